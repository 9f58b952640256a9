"""`make bench-gpu`: the accelerator, float32 against mixed precision, XLA, and the decode threads
that feed it."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backbone import BackboneSpec, build, preprocess, resolve, visible_gpu
from pipeline.batches import decoded_batches
from pipeline.bench.instruments import make_images, say
from pipeline.embedding import batched
from pipeline.features import extract


def _timed_calls(fn: Any, x: Any, reps: int) -> float:
    """Images/s of `reps` calls of `fn` on the batch `x`, after one warm-up (compiling) call."""
    np.asarray(fn(x))
    t = time.perf_counter()
    for _ in range(reps):
        np.asarray(fn(x))
    return reps * len(x) / (time.perf_counter() - t)


def decode_rate(todo: list[Any], size: int, workers: int, batch: int) -> float:
    """Images/s of the features path's decoding alone (files to resized uint8 batches)."""
    t = time.perf_counter()
    for _ in decoded_batches(batched(todo, batch), size, workers):
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
        say(f"  bare {precision}: " + ", ".join(f"batch {b} {v:.0f}" for b, v in
                                                   bare[precision].items()) + " img/s")  # fmt: skip
    out["bare_images_per_s"] = bare
    import tensorflow as tf

    xla_fn = tf.function(lambda x: models[auto](x, training=False), jit_compile=True)
    xla = {str(b): _timed_calls(xla_fn, tf.constant(big[:b]), reps) for b in batches}
    out["xla_images_per_s"] = {auto: xla}
    say(f"  XLA {auto}: " + ", ".join(f"batch {b} {v:.0f}" for b, v in xla.items()) + " img/s")
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
        say(
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
        say(f"  make features path, {kind}, {workers} threads: {rate:.0f} img/s = "
             f"{rate / target:.2f} of the bare pass")  # fmt: skip
        shutil.rmtree(data, ignore_errors=True)
    return out
