"""Who may touch a cache when: one writer per artifacts folder, readers that keep their files.

Readers hold `reading` shared from opening an index until they have read its rows; a writer
deletes segment files only while holding it exclusive, so no reader ever loses a file mid-read.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import UserError


@contextmanager
def reading(folder: Path, exclusive_: bool = False) -> Iterator[None]:
    """Readers hold this shared while they read a cache; segment deletion holds it exclusive."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fh = open(folder / ".readers", "a+")
    except OSError:  # a read-only artifacts folder: nothing can delete segments either
        yield
        return
    try:
        fcntl.flock(fh, fcntl.LOCK_EX if exclusive_ else fcntl.LOCK_SH)
        yield
    finally:
        fh.close()


@contextmanager
def no_readers(folder: Path) -> Iterator[bool]:
    """Exclusive against readers if no reader holds the cache now (True), else at once False.

    A streaming head reads for hours: the writer never waits for it; it leaves the old
    segment files and the next run deletes them.
    """
    try:
        fh = open(folder / ".readers", "a+")
    except OSError:
        yield True
        return
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        fh.close()


@contextmanager
def exclusive(folder: Path, what: str = "make features") -> Iterator[None]:
    """One writer per artifacts folder: a second one stops with a clear message."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fh = open(folder / ".lock", "a+")
    except OSError as e:
        raise UserError(
            f"cannot write to '{folder}' ({e.strerror}); make it writable or set ARTIFACTS "
            "to a writable folder"
        ) from None
    if not os.access(folder, os.W_OK):
        fh.close()
        raise UserError(
            f"cannot write to '{folder}' (read-only); make it writable or set ARTIFACTS "
            "to a writable folder"
        )
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another {what} is already writing to '{folder}'; wait for it to finish "
                "or use another ARTIFACTS folder"
            ) from None
        yield
    finally:
        fh.close()
