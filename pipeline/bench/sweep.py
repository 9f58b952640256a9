"""`make sweep` and `make finetune` on a few hundred images, before and after issue 27.

Generated images of 8 classes (stripes, checks, discs, rings, ... with noise), embedded by VGG16
(random weights, `--sweep-size` px), then as a user runs them, each in a fresh process:

- before: every run gets the partitions the count alone gave (`--no-race --budget 1e9`: 10 for
  the linear heads up to 1,000 images, 3 for the networks);
- after: the defaults, a sweep that races (after the first partition only the runs the data
  cannot tell from the best go on) and repeats by time (3 minutes a run).

Minutes, fold fits, the best run and the runs tied with it, for both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench.instruments import say

CLASSES = 8
BEFORE = ["--budget", "1e9"]  # the count-based default: budget never binds


def images(folder: Path, n: int, px: int = 64, seed: int = 0, contrast: float = 40) -> Path:
    """n PNGs in CLASSES class folders (classic layout, train only): a pattern per class, faint
    under noise (`contrast` grey levels against noise of sd 60), so heads make mistakes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:px, 0:px]
    for i in range(n):
        c, p = i % CLASSES, int(rng.integers(0, 6))
        r = np.hypot(y - px / 2 - rng.normal(0, 3), x - px / 2 - rng.normal(0, 3))
        base = [
            ((y + p) // 4) % 2,
            ((x + p) // 4) % 2,
            ((x + y + p) // 5) % 2,
            (((x + p) // 6) + ((y + p) // 6)) % 2,
            r < px / 3,
            (r // 5) % 2,
            ((y + p) // 9) % 2,
            ((x - y + p) // 5) % 2,
        ][c].astype(float)
        img = base * contrast + rng.normal(0, 60, (px, px)) + 100
        rgb = np.clip(np.stack([img, img * 0.8, img * 0.6], -1), 0, 255).astype(np.uint8)
        f = folder / "train" / f"class_{c}" / f"{i:05d}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(f)
    return folder


def _run(args: list[str]) -> tuple[float, float, str]:
    """`python -m pipeline ARGS` in a fresh process with the defaults a user gets: its wall
    time and its processor time (its own and its workers'; less moved by other jobs on a
    shared machine than the wall time)."""
    import resource

    unset = ("PIPELINE_MAX_REPEATS", "PIPELINE_BUDGET")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=env
    )
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    wall, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - ru.ru_utime + after.ru_stime - ru.ru_stime
    return wall, cpu, p.stdout


def _sweep(art: Path, extra: list[str]) -> dict[str, Any]:
    s, cpu, out = _run(["sweep", "--artifacts", str(art), *extra])
    sw = json.loads((art / "sweep" / "sweep.json").read_text())
    rank = sw["ranking"]
    fits = sum(r["repeats"] * r["folds"] for r in rank)
    return {
        "minutes": s / 60,
        "cpu_minutes": cpu / 60,
        "runs": len(rank),
        "fold_fits": fits,
        "screened_out": sum(bool(r.get("screened_out")) for r in rank),
        "best": rank[0]["run"],
        "best_accuracy": rank[0]["cv_accuracy_mean"],
        "tied": sorted(r["run"] for r in rank[1:] if r["tied_with_best"]),
        "repeats": {r["run"]: r["repeats"] for r in rank},
        "first_line": next((ln for ln in out.splitlines() if ln.startswith("sweep: ")), ""),
    }


def _finetune(data: Path, art: Path, size: int, extra: list[str]) -> dict[str, Any]:
    args = ["finetune", "--data", str(data), "--artifacts", str(art), "--weights", "none"]
    s, cpu, out = _run([*args, "--size", str(size), *extra])
    r = json.loads(next((art / "heads").glob("*/result.json")).read_text())
    return {
        "minutes": s / 60,
        "cpu_minutes": cpu / 60,
        "repeats": r["repeats"],
        "repeats_reason": r.get("repeats_reason"),
        "first_line": next((ln for ln in out.splitlines() if ln.startswith("repeats: ")), ""),
        "fold_fits": len(r["cv"]["fold_accuracies"]),
        "cv_accuracy": r["cv"]["accuracy_mean"],
        "cv_low": r["cv"]["accuracy_low"],
        "cv_high": r["cv"]["accuracy_high"],
    }


def sweep_small(work: Path, n: int = 320, size: int = 96) -> dict[str, Any]:
    """`make sweep` (logreg, svm, dense x avg, max, flatten) and `make finetune` on n images
    of 8 classes at `size` px, before and after; minutes and fits of each."""
    data = images(work / "sweep-data", n)
    out: dict[str, Any] = {"images": n, "classes": CLASSES, "size": size}
    for label, extra in (("before", ["--no-race", *BEFORE]), ("after", [])):
        art = work / f"sweep-{label}"
        _run(["features", "--data", str(data), "--artifacts", str(art), "--weights", "none",
              "--size", str(size)])  # fmt: skip
        out[f"sweep_{label}"] = r = _sweep(art, extra)
        say(
            f"  make sweep, {label}: {r['minutes']:.1f} min ({r['cpu_minutes']:.1f} min of "
            f"processor), {r['runs']} runs, {r['fold_fits']} "
            f"fold fits, {r['screened_out']} screened out; best {r['best']} "
            f"{r['best_accuracy']:.3f}, {len(r['tied'])} tied with it"
        )
    b, a = out["sweep_before"], out["sweep_after"]
    out["sweep_same_best"] = b["best"] == a["best"]
    out["sweep_same_tied"] = b["tied"] == a["tied"]
    for label, extra in (("before", BEFORE), ("after", [])):
        out[f"finetune_{label}"] = r = _finetune(data, work / f"finetune-{label}", size, extra)
        say(
            f"  make finetune, {label}: {r['minutes']:.1f} min ({r['cpu_minutes']:.1f} min of "
            f"processor), {r['repeats']}x5 folds, CV "
            f"{r['cv_accuracy']:.3f} [{r['cv_low']:.3f}, {r['cv_high']:.3f}]"
        )
    return out
