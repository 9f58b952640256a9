"""`make bench`: speed and memory figures of the real paths, measured in one run on one machine.

1. extraction throughput of `make features` against the fastest bare forward pass of the same
   backbone on decoded, resized tensors (best batch size; direct call or predict_on_batch),
   interleaved round by round, medians and ratio, for small PNGs and ~2-megapixel JPEGs;
2-3. an unchanged rerun and a rerun after adding 1% new images, as fractions of the full run;
4. peak memory of extraction (a fresh process each) at N and 4N images;
5. `make train-head` wall time and start-up time per head on synthetic cached features;
6. bytes of cache per image;
7. every backbone's images/s and peak memory in float32 and at PRECISION=auto (what it resolves
   to here), with the per-image correlation of their pooled features;
8. `make predict` images/s on new images (the backbone built and run in the call, as in a
   `make predict` process) and on the same images again (their features kept: no backbone),
   with the identity values its lookup by content read (in proportion to the images asked);
9. (`--only gpu`, `make bench-gpu`, where a GPU is) the accelerator: float32 vs mixed precision at
   batch 64-512, plain and XLA-compiled forward pass, decode threads needed to feed it.
Writes ARTIFACTS/bench/bench.json and prints a table. The size is a setting (--size). Parts 1-2
run at --precision (default auto, resolved as `make features` does) for both the pipeline and the
bare pass.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import outputs

# rounds: interleaved pipeline/bare rounds; per_round: images per round and kind; rerun_n: the
# rerun dataset; mem_n: N of the memory check (and 4N); *_n: images for train-head timings.
# A kernel SVM's nested CV grows as n^2 or worse, the dense head's with epochs: 10,000 images
# take many minutes on 2 cores, so the default times them on fewer ("full" on 10,000).
SIZES: dict[str, dict[str, int]] = {
    "small": dict(
        rounds=2,
        per_round=8,
        rerun_n=40,
        mem_n=8,
        train_n=2000,
        svm_n=500,
        dense_n=500,
        scale_n=200,
        cluster_n=16,
        predict_n=16,
        gpu_n=64,
        gpu_reps=3,
        backbone_n=8,
    ),
    "default": dict(
        rounds=3,
        per_round=10,
        rerun_n=100,
        mem_n=32,
        train_n=10000,
        svm_n=1000,
        dense_n=2000,
        scale_n=2000,
        cluster_n=32,
        predict_n=64,
        gpu_n=512,
        gpu_reps=10,
        backbone_n=16,
    ),
    "full": dict(
        rounds=5,
        per_round=32,
        rerun_n=400,
        mem_n=64,
        train_n=10000,
        svm_n=10000,
        dense_n=10000,
        scale_n=10000,
        cluster_n=96,
        predict_n=256,
        gpu_n=2048,
        gpu_reps=20,
        backbone_n=64,
    ),
}


def _say(msg: str) -> None:
    print(msg, flush=True)


def make_images(folder: Path, n: int, kind: str, seed: int = 0) -> Path:
    """Two classes of generated images: 96-px PNGs, or ~2-megapixel (1632x1224) JPEGs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h, fmt = (96, 96, "PNG") if kind == "png" else (1632, 1224, "JPEG")
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        c = i % 2
        stripes = ((xx if c else yy) // (8 + i % 5)) % 2
        base = stripes * 150 + 40
        noise = rng.integers(0, 60, (h, w), dtype=np.uint8)
        img = np.stack([base + noise, base * 0.7 + noise, base * 0.4 + noise], -1)
        p = folder / f"class_{c}" / f"{kind}_{seed}_{i:05d}.{fmt.lower()}"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, format=fmt, quality=90)
    return folder


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
    from pipeline.backbone import preprocess

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
    from pipeline.features import extract

    quiet = lambda s: None  # noqa: E731
    search = bare_rates(model, 16, spec.input_size, (1, 16, 32), spec.name)
    best = max(search, key=search.get)
    _say(f"  bare pass search: {', '.join(f'{k} {v:.1f}' for k, v in search.items())} img/s")
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
            _say(
                f"  {kind} round {r + 1}: pipeline {pipe[-1]:.2f} img/s, bare {bare[-1]:.2f} img/s"
            )
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


