"""`make sweep`: heads x pooling x augmentation on the cache alone, ranked, plus a learning curve.

Every combination goes through `train_head` (nested cross-validation, saved, in the report), on
the same outer folds. The learning curve refits the best combination on growing numbers of
training images per class, scored on those same outer folds (so its last point is the ranking's
own figure, with the same optimism as the pick), to tell whether more images would help.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import evaluate, heads, layout, store
from pipeline.errors import UserError
from pipeline.train import load, train_head

Log = Callable[[str], None]


def _split(value: str, kind: type) -> list[Any]:
    return [kind(v.strip()) for v in value.split(",") if v.strip()]


def run_sweep(
    artifacts: Path,
    heads_list: str = "logreg,svm,dense",
    pools: str = "avg,max,flatten",
    views: str = "0",
    folds: int = 5,
    seed: int = 0,
    curve_points: int = 5,
    log: Log = print,
    client: Any = None,
    backbones: str = "",
    extraction: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train every combination, rank them, and write the best one's learning curve.

    With `backbones` (e.g. "vgg16,resnet50") and `extraction` (data, weights, size, batch,
    precision, dtype, augment for `features.extract`), each backbone is extracted once into its
    own incremental cache first, and the ranking spans backbone x head x pooling x views.
    """
    names, pool_list, view_list = _split(heads_list, str), _split(pools, str), _split(views, int)
    caches: list[tuple[str, Path | None]] = [("", None)]
    if backbones:
        from pipeline.backbone import BackboneSpec, family
        from pipeline.features import extract

        if not extraction or not extraction.get("data"):
            raise UserError("SWEEP_BACKBONES needs DATA (each backbone is extracted once)")
        wanted = _split(backbones, str)
        for b in wanted:
            family(b)  # every name checked before any work
        caches = []
        for i, b in enumerate(wanted):
            log(f"--- sweep: features for {b}")
            spec = BackboneSpec(
                weights=extraction.get("weights", "imagenet"),
                name=b,
                input_size=extraction.get("size"),
                seed=seed,
                precision=extraction.get("precision", "float32"),
            )
            s = extract(
                Path(extraction["data"]),
                artifacts,
                spec,
                batch_size=extraction.get("batch", 32),
                dtype=extraction.get("dtype", "float16"),
                augment=extraction.get("augment", 0),
                log=log,
                set_current=i == 0,
                embedder_fn=extraction.get("embedder_fn"),
            )
            caches.append((b, s.cache))
    for h in names:
        if heads.get(h).needs_layer:
            raise UserError(f"HEAD={h} has its own command (`make {h}`); leave it out of HEADS")
    for p in pool_list:
        store.pool(np.zeros((1, 1, 1, 1), np.float32), p)
    results = []
    for b, cache in caches:
        for v in view_list:
            for h in names:
                for p in pool_list:
                    log(f"--- sweep: {b + ', ' if b else ''}{h}, {p} pooling, {v} augmented views")
                    r = train_head(
                        artifacts,
                        h,
                        pooling=p,
                        folds=folds,
                        seed=seed,
                        views=v,
                        log=log,
                        client=client,
                        features=cache,
                    )
                    results.append(_row(r, h, p, v))
    results.sort(key=lambda r: (-r["cv_accuracy_mean"], r["run"]))  # ties: by name
    best = results[0]
    log(f"best: {best['run']} {best['cv_accuracy_mean']:.4f} ± {best['cv_accuracy_std']:.4f}")
    cache = layout.cache_by_name(artifacts, best["cache"])
    curve = learning_curve(cache, best["head"], best["pooling"], folds, seed, curve_points)
    attrs = store.read_attrs(cache)
    out = {
        "ranking": results,
        "learning_curve": curve,
        "features": {
            "file": cache.name,
            "cache_key": attrs["cache_key"],
            "data_id": attrs["data_id"],
        },
    }
    path = layout.sweep_file(artifacts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
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
        "validation_accuracy": (r["validation"] or {}).get("accuracy"),
        "cache": r["features"]["file"],
    }


def learning_curve(
    cache: Path, head: str, pooling: str, folds: int, seed: int, points: int = 5
) -> dict[str, Any]:
    """CV accuracy of `head` when each class gets only n training images, for growing n.

    Scored on the same group-aware outer folds as every run on this cache and seed.
    """
    info = heads.get(head)
    ts = load(cache, pooling).train
    counts = np.bincount(ts.y)
    counts = counts[counts > 0]
    k = int(min(folds, counts.min()))
    largest = int(counts.min() * (k - 1) / k)  # images per class available in every fold
    sizes = sorted({int(round(v)) for v in np.geomspace(min(3, largest), largest, points)})
    sizes = [s for s in sizes if s >= 2]
    rng = np.random.default_rng(seed)
    splits, _ = evaluate.splits(ts, k, seed)
    pts = []
    for n in sizes:
        accs = []
        for train_idx, test_idx in splits:
            sub = np.concatenate(
                [rng.permutation(train_idx[ts.y[train_idx] == c])[:n] for c in np.unique(ts.y)]
            )
            est = heads.fit(heads.make(info, {}, seed), ts.X[sub], ts.y[sub], ts.groups[sub])
            accs.append(float(np.mean(est.predict(ts.X[test_idx]) == ts.y[test_idx])))
        pts.append(
            {
                "per_class": n,
                "accuracy_mean": float(np.mean(accs)),
                "accuracy_std": float(np.std(accs)),
            }
        )
    return {"head": head, "pooling": pooling, "folds": k, "points": pts, "advice": advice(pts)}


def advice(pts: list[dict[str, Any]]) -> str:
    """A plain reading of the curve's last doubling."""
    if len(pts) < 2:
        return "too few images per class for a learning curve"
    a, b = pts[-2], pts[-1]
    gain = (b["accuracy_mean"] - a["accuracy_mean"]) / max(
        np.log2(b["per_class"] / a["per_class"]), 1e-9
    )
    noise = max(a["accuracy_std"], b["accuracy_std"]) / 2
    if gain > max(0.01, noise):
        return (
            f"still rising: about +{gain:.1%} accuracy per doubling of images per class at "
            f"{b['per_class']}; more images would likely help"
        )
    return (
        f"flattening: {gain:+.1%} per doubling at {b['per_class']} images per class; more "
        "images of the same kind would likely help little"
    )
