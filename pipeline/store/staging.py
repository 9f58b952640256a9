"""Staged segments: a run's batches before its commit, merged as they come.

`make features` writes each embedded batch as a segment that no index names yet (staged). A run
that was killed leaves its staged segments behind: the next run takes up those made by the same
versions (and, during a REBUILD, by that rebuild: `writer.Writer._takes_up`, through
`log.SegmentLog.unnamed`), so nothing embedded is embedded again; other versions', older runs'
and killed merges' segments are garbage, collected after the commit. Staged segments merge like
the index's (`merging`), so a run of any length keeps few files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.store import merging
from pipeline.store.segment_writer import copy_rows, write_segment
from pipeline.store.segments import Meta, SegInfo

RESUMABLE = ("batch", "staged")  # unreferenced segments of these origins are a run's work


def merge(
    folder: Path,
    key: str,
    staged: dict[str, SegInfo],
    where: dict[str, tuple[str, int]],
    skip: set[str],
    limit: int,
    stamp: dict[str, Any],
    stamp_key: str,
    rebuild_id: str,
    dtype: str,
) -> None:
    """Merge the staged segments (all but `skip`) by the policy until no merge is due, in place:
    `staged` then names the merged segments instead of their sources, which are deleted (no
    index names them: no reader has them), and `where` finds each row in them."""
    while True:
        names = [n for n in staged if n not in skip]
        # a batch that failed whole is an empty segment: it merges like a one-row one
        sizes = [
            merging.Size(
                max(1, staged[n].rows),
                max(1, staged[n].rows),
                staged[n].stamp_key,
            )
            for n in names
        ]
        group = [names[i] for i in merging.next_merge(sizes, limit)]
        if not group:
            return
        infos = [staged[n] for n in group]
        fails = [x for i in infos for x in i.failures]
        out = copy_rows(
            folder,
            key,
            [(n, np.arange(staged[n].rows), None) for n in group],
            stamp,
            stamp_key,
            rebuild_id,
            limit,
            fails,
            known={i.name: i.meta for i in infos},
            origin="staged",
        )
        if not out and fails:  # only failures: keep them in one empty segment
            empty = {p: np.zeros((0, infos[0].channels), np.float32) for p in ("avg", "max")}
            shape = next((i.maps_shape for i in infos if i.maps_shape), None)
            zero_maps = np.zeros((0,) + shape, dtype) if shape else None
            out = [
                (
                    write_segment(
                        folder,
                        key,
                        Meta(),
                        empty,
                        zero_maps,
                        fails,
                        stamp,
                        stamp_key,
                        rebuild_id,
                        "staged",
                    ),
                    0,
                )
            ]
        meta = Meta()
        for i in infos:
            meta.extend(i.meta)
        moved: dict[tuple[str, int], tuple[str, int]] = {}
        pos = 0
        srcs = [(i.name, r) for i in infos for r in range(i.rows)]
        new_infos = []
        for k, (name, n) in enumerate(out):
            part = meta.take(range(pos, pos + n))
            new_infos.append(
                SegInfo(
                    name,
                    n,
                    stamp,
                    stamp_key,
                    rebuild_id,
                    part,
                    fails if k == 0 else [],
                    infos[0].channels,
                    next((i.maps_shape for i in infos if i.maps_shape), None),
                    infos[0].maps_dtype,
                )
            )
            for r in range(n):
                moved[srcs[pos + r]] = (name, r)
            pos += n
        for i in infos:  # only the merged rows' entries change: cost of the merge, not N
            for r, h in enumerate(i.meta.ident):
                if where.get(h) == (i.name, r):
                    where[h] = moved[(i.name, r)]
        for n in group:
            del staged[n]
            (folder / n).unlink(missing_ok=True)  # no index names it: no reader has it
        for info in new_infos:
            staged[info.name] = info