# Peak resident memory of the current process in KiB. VmHWM, not ru_maxrss: on Linux a child
# started by a large parent reports the parent's ru_maxrss (kept across exec), not its own.
PEAK_EXPR = (
    "(int(next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')).split()[1]) "
    "if __import__('os').path.exists('/proc/self/status') else "
    "__import__('resource').getrusage(__import__('resource').RUSAGE_SELF).ru_maxrss)"
)


def reruns(work: Path, cfg: dict[str, int], model: Any, spec: Any, batch: int) -> dict:
    """Full extraction, unchanged rerun, rerun with 1% new images (in-process, model built)."""
    from pipeline import store
    from pipeline.features import extract

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
        _say(f"  peak memory at {n} images: {kib / 1024:.0f} MiB")
    n1, n4 = (str(cfg["mem_n"]), str(cfg["mem_n"] * 4))
    out["ratio_4n_over_n"] = out[n4] / out[n1]
    return out


class RandomMaps:
    """A stand-in backbone for the store's figures: random relu-like maps, no network."""

    def __init__(self, shape: tuple[int, int, int], classes: int = 10, seed: int = 0) -> None:
        self.shape, self.rng = shape, np.random.default_rng(seed)
        self.centers = self.rng.gamma(1.0, 1.0, (classes,) + shape).astype(np.float32)

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        # the class is written in the image's first pixel (see `tiny_images`)
        cls = (np.asarray(x)[:, 0, 0, 0] > 0).astype(int) % len(self.centers)
        noise = self.rng.gamma(1.0, 1.0, (len(x),) + self.shape).astype(np.float32)
        return 0.35 * self.centers[cls] + noise


