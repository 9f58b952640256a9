"""Near-duplicate pairs among a cache's rows by their image signatures (mirrored copies).

One home for what the audit and `make train-head GROUPS=near` both do beside the features'
search (`neighbours.search`, `diagnose.near_duplicates`): the rows' signatures read from the
cache in the order the files hold them (one read of each segment), into a space held in memory
or in a file (`neighbours.allocate`), searched, and paired by `diagnose.near_pairs` with
`diagnose.SIGNATURE_RATIO`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import diagnose, neighbours
from pipeline.signature import WIDTH


def signature_edges(
    parts: Sequence[Any], folder: Path, k: int = diagnose.K, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows, cols, how many rows have no signature): pairs of positions in `parts`
    (`store.Rows`, one after the other) whose signatures are near-duplicates. A row without
    one (embedded before signatures were kept) or with a flat one (zeros) is not searched and
    joins no pair."""
    n = sum(len(p) for p in parts)
    S = neighbours.allocate(n, WIDTH, folder)
    where = np.empty(n, np.int64)  # the position of each row of S (the usable ones, packed)
    missing = m = 0
    at = 0
    for p in parts:
        for pos in p.file_blocks(65_536):
            sig = p.signatures(pos)
            none = np.isnan(sig).any(axis=1)
            missing += int(none.sum())
            use = ~none & (sig != 0).any(axis=1)  # a flat image's zeros: nothing to match
            k_use = int(use.sum())
            S[m : m + k_use] = neighbours.normalize(sig[use])
            where[m : m + k_use] = at + pos[use]
            m += k_use
        at += len(p)
    if m < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), missing
    # only the usable rows are searched (a view of the first m rows: no copy), so a row without
    # one never stands among another's neighbours and shifts its ratio
    dist, idx = neighbours.search(S[:m], min(k, m - 1), seed=seed)
    del S
    r, c, _ = diagnose.near_pairs(
        dist, idx, diagnose.SIGNATURE_RATIO, floor=diagnose.SIGNATURE_FLOOR
    )
    return where[r], where[c], missing
