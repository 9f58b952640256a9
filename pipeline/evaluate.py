"""Evaluation: stratified, group-aware k-fold cross-validation, everything fitted inside the folds.

One path for every head. The outer folds are drawn on the original images only, by content
group (an image's augmented views and its identical copies share its group and its fold), from
the labels, the groups and the seed alone: every run on the same cache and seed is scored on the
same folds, with or without views, so runs can be compared fold by fold. The estimator is the
configured head itself, fitted per fold with `groups` routed to its inner splits (metadata
routing); folds run in parallel through joblib (Dask with CLUSTER), with progress as they end;
scores are on original images only.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.utils.parallel import Parallel, delayed

from pipeline import views
from pipeline.errors import UserError
from pipeline.heads import chosen_params
from pipeline.inner import fit
from pipeline.oof import OOF, resumed
from pipeline.progress import Progress
from pipeline.store.reader import texts
from pipeline.store.rows import materialize

Log = Callable[[str], None]


@dataclass
class TrainSet:
    """Rows to learn from: originals (and views), each row's content group, which are originals."""

    X: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    original: np.ndarray  # bool per row: an image itself (scored), not an augmented view
    sha256: Any  # per row: a list, or a column read when asked (`store.reader.ColumnOf`)
    paths: Any = None  # per row (the same kinds), for the report's gallery of mistakes


def _sortable(sha256: Any) -> np.ndarray:
    """Content hashes as an array that sorts and groups like them: their 64-bit prefixes
    (8 bytes a row) when equal prefixes mean equal hashes (real SHA-256s: but for odds of
    about n^2 / 2^65), else the full hashes. A `ColumnOf` brings its prefixes and reads only
    the rows whose prefixes tie; an array is used as it is when it is not text. A column with
    views (`store.reader.WithViews`) sorts as its images do: a view repeats its image's key."""
    from pipeline.store.format import prefix64

    if (src := getattr(sha256, "src", None)) is not None:  # views: no tie to confirm
        own = _sortable(sha256.base)
        return np.concatenate([own, own[src]])
    prefix = getattr(sha256, "prefix", None)
    keys = None if prefix is not None else np.asarray(sha256)
    if keys is not None:
        if keys.dtype.kind == "U":
            keys = np.char.encode(keys, "utf-8")
        if keys.dtype.kind != "S" or not len(keys) or keys.dtype.itemsize < 16:
            return keys
        prefix = prefix64(keys)
    o = np.argsort(prefix, kind="stable")
    tie = np.flatnonzero(prefix[o][1:] == prefix[o][:-1])  # the same content, or not?
    if len(tie):
        a, b = o[tie], o[tie + 1]
        if keys is None:
            full = np.asarray(sha256.take(np.concatenate([a, b]))).astype("S")
            differ = (full[: len(a)] != full[len(a) :]).any()
        else:
            differ = (keys[a] != keys[b]).any()
        if differ:  # two contents share a prefix (not real SHA-256s): the full hashes
            return keys if keys is not None else np.asarray(sha256.take(np.arange(len(o))), "S")
    return prefix


def groups_of(sha256: Any) -> np.ndarray:
    """One integer group per distinct content hash, numbered in order of first appearance."""
    keys = _sortable(sha256)
    if not len(keys):
        return np.zeros(0, np.int64)
    _, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inv.reshape(-1)]


def distinct_per_class(y: np.ndarray, groups: np.ndarray | None, n: int) -> np.ndarray:
    """How many distinct contents (groups) each class has: what folds can be built from."""
    if groups is None:
        return np.bincount(y, minlength=n)
    pairs = np.unique(np.stack([y, groups]), axis=1)
    return np.bincount(pairs[0], minlength=n)


