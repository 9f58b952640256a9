"""`make train-head`: cross-validate a head on cached features, score it on validation, save it.

Reads only the HDF5 cache: the backbone is never run here, and the scikit-learn heads never
import TensorFlow. Each run is written whole by `pipeline.runs`: the fitted head and
`result.json` (metrics, settings, seed, package versions, the cache by key and content).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import (
    cluster,
    dataset,
    diagnose,
    duplicates,
    evaluate,
    heads,
    inner,
    layout,
    near,
    neighbours,
    novelty,
    oof,
    outputs,
    runs,
    stats,
    store,
)
from pipeline import views as views_of
from pipeline.cache_identity import augment_settings
from pipeline.errors import UserError
from pipeline.provenance import environment
from pipeline.seeding import set_seeds

Log = Callable[[str], None]


def run_base(head: str, pooling: str, params: dict[str, Any], views: int = 0) -> str:
    """The readable part of a run's name: head, pooling, fixed settings, views."""
    parts = [head, pooling] + [f"{k}={v}" for k, v in sorted(params.items())]
    if views:
        parts.append(f"views={views}")
    return "-".join(parts).replace("/", "_")


@dataclass
class Loaded:
    """What a head learns from and is validated on, read from one version of the cache."""

    index: store.Index
    train: evaluate.TrainSet
    validation: store.Features
    augmented: dict[str, Any] | None


def load(
    path: Path,
    pooling: str,
    views: int = 0,
    seed: int = 0,
    lazy: bool = False,
    fits: Callable[[int, int], None] | None = None,
    groups: str = "content",
    log: Log | None = None,
) -> Loaded:
    """Read the cache once (one open file: a concurrent `make features` cannot mix versions).

    `lazy`: the features stay in the cache, named by `store.Rows` (read block by block by a
    streaming head, or by a cluster's workers); the caller holds `store.reading` meanwhile.
    `fits(rows, dim)` may refuse before anything is read into memory. `groups="near"`: each
    near-duplicate set of training images (`diagnose.near_duplicates`, the audit's) is one
    group with the copies of its members, so every split, outer and inner, keeps it whole.
    """
    with store.reading(path.parent), store.open_cache(path) as f:
        idx = store.index_of(f, path, lean=lazy)  # lazy: a few bytes a row, no texts
        if fits is not None:  # views come from their own cache: K more rows per image
            n_train, n_val = int(idx.mask("train").sum()), int(idx.mask("validation").sum())
            fits(n_train * (1 + views) + n_val, store.width(idx, pooling))
        # in canonical order (content, view, path): whatever the cache's order (one run,
        # resumed, grown, merged), every split, shuffle and list of the run is the same
        tr = store.features_of(f, idx, pooling, "train", lazy=lazy, canonical=True)
        va = store.features_of(f, idx, pooling, "validation", lazy=lazy, canonical=True)
        ts = evaluate.TrainSet(
            X=tr.X,
            y=tr.y,
            groups=evaluate.groups_of(tr.sha256),
            original=np.ones(len(tr.y), dtype=bool),
            sha256=tr.sha256,
            paths=tr.paths,
        )
        if groups == "near":  # the rows' signatures read under the same readers' lock
            named = (
                tr.X
                if lazy
                else store.features_of(f, idx, pooling, "train", lazy=True, canonical=True).X
            )
            joined = _near_groups(ts, named, path.parent, log or (lambda _: None))
            ts = dataclasses.replace(ts, groups=joined)
    aug = None
    if views:
        ts, aug = _with_views(path, idx, ts, pooling, views, seed, lazy)
    return Loaded(index=idx, train=ts, validation=va, augmented=aug)


