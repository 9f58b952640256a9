"""Every registered backbone in a fresh process: images/s and peak memory in float32 and at
PRECISION=auto, and how close the two precisions' pooled features are."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backbone import FAMILIES, resolve
from pipeline.bench.instruments import PEAK_EXPR, say

BACKBONE_CODE = """
import json, resource, sys, time
import numpy as np
from pipeline.backbone import BackboneSpec, build, preprocess
name, n, batch, precision, dump = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6]
spec = BackboneSpec("none", name=name, precision=precision)
model = build(spec)
# images with structure (stripes of varying period and direction, noise), not noise alone
s = spec.input_size
yy, xx = np.mgrid[0:s, 0:s]
rng = np.random.default_rng(0)
imgs = []
for i in range(batch):
    base = (((xx if i % 2 else yy) // (4 + 3 * (i % 5))) % 2) * 150 + 40
    noise = rng.integers(0, 60, (s, s))
    imgs.append(np.stack([base + noise, base * 0.7 + noise, base * 0.4 + noise], -1))
x = preprocess(np.clip(np.stack(imgs), 0, 255).astype(np.uint8), name)
first = np.asarray(model.predict_on_batch(x), np.float32)  # warm-up
np.save(dump, first.reshape(len(first), -1, first.shape[-1]).mean(axis=1))  # avg-pooled
t = time.perf_counter()
for _ in range(max(1, n // batch)):
    np.asarray(model.predict_on_batch(x))
rate = max(1, n // batch) * batch / (time.perf_counter() - t)
peak = __PEAK__ / 1024
print("RESULT", json.dumps({"images_per_s": rate, "peak_mib": peak, "size": spec.input_size,
      "shape": list(model.output.shape[1:]), "precision": spec.precision}))
""".replace("__PEAK__", PEAK_EXPR)


def correlation(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Per-image Pearson correlation of two sets of pooled vectors: min and median."""
    c = [float(np.corrcoef(u, v)[0, 1]) for u, v in zip(a, b, strict=True)]
    return {"min": min(c), "median": float(statistics.median(c))}


def backbones(
    cfg: dict[str, int], batch: int, work: Path, versus: str = "auto", names: str = ""
) -> dict[str, Any]:
    """Every registered backbone (fresh process each, its own input size): images/s and peak
    memory in float32 and at `versus` (PRECISION=auto by default, resolved here), and the
    per-image correlation of the two precisions' pooled features on the same images.

    Where `versus` resolves to float32 (no native bfloat16 here), float32 is measured once.
    """
    other, why = resolve(versus)
    out: dict[str, Any] = {"versus": versus, "resolved": other, "reason": why, "runs": {}}

    def run(name: str, precision: str) -> tuple[dict[str, Any], np.ndarray]:
        dump = work / f"backbone-{name}-{precision}.npy"
        p = subprocess.run(
            [sys.executable, "-c", BACKBONE_CODE, name, str(cfg["backbone_n"]), str(batch),
             precision, str(dump)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")][0]
        return json.loads(line[7:]), np.load(dump)

    wanted = names.split(",") if names else list(FAMILIES)
    for name in wanted:
        fam = FAMILIES[name]
        row, f32 = run(name, "float32")
        row.update(gmac=fam.gmac, imagenet_top1=fam.top1)
        if other != "float32":
            o, feats = run(name, other)
            row[other] = {
                "images_per_s": o["images_per_s"],
                "peak_mib": o["peak_mib"],
                "speedup": o["images_per_s"] / row["images_per_s"],
                "correlation": correlation(f32, feats),
            }
        out["runs"][name] = row
        extra = ""
        if other != "float32":
            o = row[other]
            extra = (
                f"; {other} {o['images_per_s']:.2f} img/s ({o['speedup']:.2f}x), "
                f"correlation with float32 min {o['correlation']['min']:.5f}"
            )
        say(
            f"  {name}: float32 {row['images_per_s']:.2f} img/s at {row['size']} px, "
            f"{row['peak_mib']:.0f} MiB peak, {fam.gmac} GMAC, top-1 {fam.top1:.1%}{extra}"
        )
    if other == "float32":
        say(f"  PRECISION={versus} is float32 here ({why}): one column")
    return out
