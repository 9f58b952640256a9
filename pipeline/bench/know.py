"""`make audit` at 100,000 and 1,000,000 rows: its time, peak memory and neighbour recall.

Each size is built in one process and audited in a fresh one (its peak resident memory is the
audit's own). The build writes a synthetic cache through the store's own writer (512-d pooled
features in 1,000 clusters of varied spread, 10 classes, 64-d image signatures of which 1 % are
another row's) and a run's `oof.h5` (two partitions'
out-of-fold probabilities with 3 % of labels contradicted), and measures the neighbour search's
recall@10 against exact search on 1,000 seeded queries. The audit runs the product's own
`auditing._audit` on the cache read lazily, as `make audit` does: the space built a block at a
time (a memory-mapped file above `neighbours.IN_MEMORY_UP_TO`), the search, near-duplicates,
outliers, label issues and the map on its bounded sample, every CSV file written.
"""

from __future__ import annotations

import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench.instruments import say
from pipeline.store.format import SIGNATURE, SIGNATURE_WIDTH

K_CLASSES = 10


def _features(n: int, d: int = 512, seed: int = 0) -> np.ndarray:
    """Clusters of varied spread: 1,000 of them, fewer below 20,000 rows (about 20 rows each:
    a cluster of one or two rows would make its rows near-duplicates of each other)."""
    rng = np.random.default_rng(seed)
    m = min(1000, max(10, n // 20))
    centres = rng.standard_normal((m, d), dtype=np.float32) * 3
    spread = rng.uniform(0.5, 2.0, m).astype(np.float32)
    X = np.empty((n, d), np.float32)
    for a in range(0, n, 65536):
        b = min(n, a + 65536)
        c = rng.integers(0, m, b - a)
        X[a:b] = centres[c] + rng.standard_normal((b - a, d), dtype=np.float32) * spread[c, None]
    return X


def _probabilities(given: np.ndarray, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """(two partitions' out-of-fold probabilities, which given labels they contradict)."""
    rng = np.random.default_rng(seed)
    n, k = len(given), K_CLASSES
    flip = rng.random(n) < 0.03
    true = given.copy()
    true[flip] = (given[flip] + rng.integers(1, k, flip.sum())) % k
    parts = []
    for _ in range(2):
        logits = rng.standard_normal((n, k)).astype(np.float32)
        logits[np.arange(n), true] += 3.0 + rng.normal(0, 0.3, n).astype(np.float32)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        parts.append(e / e.sum(axis=1, keepdims=True))
    return parts, flip


def _signatures(n: int, seed: int) -> np.ndarray:
    """Image signatures: random unit rows, 1 % of them a copy of another row's (a mirror)."""
    rng = np.random.default_rng(seed + 2)
    S = rng.standard_normal((n, SIGNATURE_WIDTH), dtype=np.float32)
    S /= np.linalg.norm(S, axis=1, keepdims=True)
    copies = rng.choice(n, n // 100, replace=False)
    S[copies] = S[rng.integers(0, n, len(copies))]
    return S.astype(np.float16)


def build(n: int, work: Path, seed: int = 0) -> dict[str, Any]:
    """The synthetic cache and run in `work`; the search's recall@10 and the labels' AUROC."""
    from sklearn.metrics import roc_auc_score

    from pipeline import diagnose, layout, neighbours
    from pipeline.bench import store as bench_store
    from pipeline.oof import OOF
    from pipeline.store.segments import Meta
    from pipeline.store.writer import Writer
    from pipeline.train import load

    X = _features(n, seed=seed)
    sig = _signatures(n, seed)
    rows = bench_store._rows(0, n)
    path = layout.features_dir(work) / "audit.h5"
    path.parent.mkdir(parents=True)
    key = bench_store._key()
    w = Writer(path, key, bench_store.STAMP, maps=False, dtype="float16", log=lambda s: None)
    for a in range(0, n, 65536):
        part = rows[a : a + 65536]
        meta = Meta.of_rows(part)
        vectors = {"avg": X[a : a + 65536], "max": X[a : a + 65536], SIGNATURE: sig[a : a + 65536]}
        w.add_batch(meta, vectors, None, [])
    w.commit(rows, bench_store.CLASSES, [], bench_store._attrs(key, X.shape[1]), same_source=True)
    layout.set_current(work, path)
    del rows
    out: dict[str, Any] = {}
    S = neighbours.space(X)
    _, idx = neighbours.search(S, diagnose.K, seed=seed)
    q = np.sort(np.random.default_rng(seed + 1).choice(n, 1000, replace=False))
    _, exact = neighbours.neighbours(S, diagnose.K + 1, S[q])
    exact = np.array([e[e != i][: diagnose.K] for e, i in zip(exact, q, strict=True)])
    out["recall_at_10"] = neighbours.recall_at(idx[q], exact)
    del S, X, idx
    ts = load(path, "avg", lazy=True).train
    parts, flip = _probabilities(np.asarray(ts.y), seed)
    out["label_auroc"] = float(roc_auc_score(flip, -diagnose.vote(ts.y, parts)["score"]))
    every = OOF.of(np.ones(len(ts.y), bool), ts.y, K_CLASSES)
    for p in parts:
        every.start()
        every.put(np.arange(len(ts.y)), p, 0)
    run = work / "heads" / "bench"
    run.mkdir(parents=True)
    every.save(run, ts.sha256)
    np.save(work / "flipped.npy", flip)
    return out


def audit(work: Path, seed: int = 0) -> dict[str, Any]:
    """`auditing._audit` on the synthetic run, timed by part, in this process."""
    from pipeline import auditing, collection_map, layout, neighbours, oof, store
    from pipeline.train import load

    took: dict[str, float] = {"search_s": 0.0, "map_s": 0.0}

    def timed(fn: Any, name: str) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                took[name] += time.perf_counter() - t

        return run

    neighbours.search = timed(neighbours.search, "search_s")
    collection_map.embed_2d = timed(collection_map.embed_2d, "map_s")
    path = layout.current_cache(work)
    t = time.perf_counter()
    with store.reading(path.parent):
        data = load(path, "avg", lazy=True)
        saved = oof.load(work / "heads" / "bench")
        assert saved is not None
        r = {"run": "bench", "files": {}, "calibration": {}}
        s = auditing._audit(
            work, r, saved, data.train, data.validation, [f"c{i}" for i in range(K_CLASSES)],
            data.index.attrs, seed, auditing.K, collection_map.SAMPLE, lambda s: None,
        )  # fmt: skip
    out = {"total_s": time.perf_counter() - t, **took}
    out["search"] = s["near_duplicates"]["search"]
    out["near_sets"] = s["near_duplicates"]["sets"]
    out["map_points"] = s["map"]["points"]
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    flip = np.load(work / "flipped.npy")
    hashes = np.array(oof.load(work / "heads" / "bench").sha256[:])  # type: ignore[union-attr]
    flipped = set(hashes[flip].astype(str))
    with (auditing.audit_dir(work) / "label_issues.csv").open() as fh:
        found = {row["sha256"] for row in csv.DictReader(fh)}
    out["label_precision"] = len(found & flipped) / max(1, len(found))
    out["label_recall"] = len(found & flipped) / max(1, len(flipped))
    return out


def _child(*args: str) -> dict[str, Any]:
    p = subprocess.run(
        [sys.executable, "-m", "pipeline.bench.know", *args], capture_output=True, text=True
    )
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def audit_at_scale(sizes: tuple[int, ...] = (100_000, 1_000_000)) -> dict[str, Any]:
    """Each size built in one process and audited in a fresh one; a line per size."""
    res: dict[str, Any] = {}
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
            t = time.perf_counter()
            r = _child("build", str(n), tmp)
            build_s = time.perf_counter() - t
            r.update(_child("audit", tmp))
        r["rows"], r["build_s"] = n, build_s
        res[str(n)] = r
        say(
            f"  {n:>9,} rows: {r['total_s']:.0f} s (search {r['search_s']:.0f} s, "
            f"{r['search']}, recall@10 {r['recall_at_10']:.3f}; map {r['map_s']:.0f} s on "
            f"{r['map_points']:,}), peak {r['peak_rss_mib']:,.0f} MiB (features in the cache: "
            f"{n * 512 * 4 / 2**20:,.0f} MiB a pooling); label errors P "
            f"{r['label_precision']:.2f} R {r['label_recall']:.2f} AUROC {r['label_auroc']:.3f}"
        )
    return res


if __name__ == "__main__":
    if sys.argv[1] == "build":
        print(json.dumps(build(int(sys.argv[2]), Path(sys.argv[3]))))
    else:
        print(json.dumps(audit(Path(sys.argv[2]))))
