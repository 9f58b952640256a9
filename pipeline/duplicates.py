"""Identical files (same SHA-256): under two classes, or in train and in validation.

Both change what the numbers mean: a file under two classes is a label conflict, and a file in
train and in validation makes validation accuracy optimistic. Cross-validation keeps identical
files in one fold (they share a group); this module finds them so every output can say so.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np


def find(
    paths: Sequence[str],
    sha256: Sequence[str],
    labels: Sequence[int],
    split: Sequence[str],
    classes: Sequence[str],
) -> dict[str, Any]:
    """Plain data: `cross_class` and `train_validation` lists of duplicate sets, and a count."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(sha256):
        by_hash[h].append(i)
    cross_class, train_val = [], []
    n_dup_files = 0
    for h, rows in by_hash.items():
        if len(rows) < 2:
            continue
        n_dup_files += len(rows)
        files = [
            {"path": paths[i], "class": classes[int(labels[i])], "split": split[i]} for i in rows
        ]
        if len({int(labels[i]) for i in rows}) > 1:
            cross_class.append({"sha256": h, "files": files})
        if {split[i] for i in rows} >= {"train", "validation"}:
            train_val.append({"sha256": h, "files": files})
    return {
        "files_with_a_twin": n_dup_files,
        "cross_class": cross_class,
        "train_validation": train_val,
    }


def sharing(keys: np.ndarray) -> np.ndarray:
    """The rows (ascending) whose key another row has: one sort, 8 bytes a row and its place."""
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    twin = np.zeros(len(k), bool)
    if len(k) > 1:
        same = k[1:] == k[:-1]
        twin[1:] |= same
        twin[:-1] |= same
    return np.sort(order[twin])


def of_index(idx: Any) -> dict[str, Any]:
    """`find` over a cache's rows, in NumPy: Python objects only for the rows with a twin,
    so a cache of ten million distinct images costs one sort of its hashes."""
    # the hashes' 64-bit prefixes (8 bytes a row); rows sharing one are checked in full below,
    # their identities read alone (a lean index holds none)
    _, inv, counts = np.unique(idx.key64, return_inverse=True, return_counts=True)
    rows = np.flatnonzero(counts[inv] > 1)
    ids = idx.idents_of(rows)
    _, inv, counts = np.unique(ids, return_inverse=True, return_counts=True)
    rows, ids = rows[counts[inv] > 1], ids[counts[inv] > 1]
    paths = idx.paths_of(rows)
    # listed by content, then path: the same lists however the cache's rows lie in its files
    order = np.lexsort((np.array(paths, dtype=str), ids))
    rows, ids, paths = rows[order], ids[order], [paths[i] for i in order]
    return find(
        paths,
        [h.split("#", 1)[0] for h in ids.astype(str).tolist()],
        idx.labels[rows].tolist(),
        idx.split_col[rows].astype(str).tolist(),
        idx.classes,
    )


def _example(group: dict[str, Any]) -> str:
    return " = ".join(f"{f['path']} ({f['class']}, {f['split']})" for f in group["files"][:3])


def lines(found: dict[str, Any]) -> list[str]:
    """Warnings for a run's output: one per kind, with one example each."""
    out = []
    if found["cross_class"]:
        n = len(found["cross_class"])
        out.append(
            f"warning: {n} file content(s) appear under two or more classes (label conflicts, "
            f"e.g. {_example(found['cross_class'][0])}); fix their labels or remove the copies"
        )
    if found["train_validation"]:
        n = len(found["train_validation"])
        out.append(
            f"warning: {n} file content(s) are both in train and in validation, which inflates "
            f"validation accuracy (e.g. {_example(found['train_validation'][0])}); remove them "
            "from one split"
        )
    return out
