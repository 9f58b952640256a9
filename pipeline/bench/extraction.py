"""`make features` and `make predict` measured: throughput against the bare forward pass, reruns,
peak memory at N and 4N images, one process against CLUSTER=local:2, predict on new images and
on the same images again."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import store
from pipeline.backbone import preprocess
from pipeline.bench.instruments import PEAK_EXPR, make_images, say
from pipeline.features import extract
from pipeline.prediction import classify
from pipeline.store import keys
from pipeline.train import train_head


def bare_rates(
    model: Any, n_images: int, size: int, batches: tuple[int, ...], name: str = "vgg16"
) -> dict[str, float]:
    """Images/s of the backbone alone on preprocessed tensors, per call style and batch size."""
    return {
        f"{style}@{b}": bare_rates_single(model, style, b, n_images, size, name)
        for b in batches
        for style in ("predict_on_batch", "call")
    }


def bare_rates_single(
    model: Any, style: str, b: int, n: int, size: int, name: str = "vgg16"
) -> float:
    x = preprocess(np.random.default_rng(b).integers(0, 255, (b, size, size, 3), np.uint8), name)
    fn = (
        (lambda: model(x, training=False))
        if style == "call"
        else (lambda: model.predict_on_batch(x))
    )
    np.asarray(fn())
    reps = max(1, n // b)
    t = time.perf_counter()
    for _ in range(reps):
        np.asarray(fn())
    return reps * b / (time.perf_counter() - t)


def extraction(work: Path, cfg: dict[str, int], model: Any, spec: Any, batch: int) -> dict:
    """Pipeline vs bare pass, interleaved round by round, for each image kind."""
    quiet = lambda s: None  # noqa: E731
    search = bare_rates(model, 16, spec.input_size, (1, 16, 32), spec.name)
    best = max(search, key=search.get)
    say(f"  bare pass search: {', '.join(f'{k} {v:.1f}' for k, v in search.items())} img/s")
    res: dict[str, Any] = {
        "backbone": spec.name,
        "input_size": spec.input_size,
        "precision": spec.precision,  # both sides: the pipeline's model is the bare pass's
        "bare_search": search,
        "bare_best": best,
        "kinds": {},
    }
    for kind in ("png", "jpeg"):
        pipe, bare = [], []
        for r in range(cfg["rounds"]):
            data = make_images(work / f"{kind}-data-{r}", cfg["per_round"], kind, seed=r + 1)
            art = work / f"{kind}-art-{r}"
            s = extract(data, art, spec, batch_size=batch, log=quiet, model=model)
            pipe.append(s.new / s.seconds)
            bare.append(
                bare_rates_single(
                    model,
                    *best.split("@")[0:1],
                    int(best.split("@")[1]),
                    cfg["per_round"],
                    spec.input_size,
                    spec.name,
                )
            )
            say(f"  {kind} round {r + 1}: pipeline {pipe[-1]:.2f} img/s, bare {bare[-1]:.2f} img/s")
            shutil.rmtree(data)
        mp, mb = statistics.median(pipe), statistics.median(bare)
        res["kinds"][kind] = {
            "pipeline": pipe,
            "bare": bare,
            "pipeline_median": mp,
            "bare_median": mb,
            "ratio_of_medians": mp / mb,
            # rounds are interleaved pairs: the median of per-round ratios cancels the drift
            "ratio": statistics.median(p / b for p, b in zip(pipe, bare, strict=True)),
        }
    return res


def reruns(work: Path, cfg: dict[str, int], model: Any, spec: Any, batch: int) -> dict:
    """Full extraction, unchanged rerun, rerun with 1% new images (in-process, model built)."""
    quiet = lambda s: None  # noqa: E731
    n = cfg["rerun_n"]
    data = make_images(work / "rerun-data", n, "png", seed=100)
    art = work / "rerun-art"
    full = extract(data, art, spec, batch_size=batch, log=quiet, model=model)
    same = extract(data, art, spec, batch_size=batch, log=quiet, model=model)
    make_images(work / "rerun-data", max(1, n // 100), "png", seed=200)
    more = extract(data, art, spec, batch_size=batch, log=quiet, model=model)
    # the whole cache: its index and its shard files, per row
    size = full.cache.stat().st_size + sum(
        f.stat().st_size for f in store.shards_dir(full.cache).rglob("*") if f.is_file()
    )
    rows = n + more.new
    cli = [
        sys.executable,
        "-m",
        "pipeline",
        "features",
        "--data",
        str(data),
        "--artifacts",
        str(art),
        "--weights",
        spec.weights,
        "--size",
        str(spec.input_size),
        "--backbone",
        spec.name,
        "--precision",
        spec.precision,
    ]
    t = time.perf_counter()
    subprocess.run(cli, check=True, capture_output=True)
    cli_same = time.perf_counter() - t
    return {
        "n": n,
        "full_s": full.seconds,
        "unchanged_s": same.seconds,
        "added": more.new,
        "added_s": more.seconds,
        "unchanged_fraction": same.seconds / full.seconds,
        "added_fraction": more.seconds / full.seconds,
        "unchanged_cli_process_s": cli_same,
        "cache_bytes": size,
        "bytes_per_image": size / rows,
        "input_size": spec.input_size,
        "feature_bytes_per_image": int(np.prod((7, 7, 512))) * 2
        if spec.input_size == 224
        else None,
    }


def peak_memory(work: Path, cfg: dict[str, int], spec: Any, batch: int) -> dict:
    """Peak RSS of a fresh `features` process at N and 4N images, at one batch size.

    The batch holds at most N/2 images, so both runs fill whole batches: activation memory
    grows with the batch (a separate setting), and the figure is about growth with N alone.
    """
    batch = max(1, min(batch, cfg["mem_n"] // 2))
    out: dict[str, Any] = {"batch": batch}
    for mult in (1, 4):
        n = cfg["mem_n"] * mult
        data = make_images(work / f"mem-data-{n}", n, "png", seed=300 + mult)
        code = (
            "import resource, sys, json; from pipeline.cli import main; rc = main(sys.argv[1:]); "
            f"print('PEAK', {PEAK_EXPR}); sys.exit(rc)"
        )
        p = subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                "features",
                "--data",
                str(data),
                "--artifacts",
                str(work / f"mem-art-{n}"),
                "--weights",
                spec.weights,
                "--size",
                str(spec.input_size),
                "--backbone",
                spec.name,
                "--precision",
                spec.precision,
                "--batch",
                str(batch),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        kib = int([ln for ln in p.stdout.splitlines() if ln.startswith("PEAK")][0].split()[1])
        out[str(n)] = kib / 1024
        say(f"  peak memory at {n} images: {kib / 1024:.0f} MiB")
    n1, n4 = (str(cfg["mem_n"]), str(cfg["mem_n"] * 4))
    out["ratio_4n_over_n"] = out[n4] / out[n1]
    return out


def cluster_extraction(work: Path, cfg: dict[str, int], spec: Any, batch: int) -> dict:
    """`make features` throughput on the same images in one process and on CLUSTER=local:2."""
    data = make_images(work / "cluster-data", cfg["cluster_n"], "png", seed=77)
    out: dict[str, Any] = {"images": cfg["cluster_n"]}
    for name, value in (("single", ""), ("local:2", "local:2")):
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "pipeline", "features", "--data", str(data),
               "--artifacts", str(work / f"cluster-art-{name}"), "--weights", spec.weights,
               "--size", str(spec.input_size), "--batch", str(batch), "--backbone", spec.name,
               "--precision", spec.precision]  # fmt: skip
        if value:
            cmd += ["--cluster", value]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - t
        out[name] = {"wall_s": wall, "images_per_s": cfg["cluster_n"] / wall}
        say(f"  {name}: {cfg['cluster_n'] / wall:.2f} img/s ({wall:.1f} s wall, start-up in)")
    out["ratio_local2_over_single"] = out["local:2"]["images_per_s"] / out["single"]["images_per_s"]
    return out


def predict_rates(work: Path, cfg: dict[str, int], spec: Any, batch: int) -> dict[str, Any]:
    """`make predict` images/s (in-process) on new images, then on the same images again.

    The first call builds the backbone and embeds every image (as a `make predict` process
    does); the second finds every image's features kept by the first and builds none. The head
    is a logistic regression on 8 training images (its cost is not what is measured).
    """
    quiet = lambda s: None  # noqa: E731
    n = cfg["predict_n"]
    art = work / "predict-art"
    extract(make_images(work / "predict-train", 8, "png", seed=300), art, spec, log=quiet)
    train_head(art, "logreg", folds=2, log=quiet)
    new = make_images(work / "predict-new", n, "png", seed=301)
    out: dict[str, Any] = {"images": n, "batch": batch}
    for name in ("new", "again"):
        keys.READ.update(idents=0, keys=0)
        t = time.perf_counter()
        rows, _ = classify(art, new, out=work / f"predict-{name}.csv", batch_size=batch, log=quiet)
        wall = time.perf_counter() - t
        ran = sum(bool(r["backbone_ran"]) for r in rows)
        out[name] = {
            "wall_s": wall,
            "images_per_s": n / wall,
            "backbone_ran": ran,
            # what finding the images by content read: in proportion to the images, not the
            # rows held (identity values of candidate rows; key-table entries)
            "lookup_idents_read": keys.READ["idents"],
            "lookup_keys_read": keys.READ["keys"],
        }
        say(
            f"  {name}: {n / wall:.2f} img/s ({wall:.2f} s, the backbone ran for {ran} of {n}; "
            f"the lookup read {keys.READ['idents']} identities)"
        )
    out["speedup_again"] = out["again"]["images_per_s"] / out["new"]["images_per_s"]
    return out
