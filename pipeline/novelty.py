"""Images unlike the training set, at predict time: a distance and a flag per image.

A predicted image's distance to the training set is its mean distance to its k nearest
training images in the audit's space (`neighbours.space`: the run's pooled features,
L2-normalised), searched among a seeded sample of at most `SAMPLE` of the run's training images
(originals) so the cost stays bounded whatever the collection's size. The flag
`unlike_training` is set above the `QUANTILE` of the sample's own out-of-fold distances (each
training image's mean distance to its k nearest *other* sampled images): about 1 % of images
like the training ones are flagged.

The sample is taken when the run is trained and saved in it (`novelty.h5`: the sampled rows in
that space as float16, about 10 MB at most, and the threshold), so predict reads that one file:
never the cache's index or its segments, whatever the collection's size, and always the images
the run was trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline import diagnose, layout, neighbours, outputs
from pipeline.store.rows import materialize

K = diagnose.K
QUANTILE = 0.99
SAMPLE = 10_000
FILE = "novelty.h5"


class Novelty:
    """`score(X)`: (distance, unlike) per row of pooled features, against `ref` (rows already
    in `neighbours.space`) and its `threshold`. `fit` makes one from training features."""

    def __init__(self, ref: np.ndarray, threshold: float, k: int = K, quantile: float = QUANTILE):
        self.ref, self.threshold, self.quantile = ref, float(threshold), quantile
        self.k = max(1, min(k, len(ref) - 1))

    @classmethod
    def fit(cls, train: np.ndarray, k: int = K, quantile: float = QUANTILE) -> Novelty:
        ref = neighbours.space(train).astype(np.float16).astype(np.float32)  # as saved
        k = max(1, min(k, len(ref) - 1))
        own, _ = neighbours.neighbours(ref, k)
        return cls(ref, float(np.quantile(own.mean(axis=1), quantile)), k, quantile)

    def score(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d, _ = neighbours.neighbours(self.ref, self.k, neighbours.space(X))
        dist = d.mean(axis=1)
        return dist, dist > self.threshold

    def save(self, folder: Path) -> Path:
        """`novelty.h5` in a run's folder: the reference (float16) and its threshold."""
        path = folder / FILE
        with outputs.written(path) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset(
                "reference", data=self.ref.astype(np.float16), fletcher32=True, track_times=False
            )
            f.attrs.update({"k": self.k, "quantile": self.quantile, "threshold": self.threshold})
        return path


def sample(X: Any, original: np.ndarray, seed: int = 0) -> Novelty | None:
    """The reference of a training set's features `X` (an array, or `store.Rows` read here):
    a seeded sample of at most `SAMPLE` of its originals (`original`); None under two. On a
    cluster it runs on a worker (the client reads no feature row)."""
    rows = np.flatnonzero(original)
    if len(rows) < 2:
        return None
    pick = np.sort(np.random.default_rng(seed).choice(rows, min(len(rows), SAMPLE), False))
    return Novelty.fit(np.asarray(materialize(X[pick]), np.float32))


def of_run(
    artifacts: Path, r: dict[str, Any], seed: int = 0, log: Callable[[str], None] = print
) -> Novelty | None:
    """The run's reference, from its folder (None, said once, for a run saved without one)."""
    path = layout.heads_dir(artifacts) / r["run"] / FILE
    if not path.is_file():
        log(
            f"distance to training: not measured (run '{r['run']}' was saved without its "
            "training sample; rerun `make train-head` to measure it)"
        )
        return None
    with h5py.File(path, "r") as f:
        ref, a = f["reference"][...].astype(np.float32), dict(f.attrs)
    return Novelty(ref, float(a["threshold"]), int(a["k"]), float(a["quantile"]))
