"""`make export`: the pooled features of a cache as one NPZ or CSV file, for other tools.

Every original image of the cache (train rows, then validation rows; no augmented view) with its
path as the cache records it (relative to DATA; a CSV's absolute paths stay absolute), label
(class name), split and content SHA-256. NPZ holds the arrays X (n, d) float32, y (n,) int into
`classes`, labels, paths, split, sha256, classes and `provenance` (one JSON string), all plain
NumPy (no pickle: `np.load(file)` reads it). CSV holds one row per image:
`path,label,split,sha256,f_0,...,f_<d-1>`, floats written with 9 significant digits, which read
back into exactly the same float32 values; its provenance goes beside it in `<file>.json`.
The provenance says what made the features: cache file and key, data id, backbone settings,
weights (random weights flagged), pooling, versions.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import dataset, layout, outputs, store
from pipeline.errors import UserError
from pipeline.provenance import environment

Log = Callable[[str], None]
FORMATS = ("npz", "csv")


def cache_of(where: str | os.PathLike[str]) -> Path:
    """A cache file itself, or the current cache of an ARTIFACTS folder."""
    where = Path(where)
    if where.is_dir():
        return layout.current_cache(where)
    if not where.is_file():
        raise UserError(
            f"'{where}' is neither a feature cache (.h5) nor an ARTIFACTS folder; run "
            "`make features` first, or pass the cache file it printed"
        )
    return where


def provenance(idx: store.Index, path: Path, pooling: str) -> dict[str, Any]:
    """What made these features, to keep beside them."""
    a = idx.attrs
    return {
        "cache": path.name,
        "cache_key": a.get("cache_key"),
        "data_id": a.get("data_id"),
        "data": a.get("data") or a.get("data_root"),
        "settings": a.get("settings"),
        "weights": a.get("weights"),
        "random_weights": bool(a.get("random_weights", False)),
        "pooling": pooling,
        "classes": list(idx.classes),
        "embedders": a.get("embedders"),
        "environment": environment(),
    }


def export(
    artifacts: Path,
    fmt: str = "npz",
    pooling: str = "avg",
    out: Path | None = None,
    features: Path | None = None,
    log: Log = print,
) -> Path:
    """Write the pooled features of the current cache (or `features`) to `out`; return it."""
    if fmt not in FORMATS:
        raise UserError(f"FORMAT must be one of {', '.join(FORMATS)}; got '{fmt}'")
    cache = cache_of(features) if features else layout.current_cache(artifacts)
    out = (
        outputs.a_file(out, f"features.{fmt}")
        if out
        else layout.export_file(artifacts, cache, pooling, fmt)
    )
    # OUT (and its .json) is this export's: a second export to it stops at once
    with outputs.owned(out, "make export", fix="set OUT= to another file"):
        return _export(cache, fmt, pooling, out, log)


def _export(cache: Path, fmt: str, pooling: str, out: Path, log: Log) -> Path:
    with store.reading(cache.parent), store.open_cache(cache) as f:
        idx = store.index_of(f, cache)
        parts = [store.features_of(f, idx, pooling, s) for s in dataset.SPLITS]
    X = np.concatenate([p.X for p in parts])
    y = np.concatenate([p.y for p in parts]).astype(np.int64)
    split = [s for s, p in zip(dataset.SPLITS, parts, strict=True) for _ in p.paths]
    paths = [q for p in parts for q in p.paths]
    sha = [h for p in parts for h in p.sha256]
    labels = [idx.classes[int(v)] for v in y]
    d = X.shape[1]
    meta = json.dumps(provenance(idx, cache, pooling), sort_keys=True, default=str)
    needed = X.size * (4 if fmt == "npz" else 16) + sum(len(p) + 100 for p in paths)  # roughly
    # the file and its provenance take their names together: a full disk leaves both old ones
    with outputs.together(), outputs.written(out, needed=needed) as tmp:
        if fmt == "npz":
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    X=X,
                    y=y,
                    labels=np.array(labels, dtype=str),
                    paths=np.array(paths, dtype=str),
                    split=np.array(split, dtype=str),
                    sha256=np.array(sha, dtype=str),
                    classes=np.array(idx.classes, dtype=str),
                    provenance=np.array(meta),
                )
        else:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(["path", "label", "split", "sha256", *(f"f_{i}" for i in range(d))])
                for i in range(len(y)):
                    w.writerow([paths[i], labels[i], split[i], sha[i], *(f"{v:.9g}" for v in X[i])])
            outputs.write_text(out.with_name(out.name + ".json"), meta + "\n")
    log(f"exported {len(y)} images x {d} {pooling}-pooled features of {cache.name} to {out}")
    return out
