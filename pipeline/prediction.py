"""`make predict`: classify new images with a saved head and exactly the backbone path of features.

The run's whole cache key is recomputed from this installation (backbone, weights by content,
layer, size, resize, preprocessing, loader version, dtype) and a mismatch is refused in one
line, so a head never sees features made differently from the ones it was trained on. Decoder
or framework versions that differ from the cache's are said. Writes `path,label,probability`,
then with `topk=K` the next best labels (`label_2,probability_2,...`), then the probability of
every class in class order (`p_<class>`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import dataset, images, layout, outputs, runs, store
from pipeline.backbone import BackboneSpec, spec_from_settings
from pipeline.batches import decoded_batches
from pipeline.errors import UserError
from pipeline.progress import Progress
from pipeline.provenance import difference, embedder

Log = Callable[[str], None]


@dataclass(frozen=True)
class _Item:
    path: str
    abspath: Path
    sha256: str | None = None
    view: int = 0


def check_features(r: dict[str, Any], weights: str | None = None) -> BackboneSpec:
    """The spec that makes the run's features here and now; a different cache key is refused."""
    from pipeline.features import cache_settings

    feats = r["features"]
    settings = feats["settings"]
    spec = spec_from_settings(settings, weights, hint=feats.get("weights"))
    now = cache_settings(spec, settings["dtype"], settings.get("maps", True))
    if store.cache_key(now) != feats["cache_key"]:
        diff = difference(settings, now) or "the cache key"
        raise UserError(
            f"run '{r['run']}' was trained on features this installation no longer makes "
            f"({diff}); rerun `make features` and `make train-head`"
        )
    return spec


