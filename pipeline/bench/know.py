"""`make audit` at 100,000 and 1,000,000 rows: its time, peak memory and neighbour recall.

Synthetic pooled features (512-d, 1,000 clusters of varied spread, float32) stand for a cache;
out-of-fold probabilities for 10 classes with 3 % of labels flipped stand for a run's. Each
size runs in a fresh process (its peak resident memory is its own) through the audit's own
functions: the space (`neighbours.space`), the neighbour search (`neighbours.search`: exact up
to `EXACT_UP_TO` rows, blocks of exact search above), near-duplicates, outliers, label issues
with two partitions voting, and the map (`collection_map.embed_2d`, on its bounded sample).
Recall@10 of the search is measured against exact search on 1,000 seeded queries.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

from pipeline.bench.instruments import say


def _features(n: int, d: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, d), dtype=np.float32) * 3
    spread = rng.uniform(0.5, 2.0, 1000).astype(np.float32)
    X = np.empty((n, d), np.float32)
    for a in range(0, n, 65536):
        b = min(n, a + 65536)
        c = rng.integers(0, 1000, b - a)
        X[a:b] = centres[c] + rng.standard_normal((b - a, d), dtype=np.float32) * spread[c, None]
    return X


def _probabilities(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(given labels, two partitions' out-of-fold probabilities, which labels were flipped)."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    given = true.copy()
    flip = rng.random(n) < 0.03
    given[flip] = (true[flip] + rng.integers(1, k, flip.sum())) % k
    parts = []
    for _ in range(2):
        logits = rng.standard_normal((n, k)).astype(np.float32)
        logits[np.arange(n), true] += 3.0 + rng.normal(0, 0.3, n).astype(np.float32)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        parts.append(e / e.sum(axis=1, keepdims=True))
    return given, parts, flip


def one_size(n: int, seed: int = 0) -> dict[str, Any]:
    """The audit's parts at `n` rows, timed, in this process."""
    from sklearn.metrics import roc_auc_score

    from pipeline import collection_map, diagnose, neighbours

    out: dict[str, Any] = {"rows": n}
    t = time.perf_counter()
    X = neighbours.space(_features(n, seed=seed))
    out["space_s"] = time.perf_counter() - t
    t = time.perf_counter()
    dist, idx = neighbours.search(X, diagnose.K, seed=seed)
    out["search_s"] = time.perf_counter() - t
    out["search"] = "exact" if n <= neighbours.EXACT_UP_TO else "approximate"
    q = np.sort(np.random.default_rng(seed + 1).choice(n, 1000, replace=False))
    _, exact = neighbours.neighbours(X, diagnose.K + 1, X[q])
    exact = np.array([e[e != i][: diagnose.K] for e, i in zip(exact, q, strict=True)])
    out["recall_at_10"] = neighbours.recall_at(idx[q], exact)
    t = time.perf_counter()
    sets, _ = diagnose.near_duplicates(dist, idx)
    far = diagnose.outlier_scores(dist)
    out["near_outliers_s"] = time.perf_counter() - t
    out["near_sets"] = int(len(np.unique(sets[sets >= 0])))
    given, parts, flip = _probabilities(n, 10, seed)
    t = time.perf_counter()
    v = diagnose.vote(given, parts)
    out["labels_s"] = time.perf_counter() - t
    found = v["flagged"]
    out["label_precision"] = float((found & flip).sum() / max(1, found.sum()))
    out["label_recall"] = float((found & flip).sum() / max(1, flip.sum()))
    out["label_auroc"] = float(roc_auc_score(flip, -v["score"]))
    t = time.perf_counter()
    collection_map.embed_2d(X, seed)
    out["map_s"] = time.perf_counter() - t
    out["map_points"] = min(n, collection_map.SAMPLE)
    out["total_s"] = sum(out[k] for k in out if k.endswith("_s"))
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["features_mib"] = X.nbytes / 2**20
    del far
    return out


def audit_at_scale(sizes: tuple[int, ...] = (100_000, 1_000_000)) -> dict[str, Any]:
    """Each size in a fresh process; a line per size."""
    res: dict[str, Any] = {}
    for n in sizes:
        p = subprocess.run(
            [sys.executable, "-m", "pipeline.bench.know", str(n)],
            capture_output=True,
            text=True,
        )
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-2000:])
        r = json.loads(p.stdout.strip().splitlines()[-1])
        res[str(n)] = r
        say(
            f"  {n:>9,} rows: {r['total_s']:.0f} s (search {r['search_s']:.0f} s, "
            f"{r['search']}, recall@10 {r['recall_at_10']:.3f}; map {r['map_s']:.0f} s on "
            f"{r['map_points']:,}), peak {r['peak_rss_mib']:,.0f} MiB ({r['features_mib']:,.0f} "
            f"MiB of features); label errors P {r['label_precision']:.2f} R "
            f"{r['label_recall']:.2f} AUROC {r['label_auroc']:.3f}"
        )
    return res


if __name__ == "__main__":
    print(json.dumps(one_size(int(sys.argv[1]))))
