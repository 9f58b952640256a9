"""HEAD=sgd: logistic regression learnt one block of rows at a time, for any number of rows.

A scikit-learn estimator like every head. `fit` takes features in memory or a `store.Rows`
(rows named in the cache, read when needed): a `StandardScaler` is fitted in one streamed pass
(`partial_fit`), the regularisation `alpha` is chosen by a grid search on group-aware inner
folds of a bounded sample of the training rows (all of them up to `tune_rows`), then an
`SGDClassifier(loss="log_loss")` (averaged SGD) makes `epochs` passes with `partial_fit` (more
on a small set: at least MIN_UPDATES rows' updates), each over the rows in a seeded shuffled
order read block by block. Memory holds one block
(about 64 MB), the sample, and a few integers per row; never the collection.

The objective is one-vs-rest logistic loss with an L2 penalty `alpha` per row. The alpha grid
follows the data: logistic regression's C grid (C_GRID) at the training set's size
(alpha = 1/(C·n)), so both heads choose among the same penalties. SGD on a few hundred rows is
far from converged after any sensible number of passes (a few hundred passes leave the weights
15 % off); where every row fits in one block (`BUFFER_BYTES`, read once anyway), the same
objective is solved to its
optimum by lbfgs (`ExactOvR`) instead, inner folds included: the figure is the objective's,
not the optimiser's. Above that, nothing changes: SGD streams.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.model_selection import GridSearchCV
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from pipeline import views
from pipeline.errors import UserError
from pipeline.inner import INNER_FOLDS, InnerCV, fit
from pipeline.store import rows as store_rows
from pipeline.store.rows import Rows

C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # logistic regression's C grid (heads.py), shared
MIN_ALPHA = 1e-4  # below this averaged SGD over-fits unstably at scale
TUNE_ROWS = 10_000  # the grid search's sample: all rows up to this, a sample of groups above
TUNE_EPOCHS = 3  # passes per candidate in the grid search (more on a small sample, see below)
MIN_UPDATES = 100_000  # small sets get more passes: at least this many rows' updates in all
PARALLEL_ROWS = 8_192  # blocks of fewer rows are learnt in one thread (see `_sgd`)


def blocks(X: Any, shuffle: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions, float32 features) about 64 MB at a time, from a `Rows` or an array."""
    if isinstance(X, Rows):
        yield from X.blocks(shuffle)
        return
    n = len(X)
    per = max(1, store_rows.BUFFER_BYTES // max(1, 4 * X.shape[1]))
    order = np.arange(n) if shuffle is None else np.random.default_rng(shuffle).permutation(n)
    for a in range(0, n, per):
        pos = order[a : a + per]
        yield pos, np.asarray(X[pos], np.float32)


def read(X: Any, rows: np.ndarray) -> np.ndarray:
    """Features of `rows` (sorted) in memory."""
    return X[rows].load() if isinstance(X, Rows) else np.asarray(X[rows], np.float32)


def tuning_sample(y: np.ndarray, groups: np.ndarray | None, limit: int, seed: int) -> np.ndarray:
    """Sorted rows of a seeded sample of whole content groups, about `limit` rows in all.

    Every row when there are at most `limit`; views come with their image; every class keeps
    at least two contents (an inner split needs them) when it has them.
    """
    n = len(y)
    if n <= limit:
        return np.arange(n)
    content = views.content(groups) if groups is not None else np.arange(n)
    uniq, inv = np.unique(content, return_inverse=True)
    prio = np.random.default_rng(seed).random(len(uniq))
    take = prio[inv] < limit / n
    for c in np.unique(y):  # the two lowest-priority contents of every class, whatever the draw
        mine = np.unique(inv[y == c])
        keep = mine[np.argsort(prio[mine])[:2]]
        take |= np.isin(inv, keep)
    return np.flatnonzero(take)


def alphas_for(rows: int) -> tuple[float, ...]:
    """The penalties logistic regression's C grid means at `rows` training rows, strongest
    first (a tie in the grid search goes to the more regularised head)."""
    return tuple(sorted({max(MIN_ALPHA, 1.0 / (c * max(1, rows))) for c in C_GRID}, reverse=True))


class ExactOvR(ClassifierMixin, BaseEstimator):
    """SGD's objective (one-vs-rest log loss, L2 `alpha` per row) solved to its optimum by
    lbfgs: what averaged SGD converges to, for sets small enough to hold."""

    def __init__(self, alpha: float = 1e-4) -> None:
        self.alpha = alpha

    def fit(self, X: np.ndarray, y: np.ndarray) -> ExactOvR:
        c = 1.0 / (self.alpha * max(1, len(y)))
        self.clf_ = OneVsRestClassifier(LogisticRegression(C=c, max_iter=2000)).fit(X, y)
        self.classes_ = self.clf_.classes_
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.clf_.predict_proba(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.clf_.predict(X)


def passes(epochs: int, rows: int, updates: int = MIN_UPDATES) -> int:
    """`epochs`, or more on a small set: at least `updates` rows' updates in all."""
    return max(epochs, -(-updates // max(1, rows)))


class StreamingSGD(ClassifierMixin, BaseEstimator):
    """Multiclass logistic regression by averaged SGD over blocks of rows (HEAD=sgd)."""

    __metadata_request__fit = {"groups": True}  # noqa: RUF012 (scikit-learn's convention)
    accepts_rows = True  # fit and predict_proba take a `store.Rows` as it is

    def __init__(
        self,
        alpha: float | None = None,
        epochs: int = 5,
        tune_rows: int = TUNE_ROWS,
        alphas: tuple[float, ...] | None = None,
        random_state: int = 0,
        solver: str = "auto",
    ) -> None:
        self.alpha = alpha
        self.epochs = epochs
        self.tune_rows = tune_rows
        self.alphas = alphas
        self.random_state = random_state
        self.solver = solver  # auto: exact where the rows fit in one block, else sgd

    def _sgd(self, alpha: float, rows: int = PARALLEL_ROWS) -> SGDClassifier:
        """One-vs-rest over the classes in threads (the GIL released) for blocks of at least
        PARALLEL_ROWS rows; below that, starting the threads costs more than the updates (the
        result is the same: each class's seed is drawn before they start)."""
        return SGDClassifier(
            loss="log_loss",
            alpha=alpha,
            average=True,
            random_state=self.random_state,
            n_jobs=os.cpu_count() if rows >= PARALLEL_ROWS else 1,
        )

    def fit(self, X: Any, y: np.ndarray, groups: np.ndarray | None = None) -> StreamingSGD:
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        self.scaler_ = StandardScaler()
        for _, block in blocks(X):  # one streamed pass
            self.scaler_.partial_fit(block)
        self.tuning_ = {"rows": len(y), "sample": len(y), "alpha": "fixed"}
        alpha = self.alpha
        if self.solver not in ("auto", "sgd", "exact"):
            raise UserError(f"PARAMS solver={self.solver}: use auto, sgd or exact")
        one_block = len(y) * 4 * X.shape[1] <= store_rows.BUFFER_BYTES
        exact = self.solver == "exact" or (self.solver == "auto" and one_block)
        if alpha is None:
            rows = tuning_sample(y, groups, self.tune_rows, self.random_state)
            inner = len(rows) * (INNER_FOLDS - 1) // INNER_FOLDS
            grid_alphas = self.alphas or alphas_for(len(y))
            sgd = (
                ExactOvR()
                if exact
                else self._sgd(grid_alphas[0]).set_params(
                    max_iter=passes(TUNE_EPOCHS, inner, MIN_UPDATES // 2), tol=None
                )
            )
            grid = GridSearchCV(  # the scaler learns inside every inner split, as for logreg
                Pipeline([("scale", StandardScaler()), ("clf", sgd)]),
                {"clf__alpha": list(grid_alphas)},
                cv=InnerCV(INNER_FOLDS, self.random_state),
                scoring="accuracy",
                refit=False,  # only the choice is needed: the head is fitted on every row next
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                fit(
                    grid,
                    read(X, rows),
                    y[rows],
                    None if groups is None else np.asarray(groups)[rows],
                )
            alpha = float(grid.best_params_["clf__alpha"])
            self.tuning_ = {"rows": len(y), "sample": len(rows), "alpha": "inner folds"}
        self.alpha_ = alpha
        if exact:  # every row in memory at once anyway: the optimum, not an approximation
            self.clf_ = ExactOvR(alpha).fit(self.scaler_.transform(read(X, np.arange(len(y)))), y)
            self.passes_ = 0
            return self
        per_block = min(len(y), max(1, store_rows.BUFFER_BYTES // max(1, 4 * X.shape[1])))
        self.clf_ = self._sgd(alpha, per_block)
        self.passes_ = passes(self.epochs, len(y))
        for epoch in range(self.passes_):
            seed = self.random_state * 1_000 + epoch
            for pos, block in blocks(X, shuffle=seed):
                self.clf_.partial_fit(self.scaler_.transform(block), y[pos], classes=self.classes_)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        out = np.empty((len(X), len(self.classes_)), np.float64)
        for pos, block in blocks(X):
            out[pos] = self.clf_.predict_proba(self.scaler_.transform(block))
        return out

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]
