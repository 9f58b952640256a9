"""`make train-head`: cross-validate a head on cached features, score it on validation, save it.

Reads only the HDF5 cache: the backbone is never run here, and the scikit-learn heads never
import TensorFlow. Each run writes `ARTIFACTS/heads/<run>/` with the fitted head and
`result.json` (metrics, settings, seed, package versions).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import evaluate, heads, store
from pipeline.errors import UserError
from pipeline.features import current_cache
from pipeline.provenance import environment
from pipeline.seeding import set_seeds

Log = Callable[[str], None]


def heads_dir(artifacts: Path) -> Path:
    return Path(artifacts) / "heads"


def run_name(head: str, pooling: str, params: dict[str, Any], tag: str = "") -> str:
    parts = [head, pooling] + [f"{k}={v}" for k, v in sorted(params.items())]
    if tag:
        parts.append(tag)
    return "-".join(parts).replace("/", "_")


def train_head(
    artifacts: Path,
    head: str = "logreg",
    pooling: str | None = None,
    folds: int = 5,
    seed: int = 0,
    params: dict[str, str] | None = None,
    features: Path | None = None,
    n_jobs: int | None = None,
    views: int = 0,
    log: Log = print,
) -> dict[str, Any]:
    """Cross-validate, validate and save one head; return its result (also in result.json)."""
    t0 = time.perf_counter()
    info = heads.get(head)
    p = heads.parse_params(info, params or {})
    pooling = pooling or info.default_pooling
    set_seeds(seed)
    path = Path(features) if features else current_cache(artifacts)
    idx = store.read_index(path)
    tr = store.load_features(path, pooling, "train")
    va = store.load_features(path, pooling, "validation")
    classes = idx.classes
    groups = mask = None
    if views:
        tr, groups, mask = _with_views(path, tr, pooling, views)
    if idx.attrs.get("random_weights"):
        log(f"*** {idx.attrs.get('banner', 'RANDOM WEIGHTS')} ***")
    context = {
        "weights": idx.attrs.get("weights"),
        "seed": int(idx.attrs.get("seed", 0)),
        "feature_shape": store.f_shape(idx),
    }
    if info.needs_layer:
        if idx.attrs.get("layer") != info.needs_layer:
            raise UserError(
                f"HEAD={head} needs the {info.needs_layer} cache, this one is "
                f"{idx.attrs.get('layer')}; run `make finetune` (it caches {info.needs_layer} once)"
            )
        if pooling != "flatten":
            raise UserError(f"HEAD={head} takes the whole map: POOL must be flatten, not {pooling}")
        from pipeline.backbone import spec_from_settings

        spec_from_settings(idx.attrs["settings"])  # the weights file must still be the same
    if n_jobs is None:
        n_jobs = min(folds, os.cpu_count() or 1) if info.parallel_folds else 1
    log(
        f"{head} on {pooling} features {tr.X.shape[1]}-d: {len(tr.y)} train, "
        f"{len(va.y)} validation images, {len(classes)} classes"
    )
    t_cv = time.perf_counter()
    cv = evaluate.cross_validate(
        heads.factory(info, p, seed, context=context),
        tr.X,
        tr.y,
        classes,
        folds,
        seed,
        n_jobs=n_jobs,
        groups=groups,
        evaluate_mask=mask,
        log=log,
    )
    cv_s = time.perf_counter() - t_cv
    log(
        f"cross-validated accuracy {cv['accuracy_mean']:.4f} ± {cv['accuracy_std']:.4f} "
        f"over {cv['folds']} folds: {', '.join(f'{a:.3f}' for a in cv['fold_accuracies'])}"
    )
    t_fit = time.perf_counter()
    final = heads.factory(info, p, seed, final=True, context=context)(tr.y).fit(tr.X, tr.y)
    fit_s = time.perf_counter() - t_fit
    validation = None
    if len(va.y):
        pred = final.predict(va.X)
        validation = evaluate.metrics(va.y, pred, classes)
        validation["wrong"] = [
            {"path": va.paths[i], "true": classes[va.y[i]], "pred": classes[pred[i]]}
            for i in np.flatnonzero(pred != va.y)[:200]
        ]
        log(f"validation accuracy {validation['accuracy']:.4f} on {len(va.y)} images")
    name = run_name(head, pooling, p, tag=f"views={views}" if views else "")
    out_dir = heads_dir(artifacts) / name
    saved = heads.save_head(final, out_dir)
    result = {
        "run": name,
        "head": head,
        "description": info.description,
        "pooling": pooling,
        "params": p,
        "final_params": heads.chosen_params(final),
        "seed": seed,
        "classes": classes,
        "n_train": int(len(tr.y) if mask is None else mask.sum()),
        "views": views,
        "n_train_rows": int(len(tr.y)),
        "n_validation": int(len(va.y)),
        "feature_dim": int(tr.X.shape[1]),
        "cv": cv,
        "validation": validation,
        "features": {
            "path": str(path),
            "cache_key": idx.attrs.get("cache_key"),
            "settings": idx.attrs.get("settings"),
            "random_weights": bool(idx.attrs.get("random_weights", False)),
            "n_skipped": len(idx.skipped),
        },
        "saved": [s.name for s in saved],
        "timing_s": {"cv": cv_s, "final_fit": fit_s, "total": time.perf_counter() - t0},
        "environment": environment(),
    }
    tmp = out_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out_dir / "result.json")
    log(f"saved {out_dir}")
    return result


def _with_views(
    path: Path, tr: store.Features, pooling: str, views: int
) -> tuple[store.Features, np.ndarray, np.ndarray]:
    """Originals plus their cached augmented views; groups tie each view to its image."""
    from pipeline.features import augment_path

    apath = augment_path(path)
    if not apath.is_file():
        raise UserError(
            f"VIEWS={views} needs cached augmented views; run `make features AUGMENT={views}` first"
        )
    aug = store.load_features(apath, pooling, "train", max_view=views)
    have = int(aug.view.max(initial=0))
    if have < views:
        raise UserError(
            f"the cache holds {have} augmented views per image, VIEWS={views} asked; "
            f"run `make features AUGMENT={views}`"
        )
    keep = np.isin(aug.sha256, tr.sha256)
    group_of = {h: i for i, h in enumerate(dict.fromkeys(tr.sha256))}
    X = np.concatenate([tr.X, aug.X[keep]])
    y = np.concatenate([tr.y, aug.y[keep]])
    sha = tr.sha256 + [h for h, k in zip(aug.sha256, keep, strict=True) if k]
    view = np.concatenate([tr.view, aug.view[keep]])
    paths = tr.paths + [p for p, k in zip(aug.paths, keep, strict=True) if k]
    groups = np.array([group_of[h] for h in sha])
    both = store.Features(X=X, y=y, paths=paths, sha256=sha, view=view)
    return both, groups, view == 0


def load_results(artifacts: Path) -> list[dict[str, Any]]:
    """Every trained head's result, best cross-validated accuracy first."""
    out = []
    for p in sorted(heads_dir(artifacts).glob("*/result.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(out, key=lambda r: -r["cv"]["accuracy_mean"])
