"""Decoded batches: files (and their augmented views) to uint8 arrays, in threads, in order.

One path for `make features` and `make predict`: the same loader, resize and augmentation, with
the next batch decoding while the caller runs the backbone on the current one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline import images


class Source(Protocol):
    """What a batch item needs: a file, its content hash (seeds views) and which view."""

    @property
    def abspath(self) -> Path: ...
    @property
    def sha256(self) -> str | None: ...
    @property
    def view(self) -> int: ...


def decode(
    src: Source, size: int, augment_seed: int, check: bool = False
) -> np.ndarray | images.Unreadable:
    """The (size, size, 3) array of one item, or the reason it cannot be read.

    The reason says whether the bytes are at fault (`content`): only those are remembered.
    `check`: the bytes decoded are hashed too, and if they are not those of `src.sha256` (the
    file was rewritten since it was hashed) the answer is an `images.Changed`, never an array
    that the caller would keep under the old hash.
    """
    try:
        if check and src.sha256:
            arr, sha = images.load_image_hashed(src.abspath, size)
            if sha != src.sha256:
                return images.Changed(images.CHANGED, sha, arr)
        else:
            arr = images.load_image(src.abspath, size)
    except Exception as e:
        sha = getattr(e, "sha256", None)  # the bytes that failed: a rewrite caught half-way?
        if check and src.sha256 and sha and sha != src.sha256:
            return images.Changed(images.CHANGED, sha)  # never remembered as bad content
        return _unreadable(e)
    if src.view:
        arr = images.augment(arr, images.view_rng(augment_seed, src.sha256 or "", src.view))
    return arr


def _unreadable(e: Exception) -> images.Unreadable:
    """Why a file could not be decoded, and whether its bytes are at fault."""
    if isinstance(e, images.ImageError):
        return images.Unreadable(str(e), e.content)
    if isinstance(e, MemoryError):
        return images.Unreadable("image too large to decode in memory", False)
    # any decoder bug skips this one file; the run goes on
    return images.Unreadable(f"could not decode ({type(e).__name__}: {str(e)[:160]})", True)


def decoded_batches(
    todo: Iterable[Any],
    size: int,
    batch: int,
    workers: int,
    augment_seed: int = 0,
    wanted: Callable[[Any], bool] | None = None,
    check: bool = False,
) -> Iterator[tuple[list[Any], list[np.ndarray | str | None]]]:
    """Decoded batches in order; the next batch decodes in threads while the caller embeds.

    `todo` may be any iterable: it is read one batch ahead of the caller, as batches are
    needed. An item for which `wanted(item)` is false is not decoded: None in its place.
    `check`: see `decode` (a file rewritten since it was hashed comes back `images.Changed`).
    """
    items = iter(todo)
    with ThreadPoolExecutor(max_workers=workers) as ex:

        def submit() -> tuple[list[Any], list[Any]]:
            chunk = list(itertools.islice(items, batch))
            return chunk, [
                ex.submit(decode, j, size, augment_seed, check)
                if wanted is None or wanted(j)
                else None
                for j in chunk
            ]

        chunk, pending = submit()
        while chunk:
            current, futures = chunk, pending
            chunk, pending = submit()
            yield current, [f.result() if f is not None else None for f in futures]
