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
   batch 64-512, plain and XLA-compiled forward pass, decode threads needed to feed it;
10. (`--only sweep`; by default with `--size full`) `make sweep` and `make finetune` minutes on a
   few hundred generated images, every run all its partitions against a race with repeats by
   time (`pipeline.bench.sweep`).
12. (`audit`) `make audit`'s parts (neighbour search with its recall@10, near-duplicates,
   outliers, label errors, the map) at 100,000 and 1,000,000 synthetic rows: time and peak
   memory (`pipeline.bench.know`).
11. (`rerun-memory`) an unchanged `make features` rerun's peak memory per file (tracemalloc) at
   100,000 and 1,000,000 files (real files up to --rerun-real, the same code on a synthetic
   store beyond), with the projection for ten million (`pipeline.bench.scale.rerun_memory`).
Writes ARTIFACTS/bench/bench.json and prints a table. The size is a setting (--size). Parts 1-2
run at --precision (default auto, resolved as `make features` does) for both the pipeline and the
bare pass.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import backbone, outputs
from pipeline.backbone import BackboneSpec
from pipeline.bench.accelerator import gpu_extraction
from pipeline.bench.backbones import backbones
from pipeline.bench.extraction import (
    cluster_extraction,
    extraction,
    peak_memory,
    predict_rates,
    reruns,
)
from pipeline.bench.heads import heads_timing
from pipeline.bench.instruments import say
from pipeline.bench.know import audit_at_scale
from pipeline.bench.scale import rerun_memory, scale
from pipeline.bench.store import store_at_scale
from pipeline.bench.sweep import sweep_small
from pipeline.errors import UserError
from pipeline.progress import lines_to

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
        "--only",
        default=None,
        help="comma-separated parts (default: extraction,reruns,memory,heads,scale,store,"
        "rerun-memory,audit,cluster,predict,backbones, and with --size full also sweep: "
        "`make sweep` and `make finetune` on a few hundred images before and after racing "
        "and repeats by time, tens of minutes on 2 cores)",
    )
    ap.add_argument("--sweep-images", type=int, default=320, help="the sweep part's images")
    ap.add_argument("--sweep-size", type=int, default=96, help="the sweep part's input size")
    ap.add_argument(
        "--store-sizes",
        default="",
        help="rows of the store-at-scale part (default 100000,1000000; small: 10000,30000)",
    )
    ap.add_argument(
        "--rerun-sizes",
        default="",
        help="files of the rerun-memory part, an unchanged rerun's peak memory per file "
        "(default 100000,1000000; small: 3000,30000); real files up to --rerun-real, the "
        "rest through the same code on a synthetic store (no files)",
    )
    ap.add_argument(
        "--rerun-real", type=int, default=20000, help="the rerun-memory part's real sizes, up to"
    )
    ap.add_argument("--gpu-rate", type=float, default=None, help="measured GPU img/s, if any")
    ap.add_argument(
        "--precision",
        default="auto",
        help="the extraction parts' precision, pipeline and bare pass alike (default auto, "
        "resolved as `make features` does); the backbones part compares float32 with it",
    )
    ap.add_argument("--audit-sizes", default="", help="the audit part's rows (comma-separated)")
    ap.add_argument("--backbone", default="vgg16", help="the extraction parts' backbone")
    ap.add_argument("--input-size", type=int, default=224, help="the extraction parts' size")
    ap.add_argument("--backbones", default="", help="the backbones part's (default: all)")
    args = ap.parse_args(argv)
    if args.only is None:
        args.only = (
            "extraction,reruns,memory,heads,scale,store,rerun-memory,audit,cluster,predict,"
            "backbones"
        )
        args.only += ",sweep" if args.size == "full" else ""
    # the folder is this bench's (a second one would delete its work folder): it stops at once
    with outputs.owned(args.artifacts, "bench", fix="pass another --artifacts folder"):
        return _bench(args)


