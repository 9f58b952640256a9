"""`make bench`, the store at scale: synthetic caches of 100,000 and 1,000,000 rows.

Built through the store's own write path (`store.writer.Writer`: staged batch segments, merges,
commit) with random pooled vectors, MAPS=0 and the default batch of 32 (so 100,000 rows are
3,125 batches), then grown by +1 % ten times. No image is decoded and no backbone runs: the
figures are the store's alone. Printed and returned: build seconds, files in the cache folder,
peak open files while reading, seconds to read every pooled row through the store and the same
bytes from one plain HDF5 dataset (same run), seconds and bytes written per +1 %, seconds for an
unchanged rerun, and the peak memory of `train-head logreg` on `avg`.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import layout, store
from pipeline.backbone import BackboneSpec
from pipeline.bench.instruments import cli_peak, say
from pipeline.cache_identity import cache_settings
from pipeline.provenance import environment
from pipeline.store import shards_dir
from pipeline.store.segments import Meta
from pipeline.store.writer import Row, Writer

CHANNELS = 512
CLASSES = [f"c{i}" for i in range(10)]
STAMP = {"bench": "synthetic pooled vectors"}


def _hash(i: int) -> str:
    """A content hash that looks like SHA-256 (uniform leading digits), ending in the row number."""
    import hashlib

    return hashlib.sha256(str(i).encode()).hexdigest()[:56] + f"{i:08x}"


def _rows(lo: int, hi: int) -> list[Any]:
    return [
        Row(f"c{i % 10}/{i:08d}.jpg", _hash(i), CLASSES[i % 10], "train", 0, (i, i, i))
        for i in range(lo, hi)
    ]


def _vectors(idents: list[str], channels: int = CHANNELS, signal: float = 0.1) -> np.ndarray:
    """Pooled vectors like a backbone's (non-negative, skewed) with a class signal spread over
    every channel, weak enough that a linear head errs on some rows (the last 8 hex digits of
    an ident: the row number; its class is the number mod 10)."""
    n = np.array([int(h[-8:], 16) for h in idents])
    rng = np.random.default_rng(int(n[0]) if len(n) else 0)
    means = np.random.default_rng(1234).gamma(2.0, 0.5, (len(CLASSES), channels))
    x = rng.gamma(1.0, 1.0, (len(n), channels)) * (1 + signal * (means[n % len(CLASSES)] - 1))
    return x.astype(np.float32)


def _settings() -> dict[str, Any]:
    return cache_settings(BackboneSpec("none", input_size=224), "float16", maps=False)


def _attrs(key: str, channels: int = CHANNELS) -> dict[str, Any]:
    """The index's attributes but data_id (the writer keeps it from the rows it changes)."""
    settings = _settings()
    return {
        "cache_key": key,
        "settings": settings,
        **{k: v for k, v in settings.items() if isinstance(v, (str, int, float, bool))},
        "weights": "none",
        "random_weights": True,
        "feature_shape": [1, 1, channels],
        "maps": False,
        "layout": "flat",
        "data": "/synthetic",
        "data_root": "/synthetic",
        "data_sha256": "",
        "data_stat": [0, 0],
        "environment": environment(),
    }


def sync(
    path: Path, want: list[Any], batch: int = 32, channels: int = CHANNELS, signal: float = 0.1
) -> tuple[Any, int]:
    """One `make features` run's store work: stage the missing rows batch by batch, commit."""
    key = _key()
    w = Writer(path, key, STAMP, maps=False, dtype="float16", log=lambda s: None)
    had = w.has_many([r.ident for r in want])
    todo = [r for r, h in zip(want, had.tolist(), strict=True) if not h]
    for a in range(0, len(todo), batch):
        part = todo[a : a + batch]
        v = _vectors([r.ident for r in part], channels, signal)
        meta = Meta.of_rows(part)
        w.add_batch(meta, {"avg": v, "max": v * 2}, None, [])
    done = w.commit(want, CLASSES, [], _attrs(key, channels), same_source=True)
    return done, len(todo)


def _key() -> str:
    return store.cache_key(_settings())


def _wchar() -> int:
    """Bytes this process has passed to write() so far (Linux /proc/self/io), or 0."""
    try:
        with open("/proc/self/io") as fh:
            return next(int(ln.split()[1]) for ln in fh if ln.startswith("wchar"))
    except (OSError, StopIteration):
        return 0


