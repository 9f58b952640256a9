"""Pooling: what a head reads of a row under POOL=avg, max or flatten, and how wide it is.

Stored pooled vectors serve avg and max; flatten (and pooling maps read back) needs the feature
maps, which a MAPS=0 cache does not hold. Shared by the reader (`reader`) and the rows read
block by block (`rows`).
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import UserError
from pipeline.store.format import POOLINGS
from pipeline.store.manifest import Index
from pipeline.store.segments import missing_maps


def pool(block: np.ndarray, pooling: str) -> np.ndarray:
    """Pool (n, h, w, c) maps to (n, d) float32: global average, global max, or flatten."""
    if pooling == "avg":
        return block.astype(np.float32).mean(axis=(1, 2))
    if pooling == "max":
        return block.max(axis=(1, 2)).astype(np.float32)
    if pooling == "flatten":
        return block.reshape(len(block), -1).astype(np.float32)
    raise UserError(f"POOL must be one of {', '.join(POOLINGS)}; got '{pooling}'")


def f_shape(idx: Index) -> tuple[int, ...]:
    return tuple(int(v) for v in idx.attrs["feature_shape"])


def dataset_of(idx: Index, pooling: str) -> tuple[str, int]:
    """The segment dataset a pooling reads (stored pooled vectors, or the maps) and its width."""
    shape = f_shape(idx)
    if pooling in ("avg", "max"):
        return f"pooled/{pooling}", int(shape[-1])
    if not idx.attrs.get("maps", True):
        raise missing_maps("POOL=flatten")
    return "features", int(np.prod(shape))


def width(idx: Index, pooling: str) -> int:
    """How many floats a row of `idx` has under `pooling`."""
    shape = f_shape(idx)
    return int(shape[-1]) if pooling in ("avg", "max") else int(np.prod(shape))
