"""Segments that cannot be read: damaged for good, missing, or maybe passing.

A failed open or read of a segment is classified (`segment_error`): damaged for good
(truncated, a checksum, not HDF5, a column missing, permission denied) or missing
(`SegmentDamaged`: `make features` moves it into `damaged/` and embeds its rows again, only
those), or maybe passing (an I/O error: `SegmentUnreadable`, nothing changed). A reader that
finds one notes it (`NOTED`) for the next `make features`, which then reads that segment whole.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from pipeline.errors import UserError
from pipeline.store.format import CacheError, open_files_error, too_many_open_files

DAMAGED_DIR = "damaged"  # in a cache's segment folder: the segments set aside, kept for a look


NOTED = ".damaged-seen"  # in a cache's segment folder: segments a reader found damaged


PASSING = {
    errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.ENOMEM,
    errno.EBUSY, errno.ENOLCK, errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTUNREACH,
    errno.ENETDOWN, errno.ENETUNREACH, errno.ENOTCONN,
}  # fmt: skip


def cache_name(path: Path) -> str:
    """The index file a segment belongs to (`<cache>.shards/g*.h5` -> `<cache>.h5`)."""
    return Path(path).parent.name.removesuffix(".shards") + ".h5"


class SegmentDamaged(CacheError):
    """A segment lost for good: damaged (truncated, a checksum that does not match, not HDF5, a
    column missing), unreadable to this user, or missing. `make features` sets it aside and
    embeds its rows again (only those); a reader stops, naming it."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(
            f"segment '{self.path.name}' of the feature cache '{cache_name(self.path)}' is "
            f"damaged ({reason}); run `make features`: it sets the file aside and embeds that "
            "segment's images again (only those)"
        )


class SegmentMissing(SegmentDamaged):
    """A segment an index names is not on disk."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        CacheError.__init__(
            self,
            f"feature cache points at a missing segment file '{path.name}' in "
            f"'{path.parent.name}'; rerun `make features` (it embeds the missing rows again)",
        )
        self.path, self.reason = path, "missing"


class SegmentUnreadable(CacheError):
    """A segment that exists but cannot be read now (maybe passing: a network filesystem)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message  # the error alone, for a warning of one line


def _errno_of(e: BaseException) -> int | None:
    code = getattr(e, "errno", None)
    if code:
        return int(code)
    m = re.search(r"errno = (\d+)", str(e))
    return int(m.group(1)) if m else None


def cause_of(e: BaseException) -> tuple[str, bool]:
    """What a failed open or read of a segment says, in a few words, and whether the file is
    at fault (True: damaged for good) rather than the moment (False: maybe passing)."""
    text = " ".join(str(e).split())
    low = text.lower()
    code = _errno_of(e)
    if code in (errno.EACCES, errno.EPERM) or "permission denied" in low:
        return "Permission denied", True
    if isinstance(e, (KeyError, ValueError, IndexError)):
        return text.strip("'\"")[:160] or type(e).__name__, True
    m = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", low)
    if m:
        return f"truncated: {m.group(1)} of its {m.group(2)} bytes are on disk", True
    if "truncated" in low:
        return "truncated", True
    if "checksum" in low or "filter returned failure" in low or "data error detected" in low:
        return "a checksum does not match: its bytes changed on disk", True
    if "file signature not found" in low:
        return "not an HDF5 file (no HDF5 signature)", True
    if code in PASSING or any(w in low for w in ("input/output error", "stale", "timed out")):
        return text[:160], False
    if code is not None:
        return text[:160], False  # another error of the system: it may pass
    # HDF5's own errors (no errno): the file's structure is at fault
    inner = re.search(r"\(([^()]*)\)", text)
    return (inner.group(1) if inner else text)[:160], True


def note_damaged(path: Path) -> None:
    """Remember that a reader found segment `path` damaged, for the next `make features` (it
    then reads that segment whole and sets it aside): best effort, a reader may not write."""
    try:
        with open(Path(path).parent / NOTED, "a", encoding="utf-8") as fh:
            fh.write(Path(path).name + "\n")
    except OSError:
        pass


def noted_damaged(folder: Path) -> set[str]:
    """The segments readers found damaged since the last `make features` (`note_damaged`)."""
    try:
        return set((Path(folder) / NOTED).read_text(encoding="utf-8").split())
    except OSError:
        return set()


def segment_error(path: Path, e: BaseException) -> UserError:
    """The error of a failed open or read of segment `path`: the open-file limit, damaged for
    good (`SegmentDamaged`, remembered for the next `make features`) or maybe passing."""
    path = Path(path)
    if isinstance(e, FileNotFoundError) or not path.exists():
        return SegmentMissing(path)
    if too_many_open_files(e):
        return open_files_error(path)
    why, damaged = cause_of(e)
    if damaged:
        note_damaged(path)
        return SegmentDamaged(path, why)
    return SegmentUnreadable(
        f"segment '{path}' of the cache cannot be read ({why}); nothing was changed: rerun "
        "when this passes (a network filesystem; a disk error stays: the system log, `dmesg`, "
        "says which)",
        why,
    )


def put_aside(folder: Path, name: str) -> tuple[str, bool]:
    """Move damaged segment `name` out of the live ones of `folder`, into `damaged/` (kept for
    a look, never read again): where it went, in words, and whether it is out of the way (False:
    it could not be moved, and stays where it is)."""
    aside = folder / DAMAGED_DIR
    try:
        aside.mkdir(exist_ok=True)
        os.replace(folder / name, aside / name)
    except FileNotFoundError:
        return "gone since", True
    except OSError as e:
        return f"it could not be moved aside ({e.strerror or e}), it is kept, unused", False
    return f"set aside in '{folder.name}/{DAMAGED_DIR}/'", True
