"""When segments merge: a size-tiered, log-structured policy that keeps the file count small.

Segments of similar size (the same tier: floor(log8(rows))) merge once FANOUT of them exist, so
a collection of N rows lives in at most FANOUT-1 segments per tier, about 7·log8(N) files, plus
full segments (segment_bytes() each) that no longer grow: the count is bounded by rows/segment
size. A segment with more than DEAD_FRACTION of its rows removed is rewritten with its live rows
only: removed rows' bytes are reclaimed by merging, never by embedding again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FANOUT = 8
DEAD_FRACTION = 0.25


@dataclass(frozen=True)
class Size:
    """What the policy needs of a segment: live rows, all rows, and its versions stamp."""

    live: int
    rows: int
    stamp_key: str


def tier(live: int) -> int:
    return 0 if live <= 1 else int(math.log(live, FANOUT) + 1e-9)


def next_merge(sizes: list[Size], limit: int) -> list[int]:
    """Indices of the segments to merge next (in their order), or [] when none need it."""
    for i, s in enumerate(sizes):  # mostly removed: rewrite it (with its tier if it can)
        if s.live and s.rows - s.live > DEAD_FRACTION * s.rows and s.live >= limit:
            return [i]
    groups: dict[tuple[str, int], list[int]] = {}
    for i, s in enumerate(sizes):
        if 0 < s.live < limit:
            groups.setdefault((s.stamp_key, tier(s.live)), []).append(i)
    for g in groups.values():
        if len(g) >= FANOUT:
            return g
    for g in groups.values():
        for i in g:
            s = sizes[i]
            if s.rows - s.live > DEAD_FRACTION * s.rows:
                return g if len(g) > 1 else [i]
    return []