def train_head(
    artifacts: Path,
    head: str = "logreg",
    pooling: str | None = None,
    folds: int | None = None,
    seed: int = 0,
    params: dict[str, str] | None = None,
    features: Path | None = None,
    n_jobs: int | None = None,
    views: int = 0,
    log: Log = print,
    client: Any = None,
    repeats: int | None = None,
    budget: float | None = None,
    first_only: bool = False,
    resume: dict[str, Any] | None = None,
    screened_out: bool = False,
    groups: str = "content",
) -> dict[str, Any]:
    """Cross-validate, validate and save one head; return its result (also in result.json).

    `groups="near"` (GROUPS=near) keeps each near-duplicate set in one fold (`load`), under a
    run name of its own (`-near`), so its figure stands beside the run by content groups.

    `repeats=None` chooses the partitions by time: as many as `budget` minutes (BUDGET,
    default `stats.BUDGET_MINUTES`) hold at the first partition's cost, at most
    `stats.default_repeats`; the log and `result["repeats_reason"]` say which and why.

    A sweep's race in two stages: `first_only` scores the first partition and returns it with
    the repeats planned (nothing fitted on all rows, nothing saved); `resume` (that return)
    goes on to `repeats` partitions (default: the planned ones), or with `screened_out` stops
    at the first and records it so.

    `folds=None` sizes the evaluation to the data (`evaluate.protocol`): k-fold up to
    HOLDOUT_ABOVE training images, one held-out split above; a number asks for k-fold.
    A streaming head (sgd) reads the cache block by block and never holds the features; the
    others hold them in memory and refuse, naming sgd, when they would not fit. With a Dask
    `client` (CLUSTER), the folds and the final fit run on the workers through joblib's Dask
    backend, each reading its rows from the cache on shared storage: no feature matrix is sent.
    """
    t0 = time.perf_counter()
    info = heads.get(head)
    p = heads.parse_params(info, params or {})
    pooling = pooling or info.default_pooling
    set_seeds(seed)
    path = Path(features) if features else layout.current_cache(artifacts)
    if info.needs_layer and pooling != "flatten":
        raise UserError(f"HEAD={head} takes the whole map: POOL must be flatten, not {pooling}")
    lazy = info.streams or client is not None
    with contextlib.ExitStack() as held:
        if lazy:  # the rows are read while training: no merge may delete their segments
            held.enter_context(store.reading(path.parent))
        return _train(
            artifacts, head, info, p, pooling, folds, seed, path, n_jobs, views, log, client,
            repeats, lazy, t0, budget, first_only, resume, screened_out, groups,
        )  # fmt: skip


