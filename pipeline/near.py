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
    usable = np.zeros(n, bool)
    missing = 0
    at = 0
    for p in parts:  # read in the files' order, each row put at its own (canonical) place
        for pos in p.file_blocks(65_536):
            sig = p.signatures(pos)
            none = np.isnan(sig).any(axis=1)
            missing += int(none.sum())
            usable[at + pos] = ~none & (sig != 0).any(axis=1)  # flat: nothing to match
            sig[none] = 0.0
            S[at + pos] = neighbours.normalize(sig)
        at += len(p)
    # only the usable rows are searched, packed in their own order at the front (each moves
    # forward: in place, a block at a time), so a row without one never stands among
    # another's neighbours, and the searched rows are the same however the cache is laid out
    where = np.flatnonzero(usable)
    m = len(where)
    for a in range(0, m, 65_536):
        block = where[a : a + 65_536]
        S[a : a + len(block)] = S[block]
    if m < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), missing
    dist, idx = neighbours.search(S[:m], min(k, m - 1), seed=seed)
    del S
    r, c, _ = diagnose.near_pairs(
        dist, idx, diagnose.SIGNATURE_RATIO, floor=diagnose.SIGNATURE_FLOOR
    )
    return where[r], where[c], missing
