"""Evaluation: stratified k-fold cross-validation with everything fitted inside the folds.

One path for every head: per-fold accuracy, mean and spread, out-of-fold predictions for the
confusion matrix, and the hyperparameters each fold chose. Folds run in parallel with joblib
when the head allows. With `groups` (augmented views of one image), folds never split a group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from pipeline.errors import UserError
from pipeline.heads import Factory, chosen_params

Log = Callable[[str], None]


def choose_folds(y: np.ndarray, classes: list[str], folds: int, log: Log) -> int:
    """Fewer folds than asked when a class is small (with a warning); an error below two images."""
    if folds < 2:
        raise UserError(f"FOLDS must be at least 2; got {folds}")
    counts = np.bincount(y, minlength=len(classes))
    present = [c for c, n in zip(classes, counts, strict=True) if n > 0]
    if len(present) < 2:
        raise UserError(
            f"the training images cover {len(present)} class(es); a classifier needs at least two"
        )
    small = [(c, int(n)) for c, n in zip(classes, counts, strict=True) if 0 < n < 2]
    if small:
        c, n = small[0]
        raise UserError(
            f"class '{c}' has {n} readable training image; cross-validation needs at least 2 "
            "per class: add images to it or remove its folder"
        )
    least = int(counts[counts > 0].min())
    if least < folds:
        c = classes[int(np.where(counts == least)[0][0])]
        log(
            f"warning: class '{c}' has only {least} training images; using {least} folds "
            f"instead of {folds}"
        )
        return least
    return folds


def _fit_fold(make: Factory, X: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray):
    est = make(y[tr]).fit(X[tr], y[tr])
    return te, est.predict(X[te]), chosen_params(est)


def cross_validate(
    make: Factory,
    X: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    folds: int,
    seed: int,
    n_jobs: int = 1,
    groups: np.ndarray | None = None,
    evaluate_mask: np.ndarray | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Outer stratified k-fold CV; `evaluate_mask` limits scoring to some rows (original images)."""
    k = choose_folds(y if evaluate_mask is None else y[evaluate_mask], classes, folds, log)
    if groups is None:
        splits = list(StratifiedKFold(k, shuffle=True, random_state=seed).split(X, y))
    else:
        splits = list(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(X, y, groups))
    out = Parallel(n_jobs=n_jobs)(delayed(_fit_fold)(make, X, y, tr, te) for tr, te in splits)
    oof = np.full(len(y), -1, dtype=np.int64)
    fold_acc, fold_params = [], []
    for te, pred, params in out:
        if evaluate_mask is not None:
            keep = evaluate_mask[te]
            te, pred = te[keep], pred[keep]
        oof[te] = pred
        fold_acc.append(float(np.mean(pred == y[te])))
        fold_params.append(params)
    scored = oof >= 0
    return {
        "folds": k,
        "fold_accuracies": fold_acc,
        "accuracy_mean": float(np.mean(fold_acc)),
        "accuracy_std": float(np.std(fold_acc)),
        "fold_params": fold_params,
        "oof_pred": oof[scored].tolist(),
        **metrics(y[scored], oof[scored], classes),
    }


def metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, confusion matrix (rows: true class) and per-class precision/recall/F1/support."""
    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else None,
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "per_class": [
            {
                "class": c,
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(s[i]),
            }
            for i, c in enumerate(classes)
        ],
    }