def tiny_images(folder: Path, start: int, n: int, classes: int = 10) -> None:
    """n 8x8 PNGs in `classes` class folders (flat layout); cheap to write and to decode."""
    from PIL import Image

    for i in range(start, start + n):
        c = i % classes
        d = folder / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        arr = np.full((8, 8, 3), (i * 7) % 256, np.uint8)
        arr[0, 0] = (255 if c % 2 else 0, i % 256, (i // 256) % 256)
        Image.fromarray(arr).save(d / f"{i:08d}.png")


def synthetic_cache(path: Path, n: int, shape: tuple[int, int, int], classes: int = 10) -> Path:
    """A real cache of n rows of synthetic maps, written through the store (no backbone)."""
    from pipeline.backbone import BackboneSpec
    from pipeline.features import extract

    data = path.parent / f"{path.stem}-data"
    if not data.is_dir():
        tiny_images(data, 0, n, classes)
    art = path.parent / f"{path.stem}-art"
    spec = BackboneSpec("none", input_size=32 * shape[0])
    s = extract(data, art, spec, batch_size=256, log=lambda m: None, model=RandomMaps(shape))
    return s.cache


def _written(folder: Path, before: dict[str, tuple[int, int]]) -> int:
    """Bytes of the files under `folder` that are new or were rewritten since `before`."""
    total = 0
    for p in folder.rglob("*"):
        if p.is_file():
            st = p.stat()
            if before.get(str(p)) != (st.st_ino, st.st_mtime_ns):
                total += st.st_size
    return total


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def cli_peak(args: list[str]) -> tuple[float, int]:
    """Run `python -m pipeline ARGS` in a fresh process: (seconds, its own peak memory in KiB)."""
    code = (
        "import resource, sys; from pipeline.cli import main; rc = main(sys.argv[1:]); "
        f"print('PEAK', {PEAK_EXPR}); sys.exit(rc)"
    )
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    kib = int([ln for ln in p.stdout.splitlines() if ln.startswith("PEAK")][0].split()[1])
    return time.perf_counter() - t, kib


def scale(work: Path, cfg: dict[str, int]) -> dict[str, Any]:
    """The store at N and 10N rows (224 px maps, random, no backbone): +1 %, reruns, train-head."""
    from pipeline.backbone import BackboneSpec
    from pipeline.features import extract

    shape = (7, 7, 512)
    spec = BackboneSpec("none", input_size=224)
    out: dict[str, Any] = {"map": list(shape), "sizes": {}}
    for n in (cfg["scale_n"], 10 * cfg["scale_n"]):
        data, art = work / f"scale-data-{n}", work / f"scale-art-{n}"
        tiny_images(data, 0, n)
        model = RandomMaps(shape)
        t = time.perf_counter()
        first = extract(data, art, spec, batch_size=256, log=lambda m: None, model=model)
        build_s = time.perf_counter() - t
        fdir = first.cache.parent
        cache_bytes = sum(p.stat().st_size for p in fdir.rglob("*") if p.is_file())
        before = _files(fdir)
        add = max(1, n // 100)
        tiny_images(data, n, add)
        t = time.perf_counter()
        plus = extract(data, art, spec, batch_size=256, log=lambda m: None, model=model)
        add_s = time.perf_counter() - t
        add_bytes = _written(fdir, before)
        untouched = all(
            _files(fdir).get(k) == v for k, v in before.items() if "/g" in k and ".shards" in k
        )
        t = time.perf_counter()
        again = extract(data, art, spec, batch_size=256, log=lambda m: None, model=model)
        unchanged_s = time.perf_counter() - t
        head_s, kib = cli_peak(
            ["train-head", "--head", "logreg", "--pool", "avg", "--features", str(plus.cache),
             "--artifacts", str(work / f"scale-heads-{n}"), "--folds", "5"]
        )  # fmt: skip
        row = {
            "rows": n,
            "full_build_s": build_s,
            "cache_bytes": cache_bytes,
            "added_rows": add,
            "added_bytes_written": add_bytes,
            "added_bytes_per_row": add_bytes / add,
            "added_s": add_s,
            "existing_segments_untouched": untouched,
            "unchanged_rerun_s": unchanged_s,
            "unchanged_rerun_new": again.new,
            "train_head_logreg_avg_s": head_s,
            "train_head_logreg_avg_peak_mib": kib / 1024,
        }
        out["sizes"][str(n)] = row
        _say(
            f"  {n} rows: +{add} rows wrote {add_bytes / 1e6:.1f} MB in {add_s:.2f} s; "
            f"unchanged rerun {unchanged_s:.2f} s; train-head logreg avg {head_s:.1f} s, "
            f"{kib / 1024:.0f} MiB peak"
        )
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(art, ignore_errors=True)
    a, b = (out["sizes"][str(k)] for k in (cfg["scale_n"], 10 * cfg["scale_n"]))
    out["added_cost_ratio_10n_over_n_per_row"] = b["added_bytes_per_row"] / a["added_bytes_per_row"]
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
        _say(f"  {name}: {cfg['cluster_n'] / wall:.2f} img/s ({wall:.1f} s wall, start-up in)")
    out["ratio_local2_over_single"] = out["local:2"]["images_per_s"] / out["single"]["images_per_s"]
    return out


def predict_rates(work: Path, cfg: dict[str, int], spec: Any, batch: int) -> dict[str, Any]:
    """`make predict` images/s (in-process) on new images, then on the same images again.

    The first call builds the backbone and embeds every image (as a `make predict` process
    does); the second finds every image's features kept by the first and builds none. The head
    is a logistic regression on 8 training images (its cost is not what is measured).
    """
    from pipeline.features import extract
    from pipeline.prediction import classify
    from pipeline.store import keys
    from pipeline.train import train_head

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
        _say(
            f"  {name}: {n / wall:.2f} img/s ({wall:.2f} s, the backbone ran for {ran} of {n}; "
            f"the lookup read {keys.READ['idents']} identities)"
        )
    out["speedup_again"] = out["again"]["images_per_s"] / out["new"]["images_per_s"]
    return out


def _timed_calls(fn: Any, x: Any, reps: int) -> float:
    """Images/s of `reps` calls of `fn` on the batch `x`, after one warm-up (compiling) call."""
    np.asarray(fn(x))
    t = time.perf_counter()
    for _ in range(reps):
        np.asarray(fn(x))
    return reps * len(x) / (time.perf_counter() - t)


def decode_rate(todo: list[Any], size: int, workers: int, batch: int) -> float:
    """Images/s of the features path's decoding alone (files to resized uint8 batches)."""
    from pipeline.batches import decoded_batches

    t = time.perf_counter()
    for _ in decoded_batches(todo, size, batch, workers):
        pass
    return len(todo) / (time.perf_counter() - t)


@dataclass(frozen=True)
class _File:
    """A file for `decoded_batches` (the image itself: no view, no hash needed)."""

    abspath: Path
    sha256: str | None = None
    view: int = 0


GPU_BATCHES = (64, 128, 256, 512)
GPU_THREADS = (1, 2, 4, 8, 16)


def gpu_extraction(
    work: Path,
    n: int,
    reps: int,
    batches: tuple[int, ...] = GPU_BATCHES,
    threads: tuple[int, ...] = GPU_THREADS,
    size: int = 224,
    name: str = "vgg16",
) -> dict[str, Any]:
    """On an accelerator: what extraction can do there, and what it takes to feed it.

    - the bare forward pass (`predict_on_batch` on preprocessed host tensors, as the pipeline
      calls it) in float32 and mixed precision (float16; bfloat16 from compute capability 8.0)
      at each batch size, and the XLA-compiled pass (`jit_compile=True`) at PRECISION=auto;
    - decoding alone (PNG, ~2 MP JPEG) with 1-16 threads, and the threads needed to match the
      best forward pass;
    - the `make features` path at PRECISION=auto, best batch, with enough threads, against it.
    Run as `make bench-gpu` (one command) where a GPU is at hand.
    """
    from pipeline.backbone import BackboneSpec, build, preprocess, resolve, visible_gpu
    from pipeline.features import extract

    quiet = lambda m: None  # noqa: E731
    gpu = visible_gpu()
    auto, why = resolve("auto")
    out: dict[str, Any] = {
        "device": gpu,
        "images": n,
        "auto": auto,
        "auto_reason": why,
        "batches": list(batches),
    }
    cc = tuple((gpu or {}).get("compute_capability") or (0, 0))
    precisions = ["float32", "mixed_float16"] + (["mixed_bfloat16"] if cc >= (8, 0) else [])
    if auto not in precisions:
        precisions.append(auto)
    rng = np.random.default_rng(0)
    big = preprocess(rng.integers(0, 255, (max(batches), size, size, 3), np.uint8), name)
    models: dict[str, Any] = {}
    bare: dict[str, dict[str, float]] = {}
    for precision in precisions:
        models[precision] = build(BackboneSpec("none", name=name, input_size=size,
                                               precision=precision))  # fmt: skip
        m = models[precision]
        bare[precision] = {str(b): _timed_calls(m.predict_on_batch, big[:b], reps) for b in batches}
        _say(f"  bare {precision}: " + ", ".join(f"batch {b} {v:.0f}" for b, v in
                                                   bare[precision].items()) + " img/s")  # fmt: skip
    out["bare_images_per_s"] = bare
    import tensorflow as tf

    xla_fn = tf.function(lambda x: models[auto](x, training=False), jit_compile=True)
    xla = {str(b): _timed_calls(xla_fn, tf.constant(big[:b]), reps) for b in batches}
    out["xla_images_per_s"] = {auto: xla}
    _say(f"  XLA {auto}: " + ", ".join(f"batch {b} {v:.0f}" for b, v in xla.items()) + " img/s")
    best_b = max(bare[auto], key=bare[auto].get)
    target = bare[auto][best_b]
    out["best"] = {"precision": auto, "batch": int(best_b), "images_per_s": target,
                   "xla_images_per_s": xla[best_b]}  # fmt: skip
    kinds = {k: make_images(work / f"gpu-{k}", n, k, seed=11) for k in ("png", "jpeg")}
    out["decode_images_per_s"], out["threads_needed"], out["features"] = {}, {}, {}
    for kind, data in kinds.items():
        files = sorted(p for p in data.rglob("*") if p.is_file())
        todo = [_File(f) for f in files]
        rates = {str(w): decode_rate(todo, size, w, int(best_b)) for w in threads}
        out["decode_images_per_s"][kind] = rates
        enough = [w for w in threads if rates[str(w)] >= target]
        needed = enough[0] if enough else None
        out["threads_needed"][kind] = needed
        _say(
            f"  decode {kind}: " + ", ".join(f"{w} threads {v:.0f}" for w, v in rates.items())
            + f" img/s; threads to feed {target:.0f} img/s: {needed or f'> {max(threads)}'}"
        )  # fmt: skip
        workers = needed or max(threads)
        art = work / f"gpu-art-{kind}"
        spec = BackboneSpec("none", name=name, input_size=size, precision=auto)
        extract(data, art, spec, batch_size=int(best_b), workers=workers, log=quiet,
                model=models[auto])  # fmt: skip
        shutil.rmtree(art)  # the first run traced the last (partial) batch's shape
        s = extract(data, art, spec, batch_size=int(best_b), workers=workers, log=quiet,
                    model=models[auto])  # fmt: skip
        rate = s.new / s.seconds
        out["features"][kind] = {"workers": workers, "images_per_s": rate,
                                 "ratio_to_bare": rate / target}  # fmt: skip
        _say(f"  make features path, {kind}, {workers} threads: {rate:.0f} img/s = "
             f"{rate / target:.2f} of the bare pass")  # fmt: skip
        shutil.rmtree(data, ignore_errors=True)
    return out


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
    from pipeline.backbone import FAMILIES, resolve

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
        _say(
            f"  {name}: float32 {row['images_per_s']:.2f} img/s at {row['size']} px, "
            f"{row['peak_mib']:.0f} MiB peak, {fam.gmac} GMAC, top-1 {fam.top1:.1%}{extra}"
        )
    if other == "float32":
        _say(f"  PRECISION={versus} is float32 here ({why}): one column")
    return out


def projection(res: dict[str, Any], gpu_rate: float | None = None) -> dict[str, Any]:
    """1M images on 4 single-GPU workers, from the measured per-image costs; assumptions said."""
    sc = res.get("scale", {}).get("sizes", {})
    big = sc[max(sc, key=int)] if sc else None
    cpu_rate = res.get("cluster", {}).get("single", {}).get("images_per_s")
    rate = gpu_rate or cpu_rate
    n = 1_000_000
    out: dict[str, Any] = {
        "images": n,
        "workers": 4,
        "per_worker_images_per_s": rate,
        "rate_source": "GPU measured (see gpu)" if gpu_rate else "this machine's CPU, per process",
        "assumptions": [
            "extraction scales linearly with workers (one GPU each, decode threads keep it fed)",
            "the coordinator writes shards at the measured store speed; shared filesystem fast "
            "enough for 50 KB a row",
            "train-head logreg on avg grows linearly in rows (lbfgs, 5 outer x 3 inner folds)",
        ],
    }
    if rate:
        out["extraction_hours"] = n / (4 * rate) / 3600
    if big:
        per_row_store = big["added_s"] / big["added_rows"]
        out["store_write_hours"] = n * per_row_store / 3600
        out["cache_gb"] = n * big["cache_bytes"] / big["rows"] / 1e9
        out["unchanged_rerun_minutes"] = n * big["unchanged_rerun_s"] / big["rows"] / 60
        out["train_head_logreg_avg_hours"] = n * big["train_head_logreg_avg_s"] / big["rows"] / 3600
    return out


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
            _say(f"  {head}-{pool} ({n} images): {wall:.1f} s wall")
    _say(
        f"  start-up (imports of train-head): {out['startup_s']:.2f} s; the libraries alone "
        f"(scikit-learn, h5py): {out['libraries_startup_s']:.2f} s"
    )
    return out


def table(res: dict[str, Any]) -> str:
    ex, rr, mem, hd = res["extraction"], res["reruns"], res["memory"], res["heads"]
    lines = [
        f"machine: {res['machine']}",
        "| figure | value | target |",
        "|---|---|---|",
    ]
    for kind, label, target in (("png", "small PNGs", "≥ 0.95"), ("jpeg", "2 MP JPEGs", "≥ 0.90")):
        k = ex["kinds"][kind]
        lines.append(
            f"| extraction, {label}: pipeline / bare ({ex['bare_best']}, "
            f"{ex.get('precision', 'float32')}) | "
            f"{k['pipeline_median']:.2f} / {k['bare_median']:.2f} img/s, median per-round ratio "
            f"{k['ratio']:.2f} "
            f"| {target} |"
        )
    lines += [
        f"| unchanged rerun / full extraction ({rr['n']} images, in-process) | "
        f"{rr['unchanged_s']:.2f} s / {rr['full_s']:.1f} s = {rr['unchanged_fraction']:.2%} "
        "| ≤ 2% |",
        f"| rerun with {rr['added']} new (1%) / full | {rr['added_s']:.2f} s / {rr['full_s']:.1f} s"
        f" = {rr['added_fraction']:.2%} | ≤ 3% |",
        "| unchanged rerun as a new `make features` process (TensorFlow not imported) | "
        f"{rr['unchanged_cli_process_s']:.1f} s | |",
    ]
    ks = [k for k in mem if k not in ("ratio_4n_over_n", "batch")]
    lines.append(
        f"| peak memory at {ks[0]} / {ks[1]} images (batch {mem.get('batch')}) "
        f"| {mem[ks[0]]:.0f} / {mem[ks[1]]:.0f} MiB = "
        f"{mem['ratio_4n_over_n']:.3f} | ≤ 1.10 |"
    )
    lines.append(
        f"| train-head start-up (process + imports; scikit-learn and h5py alone) | "
        f"{hd['startup_s']:.2f} s ({hd['libraries_startup_s']:.2f} s) | < 2 s |"
    )
    for name, r in hd["runs"].items():
        lines.append(
            f"| train-head {name} ({r['n']} images, {r['dim']}-d, 5 nested folds) | "
            f"{r['wall_s']:.1f} s (CV {r['cv_s']:.1f} s, final fit {r['final_fit_s']:.1f} s) | |"
        )
    lines.append(
        f"| cache bytes per image, index + shards ({rr['n']} images, {rr['input_size']} px) "
        f"| {rr['bytes_per_image']:.0f} | |"
    )
    pr = res.get("predict")
    if pr:
        lines.append(
            f"| predict ({pr['images']} images): new / the same again (features kept, no "
            f"backbone) | {pr['new']['images_per_s']:.1f} / {pr['again']['images_per_s']:.1f} "
            f"img/s ({pr['speedup_again']:.0f}x) | |"
        )
    bb = res.get("backbones")
    if bb:
        other = bb["resolved"]
        for name, r in bb["runs"].items():
            o = r.get(other)
            vs = (
                f"; {other} {o['images_per_s']:.1f} img/s ({o['speedup']:.2f}x), "
                f"correlation min {o['correlation']['min']:.5f}"
                if o
                else f"; auto = {other} here"
            )
            lines.append(f"| {name} float32 | {r['images_per_s']:.1f} img/s{vs} | |")
    return "\n".join(lines)


def _save(folder: Path, res: dict[str, Any]) -> None:
    outputs.write_text(folder / "bench.json", json.dumps(res, indent=1))


def main(argv: list[str] | None = None) -> int:
    from pipeline.errors import UserError
    from pipeline.progress import lines_to

    try:
        with lines_to(None):  # the bench prints its figures, not the runs' progress lines
            return _main(argv)
    except UserError as e:  # another bench on the folder, a full disk: one line
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__)
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts/bench"))
    ap.add_argument("--size", choices=list(SIZES), default="default")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--only", default="extraction,reruns,memory,heads,scale,store,cluster,predict,backbones"
    )
    ap.add_argument(
        "--store-sizes",
        default="",
        help="rows of the store-at-scale part (default 100000,1000000; small: 10000,30000)",
    )
    ap.add_argument("--gpu-rate", type=float, default=None, help="measured GPU img/s, if any")
    ap.add_argument(
        "--precision",
        default="auto",
        help="the extraction parts' precision, pipeline and bare pass alike (default auto, "
        "resolved as `make features` does); the backbones part compares float32 with it",
    )
    ap.add_argument("--backbone", default="vgg16", help="the extraction parts' backbone")
    ap.add_argument("--input-size", type=int, default=224, help="the extraction parts' size")
    ap.add_argument("--backbones", default="", help="the backbones part's (default: all)")
    args = ap.parse_args(argv)
    # the folder is this bench's (a second one would delete its work folder): it stops at once
    with outputs.owned(args.artifacts, "bench", fix="pass another --artifacts folder"):
        return _bench(args)


def _bench(args: argparse.Namespace) -> int:
    cfg = SIZES[args.size]
    work = args.artifacts / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from pipeline import backbone
    from pipeline.backbone import BackboneSpec

    spec = BackboneSpec(
        weights="none", name=args.backbone, input_size=args.input_size, precision=args.precision
    )
    import platform

    res: dict[str, Any] = {
        "size": args.size,
        "config": cfg,
        "batch": args.batch,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "extraction_spec": spec.describe(),
    }
    parts = args.only.split(",")
    if "extraction" in parts or "reruns" in parts:
        _say(f"extraction parts: {spec.describe()}")
    if "gpu" in parts and backbone.visible_gpu() is None:
        _say("no GPU that TensorFlow can use here (`--only gpu` needs one: an NVIDIA driver and "
             "`pip install 'tensorflow[and-cuda]'` in this environment)")  # fmt: skip
        return 3
    t0 = time.perf_counter()
    if "extraction" in parts or "reruns" in parts:
        model = backbone.build(spec)
    if "extraction" in parts:
        _say("extraction throughput (pipeline vs bare forward pass, interleaved):")
        res["extraction"] = extraction(work, cfg, model, spec, args.batch)
        _save(args.artifacts, res)
    if "reruns" in parts:
        _say("reruns:")
        res["reruns"] = reruns(work, cfg, model, spec, args.batch)
        _save(args.artifacts, res)
    if "memory" in parts:
        _say("peak memory:")
        res["memory"] = peak_memory(work, cfg, spec, args.batch)
        _save(args.artifacts, res)
    if "heads" in parts:
        _say("train-head timings on synthetic cached features:")
        res["heads"] = heads_timing(work, cfg)
        _save(args.artifacts, res)
    if "scale" in parts:
        _say("scale: the store at N and 10N rows (random 7x7x512 maps, no backbone):")
        res["scale"] = scale(work, cfg)
        _save(args.artifacts, res)
    if "store" in parts:
        from pipeline.bench_store import store_at_scale

        default = "10000,30000" if args.size == "small" else "100000,1000000"
        sizes = tuple(int(v) for v in (args.store_sizes or default).split(","))
        shown = ", ".join(f"{n:,}" for n in sizes)
        _say(
            f"store at scale: {shown} rows, MAPS=0, batch 32, +1 % ten times "
            "(synthetic pooled vectors through the store's write path):"
        )
        res["store"] = store_at_scale(work, sizes)
        _save(args.artifacts, res)
    if "cluster" in parts:
        _say("extraction in one process and on CLUSTER=local:2 (same images):")
        res["cluster"] = cluster_extraction(work, cfg, spec, args.batch)
    if "predict" in parts:
        _say(f"make predict on {cfg['predict_n']} new images, then the same images again:")
        res["predict"] = predict_rates(work, cfg, spec, args.batch)
        _save(args.artifacts, res)
    if "backbones" in parts:
        _say("backbones (random weights, each at its own input size, batch of 8), float32 and "
             f"PRECISION={args.precision}:")  # fmt: skip
        res["backbones"] = backbones(cfg, 8, work, args.precision, args.backbones)
        _save(args.artifacts, res)
    if "gpu" in parts:
        _say("extraction on the accelerator:")
        res["gpu"] = gpu_extraction(work, cfg["gpu_n"], cfg["gpu_reps"])
        _save(args.artifacts, res)
    gpu_rate = args.gpu_rate or res.get("gpu", {}).get("best", {}).get("images_per_s")
    res["projection"] = projection(res, gpu_rate)
    res["total_s"] = time.perf_counter() - t0
    out = args.artifacts / "bench.json"
    outputs.write_text(out, json.dumps(res, indent=1))  # also written after each part, above
    if all(k in res for k in ("extraction", "reruns", "memory", "heads")):
        _say(table(res))
    _say(f"total {res['total_s']:.0f} s; wrote {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
