"""The one exception type a user can cause; the CLI turns it into one line and exit code 2."""


class UserError(Exception):
    """A problem with the user's data, settings or order of commands; the message names the fix."""