def _tree(folder: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for p in folder.rglob("*"):
        if p.is_file():
            st = p.stat()
            out[str(p)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def _written(before: dict[str, tuple[int, int, int]], after: dict[str, tuple[int, int, int]]):
    return sum(v[2] for k, v in after.items() if before.get(k) != v)


class OpenFiles:
    """The most file descriptors this process held while the block ran (sampled every ms)."""

    def __enter__(self) -> OpenFiles:
        self.peak, self._stop = 0, False

        def sample() -> None:
            while not self._stop:
                self.peak = max(self.peak, len(os.listdir("/proc/self/fd")))
                time.sleep(0.001)

        self._t = threading.Thread(target=sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._t.join()


def _read_store(path: Path) -> tuple[float, float, int, np.ndarray]:
    """(seconds for the index's rows, seconds for every pooled vector, peak fds, X)."""
    with OpenFiles() as of:
        t = time.perf_counter()
        with store.open_cache(path) as f:
            idx = store.index_of(f, path)
            t_idx = time.perf_counter() - t
            t = time.perf_counter()
            X = store.features_of(f, idx, "avg", "train").X
            t_x = time.perf_counter() - t
    return t_idx, t_x, of.peak, X


def _read_plain(path: Path) -> float:
    import h5py

    t = time.perf_counter()
    with h5py.File(path, "r") as f:
        f["x"][()]
    return time.perf_counter() - t


def at_size(work: Path, n: int, batch: int, heads: bool) -> dict[str, Any]:
    import h5py

    folder = work / f"store-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cache.h5"
    want = _rows(0, n)
    t, w0 = time.perf_counter(), _wchar()
    sync(path, want, batch)
    build_s, build_written = time.perf_counter() - t, _wchar() - w0
    files = len(list(shards_dir(path).iterdir())) + 1
    fds0 = len(os.listdir("/proc/self/fd"))
    _read_store(path)  # warm the page cache, as for the plain file below
    index_s, read_s, peak_fds, X = _read_store(path)
    plain = folder / "plain.h5"
    with h5py.File(plain, "w") as f:
        f.create_dataset("x", data=X)
    _read_plain(plain)
    plain_s = _read_plain(plain)
    plain.unlink()
    del X
    grow = []
    step = max(1, n // 100)
    for k in range(10):
        more = want + _rows(n + k * step, n + (k + 1) * step)
        before = _tree(folder)
        t = time.perf_counter()
        done, embedded = sync(path, more, batch)
        s = time.perf_counter() - t
        grow.append(
            {
                "s": s,
                "bytes": _written(before, _tree(folder)),
                "rows": embedded,
                "merges": done.merges,
            }
        )
        want = more
    before = _tree(folder)
    t = time.perf_counter()
    done, embedded = sync(path, want, batch)
    unchanged_s = time.perf_counter() - t
    assert embedded == 0 and not done.rewrote and _tree(folder) == before
    import tracemalloc

    want = want + _rows(n + 10 * step, n + 10 * step + 1)
    tracemalloc.start()  # a one-row change: what the store holds beyond the run's file list
    sync(path, want, batch)
    one_row_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    row: dict[str, Any] = {
        "rows": n,
        "batches": -(-n // batch),
        "build_s": build_s,
        "build_bytes_written_per_row": build_written / n,
        "files": files,
        "files_after_growth": len(list(shards_dir(path).iterdir())) + 1,
        "cache_bytes": sum(v[2] for v in _tree(folder).values()),
        "read_index_s": index_s,
        "read_pooled_s": read_s,
        "read_plain_dataset_s": plain_s,
        "peak_open_files_reading": peak_fds,
        "open_files_before_reading": fds0,
        "plus_1pct_s": [g["s"] for g in grow],
        "plus_1pct_bytes": [g["bytes"] for g in grow],
        "plus_1pct_merges": [g["merges"] for g in grow],
        "plus_1pct_bytes_per_row": sum(g["bytes"] for g in grow) / sum(g["rows"] for g in grow),
        "plus_1pct_s_mean": sum(g["s"] for g in grow) / len(grow),
        "unchanged_rerun_s": unchanged_s,
        "one_row_change_peak_bytes": one_row_peak,
    }
    say(
        f"  {n:,} rows ({row['batches']:,} batches of {batch}): built in {build_s:.1f} s "
        f"({row['build_bytes_written_per_row']:,.0f} B written per row, merges included), "
        f"{row['files']} files; read the index's rows {index_s:.2f} s, then all pooled vectors "
        f"{read_s:.2f} s (the same bytes from one plain dataset: {plain_s:.2f} s), peak "
        f"{peak_fds} open fds ({fds0} before); +1 % x10: "
        f"{row['plus_1pct_s_mean']:.2f} s and {row['plus_1pct_bytes_per_row']:,.0f} B written "
        f"per added row (merges {sum(row['plus_1pct_merges'])}); unchanged rerun "
        f"{unchanged_s:.2f} s; a one-row change holds {one_row_peak / 2**20:.0f} MiB at peak "
        f"({one_row_peak / n:.0f} B a row); {row['files_after_growth']} files after growth"
    )
    if heads:
        row.update(heads_on(path, folder / "art"))
    return row


def heads_on(path: Path, art: Path) -> dict[str, Any]:
    """`train-head` logreg (C=1 fixed: its grid would take hours at 1M) and sgd (alpha tuned),
    each in one process (--jobs 1, so the peak counts everything) with the default evaluation
    (5-fold up to 200,000 rows, one held-out split above): seconds, peak memory, accuracy."""
    import json

    out: dict[str, Any] = {}
    for head, extra in (("logreg", ["--param", "C=1"]), ("sgd", [])):
        s, kib = cli_peak(
            ["train-head", "--head", head, "--pool", "avg", "--features", str(path),
             "--artifacts", str(art), "--repeats", "1", "--jobs", "1", *extra]
        )  # fmt: skip
        res = sorted(
            layout.heads_dir(art).glob(f"{head}-*/result.json"), key=lambda p: p.stat().st_mtime
        )
        cv = json.loads(res[-1].read_text())["cv"]
        out[f"train_head_{head}"] = {
            "s": s,
            "peak_mib": kib / 1024,
            "protocol": cv["protocol"],
            "accuracy": cv["accuracy_mean"],
            "low": cv["accuracy_low"],
            "high": cv["accuracy_high"],
        }
        say(
            f"    train-head {head} avg{' C=1' if extra else ''} ({cv['protocol']}): {s:.0f} s, "
            f"{kib / 1024:,.0f} MiB peak, accuracy {cv['accuracy_mean']:.4f} "
            f"[{cv['accuracy_low']:.3f}, {cv['accuracy_high']:.3f}]"
        )
    return out


def store_at_scale(work: Path, sizes: tuple[int, ...], batch: int = 32, heads: bool = True) -> dict:
    """The store at each size; growth ratios between the first and the last."""
    import shutil

    out: dict[str, Any] = {"channels": CHANNELS, "batch": batch, "sizes": {}}
    for n in sizes:
        out["sizes"][str(n)] = at_size(work, n, batch, heads)
        shutil.rmtree(work / f"store-{n}", ignore_errors=True)
    if len(sizes) > 1:
        a, b = out["sizes"][str(sizes[0])], out["sizes"][str(sizes[-1])]
        out["read_growth"] = b["read_pooled_s"] / a["read_pooled_s"]
        out["rows_growth"] = sizes[-1] / sizes[0]
        out["write_per_row_growth"] = b["plus_1pct_bytes_per_row"] / a["plus_1pct_bytes_per_row"]
        out["build_write_per_row_growth"] = (
            b["build_bytes_written_per_row"] / a["build_bytes_written_per_row"]
        )
        if "train_head_sgd" in a:
            out["sgd_memory_growth"] = (
                b["train_head_sgd"]["peak_mib"] / a["train_head_sgd"]["peak_mib"]
            )
            say(
                f"  train-head sgd peak memory x{out['sgd_memory_growth']:.2f} for x"
                f"{sizes[-1] // sizes[0]} rows (target <= 1.3)"
            )
        say(
            f"  {sizes[0]:,} -> {sizes[-1]:,} rows: reads x{out['read_growth']:.1f} "
            f"(rows x{out['rows_growth']:.0f}, target <= ~10), bytes written per added row "
            f"x{out['write_per_row_growth']:.2f} over the ten +1 % runs, "
            f"x{out['build_write_per_row_growth']:.2f} over the whole build (target <= 2)"
        )
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pipeline.bench.store", description=__doc__)
    ap.add_argument("--work", type=Path, default=Path("artifacts/bench/work"))
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--no-heads", action="store_true")
    a = ap.parse_args()
    import json

    res = store_at_scale(a.work, tuple(int(v) for v in a.sizes.split(",")), heads=not a.no_heads)
    print(json.dumps(res, indent=1))
