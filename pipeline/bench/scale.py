"""The store at N and 10N rows (random maps, no backbone): +1 %, an unchanged rerun, train-head;
and an unchanged rerun's peak memory per file at 100,000 and 1,000,000 files (`rerun_memory`)."""

from __future__ import annotations

import gc
import shutil
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backbone import BackboneSpec
from pipeline.bench.instruments import RandomMaps, cli_peak, say, tiny_images
from pipeline.features import extract
from pipeline.listing import Builder
from pipeline.store.writer import Writer


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


def scale(work: Path, cfg: dict[str, int]) -> dict[str, Any]:
    """The store at N and 10N rows (224 px maps, random, no backbone): +1 %, reruns, train-head."""
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
        say(
            f"  {n} rows: +{add} rows wrote {add_bytes / 1e6:.1f} MB in {add_s:.2f} s; "
            f"unchanged rerun {unchanged_s:.2f} s; train-head logreg avg {head_s:.1f} s, "
            f"{kib / 1024:.0f} MiB peak"
        )
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(art, ignore_errors=True)
    a, b = (out["sizes"][str(k)] for k in (cfg["scale_n"], 10 * cfg["scale_n"]))
    out["added_cost_ratio_10n_over_n_per_row"] = b["added_bytes_per_row"] / a["added_bytes_per_row"]
    return out


# -- an unchanged rerun's memory per file (issue 24.2: the job list held as columns) ----------


def _traced(fn: Callable[[], Any]) -> tuple[Any, int, float]:
    """fn's result, its tracemalloc peak (bytes) and seconds (traced: Python runs slower)."""
    gc.collect()
    tracemalloc.start()
    t = time.perf_counter()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1], time.perf_counter() - t
    finally:
        tracemalloc.stop()


def _real_rerun(work: Path, n: int) -> dict[str, Any]:
    """`make features` on n tiny PNGs, then an unchanged rerun traced (after one untraced, for
    its imports): its peak per file, the versions stamp read before (a fixed 0.4 MB peak)."""
    data, art = work / f"rerun-data-{n}", work / f"rerun-art-{n}"
    tiny_images(data, 0, n)
    spec, model = BackboneSpec("none", input_size=32), RandomMaps((1, 1, 8))
    t = time.perf_counter()
    extract(data, art, spec, batch_size=256, log=lambda m: None, model=model, maps=False)
    build_s = time.perf_counter() - t
    extract(data, art, spec, batch_size=256, log=lambda m: None, model=model, maps=False)
    again, peak, secs = _traced(
        lambda: extract(data, art, spec, batch_size=256, log=lambda m: None, maps=False)
    )
    assert again.new == 0 and not again.rewrote, again.line()
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(art, ignore_errors=True)
    return {"files": n, "how": "real", "first_run_s": build_s, "peak_bytes": peak,
            "traced_rerun_s": secs}  # fmt: skip


def _synthetic_rerun(work: Path, n: int) -> dict[str, Any]:
    """An unchanged rerun's own path on n files without the files: a store of n rows built
    through the writer (`bench.store.sync`, 8-d vectors), then traced: the listing built into
    columns as the scan builds it, the stats set as `os.stat` would give them, the hashes
    reused from the store (`hashing`), the jobs' compare with the store and the commit that
    writes nothing (`features._sync`), the duplicates check. What it leaves out: the file
    system's walk and stat calls (their Python objects are a folder's, then freed)."""
    from pipeline import dataset, embedding, hashing
    from pipeline.bench import store as bstore
    from pipeline.features import _Ctx, _duplicates, _sync

    path = work / f"rerun-store-{n}" / "cache.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    bstore.sync(path, bstore._rows(0, n), batch=1 << 16, channels=8)
    build_s = time.perf_counter() - t
    classes = bstore.CLASSES
    root = Path("/synthetic")

    def rerun() -> Any:
        w = Writer(path, bstore._key(), bstore.STAMP, False, "float16", lambda s: None)
        b = Builder()
        for i in range(n):
            b.add(f"c{i % 10}/{i:08d}.jpg", i % 10, "train")
        listing = b.done()
        hashed = hashing.Hashed(
            np.repeat(np.arange(n, dtype=np.int64), 3).reshape(n, 3),  # what bench.store wrote
            np.zeros((n, 32), np.uint8),
            np.zeros(n, bool),
        )
        hashing._reuse(listing, hashed, np.ones(n, bool), w.known_files(), ())
        assert hashed.ok.all()
        scan = dataset.Scan(root, "flat", classes, listing)
        ctx = _Ctx(BackboneSpec("none", input_size=224), 32, "float16", lambda s: None, scan,
                   embedding.Local())  # fmt: skip
        summary, rows = _sync(w, {}, embedding.Jobs(root, listing, hashed), ctx)
        _duplicates(rows, classes)
        return summary

    summary, peak, secs = _traced(rerun)
    assert summary.new == 0 and not summary.rewrote and summary.cached == n, summary.line()
    shutil.rmtree(path.parent, ignore_errors=True)
    return {"files": n, "how": "synthetic", "store_build_s": build_s, "peak_bytes": peak,
            "traced_rerun_s": secs}  # fmt: skip


def rerun_memory(work: Path, sizes: tuple[int, ...], real_up_to: int) -> dict[str, Any]:
    """An unchanged rerun's peak memory per file (tracemalloc, everything it allocates, fixed
    start-up included) at each size: real files up to `real_up_to`, the synthetic path (no
    files) at every size; and the projection for ten million from the largest."""
    out: dict[str, Any] = {"sizes": {}}
    for n in sizes:
        row: dict[str, Any] = {"synthetic": _synthetic_rerun(work, n)}
        if n <= real_up_to:
            row["real"] = _real_rerun(work, n)
        for how, r in row.items():
            r["bytes_per_file"] = r["peak_bytes"] / n
            mib, secs = r["peak_bytes"] / 2**20, r["traced_rerun_s"]
            say(
                f"  {n:,} files ({how}): unchanged rerun peak {mib:.1f} MiB, "
                f"{r['bytes_per_file']:.0f} B a file ({secs:.1f} s traced)"
            )
        out["sizes"][str(n)] = row
    big = out["sizes"][str(max(sizes))]
    per = max(r["bytes_per_file"] for r in big.values())
    out["projection_10m_gb"] = per * 10_000_000 / 1e9
    say(f"  ten million files: about {out['projection_10m_gb']:.1f} GB ({per:.0f} B a file)")
    return out