def _views(item: _Item, arr: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    if not k:
        return [arr]
    sha = images.content_sha256(item.abspath)
    return [arr] + [images.augment(arr, images.view_rng(seed, sha, v)) for v in range(1, k + 1)]


def tta_seed(r: dict[str, Any]) -> int:
    """The seed of TTA's views: that of the views the run trained on, else of the cache.

    The cache's settings hold a seed for random weights only; a run without views then draws
    them as `make features AUGMENT=K SEED=<the run's seed>` would, never with a seed of 0.
    """
    feats = r["features"]
    views = feats.get("augmented") or {}
    if "seed" in views:
        return int(views["seed"])
    if "seed" in (feats.get("settings") or {}):
        return int(feats["settings"]["seed"])
    return int(r.get("seed", 0))


def columns(classes: list[str], topk: int = 0) -> list[str]:
    """The CSV's header: path,label,probability, the k-1 next best, then `p_<class>` per class."""
    top = [f"{c}_{i}" for i in range(2, topk + 1) for c in ("label", "probability")]
    return ["path", "label", "probability", *top, *(f"p_{c}" for c in classes)]


def _row(path: str, p: np.ndarray, classes: list[str], topk: int) -> dict[str, Any]:
    """One prediction: best label, its probability, every class's, and the k best (descending)."""
    best = np.argsort(-p, kind="stable")[: max(topk, 1)]  # ties keep class order
    return {
        "path": path,
        "label": classes[int(best[0])],
        "probability": float(p[best[0]]),
        "probabilities": {c: float(v) for c, v in zip(classes, p, strict=True)},
        "top": [(classes[int(i)], float(p[i])) for i in best],
        "error": "",
    }


def _csv_row(r: dict[str, Any]) -> list[str]:
    top = [x for lab, pr in r["top"][1:] for x in (lab, f"{pr:.6f}")]
    rest = [f"{v:.6f}" for v in r["probabilities"].values()]
    return [r["path"], r["label"], f"{r['probability']:.6f}", *top, *rest]


def classify(
    artifacts: Path,
    images_path: Path | Sequence[str | os.PathLike[str]],
    run: str | None = None,
    out: Path | None = None,
    weights: str | None = None,
    batch_size: int = 32,
    tta: int = 0,
    log: Log = print,
    backbone: str | None = None,
    topk: int = 0,
) -> tuple[list[dict[str, Any]], Path]:
    """Classify every image under `images_path`, write the CSV; return every image's row and
    the CSV's path.

    `images_path`: an image file, a folder, or a list of image files (paths kept as given).
    Each row: path, label, probability, `probabilities` (every class by name, in class order),
    `top` (the max(topk, 1) best (label, probability) pairs, most probable first) and `error`
    ("" or, for a file that could not be read, why: then label and probabilities are None and
    the CSV, which holds readable images only, leaves it out; the log says it).
    `tta=K` averages the head's probabilities over the image and K augmented views of it (the
    same augmentation as `make features AUGMENT=K`).
    """
    from pipeline import backbone as bb

    if topk < 0:
        raise UserError(f"TOPK must be 0 or a positive number of labels; got {topk}")
    listed = None if isinstance(images_path, (str, os.PathLike)) else [Path(p) for p in images_path]
    if listed is not None and not listed:
        raise UserError("IMAGES is an empty list; pass image files, a file or a folder")
    images_path = Path(images_path) if listed is None else Path(".")
    if listed is None and not images_path.exists() and not images_path.is_symlink():
        raise UserError(f"IMAGES '{images_path}' does not exist; pass an image file or a folder")
    r = runs.pick(artifacts, run)
    if not r["current"]:
        log(f"warning: run '{r['run']}' is stale ({r['stale_reason']})")
    spec = check_features(r, weights)
    if backbone and backbone != spec.name:
        raise UserError(
            f"run '{r['run']}' uses BACKBONE={spec.name}, not {backbone}; pick a {backbone} run "
            "with RUN=, or leave BACKBONE out"
        )
    est = runs.load_estimator(artifacts, r)
    settings = r["features"]["settings"]
    if r["features"]["random_weights"]:
        log("*** RANDOM WEIGHTS: this head was trained on features of an untrained VGG16 ***")
    now = embedder()
    for e in r["features"].get("embedders") or []:
        if e != now:
            log(
                "warning: the head's features were embedded with other decoder/framework "
                f"versions ({difference(e, now)}); predictions may differ slightly from the "
                "cached features: `make features REBUILD=1` and retrain to align them"
            )
            break
    if listed is not None:  # a list (the library): each path as given, in the given order
        files, base = listed, None
    elif images_path.is_dir():
        files, base = dataset.walk_files(images_path), images_path
    else:
        files, base = [images_path], images_path.parent
    if not files:
        raise UserError(f"IMAGES folder '{images_path}' has no files")
    model = bb.build(spec)
    classes = r["classes"]
    if topk > len(classes):
        log(f"TOPK={topk} is more than the {len(classes)} classes: writing all {len(classes)}")
        topk = len(classes)
    seed = tta_seed(r)
    progress = Progress(len(files), "predicting")
    todo = [
        _Item(dataset.display(str(f) if base is None else f.relative_to(base).as_posix()), f)
        for f in files
    ]
    done: dict[int, dict[str, Any]] = {}  # id of a todo item -> its row
    workers = min(8, (os.cpu_count() or 2) + 2)
    for jobs, decoded in decoded_batches(todo, spec.input_size, batch_size, workers):
        ok = []
        for j, d in zip(jobs, decoded, strict=True):
            if isinstance(d, str):
                done[id(j)] = _failed(j.path, d)
            else:
                ok.append((j, d))
        if ok:
            stack = [v for j, d in ok for v in _views(j, d, tta, seed)]
            x = bb.preprocess(np.stack(stack), spec.name)
            maps = np.asarray(model.predict_on_batch(x))
            proba = est.predict_proba(store.pool(maps.astype(settings["dtype"]), r["pooling"]))
            proba = proba.reshape(len(ok), tta + 1, -1).mean(axis=1)  # test-time averaging
            full = np.zeros((len(ok), len(classes)))  # a class the head never saw: 0
            full[:, np.asarray(est.classes_, dtype=int)] = proba
            done.update(
                (id(j), _row(j.path, p, classes, topk)) for (j, _), p in zip(ok, full, strict=True)
            )
        progress.update(len(jobs))
    everything = [done[id(j)] for j in todo]  # every image, in order
    rows = [row for row in everything if not row["error"]]
    out = Path(out) if out else layout.predictions_file(artifacts)
    with outputs.written(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(columns(classes, topk))
        w.writerows(_csv_row(row) for row in rows)
    for row in everything:
        if row["error"]:
            log(f"could not read {row['path']}: {row['error']}")
    n_bad = len(everything) - len(rows)
    log(f"predicted {len(rows)} images with head {r['run']}, {n_bad} unreadable; wrote {out}")
    return everything, out


def _failed(path: str, reason: str) -> dict[str, Any]:
    return {
        "path": path,
        "label": None,
        "probability": None,
        "probabilities": None,
        "top": [],
        "error": reason,
    }
