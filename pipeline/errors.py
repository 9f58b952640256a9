"""The exception types a user can cause; the CLI turns them into one line and an exit code."""


class UserError(Exception):
    """A problem with the user's data, settings or order of commands; the message names the fix.

    The CLI exits with `exit_code` (2)."""

    exit_code = 2


class DiskFull(UserError):
    """The disk, a quota or the file-size limit ran out while writing (ENOSPC, EDQUOT, EFBIG):
    not the user's command but the machine's room; the CLI exits with 1. What was there before
    is intact; rerunning once there is room completes the command."""

    exit_code = 1