def choose_folds(
    y: np.ndarray,
    classes: list[str],
    folds: int,
    log: Log,
    groups: np.ndarray | None = None,
) -> int:
    """Fewer folds than asked when a class is small (with a warning); an error below two images.

    A class counts its distinct contents: identical copies always share a fold.
    """
    if folds < 2:
        raise UserError(f"FOLDS must be at least 2; got {folds}")
    counts = distinct_per_class(y, groups, len(classes))
    present = [c for c, n in zip(classes, counts, strict=True) if n > 0]
    if len(present) < 2:
        raise UserError(
            f"the training images cover {len(present)} class(es); a classifier needs at least two"
        )
    small = [(c, int(n)) for c, n in zip(classes, counts, strict=True) if 0 < n < 2]
    if small:
        c, n = small[0]
        raise UserError(
            f"class '{c}' has {n} readable training image (distinct contents); "
            "cross-validation needs at least 2 per class: add images to it or remove its folder"
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


DEFAULT_FOLDS = 5


def holdout_above() -> int:
    """Training images above which the default evaluation is one held-out split.

    At 200,000 images a 1/5 held-out split scores 40,000 of them: its 95 % interval is about
    +-0.3 points, while k-fold would cost k fits of hours each. PIPELINE_HOLDOUT_ABOVE sets it.
    """
    import os

    return int(os.environ.get("PIPELINE_HOLDOUT_ABOVE", 200_000))


def protocol(n_train: int, folds: int | None) -> dict[str, Any]:
    """Which evaluation makes the number, and why: k-fold where affordable or asked (FOLDS),
    else one group-aware held-out split of the training images."""
    limit = holdout_above()
    if folds is not None:
        return {
            "holdout": False,
            "folds": folds,
            "asked": folds,
            "reason": f"{folds}-fold cross-validation (FOLDS={folds} asked)",
        }
    if n_train > limit:
        return {
            "holdout": True,
            "folds": DEFAULT_FOLDS,
            "asked": None,
            "reason": (
                f"one held-out split (1/{DEFAULT_FOLDS} of the training images, by content "
                f"group), {n_train:,} training images being more than {limit:,}; FOLDS=k asks "
                "for k-fold cross-validation"
            ),
        }
    return {
        "holdout": False,
        "folds": DEFAULT_FOLDS,
        "asked": None,
        "reason": (
            f"{DEFAULT_FOLDS}-fold cross-validation ({n_train:,} training images, at most "
            f"{limit:,}: above that, one held-out split)"
        ),
    }


def outer_folds(y: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The fold number of every row: stratified by label, a group never in two folds.

    Every row its own content: StratifiedKFold (linear; the same constraint), else
    StratifiedGroupKFold (it loops over the groups in Python: minutes at a million).
    """
    fold = np.full(len(y), -1, dtype=np.int64)
    distinct = len(np.unique(groups)) == len(groups)
    cv = (StratifiedKFold if distinct else StratifiedGroupKFold)(k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class": said elsewhere
        for i, (_, te) in enumerate(cv.split(np.zeros(len(y)), y, groups)):
            fold[te] = i
    return fold


def folds_id(sha256: Any, fold: np.ndarray, rows: np.ndarray | None = None) -> str:
    """Fingerprint of a fold assignment by content: equal ids mean runs are paired fold by fold.

    The SHA-256 of the JSON list of sorted (content, fold) pairs, one per content, written in
    pieces; a content is named by its hash's first 16 hex digits (by the whole hash only where
    two contents share them). `rows`: the rows of `sha256` that `fold` is about, sorted by
    content (no copy of them all).
    """
    keys = _sortable(sha256)
    if rows is None:
        rows = np.argsort(keys, kind="stable")
        fold = fold[rows]
    h = hashlib.sha256(b"[")
    step = 65536
    prev: Any = None
    started = False
    for a in range(0, len(rows), step):
        key = keys[rows[a : a + step]]
        for k, f in zip(key.tolist(), fold[a : a + step].tolist(), strict=True):
            if started and k == prev:  # one pair per content (copies share a fold)
                continue
            name = f"{k:016x}" if isinstance(k, int) else _text(k)
            h.update(((", " if started else "") + f'["{name}", {int(f)}]').encode())
            prev, started = k, True
    h.update(b"]")
    return h.hexdigest()


def splits(ts: TrainSet, k: int, seed: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """(train rows, scored rows) per fold, and the folds' fingerprint.

    Folds are drawn on the originals in content order (sorted by SHA-256), so they depend on
    the images, labels and seed alone, never on a cache's row order: every cache of the same
    images (another layer, backbone, or one grown incrementally) gets the same folds. Every
    view follows its image's group. A training fold holds the originals and views of its
    groups; a test fold only originals. NumPy throughout: a million rows cost a sort.
    """
    orig = np.flatnonzero(ts.original)
    sk = _sortable(ts.sha256)
    orig = orig[np.lexsort((ts.y[orig], sk[orig]))]  # stable: as sorted() by (hash, label)
    sorted_groups = groups_of(ts.groups[orig])  # contents, or near-duplicate sets joined
    fold_o = outer_folds(ts.y[orig], sorted_groups, k, seed)
    content = views.content(ts.groups)
    fold_of_group = np.full(int(content.max()) + 1 if len(content) else 0, -1, np.int64)
    fold_of_group[ts.groups[orig]] = fold_o
    row_fold = fold_of_group[content]
    out = [(np.flatnonzero((row_fold != i) & (row_fold >= 0)), orig[fold_o == i]) for i in range(k)]
    return out, folds_id(sk, fold_o, orig)


def _fold(
    estimator: Any,
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    tr: np.ndarray,
    te: np.ndarray,
    n_classes: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Fit a fresh copy of the configured head on one training fold; predict its test fold.

    The label is the argmax of the probabilities, as for the saved head; every class's
    probability comes back too (`n_classes` columns, float32: the report shows the most
    confident mistakes first, the audit and calibration read them all). `X` may name rows in
    the cache (`store.Rows`: on a cluster's worker, or for a streaming head): a streaming head
    reads them block by block, any other reads its fold's rows into memory here.
    """
    est = fit(clone(estimator), for_head(estimator, X[tr]), y[tr], groups[tr])
    proba = est.predict_proba(for_head(est, X[te]))
    full = np.zeros((len(proba), n_classes or int(np.max(y)) + 1), np.float32)
    full[:, np.asarray(est.classes_, np.int64)] = proba  # a class the fold lacks: 0
    return est.classes_[np.argmax(proba, axis=1)], full, chosen_params(est)


def for_head(est: Any, X: Any) -> Any:
    """`X` as `est` takes it: rows named in the cache for a streaming head, else an array."""
    return X if getattr(est, "accepts_rows", False) else materialize(X)


def repeat_seed(seed: int, r: int) -> int:
    """The seed of the r-th partition (r = 0 is SEED itself: one partition keeps its folds)."""
    return seed if r == 0 else seed + 1_000_003 * r


def partitions(
    ts: TrainSet, k: int, seed: int, repeats: int, ids: list[str] | None = None
) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """`repeats` different seeded, group-aware k-fold partitions: r·k (train, test) pairs.

    The same seed and repeats give the same r·k folds on any cache of the same images, so
    runs stay paired fold by fold; the fingerprint covers every partition.
    """
    out: list[tuple[np.ndarray, np.ndarray]] = []
    got: list[str] = []
    for r in range(repeats):
        cv, fid = splits(ts, k, repeat_seed(seed, r))
        out += cv
        got.append(fid)
    if ids is not None:  # each partition's own fingerprint: runs pair on their common ones
        ids[:] = got
    fid = got[0] if repeats == 1 else hashlib.sha256(json.dumps(got).encode()).hexdigest()
    return out, fid


def held_out(
    cv: list[tuple[np.ndarray, np.ndarray]], fid: str
) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """The held-out split of a k-fold partition (its first fold) and its fingerprint."""
    return cv[:1], f"holdout-{fid}"


def cross_validate(
    estimator: Any,
    ts: TrainSet,
    classes: list[str],
    folds: int,
    seed: int,
    n_jobs: int = 1,
    log: Log = print,
    repeats: int | Callable[[float], int] = 1,
    holdout: bool = False,
    prior: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Outer CV of the configured `estimator` over `repeats` partitions of k folds.

    Returns every fold's accuracy (r·k of them, partition by partition), their mean with its
    corrected resampled t interval (`pipeline.stats`), the seconds each partition took, and
    the out-of-fold predictions of the first partition (the confusion matrix, per-class
    figures and the gallery come from it).

    `repeats` may be a function of the first partition's seconds giving the number (repeats
    by time: `stats.budget_repeats`). `prior`: this function's result on the same images,
    seed and folds for its first partitions (a sweep's race scores every run on the first
    one): only the partitions after them are fitted, and the result covers them all.

    `holdout`: one fit instead, on all but the first fold of the first partition, scored on
    that fold (1/`folds` of the training images, by content group, stratified) with a Wilson
    interval: the protocol for collections where k fits would take hours.
    """
    import time

    from pipeline import stats

    if isinstance(repeats, int) and repeats < 1:
        raise UserError(f"REPEATS must be 1 or more; got {repeats}")
    k = choose_folds(ts.y[ts.original], classes, folds, log, ts.groups[ts.original])
    if holdout:  # one split, nothing to add to it
        return dict(prior) if prior else _held_out_cv(estimator, ts, classes, k, seed, n_jobs)
    fold_acc = list(prior["fold_accuracies"]) if prior else []
    fold_params = list(prior.get("fold_params") or []) if prior else []
    part_ids = list(prior["partition_ids"]) if prior else []
    took = list(prior.get("partition_seconds") or []) if prior else []
    if prior and (prior.get("folds") != k or len(fold_acc) != k * len(part_ids)):
        raise UserError("the first partitions were scored with other folds; run it again")
    for r, pid in enumerate(part_ids):  # the same images and seed: the same partitions
        if splits(ts, k, repeat_seed(seed, r))[1] != pid:
            raise UserError(
                "the training images changed between the first partition and the next "
                "(a concurrent `make features`?); run it again"
            )
    target = repeats if isinstance(repeats, int) else repeats(took[0]) if took else None
    oof = np.full(len(ts.y), -1, dtype=np.int64)
    oof_p = np.zeros(len(ts.y), dtype=np.float64)
    n_classes = len(classes)
    every = (
        resumed(prior["oof"]) if prior and "oof" in prior else OOF.of(ts.original, ts.y, n_classes)
    )
    progress = Progress(
        k * max(0, (target or 1) - len(part_ids)), _label(target, k), unit="folds", every=0.0
    )
    while target is None or len(part_ids) < target:
        r = len(part_ids)
        cv, fid = splits(ts, k, repeat_seed(seed, r))
        t0 = time.perf_counter()
        jobs = Parallel(n_jobs=n_jobs, return_as="generator")(
            delayed(_fold)(estimator, ts.X, ts.y, ts.groups, tr, te, n_classes) for tr, te in cv
        )
        keep = every.start()
        for i, ((_, te), (pred, prob, params)) in enumerate(zip(cv, jobs, strict=True)):
            if keep:
                every.put(te, prob, i)
            if r == 0:  # the first partition's out-of-fold predictions
                oof[te] = pred
                oof_p[te] = prob.max(axis=1)
            fold_acc.append(float(np.mean(pred == ts.y[te])))
            fold_params.append(params)
            progress.update(1)
        took.append(time.perf_counter() - t0)
        part_ids.append(fid)
        if target is None:  # by time: the first partition's cost says how many
            target = max(1, repeats(took[0]))  # type: ignore[operator]
            progress.total, progress.label = target * k, _label(target, k)
    ci = stats.corrected_t(fold_acc, k)
    whole = hashlib.sha256(json.dumps(part_ids).encode()).hexdigest()
    fid = part_ids[0] if len(part_ids) == 1 else whole  # one partition keeps its own id
    out = {
        "protocol": "k-fold",
        "folds": k,
        "repeats": len(part_ids),
        "folds_id": fid,
        "partition_ids": part_ids,
        "partition_seconds": took,
        "fold_accuracies": fold_acc,
        "accuracy_mean": float(np.mean(fold_acc)),
        "accuracy_std": float(np.std(fold_acc)),
        "accuracy_low": ci["low"],
        "accuracy_high": ci["high"],
        "interval": stats.CV_INTERVAL,
        "fold_params": fold_params,
        "oof": every,  # not JSON: the run saves it beside result.json (`pipeline.oof`)
    }
    if prior:  # the first partition's predictions came with it
        return {**out, **{key: v for key, v in prior.items() if key not in out}}
    scored = oof >= 0
    return {**out, **metrics(ts.y[scored], oof[scored], classes), **_oof(ts, oof, oof_p, scored)}


def _label(repeats: int | None, k: int) -> str:
    if repeats is None:
        return f"cross-validation (first partition of {k} folds)"
    return f"cross-validation ({f'{repeats}x' if repeats > 1 else ''}{k} folds)"


def _held_out_cv(
    estimator: Any, ts: TrainSet, classes: list[str], k: int, seed: int, n_jobs: int
) -> dict[str, Any]:
    """One fit on all but the first fold of the first partition, scored on that fold, with its
    Wilson interval and every scored image's right or wrong (held-out runs pair on them)."""
    import time

    from pipeline import stats

    cv, fid = held_out(*splits(ts, k, repeat_seed(seed, 0)))
    progress = Progress(1, f"held-out split (1/{k} of the training images)", "folds", 0.0)
    t0 = time.perf_counter()
    ((tr, te),) = cv
    # through joblib: on a cluster (its Dask backend) the fit runs on a worker
    job = delayed(_fold)(estimator, ts.X, ts.y, ts.groups, tr, te, len(classes))
    pred, prob, params = Parallel(n_jobs=n_jobs)([job])[0]
    progress.update(1)
    oof = np.full(len(ts.y), -1, dtype=np.int64)
    oof_p = np.zeros(len(ts.y), dtype=np.float64)
    oof[te], oof_p[te] = pred, prob.max(axis=1)
    every = OOF.of(ts.original, ts.y, len(classes))
    every.start()
    every.put(te, prob, 0)
    right = pred == ts.y[te]  # the fold's rows, in content order
    acc = float(np.mean(right))
    w = stats.wilson(int(right.sum()), len(right))
    scored = oof >= 0
    return {
        "protocol": "holdout",
        "folds": 1,
        "repeats": 1,
        "folds_id": fid,
        "partition_ids": [fid],
        "partition_seconds": [time.perf_counter() - t0],
        "fold_accuracies": [acc],
        "accuracy_mean": acc,
        "accuracy_std": 0.0,
        "accuracy_low": w["low"],
        "accuracy_high": w["high"],
        "interval": stats.VALIDATION_INTERVAL,
        "fold_params": [params],
        "oof": every,
        **metrics(ts.y[scored], oof[scored], classes),
        **_oof(ts, oof, oof_p, scored),
        "holdout_fraction": 1 / k,
        "holdout_images": int(len(right)),
        "holdout_right": stats.pack_bits(right),
    }


def _text(h: Any) -> str:
    return h.decode() if isinstance(h, bytes) else str(h)


OOF_ROWS_KEPT = 100_000  # above this many scored images, a run keeps its mistakes' rows only
OOF_MISTAKES_KEPT = 1_000


def kept_rows(rows: np.ndarray, wrong: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """The rows a run keeps one by one: all of `rows`, or past OOF_ROWS_KEPT of them the
    OOF_MISTAKES_KEPT mistakes (`wrong`, among them) of highest `probability`, sorted."""
    if len(rows) <= OOF_ROWS_KEPT:
        return rows
    return np.sort(wrong[np.argsort(-probability[wrong], kind="stable")[:OOF_MISTAKES_KEPT]])


def _oof(ts: TrainSet, oof: np.ndarray, oof_p: np.ndarray, scored: np.ndarray) -> dict[str, Any]:
    """The out-of-fold predictions a run keeps: every scored image, or past OOF_ROWS_KEPT of
    them the OOF_MISTAKES_KEPT most confident mistakes (what the report's gallery shows), so a
    run's record stays small at ten million images. Counts and matrices cover all of them."""
    keep = np.flatnonzero(scored)
    wrong = keep[oof[keep] != ts.y[keep]]
    out: dict[str, Any] = {"oof_scored": int(len(keep)), "oof_mistakes": int(len(wrong))}
    if len(keep) > OOF_ROWS_KEPT:
        keep = kept_rows(keep, wrong, oof_p)
        out["oof_kept"] = f"the {len(keep):,} most confident mistakes"
    return {
        **out,
        "oof_pred": oof[keep].tolist(),
        "oof_sha256": [_text(h) for h in texts(ts.sha256, keep)],
        "oof_probability": oof_p[keep].round(6).tolist(),
        "oof_true": ts.y[keep].tolist(),
        "oof_paths": texts(ts.paths, keep) if ts.paths is not None and len(ts.paths) else None,
    }


def validation_record(
    y: np.ndarray,
    pred: np.ndarray,
    probability: np.ndarray,
    sha256: Any,
    paths: Any,
    classes: list[str],
) -> dict[str, Any]:
    """What a run keeps of its validation predictions, bounded like the out-of-fold ones.

    Metrics over every image; each image right or wrong, 1 bit in content order, with the
    identity of the images in that order (`images_id`: runs on the same validation images
    pair image by image); and the predictions row by row: every image, or past OOF_ROWS_KEPT
    of them the OOF_MISTAKES_KEPT most confident mistakes (the report's gallery).
    """
    from pipeline import stats

    out = metrics(y, pred, classes)
    right = pred == y
    keys = _sortable(sha256)
    order = np.lexsort((y, keys))  # identical contents with one label predict alike
    h = hashlib.sha256()
    for a in range(0, len(order), 1 << 16):
        part = order[a : a + (1 << 16)]
        h.update(np.ascontiguousarray(keys[part]).tobytes() + y[part].astype("<i8").tobytes())
    out["images_id"] = h.hexdigest()
    out["right"] = stats.pack_bits(right[order])
    out["mistakes"] = int((~right).sum())
    keep = kept_rows(np.arange(len(y)), np.flatnonzero(~right), probability)
    if len(keep) < len(y):
        out["predictions_kept"] = f"the {len(keep):,} most confident mistakes"
    out["predictions"] = [
        {"path": p, "true": classes[int(t)], "pred": classes[int(q)], "probability": float(pr)}
        for p, t, q, pr in zip(
            texts(paths, keep), y[keep], pred[keep], probability[keep], strict=True
        )
    ]
    return out


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
