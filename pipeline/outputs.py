"""Outputs written whole: a temporary file next to the output, renamed onto it when complete.

A reader (or a second command writing the same file) sees the old file or the new one, never
half of one; a failure or an interrupt leaves the old file and removes the temporary one, and
a full disk or an unwritable folder is one clear line (`store.replacing`).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline import store


@contextmanager
def written(path: Path) -> Iterator[Path]:
    """A temporary path to write in the block; it becomes `path` when the block ends well."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}-{os.getpid()}")
    with store.replacing(tmp, path):
        yield tmp


def write_text(path: Path, text: str) -> None:
    """`path.write_text(text)`, whole or not at all."""
    with written(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