def _train(
    artifacts: Path,
    head: str,
    info: heads.HeadInfo,
    p: dict[str, Any],
    pooling: str,
    folds: int | None,
    seed: int,
    path: Path,
    n_jobs: int | None,
    views: int,
    log: Log,
    client: Any,
    repeats: int | None,
    lazy: bool,
    t0: float,
    budget: float | None = None,
    first_only: bool = False,
    resume: dict[str, Any] | None = None,
    screened_out: bool = False,
    groups: str = "content",
) -> dict[str, Any]:
    data = load(
        path,
        pooling,
        views,
        seed,
        lazy,
        lambda n, d: heads.check_memory(info, n, d, client),
        groups=groups,
        log=log,
    )
    idx, ts, va = data.index, data.train, data.validation
    classes = idx.classes
    if idx.attrs.get("random_weights"):
        log(f"*** {idx.attrs.get('banner', 'RANDOM WEIGHTS')} ***")
    if changed := dataset.source_changed(idx.attrs):
        log(f"warning: {changed}")
    context = {
        "weights": idx.attrs.get("weights"),
        "seed": int(idx.attrs.get("seed", 0)),
        "feature_shape": store.f_shape(idx),
    }
    context = {
        **context,
        "backbone": idx.attrs.get("name", "vgg16"),
        "layer": idx.attrs.get("layer"),
        "input_size": idx.attrs.get("input_size"),
    }
    if info.needs_layer:
        from pipeline.backbone import family, spec_from_settings

        fam = family(context["backbone"])
        if idx.attrs.get("layer") != fam.finetune_from:
            raise UserError(
                f"HEAD={head} needs the {fam.finetune_from} cache of {fam.name}, this one is "
                f"{idx.attrs.get('layer')}; run `make finetune BACKBONE={fam.name}` (it caches "
                f"{fam.finetune_from} once)"
            )
        # the weights file must still be the same
        spec_from_settings(idx.attrs["settings"], hint=idx.attrs.get("weights"))
    heads.check_size(info, len(ts.y), p)
    n_orig = int(ts.original.sum())
    protocol = evaluate.protocol(n_orig, folds)
    folds = protocol["folds"]
    dups = duplicates.of_index(idx)
    for w in duplicates.lines(dups):
        log(w)
    augmented = data.augmented
    del data
    idx = idx.summary()  # the rows' columns go: a streaming head keeps a few bytes per row
    if n_jobs is None:
        n_jobs = min(folds, os.cpu_count() or 1) if info.parallel_folds else 1
    if client is not None:
        n_jobs = folds
    log(
        f"{head} on {pooling} features {ts.X.shape[1]}-d: {n_orig} train"
        + (f" (+{len(ts.y) - n_orig} augmented views)" if views else "")
        + f", {len(va.y)} validation images, {len(classes)} classes"
    )
    if protocol["holdout"]:  # one split: nothing to repeat
        if repeats not in (None, 1):
            log(f"REPEATS={repeats} ignored: one held-out split (FOLDS=k for repeated k-fold)")
        repeats = 1
    key, did = idx.attrs.get("cache_key"), idx.attrs.get("data_id")
    prior = None
    if resume is not None:  # the race's second stage: the first partition is scored
        if (resume["cache_key"], resume["data_id"]) != (key, did):
            raise UserError(
                f"the cache '{path.name}' changed during the sweep (a concurrent `make "
                "features`?); run the sweep again"
            )
        prior, why = resume["cv"], [resume["repeats_reason"]]
        done = int(prior["repeats"])
        choose: Any = done if screened_out else max(done, repeats or resume["repeats_planned"])
        if screened_out:
            why[0] = (
                f"screened out after the first partition; {resume['repeats_planned']} "
                f"planned: {why[0]}"
            )
        log(f"repeats: {choose} ({why[0]})")
    else:
        choose, why = _repeats_plan(repeats, protocol, budget, info, n_orig, log)
    log(f"evaluation: {protocol['reason']}")
    t_cv = time.perf_counter()
    # on a cluster: the outer folds on the workers, each reading its rows from the cache
    with cluster.joblib_backend(client, ts.y, ts.groups):
        cv = evaluate.cross_validate(
            heads.make(info, p, seed, context),
            ts,
            classes,
            folds,
            seed,
            n_jobs=n_jobs,
            log=log,
            repeats=1 if first_only else choose,
            holdout=protocol["holdout"],
            prior=prior,
        )
    cv["protocol_reason"] = protocol["reason"]
    cv_s = time.perf_counter() - t_cv + (resume or {}).get("cv_s", 0.0)
    if first_only:  # the race's first stage: what the first partition says, and the plan
        planned = choose(cv["partition_seconds"][0]) if callable(choose) else int(choose)
        return {
            "cv": cv,
            "cv_s": cv_s,
            "total_s": time.perf_counter() - t0,
            "repeats_planned": planned,
            "repeats_reason": why[0],
            "cache_key": key,
            "data_id": did,
        }
    repeats, why = int(cv["repeats"]), why[0]
    every = cv.pop("oof", None)  # saved beside result.json, read by the audit
    every = oof.resumed(every) if every is not None else None  # a race's, from its file
    calib = diagnose.calibrate(every.labels, every.probabilities, every.folds) if every else None
    if calib:
        log(diagnose.calibration_line(calib))
    if screened_out:
        cv["screened_out"] = True
    log(f"{'held-out' if protocol['holdout'] else 'cross-validated'} accuracy {stats.cv_line(cv)}")
    t_fit = time.perf_counter()
    est = heads.make(info, p, seed, context)
    if client is not None:  # on a worker, which reads the rows itself
        final = client.submit(fit_on, est, ts.X, ts.y, ts.groups, pure=False).result()
    else:
        final = fit_on(est, ts.X, ts.y, ts.groups)
    fit_s = time.perf_counter() - t_fit
    if tuning := getattr(final, "tuning_", None):
        cv["tuning"] = tuning
    validation = None
    if len(va.y):
        proba = final.predict_proba(evaluate.for_head(final, va.X))
        pred = final.classes_[np.argmax(proba, axis=1)]
        validation = evaluate.validation_record(
            va.y, pred, proba.max(axis=1), va.sha256, va.paths, classes
        )
        right = int(np.sum(pred == va.y))
        w = stats.wilson(right, len(va.y))
        validation["accuracy_low"], validation["accuracy_high"] = w["low"], w["high"]
        validation["interval"] = stats.VALIDATION_INTERVAL
        log(
            f"validation accuracy {validation['accuracy']:.4f} on {len(va.y)} images "
            f"(95 % interval {w['low']:.3f} to {w['high']:.3f}, Wilson)"
        )
    bb = context["backbone"]
    base = (f"{bb}-" if bb != "vgg16" else "") + run_base(head, pooling, p, views)
    base += "-near" if groups == "near" else ""
    name = runs.run_name(
        base, key, did, seed, f"holdout-{folds}" if protocol["holdout"] else folds, repeats
    )
    result = {
        "head": head,
        "description": info.description,
        "pooling": pooling,
        "params": p,
        "final_params": heads.chosen_params(final),
        "seed": seed,
        "folds_asked": protocol["asked"],
        "repeats": repeats,
        "repeats_reason": why,
        "screened_out": screened_out,
        "classes": classes,
        "n_train": n_orig,
        "views": views,
        "groups": groups,
        "n_train_rows": int(len(ts.y)),
        "n_validation": int(len(va.y)),
        "feature_dim": int(ts.X.shape[1]),
        "cv": cv,
        "validation": validation,
        "calibration": calib,
        "duplicates": dups,
        "features": {
            "file": path.name,
            "cache_key": key,
            "data_id": did,
            "settings": idx.attrs.get("settings"),
            "weights": idx.attrs.get("weights"),
            "embedders": idx.attrs.get("embedders"),
            "random_weights": bool(idx.attrs.get("random_weights", False)),
            "n_skipped": len(idx.skipped),
            "augmented": augmented,
        },
        "timing_s": {
            "cv": cv_s,
            "final_fit": fit_s,
            "total": time.perf_counter() - t0 + (resume or {}).get("total_s", 0.0),
        },
        "environment": environment(),
    }

    # predict's distance to training, from the run (on a cluster: sampled on a worker)
    if client is not None:
        reference = client.submit(novelty.sample, ts.X, ts.original, seed, pure=False).result()
    else:
        reference = novelty.sample(ts.X, ts.original, seed)

    def save(d: Path) -> list[Path]:
        files = list(heads.save_head(final, d))
        files += [reference.save(d)] if reference is not None else []
        return files + ([every.save(d, ts.sha256)] if every else [])

    out_dir = runs.write_run(artifacts, name, result, save)
    result = json.loads((out_dir / runs.RESULT).read_text(encoding="utf-8"))
    log(f"saved {out_dir}")
    return result


