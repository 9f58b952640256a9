"""`make sweep`: heads x pooling x augmentation on the cache alone, ranked, plus a learning curve.

Every combination goes through `train_head` (nested cross-validation, saved, in the report), on
the same outer folds. The learning curve refits the best combination on growing numbers of
training images per class, scored on those same outer folds (so its last point is the ranking's
own figure, with the same optimism as the pick), to tell whether more images would help.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.utils.parallel import Parallel, delayed

from pipeline import evaluate, heads, layout, outputs, stats, store
from pipeline import views as views_mod
from pipeline.errors import UserError
from pipeline.settings import ExtractSettings
from pipeline.train import load, train_head

Log = Callable[[str], None]


def _split(value: str, kind: type) -> list[Any]:
    return [kind(v.strip()) for v in value.split(",") if v.strip()]


def run_sweep(
    artifacts: Path,
    heads_list: str = "logreg,svm,dense",
    pools: str = "avg,max,flatten",
    views: str = "0",
    folds: int | None = None,
    seed: int = 0,
    curve_points: int = 5,
    log: Log = print,
    client: Any = None,
    backbones: str = "",
    extraction: ExtractSettings | None = None,
    repeats: int | None = None,
    race: bool = True,
    margin: float = stats.RACE_MARGIN,
    budget: float | None = None,
    embedder_fn: Any = None,
) -> dict[str, Any]:
    """Train every combination, rank them, and write the best one's learning curve.

    `race` (the default): every combination is scored on the first partition; only those
    the data cannot yet tell from the best (paired 95 % interval including 0, or within
    `margin` of it) go on to their repeats (`repeats`, else by time: `budget` minutes a run);
    the others are saved with their first partition's figure, marked `screened_out`.
    `race=False` gives every combination all its repeats.

    With `backbones` (e.g. "vgg16,resnet50") and `extraction` (the features settings: data,
    weights, size, batch, precision, ...; its `backbone` is set to each in turn), each backbone
    is extracted once into its own incremental cache first (with `embedder_fn`, as
    `features.extract`), and the ranking spans backbone x head x pooling x views.
    """
    # the sweep's output for its whole run: a second sweep on this ARTIFACTS stops at once
    with (
        outputs.owned(layout.sweep_file(artifacts), "make sweep", fix="use another ARTIFACTS"),
        contextlib.ExitStack() as stack,
    ):
        names, pool_list = _split(heads_list, str), _split(pools, str)
        view_list = _split(views, int)
        caches: list[tuple[str, Path | None]] = [("", None)]
        if backbones:
            from pipeline.backbone import family

            if extraction is None or extraction.data is None:
                raise UserError("SWEEP_BACKBONES needs DATA (each backbone is extracted once)")
            wanted = _split(backbones, str)
            for b in wanted:
                family(b)  # every name checked before any work
            caches = []
            for i, b in enumerate(wanted):
                log(f"--- sweep: features for {b}")
                e = dataclasses.replace(extraction, backbone=b, seed=seed)
                s = e.run(log, set_current=i == 0, embedder_fn=embedder_fn)
                caches.append((b, s.cache))
        for h in names:
            if heads.get(h).needs_layer:
                raise UserError(f"HEAD={h} has its own command (`make {h}`); leave it out of HEADS")
        for p in pool_list:
            store.pool(np.zeros((1, 1, 1, 1), np.float32), p)
        todo = [
            (b, c, v, h, p) for b, c in caches for v in view_list for h in names for p in pool_list
        ]
        where = [
            f"{b + ', ' if b else ''}{h}, {p} pooling, {v} augmented views"
            for b, _, v, h, p in todo
        ]

        def train(i: int, **stage: Any) -> dict[str, Any]:
            _, cache, v, h, p = todo[i]
            return train_head(
                artifacts, h, pooling=p, folds=folds, seed=seed, views=v, log=log,
                client=client, features=cache, repeats=repeats, budget=budget, **stage,
            )  # fmt: skip

        minutes = stats.budget_minutes(budget)
        log(
            f"sweep: {len(todo)} runs; "
            + (
                "a race: each scored on the first partition, then only those tied with the "
                f"best (paired 95 % interval) or within {margin:.1%} of it go on (RACE=0: all)"
                if race
                else "every run all its partitions"
            )
            + (
                f"; repeats: {repeats} (REPEATS={repeats} asked)"
                if repeats
                else f"; repeats by time: as many as {minutes:g} min a run holds (BUDGET=)"
            )
        )
        first: list[dict[str, Any]] = []
        keep = [True] * len(todo)
        # each run's first-partition probabilities wait on disk for its second stage, not in
        # memory (n x classes floats a run), in a folder of this sweep removed at its end
        if race:
            layout.sweep_file(artifacts).parent.mkdir(parents=True, exist_ok=True)
            spill = stack.enter_context(
                outputs.scratch(layout.sweep_file(artifacts).parent, "race")
            )
            for i in range(len(todo)):
                log(f"--- sweep: {where[i]}: first partition")
                first.append(train(i, first_only=True))
                if first[-1]["cv"].get("oof") is not None:
                    first[-1]["cv"]["oof"] = first[-1]["cv"]["oof"].spill(spill / f"{i}.h5")
            keep = _race(first, where, margin, log)
        results = []
        full_results: list[dict[str, Any]] = []
        for i, (_, _, v, h, p) in enumerate(todo):
            out_now = "" if keep[i] else ": screened out after the first partition"
            log(f"--- sweep: {where[i]}{out_now}")
            if race:
                r = train(i, resume=first[i], screened_out=not keep[i])
            else:
                r = train(i)
            results.append(_row(r, h, p, v))
            full_results.append(r)
        # a run screened out after one partition ranks after those that raced: its figure
        # stands on fewer partitions, and the race found it worse than the best
        results.sort(key=lambda r: (r["screened_out"], -r["cv_accuracy_mean"], r["run"]))
        best = results[0]
        by_run = {r["run"]: r["cv"] for r in full_results}
        top = by_run[best["run"]]
        for row in results:  # who the data cannot tell from the best (paired, corrected interval)
            c = by_run[row["run"]]
            row["cv_low"], row["cv_high"] = c.get("accuracy_low"), c.get("accuracy_high")
            pv = None if row is best else stats.paired_runs(top, c)
            row["tied_with_best"] = True if row is best else pv["tied"] if pv is not None else None
        tied = [r["run"] for r in results[1:] if r["tied_with_best"]]
        if tied:
            log(f"tied with the best (paired 95 % interval includes 0): {', '.join(tied)}")
        log(
            f"best: {best['run']} {best['cv_accuracy_mean']:.4f} ± {best['cv_accuracy_std']:.4f} "
            f"({best['repeats']}x{best['folds']} folds)"
        )
        fits = sum(len(r["cv"]["fold_accuracies"]) for r in full_results)
        screened = [r["run"] for r in results if r["screened_out"]]
        log(
            f"sweep: {len(results)} runs, {fits} fold fits"
            + (f", {len(screened)} screened out after the first partition" if race else "")
        )
        cache = layout.cache_by_name(artifacts, best["cache"])
        ranked = next(r for r in full_results if r["run"] == best["run"])
        curve = learning_curve(
            cache, best["head"], best["pooling"], folds, seed, curve_points, run=ranked,
            budget=budget, fixed=repeats is not None,
        )  # fmt: skip
        attrs = store.read_attrs(cache)
        out = {
            "ranking": results,
            "race": {
                "raced": race,
                "margin": margin if race else None,
                "screened_out": screened,
                "fold_fits": fits,
            },
            "learning_curve": curve,
            "features": {
                "file": cache.name,
                "cache_key": attrs["cache_key"],
                "data_id": attrs["data_id"],
            },
        }
        path = layout.sweep_file(artifacts)
        path.parent.mkdir(parents=True, exist_ok=True)
        outputs.write_text(path, json.dumps(out, indent=1))  # whole or not at all
        for pt in curve["points"]:
            log(
                f"learning curve: {pt['per_class']:>5} images/class -> "
                f"{pt['accuracy_mean']:.4f} ± {pt['accuracy_std']:.4f}"
            )
        log(curve["advice"])
        return out


def _row(r: dict[str, Any], h: str, p: str, v: int) -> dict[str, Any]:
    return {
        "run": r["run"],
        "backbone": (r["features"].get("settings") or {}).get("name", "vgg16"),
        "head": h,
        "pooling": p,
        "views": v,
        "cv_accuracy_mean": r["cv"]["accuracy_mean"],
        "cv_accuracy_std": r["cv"]["accuracy_std"],
        "folds": r["cv"]["folds"],
        "repeats": r["cv"].get("repeats", 1),
        "repeats_reason": r.get("repeats_reason"),
        "screened_out": bool(r.get("screened_out")),
        "validation_accuracy": (r["validation"] or {}).get("accuracy"),
        "cache": r["features"]["file"],
    }


def _race(first: list[dict[str, Any]], where: list[str], margin: float, log: Log) -> list[bool]:
    """Which runs go on past the first partition: the best on it, those whose paired 95 %
    interval against it (on the partition they share) includes 0 or that are within `margin`
    of it, and those planned for one partition anyway. The rest are screened out."""
    if not first:
        return []
    top = max(range(len(first)), key=lambda i: (first[i]["cv"]["accuracy_mean"], -i))
    keep, out = [], []
    for i, f in enumerate(first):
        more = f["repeats_planned"] > int(f["cv"]["repeats"])
        goes_on, pv = (
            (True, None)
            if i == top or not more
            else stats.keeps_racing(first[top]["cv"], f["cv"], margin)
        )
        keep.append(goes_on)
        if not goes_on and pv is not None:
            out.append(
                f"{where[i]} {f['cv']['accuracy_mean']:.4f} ({-pv['diff_mean']:+.4f}, 95 % "
                f"interval {-pv['diff_high']:+.4f} to {-pv['diff_low']:+.4f} vs the best)"
            )
    raced = sum(f["repeats_planned"] > int(f["cv"]["repeats"]) for f in first)
    if raced:
        log(
            f"race after the first partition: best {where[top]} "
            f"{first[top]['cv']['accuracy_mean']:.4f}; {raced - len(out)} of {raced} run(s) go "
            f"on (paired 95 % interval with the best includes 0, or within {margin:.1%} of "
            f"it); screened out: {'; '.join(out) or 'none'}"
        )
    return keep


def learning_curve(
    cache: Path,
    head: str,
    pooling: str,
    folds: int | None,
    seed: int,
    points: int = 5,
    run: dict[str, Any] | None = None,
    budget: float | None = None,
    fixed: bool = False,
) -> dict[str, Any]:
    """CV accuracy of the ranked run's head on growing fractions of each training fold.

    On the ranked run's protocol: its k folds, or its one held-out split (scored with a
    Wilson interval); `folds=None` without a run sizes it to the data (`evaluate.protocol`).
    A streaming head reads its rows from the cache (never the features in memory).

    The last point IS the ranked run's own figure (same folds and repeats, same per-class
    counts, same views, its interval): no refit. Smaller points subsample each training fold
    by class (whole content groups: an image with its views), seeded, and are scored on the
    same test folds with the same head settings, each with its corrected 95 % interval.
    Unless the run's repeats were asked (`fixed`), the smaller points take as many of its
    partitions as `budget` minutes hold at its first partition's cost, at least 1: the curve
    costs about one run, not (points - 1) runs. Folds run in parallel as in the run's CV.
    """
    info = heads.get(head)
    cvr = (run or {}).get("cv") or {}
    views = int((run or {}).get("views", 0))
    repeats = int(cvr.get("repeats", 1))
    first_s = (cvr.get("partition_seconds") or [None])[0]
    if not fixed and first_s is not None and repeats > 1:
        repeats = stats.budget_repeats(
            first_s * max(1, points - 1), stats.budget_minutes(budget), repeats
        )
    with store.reading(cache.parent):
        return _curve(cache, head, pooling, folds, seed, points, run, info, cvr, views, repeats)


def _curve(
    cache: Path,
    head: str,
    pooling: str,
    folds: int | None,
    seed: int,
    points: int,
    run: dict[str, Any] | None,
    info: heads.HeadInfo,
    cvr: dict[str, Any],
    views: int,
    repeats: int,
) -> dict[str, Any]:
    params = (run or {}).get("params") or {}
    ts = load(cache, pooling, views, seed, lazy=info.streams).train
    orig = ts.original
    counts = np.bincount(ts.y[orig])
    counts = counts[counts > 0]
    plan = evaluate.protocol(int(orig.sum()), folds)
    holdout = cvr.get("protocol") == "holdout" if cvr else plan["holdout"]
    if holdout:  # the first fold of the k-fold partition, as the run's held-out split
        k = round(1 / cvr["holdout_fraction"]) if cvr.get("holdout_fraction") else plan["folds"]
    else:
        k = int(cvr.get("folds") or min(plan["folds"], counts.min()))
    ids: list[str] = []
    cv, fid = evaluate.partitions(ts, k, seed, 1 if holdout else repeats, ids)
    if holdout:
        cv, fid = evaluate.held_out(cv, fid)
    full = int(np.median(counts) * (k - 1) / k)  # images per class in a training fold
    smallest = max(2 / max(1, counts.min() * (k - 1) / k), 1 / max(1, full))
    fracs = [float(f) for f in np.geomspace(min(1.0, smallest), 1.0, max(2, points))]
    fracs = sorted({round(f, 4) for f in fracs if f < 0.999})
    rng = np.random.default_rng(seed)
    est = heads.make(info, params, seed)
    todo = []
    for f in fracs:
        for tr, te in cv:
            keep_groups = []
            for c in np.unique(ts.y[tr]):
                g = np.unique(ts.groups[tr][(ts.y[tr] == c) & orig[tr]])
                n = max(2, int(round(f * len(g))))
                keep_groups.append(rng.permutation(g)[:n])
            # an image's augmented views follow it (their groups are marked: views.content)
            sub = tr[np.isin(views_mod.content(ts.groups[tr]), np.concatenate(keep_groups))]
            todo.append((sub, te))
    n_jobs = min(len(cv), os.cpu_count() or 1) if info.parallel_folds else 1
    preds = iter(
        Parallel(n_jobs=n_jobs)(
            delayed(evaluate._fold)(est, ts.X, ts.y, ts.groups, sub, te) for sub, te in todo
        )
    )
    pts = []
    for f in fracs:
        accs = []
        for _, te in cv:
            pred = next(preds)[0]
            accs.append(float(np.mean(pred == ts.y[te])))
            right = int(np.sum(pred == ts.y[te]))
        if holdout:
            w = stats.wilson(right, len(cv[0][1]))
            ci = {"low": w["low"], "high": w["high"]}
        else:
            ci = stats.corrected_t(accs, k)
        pts.append(
            {
                "fraction": f,
                "per_class": max(2, int(round(f * full))),
                "accuracy_mean": float(np.mean(accs)),
                "accuracy_std": float(np.std(accs)),
                "low": ci["low"],
                "high": ci["high"],
            }
        )
    if cvr:  # the ranked run itself: its folds, its figure
        # the run's own folds (its first partitions, where the smaller points take fewer)
        theirs = cvr.get("partition_ids") or []
        same = cvr.get("folds_id") == fid or (not holdout and theirs[: len(ids)] == ids)
        pts.append(
            {
                "fraction": 1.0,
                "per_class": full,
                "accuracy_mean": cvr["accuracy_mean"],
                "accuracy_std": cvr["accuracy_std"],
                "low": cvr.get("accuracy_low"),
                "high": cvr.get("accuracy_high"),
                "the_ranked_run": True,
                "same_folds": same,
            }
        )
    return {
        "head": head,
        "pooling": pooling,
        "views": views,
        "folds": 1 if holdout else k,
        "protocol": "holdout" if holdout else "k-fold",
        "repeats": 1 if holdout else repeats,
        "run": (run or {}).get("run"),
        "points": pts,
        "advice": advice(pts),
    }


def advice(pts: list[dict[str, Any]]) -> str:
    """A plain reading of the curve's last doubling."""
    if len(pts) < 2:
        return "too few images per class for a learning curve"
    a, b = pts[-2], pts[-1]
    gain = (b["accuracy_mean"] - a["accuracy_mean"]) / max(
        np.log2(b["per_class"] / a["per_class"]), 1e-9
    )
    widths = [(p["high"] - p["low"]) / 2 for p in (a, b) if p.get("low") is not None] or [
        max(a["accuracy_std"], b["accuracy_std"])
    ]
    noise = max(widths) / 2
    if gain > max(0.01, noise):
        return (
            f"still rising: about +{gain:.1%} accuracy per doubling of images per class at "
            f"{b['per_class']}; more images would likely help"
        )
    return (
        f"flattening: {gain:+.1%} per doubling at {b['per_class']} images per class; more "
        "images of the same kind would likely help little"
    )
