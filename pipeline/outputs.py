"""Outputs: owned by one command at a time, and written whole.

`owned`: a command holds its output (a file with what goes beside it, or a folder) for its
whole run; a second command writing the same output stops at once, in one line naming the one
that holds it, and never touches its files. `written`: a temporary file next to the output,
flushed to disk (fsync) and renamed onto it when complete: a reader sees the old file or the
new one, never half of one, and a crash never leaves an empty one under the output's name;
a failure or an interrupt leaves the old file and removes the temporary one. Every output
file is written through it but predict's CSV, which grows in a `.partial` file it can resume
(fsynced and renamed onto OUT the same way). `together`: the outputs written in its block
take their names only when all of them are complete. A full disk (or quota, or file-size
limit) is one line naming the file system (`store.disk_error`).
"""

from __future__ import annotations

import fcntl
import glob
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import store
from pipeline.errors import UserError


def a_file(path: Path, example: str) -> Path:
    """`path` when it can become a file; a folder there is one line naming a file instead."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"OUT='{path}' is a folder; name a file, e.g. OUT={path / example}")
    return path


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
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)  # unbuffered: no flush at close
    except OSError as e:
        raise store.disk_error(
            e, lock, kept="nothing was written", rerun="the same command"
        ) or UserError(f"cannot write '{path}' ({e.strerror or e}); {fix}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            said = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            holder = " ".join(said.split()) or f"{what} (pid unknown)"
            raise UserError(
                f"'{path}' is being written by another {holder}; wait for it to finish or {fix}"
            ) from None
        try:  # who holds it, for the next one's message; best effort (a full disk: unsaid)
            cmd = " ".join(" ".join(sys.argv).split())[:200]
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{what} (pid {os.getpid()}: {cmd})\n".encode(), 0)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


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
            os.replace(tmp, path)  # each fsynced when its block ended
        except OSError as e:
            for t, _ in mine[i:]:
                t.unlink(missing_ok=True)
            raise store.disk_error(e, path, **_told(path, None)) or e from None
    for folder in {path.parent for _, path in mine}:
        _sync_folder(folder)


def current(path: Path) -> Path:
    """Where `path`'s content is now for this thread: the temporary file of a `together` block
    not yet renamed onto it (the new content), else `path`."""
    for tmp, dest in reversed(getattr(_pending, "renames", None) or []):
        if dest == Path(path):
            return tmp
    return Path(path)


@contextmanager
def telling(kept: str, needed: int | None = None) -> Iterator[None]:
    """What a full disk's line says of the outputs `written` in the block that do not say it
    themselves (a run's files, written in its temporary folder: the run as it was is intact)."""
    outer = getattr(_pending, "told", None)
    _pending.told = (kept, needed)
    try:
        yield
    finally:
        _pending.told = outer


def _told(path: Path, needed: int | None, kept: str | None = None) -> dict[str, Any]:
    said_kept, said_needed = getattr(_pending, "told", None) or (None, None)
    needed = needed or said_needed
    if kept is None:
        kept = said_kept or (
            f"the old '{path.name}' is intact" if path.exists() else "nothing was written"
        )
    return {"needed": needed, "kept": kept, "rerun": "the same command"}


def _sync(path: Path) -> None:
    """`path`'s content on disk (fsync): before it takes an output's name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    """The renames in `folder` on disk; best effort (not every file system syncs a folder)."""
    try:
        _sync(folder)
    except OSError:
        pass


@contextmanager
def written(
    path: Path,
    needed: int | None = None,
    kept: str | None = None,
    suffix: str = "",
    durable: bool = True,
) -> Iterator[Path]:
    """A temporary path to write in the block; when the block ends well it is flushed to disk
    and becomes `path` (in a `together` block: when that one ends). `needed`/`kept`: what a
    full disk's line says; `suffix`: the temporary name's end, for writers that want one;
    `durable=False`: renamed without fsync (whole against a kill, not a power cut), for files
    made again from nothing, written by the thousand (the demo's images)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise store.disk_error(e, path.parent, **_told(path, needed, kept)) or e from None
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}-{os.getpid()}{suffix}")
    batch = getattr(_pending, "renames", None)
    with store.replacing(tmp, path, rename=False, **_told(path, needed, kept)):
        yield tmp
        if durable:
            _sync(tmp)
        if batch is None:
            os.replace(tmp, path)
    if batch is not None:
        batch.append((tmp, path))
    elif durable:
        _sync_folder(path.parent)


def write_text(path: Path, text: str) -> None:
    """`path.write_text(text)`, whole or not at all."""
    data = text.encode("utf-8")
    with written(path, needed=len(data)) as tmp:
        tmp.write_bytes(data)


def scratch_owner() -> str:
    """Who a scratch folder belongs to: this host and PID namespace (two containers sharing a
    host name and a folder never take each other's process ids for their own), as name-safe
    characters."""
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = 0
    return f"{host}_{ns}"


@contextmanager
def scratch(folder: Path, what: str) -> Iterator[Path]:
    """A folder for this process's large temporary files (a search's space, a race's spilled
    probabilities), named `.{what}-{owner}-{pid}-{random}` in `folder` (beside the data, where
    there is room for it) or, where `folder` cannot be written (a shared read-only cache), in
    the system's; removed at the end. Such folders left by a process of the same owner
    (`scratch_owner`: host and PID namespace) that no longer runs (killed: SIGKILL, out of
    memory) are removed first: nothing builds up."""
    owner = scratch_owner()
    for old in Path(folder).glob(f".{glob.escape(what)}-{glob.escape(owner)}-*"):
        try:
            pid = int(old.name.split("-")[2])
            os.kill(pid, 0)
        except ProcessLookupError:  # its process is gone: its files are of no use
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue  # not ours to judge (another user's process, another name)
    prefix = f".{what}-{owner}-{os.getpid()}-"
    try:
        made = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
    except OSError:
        made = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)
