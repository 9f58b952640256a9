"""Outputs: owned by one command at a time, and written whole.

`owned`: a command holds its output (a file with what goes beside it, or a folder) for its
whole run; a second command writing the same output stops at once, in one line naming the one
that holds it, and never touches its files. `written`: a temporary file next to the output,
renamed onto it when complete: a reader sees the old file or the new one, never half of one;
a failure or an interrupt leaves the old file and removes the temporary one. `together`: the
outputs written in its block take their names only when all of them are complete. A full disk
(or quota, or file-size limit) is one line naming the file system (`store.disk_error`).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import store
from pipeline.errors import UserError


def lock_path(path: Path) -> Path:
    """The lock file of the output `path`: `.<name>.lock` beside it (the real folder's)."""
    real = Path(os.path.realpath(path))
    return real.with_name(f".{real.name}.lock")


@contextmanager
def owned(
    path: Path, what: str, fix: str = "write somewhere else", wait: bool = False
) -> Iterator[None]:
    """This command's output `path` (a file and the files beside it named after it, or a
    folder) for the block: a flock on `lock_path(path)`, recording who holds it.

    Another command already holding it: a UserError at once naming it (its `what`, pid and
    command line) and `fix`; `wait=True` waits for it instead (writers taking turns).
    """
    path = Path(path)
    lock = lock_path(path)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock, "a+", encoding="utf-8")
    except OSError as e:
        raise store.disk_error(
            e, lock, kept="nothing was written", rerun="the same command"
        ) or UserError(f"cannot write '{path}' ({e.strerror or e}); {fix}") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            holder = " ".join(fh.read().split()) or f"{what} (pid unknown)"
            raise UserError(
                f"'{path}' is being written by another {holder}; wait for it to finish or {fix}"
            ) from None
        try:  # who holds it, for the message of the next one; best effort (a full disk)
            fh.seek(0)
            fh.truncate()
            cmd = " ".join(" ".join(sys.argv).split())[:200]
            fh.write(f"{what} (pid {os.getpid()}: {cmd})\n")
            fh.flush()
        except OSError:
            pass
        yield


_pending = threading.local()  # the renames of this thread's `together` block


@contextmanager
def together() -> Iterator[None]:
    """Every `written` output of the block takes its name when the block ends well, all at
    the end: a failure part-way (a full disk at the third file) leaves every old file."""
    outer = getattr(_pending, "renames", None)
    mine: list[tuple[Path, Path]] = []
    _pending.renames = mine
    try:
        yield
    except BaseException:
        for tmp, _ in mine:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _pending.renames = outer
    if outer is not None:  # nested: the outermost block renames
        outer.extend(mine)
        return
    for i, (tmp, path) in enumerate(mine):
        try:
            os.replace(tmp, path)
        except OSError as e:
            for t, _ in mine[i:]:
                t.unlink(missing_ok=True)
            raise store.disk_error(e, path, **_told(path, None)) or e from None


def current(path: Path) -> Path:
    """Where `path`'s content is now for this thread: the temporary file of a `together` block
    not yet renamed onto it (the new content), else `path`."""
    for tmp, dest in reversed(getattr(_pending, "renames", None) or []):
        if dest == Path(path):
            return tmp
    return Path(path)


def _told(path: Path, needed: int | None, kept: str | None = None) -> dict[str, Any]:
    if kept is None:
        kept = f"the old '{path.name}' is intact" if path.exists() else "nothing was written"
    return {"needed": needed, "kept": kept, "rerun": "the same command"}


@contextmanager
def written(path: Path, needed: int | None = None, kept: str | None = None) -> Iterator[Path]:
    """A temporary path to write in the block; it becomes `path` when the block ends well (in
    a `together` block: when that one does). `needed`/`kept`: what a full disk's line says."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise store.disk_error(e, path.parent, **_told(path, needed, kept)) or e from None
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}-{os.getpid()}")
    batch = getattr(_pending, "renames", None)
    with store.replacing(tmp, path, rename=batch is None, **_told(path, needed, kept)):
        yield tmp
    if batch is not None:
        batch.append((tmp, path))


def write_text(path: Path, text: str) -> None:
    """`path.write_text(text)`, whole or not at all."""
    data = text.encode("utf-8")
    with written(path, needed=len(data)) as tmp:
        tmp.write_bytes(data)
