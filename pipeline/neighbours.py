"""Nearest neighbours on L2-normalised pooled features: one search for the audit and HEAD=knn.

Features are standardised (by the head's scaler) and scaled to unit length, so Euclidean
distance orders neighbours as cosine similarity does. scikit-learn's exact search
(`NearestNeighbors`, a tree or brute force as it judges) answers queries a block at a time, so
memory holds one block of distances besides the features.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors


def normalize(X: np.ndarray, block: int = 65_536) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32): cosine geometry in Euclidean distances. Rows of
    unit length (or zero) already (the audit's space, maybe a file: `space_of`) are returned
    as they are, checked a block at a time (no copy)."""
    X = np.asarray(X, np.float32)
    unit = all(  # zero rows (no signature) count as ready: a space never copies for them
        np.all((np.abs(nrm - 1) < 1e-4) | (nrm == 0))
        for nrm in (np.linalg.norm(X[a : a + block], axis=1) for a in range(0, len(X), block))
    )
    if unit:
        return X
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


EXACT_UP_TO = 50_000  # rows searched exactly; above, `approximate` (recall in `make bench`)
PROJECT_ABOVE = 1024  # wider features are projected to PROJECTED dimensions first
PROJECTED = 512


def space(X: np.ndarray, seed: int = 0) -> np.ndarray:
    """The audit's space: pooled features, L2-normalised (cosine geometry), float32; features
    wider than PROJECT_ABOVE (a flattened map) first randomly projected to PROJECTED dimensions
    (Johnson-Lindenstrauss: distances kept within a few per cent), seeded, so memory and time
    follow the rows."""
    X = np.asarray(X, np.float32)
    if X.shape[1] > PROJECT_ABOVE:
        R = _projection(X.shape[1], seed)
        X = np.concatenate([normalize(X[a : a + 8192]) @ R for a in range(0, len(X), 8192)])
    return normalize(X)


@functools.lru_cache(maxsize=2)
def _projection(dim: int, seed: int) -> np.ndarray:
    """The seeded projection of `dim`-wide features (made once per width and seed)."""
    return np.random.default_rng(seed).standard_normal((dim, PROJECTED), dtype=np.float32)


IN_MEMORY_UP_TO = 1 << 30  # bytes of the space held in memory; above, a file (`space_of`)