def _repeats_plan(
    repeats: int | None,
    protocol: dict[str, Any],
    budget: float | None,
    info: heads.HeadInfo,
    n_orig: int,
    log: Log,
) -> tuple[Any, list[str]]:
    """How many partitions, and why (said in the log): a number (REPEATS, or 1 for a held-out
    split), or by time a function of the first partition's seconds, which says its choice."""
    if protocol["holdout"]:
        return 1, ["one held-out split"]
    if repeats is not None:
        log(f"repeats: {repeats} (REPEATS={repeats} asked)")
        return repeats, [f"REPEATS={repeats} asked"]
    minutes = stats.budget_minutes(budget)
    most = stats.default_repeats(n_orig, slow=not info.parallel_folds)
    why = [""]
    if most == 1:
        log(f"repeats: 1 (at most 1 for {n_orig:,} training images)")
        why[0] = f"at most 1 for {n_orig:,} training images"
        return 1, why
    log(
        f"repeats: by time, up to {most} for {n_orig:,} training images (budget {minutes:g} "
        "min a run, BUDGET=; REPEATS=r fixes it)"
    )

    def by_time(first_s: float) -> int:
        r = stats.budget_repeats(first_s, minutes, most)
        why[0] = (
            f"first partition took {stats.seconds(first_s)}; budget {minutes:g} min, at most "
            f"{most} for {n_orig:,} training images"
        )
        log(f"repeats: {r} ({why[0]})")
        return r

    return by_time, why


def _near_groups(ts: evaluate.TrainSet, rows: store.Rows, folder: Path, log: Log) -> np.ndarray:
    """The content groups joined along near-duplicate sets of the training images, found as
    the audit finds them: their features in the audit's space (`neighbours.search`) and their
    image signatures (mirrored copies, `near.signature_edges`; `rows` names them in the cache, read
    a block at a time), the space in a file in `folder` above its memory bound. One group per
    set and its copies."""
    with outputs.scratch(folder, "near") as tmp:
        X = neighbours.space_of([ts.X], tmp)
        dist, idx = neighbours.search(X, diagnose.K)
        del X
        sig_r, sig_c, unsigned = near.signature_edges([rows], tmp)
    if unsigned:
        log(
            f"GROUPS=near: mirrored copies not searched among {unsigned:,} image(s) embedded "
            "before image signatures were kept (`make features REBUILD=1` embeds them again)"
        )
    sets, _ = diagnose.near_duplicates(dist, idx, extra=(sig_r, sig_c))
    merged = diagnose.join_groups(ts.groups, sets)
    n_sets = len(np.unique(sets[sets >= 0]))
    log(
        f"GROUPS=near: {n_sets} near-duplicate set(s) join {len(np.unique(ts.groups)):,} "
        f"contents into {len(np.unique(merged)):,} groups; folds keep each group whole"
    )
    return merged