def _bench(args: argparse.Namespace) -> int:
    cfg = SIZES[args.size]
    work = args.artifacts / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
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
        say(f"extraction parts: {spec.describe()}")
    if "gpu" in parts and backbone.visible_gpu() is None:
        say("no GPU that TensorFlow can use here (`--only gpu` needs one: an NVIDIA driver and "
             "`pip install 'tensorflow[and-cuda]'` in this environment)")  # fmt: skip
        return 3
    t0 = time.perf_counter()
    if "extraction" in parts or "reruns" in parts:
        model = backbone.build(spec)
    if "extraction" in parts:
        say("extraction throughput (pipeline vs bare forward pass, interleaved):")
        res["extraction"] = extraction(work, cfg, model, spec, args.batch)
        _save(args.artifacts, res)
    if "reruns" in parts:
        say("reruns:")
        res["reruns"] = reruns(work, cfg, model, spec, args.batch)
        _save(args.artifacts, res)
    if "memory" in parts:
        say("peak memory:")
        res["memory"] = peak_memory(work, cfg, spec, args.batch)
        _save(args.artifacts, res)
    if "heads" in parts:
        say("train-head timings on synthetic cached features:")
        res["heads"] = heads_timing(work, cfg)
        _save(args.artifacts, res)
    if "scale" in parts:
        say("scale: the store at N and 10N rows (random 7x7x512 maps, no backbone):")
        res["scale"] = scale(work, cfg)
        _save(args.artifacts, res)
    if "store" in parts:
        default = "10000,30000" if args.size == "small" else "100000,1000000"
        sizes = tuple(int(v) for v in (args.store_sizes or default).split(","))
        shown = ", ".join(f"{n:,}" for n in sizes)
        say(
            f"store at scale: {shown} rows, MAPS=0, batch 32, +1 % ten times "
            "(synthetic pooled vectors through the store's write path):"
        )
        res["store"] = store_at_scale(work, sizes)
        _save(args.artifacts, res)
    if "rerun-memory" in parts:
        default = "3000,30000" if args.size == "small" else "100000,1000000"
        sizes = tuple(int(v) for v in (args.rerun_sizes or default).split(","))
        say("an unchanged `make features` rerun's peak memory per file (tracemalloc):")
        res["rerun_memory"] = rerun_memory(work, sizes, args.rerun_real)
        _save(args.artifacts, res)
    if "audit" in parts:
        default = "10000,30000" if args.size == "small" else "100000,1000000"
        sizes = tuple(int(v) for v in (args.audit_sizes or default).split(","))
        say("make audit's parts on synthetic 512-d features (a fresh process per size):")
        res["audit"] = audit_at_scale(sizes)
        _save(args.artifacts, res)
    if "cluster" in parts:
        say("extraction in one process and on CLUSTER=local:2 (same images):")
        res["cluster"] = cluster_extraction(work, cfg, spec, args.batch)
    if "predict" in parts:
        say(f"make predict on {cfg['predict_n']} new images, then the same images again:")
        res["predict"] = predict_rates(work, cfg, spec, args.batch)
        _save(args.artifacts, res)
    if "backbones" in parts:
        say("backbones (random weights, each at its own input size, batch of 8), float32 and "
             f"PRECISION={args.precision}:")  # fmt: skip
        res["backbones"] = backbones(cfg, 8, work, args.precision, args.backbones)
        _save(args.artifacts, res)
    if "sweep" in parts:
        say(
            f"make sweep and make finetune on {args.sweep_images} generated images of 8 classes "
            f"({args.sweep_size} px), before (every run all its partitions, as many as the "
            "count gave) and after (a race, repeats by time):"
        )
        res["sweep_small"] = sweep_small(work, args.sweep_images, args.sweep_size)
        _save(args.artifacts, res)
    if "gpu" in parts:
        say("extraction on the accelerator:")
        res["gpu"] = gpu_extraction(work, cfg["gpu_n"], cfg["gpu_reps"])
        _save(args.artifacts, res)
    gpu_rate = args.gpu_rate or res.get("gpu", {}).get("best", {}).get("images_per_s")
    res["projection"] = projection(res, gpu_rate)
    res["total_s"] = time.perf_counter() - t0
    out = args.artifacts / "bench.json"
    outputs.write_text(out, json.dumps(res, indent=1))  # also written after each part, above
    if all(k in res for k in ("extraction", "reruns", "memory", "heads")):
        say(table(res))
    say(f"total {res['total_s']:.0f} s; wrote {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0
