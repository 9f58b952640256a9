"""`make predict`: classify new images with a saved head and exactly the backbone path of features.

Same loader, resize, preprocessing and weights as the cache the head was trained on (checked by
weights identity), so no silent train/serve mismatch. Writes `path,label,probability` rows.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import dataset, heads, images, store
from pipeline.backbone import file_sha256, spec_from_settings
from pipeline.errors import UserError
from pipeline.features import Job, decoded_batches
from pipeline.progress import Progress
from pipeline.train import heads_dir, load_results

Log = Callable[[str], None]


def pick_run(artifacts: Path, run: str | None) -> dict[str, Any]:
    """The named trained head, or the best by cross-validated accuracy."""
    results = load_results(artifacts)
    if not results:
        raise UserError(
            f"no trained heads in '{heads_dir(artifacts)}'; run `make train-head` first"
        )
    if run is None:
        return results[0]
    for r in results:
        if r["run"] == run:
            return r
    raise UserError(
        f"RUN '{run}' is not a trained head; trained: {', '.join(r['run'] for r in results)}"
    )


def _views(job: Job, arr: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    if not k:
        return [arr]
    sha = file_sha256(job.abspath)
    return [arr] + [images.augment(arr, images.view_rng(seed, sha, v)) for v in range(1, k + 1)]


def predict(
    artifacts: Path,
    images_path: Path,
    run: str | None = None,
    out: Path | None = None,
    weights: str | None = None,
    batch_size: int = 32,
    tta: int = 0,
    log: Log = print,
) -> Path:
    """Classify every image under `images_path`; return the CSV's path.

    `tta=K` averages the head's probabilities over the image and K augmented views of it (the
    same augmentation as `make features AUGMENT=K`).
    """
    from pipeline import backbone

    images_path = Path(images_path)
    if not images_path.exists() and not images_path.is_symlink():
        raise UserError(f"IMAGES '{images_path}' does not exist; pass an image file or a folder")
    r = pick_run(artifacts, run)
    est = heads.load_head(heads_dir(artifacts) / r["run"])
    settings = r["features"]["settings"]
    spec = spec_from_settings(settings, weights)
    if r["features"]["random_weights"]:
        log("*** RANDOM WEIGHTS: this head was trained on features of an untrained VGG16 ***")
    if images_path.is_dir():
        files = dataset.walk_files(images_path)
        base = images_path
    else:
        files, base = [images_path], images_path.parent
    if not files:
        raise UserError(f"IMAGES folder '{images_path}' has no files")
    model = backbone.build(spec)
    classes = r["classes"]
    rows: list[tuple[str, str, float]] = []
    bad: list[tuple[str, str]] = []
    progress = Progress(len(files), "predicting")
    todo = [
        Job(dataset.display(f.relative_to(base).as_posix()), f, -1, "predict", None) for f in files
    ]
    workers = min(8, (os.cpu_count() or 2) + 2)
    for jobs, decoded in decoded_batches(todo, spec.input_size, batch_size, workers):
        bad += [(j.path, d) for j, d in zip(jobs, decoded, strict=True) if isinstance(d, str)]
        ok = [(j, d) for j, d in zip(jobs, decoded, strict=True) if not isinstance(d, str)]
        if ok:
            stack = [v for j, d in ok for v in _views(j, d, tta, int(settings.get("seed", 0)))]
            maps = np.asarray(model.predict_on_batch(backbone.preprocess(np.stack(stack))))
            proba = est.predict_proba(store.pool(maps.astype(settings["dtype"]), r["pooling"]))
            proba = proba.reshape(len(ok), tta + 1, -1).mean(axis=1)  # test-time averaging
            for (j, _), p in zip(ok, proba, strict=True):
                k = int(np.argmax(p))
                rows.append((j.path, classes[int(est.classes_[k])], float(p[k])))
        progress.update(len(jobs))
    out = Path(out) if out else Path(artifacts) / "predictions.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "probability"])
        w.writerows((p, lab, f"{pr:.6f}") for p, lab, pr in rows)
    for p, reason in bad:
        log(f"could not read {p}: {reason}")
    log(f"predicted {len(rows)} images with head {r['run']}, {len(bad)} unreadable; wrote {out}")
    return out
