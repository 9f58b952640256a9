"""Images unlike the training set, at predict time: a distance and a flag per image.

A predicted image's distance to the training set is its mean distance to its k nearest
training images in the audit's space (`neighbours.space`: the run's pooled features,
L2-normalised), searched among a seeded sample of at most `SAMPLE` training images so the cost
stays bounded whatever the collection's size. The flag `unlike_training` is set above the
`QUANTILE` of the sample's own out-of-fold distances (each training image's mean distance to
its k nearest *other* sampled images): about 1 % of images like the training ones are flagged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import diagnose, layout, neighbours, store
from pipeline.store.damage import SegmentDamaged
from pipeline.store.rows import materialize
from pipeline.train import load

K = diagnose.K
QUANTILE = 0.99
SAMPLE = 10_000


class Novelty:
    """`score(X)`: (distance, unlike) per row of pooled features."""

    def __init__(self, train: np.ndarray, k: int = K, quantile: float = QUANTILE) -> None:
        self.ref = neighbours.space(train)
        self.k = max(1, min(k, len(self.ref) - 1))
        own, _ = neighbours.neighbours(self.ref, self.k)
        self.threshold = float(np.quantile(own.mean(axis=1), quantile))
        self.quantile = quantile

    def score(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d, _ = neighbours.neighbours(self.ref, self.k, neighbours.space(X))
        dist = d.mean(axis=1)
        return dist, dist > self.threshold


def of_run(
    artifacts: Path, r: dict[str, Any], seed: int = 0, log: Callable[[str], None] = print
) -> Novelty | None:
    """The run's reference: a seeded sample of its cache's training images (None, said once,
    when the cache is gone or holds fewer than two of them)."""
    cache = layout.cache_by_name(artifacts, r["features"]["file"])
    if not cache.is_file():
        log(f"distance to training: not measured (the run's cache '{cache.name}' is gone)")
        return None
    with store.reading(cache.parent):
        data = load(cache, r["pooling"], lazy=True)
        if data.index.attrs.get("data_id") != r["features"]["data_id"]:
            log(
                f"distance to training: not measured (the cache '{cache.name}' now holds other "
                f"images than run '{r['run']}' was trained on; rerun `make train-head`)"
            )
            return None
        ts = data.train
        n = len(ts.y)
        if n < 2:
            return None
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(n, min(n, SAMPLE), replace=False))
        rows = ts.X[pick]
        for _ in range(8):  # a damaged segment costs its rows here (the lookup names it)
            try:
                X = materialize(rows)
                break
            except SegmentDamaged as e:
                rows = rows[~_in_segment(rows, e.path.name)]
        else:
            return None
    return Novelty(X) if len(X) >= 2 else None


def _in_segment(rows: Any, name: str) -> np.ndarray:
    """Which of `rows` (`store.Rows`) live in the segment file `name`."""
    hit = np.zeros(len(rows.row), bool)
    for p, part in enumerate(rows.parts):
        if name in part.names:
            hit |= (rows.part == p) & (rows.seg == part.names.index(name))
    return hit
