"""`make demo`: the whole job on a small real image set that ships inside scikit-learn.

scikit-learn's handwritten digits (1,797 scans of 8x8 pixels) are written out as PNGs in the
classic layout (train/ and validation/), then features, all three heads and the report run.
Where the ImageNet weights cannot be had, the demo alone continues with random weights, under a
banner that every output repeats.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline import outputs
from pipeline.errors import UserError
from pipeline.settings import DemoSettings
from pipeline.settings_base import takes

Log = Callable[[str], None]


def write_digits(
    folder: Path,
    per_class: int | None = None,
    validation: float = 0.2,
    seed: int = 0,
    pixels: int = 32,
) -> Path:
    """Write the digits as square grayscale PNGs under folder/train and folder/validation."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X, y = d.images, d.target
    if per_class is not None:
        rng = np.random.default_rng(seed)
        keep = np.concatenate(
            [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)]
        )
        X, y = X[keep], y[keep]
    idx_tr, idx_va = train_test_split(
        np.arange(len(y)), test_size=validation, stratify=y, random_state=seed
    )
    for split, idx in (("train", idx_tr), ("validation", idx_va)):
        for i in idx:
            out = folder / split / str(y[i]) / f"digit-{i:04d}.png"
            if out.exists():  # whole: an interrupted run leaves no half image to keep
                continue
            img = (255 - X[i] * (255 / 16)).astype(np.uint8)  # dark ink on white paper
            small = Image.fromarray(img, "L").resize((pixels, pixels), Image.Resampling.BICUBIC)
            with outputs.written(out, durable=False) as tmp:  # made again from nothing
                small.save(tmp, format="PNG")
    return folder


@takes(DemoSettings)
def run_demo(s: DemoSettings, per_class: int | None = None, log: Log = print) -> dict:
    """Sample data, features, logreg + svm + dense heads, report; returns the report.

    Settings and defaults: `pipeline.settings.DemoSettings` (pass one, or its fields)."""
    from pipeline.backbone import BackboneSpec
    from pipeline.cache_identity import RANDOM_BANNER
    from pipeline.features import extract
    from pipeline.reporting import build_report
    from pipeline.train import train_head

    artifacts, weights, size, folds = Path(s.artifacts), s.weights, s.size, s.folds
    data = write_digits(artifacts / "demo-data", per_class=per_class)
    log(f"demo dataset: {data} (scikit-learn digits as PNGs)")
    try:
        extract(data, artifacts, BackboneSpec(weights=weights, input_size=size), log=log)
    except UserError as e:
        if weights.lower() != "imagenet":
            raise
        log(f"warning: {e}")
        log(f"*** the demo continues with random weights. {RANDOM_BANNER} ***")
        extract(data, artifacts, BackboneSpec(weights="none", input_size=size), log=log)
    for head in ("logreg", "svm", "dense"):
        train_head(artifacts, head=head, folds=folds, log=log)
    return build_report(artifacts, log=log)
