"""`make train-head` measured: start-up, and the wall time of each head and pooling, each in a fresh
process, on synthetic cached features."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.bench.instruments import say, synthetic_cache


def heads_timing(work: Path, cfg: dict[str, int]) -> dict:
    """Start-up and wall time of `train-head` per head and pooling, each in a fresh process."""
    shape = (2, 2, 512)
    startup_code = (
        "import time; t = time.perf_counter(); import pipeline.cli, pipeline.train, "
        "pipeline.heads, pipeline.evaluate; print(time.perf_counter() - t)"
    )
    libs_code = (
        "import time; t = time.perf_counter(); import sklearn.linear_model, sklearn.svm, "
        "sklearn.model_selection, sklearn.metrics, h5py; print(time.perf_counter() - t)"
    )
    out: dict[str, Any] = {"map": list(shape), "runs": {}}

    def timed(code: str) -> tuple[float, float]:
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return time.perf_counter() - t, float(p.stdout)

    out["startup_s"], out["import_s"] = timed(startup_code)
    out["libraries_startup_s"], out["libraries_import_s"] = timed(libs_code)
    caches = {}
    for head in ("logreg", "svm", "dense"):
        n = cfg.get(f"{head}_n", cfg["train_n"])
        if n not in caches:
            caches[n] = synthetic_cache(work / f"synthetic-{n}.h5", n, shape)
        for pool in ("avg", "flatten"):
            art = work / f"heads-{head}-{pool}"
            t = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pipeline",
                    "train-head",
                    "--head",
                    head,
                    "--pool",
                    pool,
                    "--features",
                    str(caches[n]),
                    "--artifacts",
                    str(art),
                    "--folds",
                    "5",
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - t
            r = json.loads(next((art / "heads").glob("*/result.json")).read_text())
            out["runs"][f"{head}-{pool}"] = {
                "n": n,
                "wall_s": wall,
                "cv_s": r["timing_s"]["cv"],
                "final_fit_s": r["timing_s"]["final_fit"],
                "cv_accuracy": r["cv"]["accuracy_mean"],
                "dim": r["feature_dim"],
                "tensorflow_imported": head == "dense",
            }
            say(f"  {head}-{pool} ({n} images): {wall:.1f} s wall")
    say(
        f"  start-up (imports of train-head): {out['startup_s']:.2f} s; the libraries alone "
        f"(scikit-learn, h5py): {out['libraries_startup_s']:.2f} s"
    )
    return out