def _feature_blocks(part: Any, block: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions, features) of an array, or of a `store.Rows` in the order its files hold
    them (each segment read once over the pass)."""
    if hasattr(part, "file_order_blocks"):
        yield from part.file_order_blocks()
        return
    for a in range(0, len(part), block):
        yield np.arange(a, min(len(part), a + block)), part[a : a + block]


def allocate(n: int, d: int, folder: Path) -> np.ndarray:
    """An (n, d) float32 array: in memory up to IN_MEMORY_UP_TO bytes, else a memory-mapped
    file in `folder` (`space-*.npy`; the caller removes the folder)."""
    if n * d * 4 <= IN_MEMORY_UP_TO:
        return np.empty((n, d), np.float32)
    file = Path(folder) / f"space-{secrets.token_hex(4)}.npy"
    return np.lib.format.open_memmap(file, "w+", np.float32, (n, d))


def space_of(parts: Sequence[Any], folder: Path, seed: int = 0) -> np.ndarray:
    """`space` of the rows of `parts` (arrays, or `store.Rows` read a block at a time), one
    after the other, in memory or in a file (`allocate`): what is held stays bounded."""
    n = sum(len(p) for p in parts)
    width = int(parts[0].shape[1]) if parts else 0
    out = allocate(n, PROJECTED if width > PROJECT_ABOVE else width, folder)
    at = 0
    for p in parts:
        for pos, X in _feature_blocks(p):
            out[at + pos] = space(X, seed)
        at += len(p)
    return out


def search(
    X: np.ndarray,
    k: int,
    query: np.ndarray | None = None,
    seed: int = 0,
    exact_up_to: int = EXACT_UP_TO,
) -> tuple[np.ndarray, np.ndarray]:
    """`neighbours` up to `exact_up_to` rows of X, `approximate` above: what the audit and
    `make predict` call. Rows are taken as they are (already in `space`)."""
    if len(X) <= exact_up_to:
        return neighbours(X, k, query)
    return approximate(X, k, query, seed=seed)


def approximate(
    X: np.ndarray,
    k: int,
    query: np.ndarray | None = None,
    seed: int = 0,
    probes: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate k nearest neighbours by blocks of exact search (an inverted file, as faiss'
    IVF-Flat): rows grouped around about 4 sqrt(n) k-means centres (a few passes over a seeded
    sample), each query compared exactly with the rows of its `probes` nearest groups, group
    by group (one block of distances at a time: the queries probing a group x its rows). Cost
    about n * probes * n / groups * d. Recall@10 against exact search: `make bench`."""
    from sklearn.cluster import MiniBatchKMeans

    base = normalize(X)
    own = query is None
    q = base if own else normalize(query)
    n = len(base)
    groups = max(1, min(n // 16, int(4 * np.sqrt(n))))
    rng = np.random.default_rng(seed)
    fit_on = base[np.sort(rng.choice(n, min(n, groups * 16), replace=False))]
    km = MiniBatchKMeans(
        groups, init="random", random_state=seed, n_init=1, batch_size=4096, max_iter=5
    )
    centres = km.fit(fit_on).cluster_centers_.astype(np.float32)
    member = _nearest(base, centres, 1)[:, 0]
    order = np.argsort(member, kind="stable")
    starts = np.searchsorted(member[order], np.arange(groups + 1))
    m = min(probes, groups)
    probe = _nearest(q, centres, m)
    pairs_g = probe.ravel()
    by_group = np.argsort(pairs_g, kind="stable")
    asks = np.searchsorted(pairs_g[by_group], np.arange(groups + 1))
    kk = min(k, n - (1 if own else 0))
    best_d = np.full((len(q), kk), np.inf, np.float32)
    best_i = np.full((len(q), kk), -1, np.int32 if n < 2**31 else np.int64)
    for g in range(groups):
        rows = order[starts[g] : starts[g + 1]]
        asking = by_group[asks[g] : asks[g + 1]] // m  # the queries that probe group g
        if len(rows) == 0 or len(asking) == 0:
            continue
        step = max(1, BLOCK // len(rows))  # a block of distances: at most BLOCK of them
        for a in range(0, len(asking), step):
            _merge(q, base, rows, asking[a : a + step], own, kk, best_d, best_i)
    srt = np.argsort(best_d, axis=1, kind="stable")
    return np.take_along_axis(best_d, srt, 1), np.take_along_axis(best_i, srt, 1)


BLOCK = 1 << 22  # distances held at once by the approximate search (16 MiB of float32)


def _merge(
    q: np.ndarray,
    base: np.ndarray,
    rows: np.ndarray,
    who: np.ndarray,
    own: bool,
    kk: int,
    best_d: np.ndarray,
    best_i: np.ndarray,
) -> None:
    """Queries `who` against `rows` exactly, merged into their best kk so far (in place)."""
    sim = q[who] @ base[rows].T
    if own:  # never itself
        sim[rows[None, :] == who[:, None]] = -np.inf
    d = np.sqrt(np.maximum(2.0 - 2.0 * sim, 0.0))
    cand_d = np.concatenate([best_d[who], d], axis=1)
    cand_i = np.concatenate([best_i[who], np.broadcast_to(rows, d.shape)], axis=1)
    if cand_d.shape[1] > kk:
        top = np.argpartition(cand_d, kk - 1, axis=1)[:, :kk]
        cand_d = np.take_along_axis(cand_d, top, 1)
        cand_i = np.take_along_axis(cand_i, top, 1)
    best_d[who], best_i[who] = cand_d, cand_i


def _nearest(q: np.ndarray, centres: np.ndarray, m: int, step: int = 4096) -> np.ndarray:
    """The m centres nearest each row of q (unit rows: largest dot products), `step` rows at a
    time (one block of similarities in memory: step x centres), as an int32 copy."""
    if m >= len(centres):
        return np.tile(np.arange(len(centres), dtype=np.int32), (len(q), 1))
    half = 0.5 * (centres * centres).sum(axis=1)[None, :]
    out = np.empty((len(q), m), np.int32)
    for a in range(0, len(q), step):
        sim = q[a : a + step] @ centres.T - half
        out[a : a + step] = np.argpartition(-sim, m - 1, axis=1)[:, :m]
    return out


def recall_at(approx: np.ndarray, exact: np.ndarray) -> float:
    """The share of the exact k nearest neighbours that the approximate search found."""
    hits = sum(len(np.intersect1d(a, e)) for a, e in zip(approx, exact, strict=True))
    return hits / exact.size if exact.size else 1.0


def neighbours(
    X: np.ndarray, k: int, query: np.ndarray | None = None, block: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices) of the k nearest rows of normalised X for every query row (X's own
    rows, each without itself, when `query` is None), in blocks of `block` queries."""
    base = normalize(X)
    own = query is None
    q = base if own else normalize(query)
    kk = min(k + (1 if own else 0), len(base))
    nn = NearestNeighbors(n_neighbors=kk).fit(base)
    dist = np.empty((len(q), kk - (1 if own else 0)), np.float32)
    idx = np.empty(dist.shape, np.int64)
    for a in range(0, len(q), block):
        d, i = nn.kneighbors(q[a : a + block])
        if own:  # drop each row itself (an exact copy may come first: drop by index)
            rows = np.arange(a, a + len(d))[:, None]
            keep = i != rows
            over = keep.sum(axis=1) > kk - 1  # itself not among them: drop the farthest
            keep[over, -1] = False
            d = d[keep].reshape(len(d), kk - 1)
            i = i[keep].reshape(len(i), kk - 1)
        dist[a : a + len(d)], idx[a : a + len(d)] = d, i
    return dist, idx


class KNNHead(ClassifierMixin, BaseEstimator):
    """k nearest neighbours on normalised rows (HEAD=knn): no training pass; `n_neighbors`
    and `weights` tuned like every head's hyperparameters. k above the rows it is fitted on
    (an inner split of a small class) is cut to them, never an error."""

    def __init__(self, n_neighbors: int = 5, weights: str = "distance") -> None:
        self.n_neighbors = n_neighbors
        self.weights = weights

    def fit(self, X: np.ndarray, y: np.ndarray) -> KNNHead:
        k = max(1, min(int(self.n_neighbors), len(y)))
        self.knn_ = KNeighborsClassifier(n_neighbors=k, weights=self.weights)
        self.knn_.fit(normalize(X), y)
        self.classes_ = self.knn_.classes_
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.knn_.predict_proba(normalize(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]
