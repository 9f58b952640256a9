"""The reader of the embedding stage (`pipeline.embedding`): files (and their augmented views) to
uint8 arrays, in threads, in order.

One path for `make features`, `make predict` and the Dask workers: the same loader, resize and
augmentation, and one decoder check. The views of one file in a batch are drawn from one
decoding of it, and the next batch decodes while the caller runs the backbone on the current one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline import images

Decoded = np.ndarray | images.Unreadable


class Source(Protocol):
    """What a batch item needs: a file, its content hash (seeds views) and which view."""

    @property
    def abspath(self) -> Path: ...
    @property
    def sha256(self) -> str | None: ...
    @property
    def view(self) -> int: ...


@dataclass(frozen=True)
class _Image:
    """The file itself (view 0), whatever view a job asks for: its views are drawn from it."""

    abspath: Path
    sha256: str | None
    view: int = 0


def decode(src: Source, size: int, augment_seed: int, check: bool = False) -> Decoded:
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


def decode_views(jobs: Sequence[Source], size: int, augment_seed: int) -> list[Decoded]:
    """The arrays of `jobs`, views of one file (one path, one hash): the file decoded once,
    checked (see `decode`), each view drawn from it; or its reason, for every view."""
    first = decode(_Image(jobs[0].abspath, jobs[0].sha256), size, augment_seed, check=True)
    if isinstance(first, str):
        return [first] * len(jobs)
    return [
        first
        if not j.view
        else images.augment(first, images.view_rng(augment_seed, j.sha256 or "", j.view))
        for j in jobs
    ]


def decode_batch(
    jobs: Sequence[Source], size: int, augment_seed: int, ex: Executor
) -> Callable[[], list[Decoded]]:
    """Start decoding a batch in `ex`, a task per file; the call returned waits for it and gives
    each job's array or reason, in the batch's order."""
    files: dict[tuple[Path, str | None], list[int]] = {}
    for n, j in enumerate(jobs):
        files.setdefault((j.abspath, j.sha256), []).append(n)
    tasks = [
        (where, ex.submit(decode_views, [jobs[n] for n in where], size, augment_seed))
        for where in files.values()
    ]

    def result() -> list[Decoded]:
        out: list[Any] = [None] * len(jobs)
        for where, task in tasks:
            for n, d in zip(where, task.result(), strict=True):
                out[n] = d
        return out

    return result


def decoded_batches(
    batches: Iterable[Sequence[Source]], size: int, workers: int, augment_seed: int = 0
) -> Iterator[tuple[list[Any], list[Decoded]]]:
    """Each batch with its arrays or reasons (`decode_batch`), in order; the next batch is taken
    from `batches` and decodes in threads while the caller embeds this one."""
    it = iter(batches)
    with ThreadPoolExecutor(max_workers=workers) as ex:

        def submit() -> tuple[list[Any], Callable[[], list[Decoded]]] | None:
            chunk = next(it, None)
            if chunk is None:
                return None
            chunk = list(chunk)
            return chunk, decode_batch(chunk, size, augment_seed, ex)

        ahead = submit()
        while ahead is not None:
            chunk, result = ahead
            ahead = submit()
            yield chunk, result()
