"""The segment log both stores keep, and why a kill at any of its steps loses nothing.

The feature cache (`writer`) and the predicted-images store (`content`) are the same log: an
index (one small file, replaced whole) naming immutable segments (`segments`) in its
`*.shards/` folder. `SegmentLog` takes every step that changes files; a store brings its
`Policy` (which unnamed segments are its own, what its lines say) and its own logic (which rows
it wants, the index's attributes). One writer per log holds its lock (`locks.exclusive`);
readers hold `.readers` (`locks.reading`) from opening an index to reading its segments.

Each step, and why a kill at any point of it leaves a readable store with nothing mixed:

1. Stage (`stage`). Rows are written as a new segment under a temporary name, fsynced and
   renamed to a random name (`segment_writer`, `format.new_h5`). Killed before the rename: a
   `.tmp-*` file no reader opens, deleted when the log is next opened (`unnamed`). After it:
   a whole segment that no index names; readers never see it.
2. Take up (`unnamed`). When the log is opened, the segments no index names are read (a
   segment a reader noted damaged is read whole first): a damaged one is set aside (5), one
   that cannot be read now is kept and left alone, and those the policy takes up (this store's
   key and versions: a killed run's staged rows) are the store's to name again, so nothing
   embedded is embedded again; the rest (a killed merge's output while the index names its
   sources, other versions') are garbage (3). Reading only: a kill here changes nothing.
3. Index (`write_index`). The index is written to a temporary name, fsynced and renamed over
   the old one: a reader opens the old index or the new one, each naming only whole segments
   (1). Killed before the rename: the old index and every segment it names are as they were;
   the staged segments are taken up again (2).
4. Merge (`merge`). Segments of one size tier (`merging`) are copied, live rows only, into a
   new segment (1), then the index naming it instead of its sources is written (3), one merge
   at a time. Killed before the index: the old index names the sources, still on disk, and the
   output holds nothing new: garbage. After it: the new index names the output, and the
   sources are garbage. Rows are read from both only through the index in place: never twice,
   never missing. A full disk stops the merging with the index in place complete. A run's
   staged segments (the feature cache's, `staging`) merge with no index to write: the output
   is written whole first, then the sources are deleted (no index names them: no reader has
   them); killed between, both are taken up (2) and each row is used once.
5. Set aside (`lose`, `put_aside`). A segment found damaged for good (a checksum, truncated,
   not HDF5) is moved into `damaged/` once (a rename: there or not) and left out of the next
   index written (3); the feature cache embeds its rows again, the predicted-images store
   only misses them. A damaged index is moved aside whole (`index_aside`); its segments are
   then taken up as unnamed ones (2).
6. Collect (`collect`). Segment files no index names (and none that cannot be read now) are
   deleted only after the index not naming them is in place (3), and only while no reader
   holds `.readers`: a reader that opened an older index finds its segments until it lets go;
   otherwise they wait for a later collect. Killed mid-way: some garbage is left, for later.

So at every instant the index on disk names whole segments that are on disk (or set aside,
which a reader reports as damaged), and each row it names is there once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.store import merging
from pipeline.store.damage import (
    DAMAGED_DIR,
    SegmentDamaged,
    SegmentMissing,
    noted_damaged,
    put_aside,
)
from pipeline.store.format import CacheError, cache_key
from pipeline.store.locks import no_readers
from pipeline.store.manifest import Entry, shards_dir, write_manifest
from pipeline.store.segment_writer import copy_rows, write_segment
from pipeline.store.segments import (
    Failure,
    ForeignSegment,
    Meta,
    SegInfo,
    limit_of,
    open_segment,
    read_info,
    verify,
)

Log = Callable[[str], None]


@dataclass(frozen=True)
class Policy:
    """What the stores sharing the log do differently; everything else is `SegmentLog`'s."""

    what: str  # the store, in words ("cache"...), as its lines name it
    takes_up: Callable[[SegInfo], bool]  # an unnamed segment of this key: this store's rows?
    then: str  # said after a damaged index is moved aside: what happens next
    told: dict[str, str] | None = None  # a full disk's line (None: the feature cache's)
    says_lost: bool = True  # say each segment left out for good (else a miss, said by readers)
    held: str = ""  # said ({n}: files) when a reader postpones a collect ("": nothing)


