"""Decoded batches: files (and their augmented views) to uint8 arrays, in threads, in order.

One path for `make features` and `make predict`: the same loader, resize and augmentation, with
the next batch decoding while the caller runs the backbone on the current one.
"""

from __future__ import annotations

from collections.abc import Iterator
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


def decode(src: Source, size: int, augment_seed: int) -> np.ndarray | images.Unreadable:
    """The (size, size, 3) array of one item, or the reason it cannot be read.

    The reason says whether the bytes are at fault (`content`): only those are remembered.
    """
    try:
        arr = images.load_image(src.abspath, size)
    except images.ImageError as e:
        return images.Unreadable(str(e), e.content)
    except MemoryError:
        return images.Unreadable("image too large to decode in memory", False)
    except Exception as e:  # any decoder bug skips this one file; the run goes on
        return images.Unreadable(f"could not decode ({type(e).__name__}: {str(e)[:160]})", True)
    if src.view:
        arr = images.augment(arr, images.view_rng(augment_seed, src.sha256 or "", src.view))
    return arr


def decoded_batches(
    todo: list[Any], size: int, batch: int, workers: int, augment_seed: int = 0
) -> Iterator[tuple[list[Any], list[np.ndarray | str]]]:
    """Decoded batches in order; the next batch decodes in threads while the caller embeds."""
    with ThreadPoolExecutor(max_workers=workers) as ex:
        chunks = [todo[i : i + batch] for i in range(0, len(todo), batch)]

        def submit(chunk: list[Any]) -> list[Any]:
            return [ex.submit(decode, j, size, augment_seed) for j in chunk]

        pending = submit(chunks[0]) if chunks else []
        for k, chunk in enumerate(chunks):
            current = pending
            if k + 1 < len(chunks):
                pending = submit(chunks[k + 1])
            yield chunk, [f.result() for f in current]
