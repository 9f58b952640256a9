"""Which training rows are augmented views, told by the sign of their group.

A training row's group is its content (an image, its identical copies and its augmented views
share one). An augmented view's group is stored as `-(g + 1)`, so the one `groups` array that
metadata routing passes to every inner split (grid search, calibration, early stopping) also
says which rows are originals: those splits keep a content on one side, as before, and score
original images only, as the outer folds do.

`pair` finds each image's views in the views cache by content (NumPy sorts, no dict).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def mark(groups: np.ndarray) -> np.ndarray:
    """The groups of augmented views of images in `groups` (non-negative content groups)."""
    return -np.asarray(groups, dtype=np.int64) - 1


def content(groups: Any) -> np.ndarray:
    """Every row's content group, views and originals alike."""
    g = np.asarray(groups)
    return np.where(g < 0, -g - 1, g)


def originals(groups: Any) -> np.ndarray:
    """True for the rows that are images themselves, False for augmented views."""
    return np.asarray(groups) >= 0


BLOCK = 1 << 16  # images searched, and candidate pairs confirmed, at once: bounded temporaries


def pair(
    image_key: np.ndarray,
    view_key: np.ndarray,
    view_no: np.ndarray,
    views: int,
    same: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each image's views 1..`views` among the rows of a views cache, matched by content.

    `image_key` (one per image) and `view_key`, `view_no` (one per row of the views cache)
    sort alike and are equal for the same content. Keys that are only part of a content hash
    (its 64-bit prefix: 8 bytes a row, no texts) need `same(images, rows)`: True where image
    `images[j]` and views-cache row `rows[j]` are exactly the same content; every candidate is
    confirmed by it, BLOCK at a time, so two contents sharing a prefix are never paired (not
    even an image lacking its views with a stale view of another content). Where several rows
    hold one view of one content, the last one is taken.

    Returns (src, rows, missing): view row `rows[j]` is a view of image `src[j]` (image by
    image, views 1..`views` in order; -1 where missing); `missing`: the images lacking a view
    (sorted). NumPy sorts and searches, BLOCK images at a time: never a dict of identities.
    """
    n = len(image_key)
    chosen = np.full((n, views), -1, np.int64)
    for v in range(1, views + 1):
        cand = np.flatnonzero(np.asarray(view_no) == v)
        order = cand[np.argsort(view_key[cand], kind="stable")]  # equal keys: in row order
        del cand
        keys = view_key[order]
        for a in range(0, n, BLOCK):
            part = image_key[a : a + BLOCK]
            lo = np.searchsorted(keys, part, "left")
            count = np.searchsorted(keys, part, "right") - lo
            img = np.repeat(np.arange(a, a + len(part)), count)  # (image, candidate) pairs
            row = order[np.repeat(lo - (np.cumsum(count) - count), count) + np.arange(len(img))]
            if same is not None:
                ok = np.zeros(len(img), bool)
                for b in range(0, len(img), BLOCK):
                    ok[b : b + BLOCK] = same(img[b : b + BLOCK], row[b : b + BLOCK])
                img, row = img[ok], row[ok]
            last = np.flatnonzero(np.r_[img[1:] != img[:-1], True]) if len(img) else img
            chosen[img[last], v - 1] = row[last]  # an image's candidates ascend: its last row
    missing = np.flatnonzero((chosen < 0).any(axis=1))
    return np.repeat(np.arange(n), views), chosen.reshape(-1), missing
