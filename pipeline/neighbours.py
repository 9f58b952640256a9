"""Nearest neighbours on L2-normalised pooled features: one search for the audit and HEAD=knn.

Features are standardised (by the head's scaler) and scaled to unit length, so Euclidean
distance orders neighbours as cosine similarity does. scikit-learn's exact search
(`NearestNeighbors`, a tree or brute force as it judges) answers queries a block at a time, so
memory holds one block of distances besides the features.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors


def normalize(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32): cosine geometry in Euclidean distances."""
    X = np.asarray(X, np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


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
