"""Inner cross-validation: the folds inside a training fold, and `fit` that routes `groups`.

Every head that tunes or calibrates on its training data splits it with `InnerCV` (stratified,
group-aware: an image, its augmented views and its identical copies stay on one side), whether
the split is made by a grid search, a calibration, a Keras head's early stopping or the streaming
head (`pipeline.streaming`). Metadata routing is switched on here, so `groups` reach every one.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import sklearn
from sklearn.model_selection import BaseCrossValidator, StratifiedGroupKFold, StratifiedKFold
from sklearn.utils.metadata_routing import get_routing_for_object

from pipeline import views

sklearn.set_config(enable_metadata_routing=True)  # `groups` reach every inner split

INNER_FOLDS = 3


class InnerCV(BaseCrossValidator):
    """The folds inside a training fold: stratified, group-aware, as many as the data allows.

    Up to `n_splits` folds, fewer when a class has fewer groups in this training fold (never
    below 2); with `groups`, no content is on both sides of a split, and a test fold holds
    original images only (augmented views, marked in `groups`, train only: `pipeline.views`).
    """

    __metadata_request__split = {"groups": True}  # noqa: RUF012 (scikit-learn's convention)

    def __init__(self, n_splits: int = INNER_FOLDS, random_state: int = 0) -> None:
        self.n_splits = n_splits
        self.random_state = random_state

    def get_n_splits(self, X: Any = None, y: Any = None, groups: Any = None) -> int:
        if y is None:
            return self.n_splits
        yi = np.unique(y, return_inverse=True)[1]
        if groups is not None:  # distinct contents per class: copies never split
            yi = np.unique(np.stack([yi, views.content(groups)]), axis=1)[0]
        least = int(np.bincount(yi).min())
        return max(2, min(self.n_splits, least))

    def split(self, X: Any, y: Any = None, groups: Any = None):  # type: ignore[override]
        k = self.get_n_splits(X, y, groups)
        with warnings.catch_warnings():  # "least populated class" on tiny folds: expected
            warnings.simplefilter("ignore", UserWarning)
            if groups is None:
                cv: Any = StratifiedKFold(k, shuffle=True, random_state=self.random_state)
                yield from cv.split(X, y)
            else:
                content = views.content(groups)
                # every row its own content: the same constraint as StratifiedKFold, which is
                # linear where StratifiedGroupKFold loops over every group (seconds at 20,000)
                distinct = len(np.unique(content)) == len(content)
                cv = (StratifiedKFold if distinct else StratifiedGroupKFold)(
                    k, shuffle=True, random_state=self.random_state
                )
                orig = views.originals(groups)
                for tr, te in cv.split(X, y, content):
                    # scored on originals; a fold of views alone (a subsample) stays as it is
                    yield tr, (te[orig[te]] if orig[te].any() else te)


def consumes_groups(est: Any) -> bool:
    """Whether fitting `est` uses `groups` (a grid search, a calibration or a Keras head)."""
    return bool(get_routing_for_object(est).consumes("fit", ["groups"]))


def fit(est: Any, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> Any:
    """`est.fit`, passing `groups` where the estimator routes them to an inner split."""
    if groups is not None and consumes_groups(est):
        return est.fit(X, y, groups=groups)
    return est.fit(X, y)
