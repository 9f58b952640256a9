"""Staged segments: a run's batches before its commit, taken up after a kill, merged as they come.

`make features` writes each embedded batch as a segment that no index names yet (staged). A run
that was killed leaves its staged segments behind: the next run takes up those made by the same
versions (and, during a REBUILD, by that rebuild), so nothing embedded is embedded again; other
versions', older runs' and killed merges' segments are garbage, collected after the commit
(`writer`). Staged segments merge like the index's (`merging`), so a run of any length keeps
few files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.store import merging
from pipeline.store.damage import SegmentDamaged, SegmentMissing, noted_damaged, put_aside
from pipeline.store.format import CacheError
from pipeline.store.segment_writer import copy_rows, write_segment
from pipeline.store.segments import (
    ForeignSegment,
    Meta,
    SegInfo,
    open_segment,
    read_info,
    verify,
)

RESUMABLE = ("batch", "staged")  # unreferenced segments of these origins are a run's work


def taken_up(
    folder: Path,
    referenced: set[str],
    key: str,
    stamp_key: str,
    rebuild: bool,
    rebuild_id: str,
    indexed: bool,
    log: Callable[[str], None],
) -> tuple[dict[str, SegInfo], set[str]]:
    """The segments of `folder` that no index names (not in `referenced`) and this run takes
    up, by name; and those that cannot be read now (kept, unused: maybe passing). A damaged one
    is set aside (`damage.put_aside`); `indexed`: an index is in place (a killed merge's output
    is then garbage)."""
    staged: dict[str, SegInfo] = {}
    unreadable: set[str] = set()
    if not folder.is_dir():
        return staged, unreadable
    for p in folder.glob(".tmp-*"):  # a killed writer's half-made file
        p.unlink(missing_ok=True)
    noted = noted_damaged(folder)  # found damaged by a reader (a damaged index's, say)
    for p in sorted(folder.glob("g*.h5")):
        if p.name in referenced:
            continue
        try:
            if p.name in noted:  # read whole first: checksums and digests
                with open_segment(p) as g:
                    verify(g)
            info = read_info(p, key)
        except ForeignSegment:
            continue  # another cache's segment: garbage, collected after the commit
        except SegmentMissing:
            continue
        except SegmentDamaged as e:  # for good: set aside once, never read again
            where, gone = put_aside(folder, p.name)
            if not gone:
                unreadable.add(p.name)
            log(
                f"warning: segment '{p.name}', which no index names (a stopped run's "
                f"work), is damaged ({e.reason}); {where}: what it held is embedded "
                "again if needed"
            )
            continue
        except (CacheError, OSError, KeyError) as e:
            unreadable.add(p.name)  # maybe passing (a network filesystem): kept
            why = getattr(e, "reason", e)
            log(f"warning: cannot read segment '{p.name}' now ({why}); it is kept, unused")
            continue
        if (
            info.stamp_key != stamp_key
            or (rebuild and info.rebuild != rebuild_id)
            # a killed merge's output is garbage while an index names its sources;
            # with no index (a damaged one set aside) every segment is taken up
            or (info.origin not in RESUMABLE and indexed)
        ):
            continue  # other versions', an older run's or a killed merge's: garbage
        staged[p.name] = info
    return staged, unreadable


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