class SegmentLog:
    """The files of one store at `path` (an index and its `*.shards/` segments), changed only
    by the steps of the module doc; `unreadable` segments are never deleted nor read again."""

    def __init__(
        self, path: Path, key: str, stamp: dict[str, Any], policy: Policy, log: Log
    ) -> None:
        self.path, self.folder, self.key = Path(path), shards_dir(path), key
        self.stamp, self.stamp_key = stamp, cache_key(stamp)
        self.policy, self.log = policy, log
        self.unreadable: set[str] = set()  # kept, unused (maybe passing)
        self.limit: int | None = None  # rows of a full segment

    # -- 1. stage ----------------------------------------------------------------------------
    def stage(
        self,
        meta: Meta,
        pooled: dict[str, np.ndarray],
        maps: np.ndarray | None,
        failures: list[Failure],
        rebuild: str = "",
    ) -> str:
        """Write rows as one whole segment that no index names yet; its name."""
        return write_segment(
            self.folder, self.key, meta, pooled, maps, failures, self.stamp, self.stamp_key,
            rebuild, told=self.policy.told,
        )  # fmt: skip

    # -- 2. take up --------------------------------------------------------------------------
    def unnamed(self, named: set[str]) -> list[SegInfo]:
        """The segments not in `named` (no index names them) that the policy takes up, in name
        order; half-made files are deleted, damaged ones set aside, unreadable ones kept."""
        if not self.folder.is_dir():
            return []
        for p in [*self.folder.glob(".tmp-*"), *self.path.parent.glob(f"{self.path.name}.tmp-*")]:
            p.unlink(missing_ok=True)  # a killed writer's half-made segment or index
        noted = noted_damaged(self.folder)  # found damaged by a reader
        out = []
        for p in sorted(self.folder.glob("g*.h5")):
            if p.name in named:
                continue
            try:
                if p.name in noted:  # read whole first: checksums and digests
                    with open_segment(p) as g:
                        verify(g)
                info = read_info(p, self.key)
            except (ForeignSegment, SegmentMissing):
                continue  # another store's segment (garbage), or gone since
            except SegmentDamaged as e:
                where = self.put_aside(p.name)
                self.log(
                    f"warning: segment '{p.name}', which no index names (a stopped run's "
                    f"work), is damaged ({e.reason}); {where}: what it held is embedded "
                    "again if needed"
                )
                continue
            except (CacheError, OSError, KeyError) as e:
                self.unreadable.add(p.name)  # maybe passing (a network filesystem): kept
                why = getattr(e, "reason", e)
                self.log(f"warning: cannot read segment '{p.name}' now ({why}); it is kept, unused")
                continue
            if self.policy.takes_up(info):
                out.append(info)
        return out

    # -- 3. index ----------------------------------------------------------------------------
    def write_index(
        self,
        entries: list[Entry],
        classes: list[str],
        skipped: list[dict[str, Any]],
        attrs: dict[str, Any],
    ) -> None:
        """Replace the index whole, naming `entries` (`manifest.write_manifest`)."""
        write_manifest(self.path, entries, classes, skipped, attrs, told=self.policy.told)

    # -- 4. merge ----------------------------------------------------------------------------
    def limit_for(self, entries: list[Entry]) -> int:
        """The rows of a full segment: known, else from the first segment's header."""
        if self.limit is None and entries:
            self.limit = limit_of(self.folder / entries[0].name)
        return self.limit if self.limit is not None else 1 << 20

    def merge(
        self,
        entries: list[Entry],
        write: Callable[[list[Entry]], None],
        stamps: dict[str, dict[str, Any]] | None = None,
    ) -> tuple[list[Entry], int]:
        """Merge `entries` by the policy (`merging`) until none is due, `write` (the index
        naming them) after each merge; the entries then, and how many merges. The sources are
        left to `collect`; `stamps` gives each versions stamp by its key (else this log's)."""
        limit, n = self.limit_for(entries), 0
        while True:
            sizes = [merging.Size(e.live, e.rows, e.stamp_key) for e in entries]
            group = merging.next_merge(sizes, limit)
            if not group:
                return entries, n
            srcs: list[tuple[str, np.ndarray, Meta | None]] = []
            for i in group:
                e = entries[i]
                live = np.ones(e.rows, bool)
                live[e.dead] = False
                rows_live = np.flatnonzero(live)
                meta = None
                if len(e.restat_rows):  # fold the new stats into the merged rows
                    meta = read_info(self.folder / e.name).meta.take(rows_live)
                    pos = np.searchsorted(rows_live, e.restat_rows)
                    for p, st in zip(pos.tolist(), e.restat.tolist(), strict=True):
                        meta.stat[p] = tuple(st)
                srcs.append((e.name, rows_live, meta))
            sk = entries[group[0]].stamp_key
            stamp = (stamps or {}).get(sk, self.stamp)
            out = copy_rows(
                self.folder, self.key, srcs, stamp, sk, "", limit, told=self.policy.told
            )
            entries = [e for i, e in enumerate(entries) if i not in group[1:]]
            at = next(i for i, e in enumerate(entries) if e.name == srcs[0][0])
            entries[at : at + 1] = [Entry(nm, k, sk) for nm, k in out]
            write(entries)
            n += 1

    # -- 5. set aside ------------------------------------------------------------------------
    def put_aside(self, name: str) -> str:
        """`damage.put_aside`, in words; a file that cannot be moved is kept, unused."""
        where, gone = put_aside(self.folder, name)
        if not gone:
            self.unreadable.add(name)
        return where

    def lose(self, lost: list[tuple[Entry, SegmentDamaged]]) -> set[str]:
        """Segments an index names, lost for good: a damaged one set aside, each said once
        (if the policy says them); their names, for the caller to leave out of its index."""
        for e, err in lost:
            if isinstance(err, SegmentMissing):
                earlier = (self.folder / DAMAGED_DIR / e.name).exists()
                state = "set aside earlier as damaged" if earlier else "missing"
            else:
                state = f"damaged ({err.reason}); {self.put_aside(e.name)}"
            if self.policy.says_lost:
                self.log(
                    f"warning: segment '{e.name}' of the {self.policy.what} is {state}: its "
                    f"{e.live} image(s) are embedded again"
                )
        return {e.name for e, _ in lost}

    def index_aside(self, err: CacheError) -> None:
        """Move a damaged index (or one of other settings) aside; its segments stay, taken up
        again as unnamed ones."""
        aside = self.path.with_name(self.path.name + f".damaged-{int(time.time())}")
        os.replace(self.path, aside)
        why = str(err).split("; rerun `make features`")[0]  # this is that rerun
        self.log(f"warning: {why}; moved aside to '{aside.name}'{self.policy.then}")

    # -- 6. collect --------------------------------------------------------------------------
    def collect(self, entries: list[Entry]) -> None:
        """Unlink the segment files not in `entries` (never an unreadable one), only while no
        reader holds the folder (else a later collect does)."""
        if not self.folder.is_dir():
            return
        named = {e.name for e in entries} | self.unreadable
        garbage = [p for p in self.folder.glob("g*.h5") if p.name not in named]
        if not garbage:
            return
        with no_readers(self.folder.parent) as free:
            if not free:
                if self.policy.held:
                    self.log(self.policy.held.format(n=len(garbage)))
                return
            for p in garbage:
                p.unlink(missing_ok=True)