def _with_views(
    path: Path,
    idx: store.Index,
    ts: evaluate.TrainSet,
    pooling: str,
    views: int,
    seed: int = 0,
    lazy: bool = False,
) -> tuple[evaluate.TrainSet, dict[str, Any]]:
    """Originals plus views 1..`views` of each, labelled by their image in the current cache.

    A view's label is always its source image's label now (by content hash), never the one it
    had when it was embedded; an image without all its views is refused with the fix. `lazy`
    (a streaming head): views are found by 64-bit hash prefix, each pair confirmed on the full
    identities read a block at a time, and the rows keep NumPy columns only (a view's hash and
    path are its image's, read when asked: `store.reader.WithViews`).
    """
    apath = layout.augment_path(path, seed)
    fix = f"run `make features AUGMENT={views} SEED={seed}` (same settings as the cache)"
    if not apath.is_file():
        raise UserError(f"VIEWS={views} needs cached augmented views; {fix}")
    with store.reading(apath.parent), store.open_cache(apath) as f:
        aidx = store.index_of(f, apath, lean=lazy)  # lazy: no identities, paths or stats
        made, views_made = idx.attrs.get("embedders") or [], aidx.attrs.get("embedders") or []
        if any(e not in made for e in views_made):
            raise UserError(
                f"the augmented views in '{apath.name}' were embedded with other decoder/"
                f"framework versions than '{path.name}'; run `make features AUGMENT={views} "
                "REBUILD=1`"
            )
        aset = aidx.attrs.get("settings", {})
        if aset != augment_settings(idx.attrs["settings"], seed):
            raise UserError(
                f"the augmented views in '{apath.name}' were made with other settings "
                f"than '{path.name}' or another augmentation; {fix}"
            )
        aug = store.features_of(
            f, aidx, pooling, "train", max_view=views, lazy=lazy, canonical=True
        )
    if lazy:  # 64-bit prefixes, each candidate confirmed on the identities in the segments
        src, vrows, missing = views_of.pair(
            ts.sha256.prefix, aug.sha256.prefix, aug.view, views, _same_content(ts.X, aug.X)
        )
    else:  # the whole hashes are in memory: they are the keys
        keys = np.array(ts.sha256, dtype=str)
        src, vrows, missing = views_of.pair(keys, np.array(aug.sha256, dtype=str), aug.view, views)
    if len(missing):
        raise UserError(
            f"{len(missing)} training image(s) have fewer than {views} cached augmented "
            f"views (new since the last AUGMENT run?); {fix}"
        )
    info = {  # the views by key and content: embedded again, the run is stale (runs.status)
        "file": apath.name,
        "cache_key": aidx.attrs.get("cache_key"),
        "data_id": aidx.attrs.get("data_id"),
        "embedders": aidx.attrs.get("embedders"),
        "seed": seed,  # the views' augmentation seed: predict's TTA draws its views with it
    }
    n = len(ts.y)
    X = _concat(ts.X, aug.X[vrows]) if len(vrows) else ts.X
    del aug, aidx, vrows  # the views cache's columns: only their rows' names are kept
    if lazy:  # the images' texts through the images' rows of X (shared, not copied)
        images = X[:n]
        sha256: Any = store.WithViews(store.ColumnOf(images, "ident", ts.sha256.prefix), src)
        paths: Any = store.WithViews(store.ColumnOf(images, "path"), src)
    else:
        sha256 = ts.sha256 + [ts.sha256[i] for i in src]
        paths = (ts.paths or []) + [(ts.paths or [""] * n)[i] for i in src]
    both = evaluate.TrainSet(
        X=X,
        y=np.concatenate([ts.y, ts.y[src]]),
        groups=np.concatenate([ts.groups, views_of.mark(ts.groups[src])]),  # marked: views
        original=np.concatenate([ts.original, np.zeros(len(src), dtype=bool)]),
        sha256=sha256,
        paths=paths,
    )
    return both, info


def _same_content(images: store.Rows, views: store.Rows) -> Callable[..., np.ndarray]:
    """Whether image row i and views-cache row r hold one content: their identities (read
    from the segments, only the rows asked) equal but for the view's `#v`."""

    def content(rows: store.Rows) -> np.ndarray:
        raw = rows.column("ident").astype("S")  # rows of several segments come as objects
        return np.char.partition(raw, b"#")[:, 0]

    def same(i: np.ndarray, r: np.ndarray) -> np.ndarray:
        if not len(i):
            return np.zeros(0, bool)
        return content(images[i]) == content(views[r])

    return same


def _concat(a: Any, b: Any) -> Any:
    """Rows of the cache then of its views: named (`store.Rows`) or in memory."""
    if isinstance(a, store.Rows):
        return store.Rows.concat(a, b)
    return np.concatenate([a, b])


def fit_on(est: Any, X: Any, y: np.ndarray, groups: np.ndarray) -> Any:
    """Fit the saved head on all training rows (here, or on a cluster's worker)."""
    return inner.fit(est, evaluate.for_head(est, X), y, groups)
