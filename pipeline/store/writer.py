"""Writing a cache: a run's new rows staged in segments, one commit, merges, garbage collection.

A run of `make features` (one writer per artifacts folder) goes:
1. `Writer(...)` reads the current index and finds the segments no index names yet: a killed
   run's work, resumed when made by the same versions (and, during a REBUILD, by that rebuild:
   `staging`).
2. `add_batch` writes each embedded batch as a small segment (crash-safe on return) and merges
   staged segments as they accumulate (`staging`), so a run of any length keeps few files.
3. `commit` places every wanted row: kept where it is, taken from a staged segment as it is, or
   copied under new metadata (a moved or relabelled file); writes the new index atomically,
   its data_id updated from the rows added and taken off (a sum kept in the index, `format`);
   then merges the index's segments (`merging`), writing the index after each merge; and only
   then deletes the files no index names, while no reader is between opening and reading.
Each of these is a step of the segment log (`log.SegmentLog`, with this cache's `Policy`), whose
module doc says why a kill at any of them loses nothing; this module holds what is the feature
cache's own: which rows a run wants, where each is found, the data_id, REBUILD.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DiskFull, UserError
from pipeline.store import changes, merging, staging
from pipeline.store.changes import Row
from pipeline.store.content import Lookup
from pipeline.store.damage import NOTED, SegmentDamaged, SegmentUnreadable, noted_damaged
from pipeline.store.format import (
    DATA_MOD,
    DATA_SUM,
    CacheError,
    cache_key,
    data_id_of,
    replacing,
    rows_sum,
    stored_sum,
    sum_attr,
)
from pipeline.store.log import Policy, SegmentLog
from pipeline.store.manifest import Entry, Index, read_summary
from pipeline.store.segment_writer import copy_rows
from pipeline.store.segments import Failure, Meta, SegInfo, max_rows, open_segment

Log = Callable[[str], None]


@dataclass
class Committed:
    """What a commit did."""

    rewrote: bool
    resumed: set[str]
    copied: int
    merges: int
    removed: int = 0  # old rows whose (path, view) the run no longer has


def rebuild_marker(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".rebuild")


class Writer:
    """The one writer of the cache at `path` for this run (the caller holds `locks.exclusive`)."""

    def __init__(
        self,
        path: Path,
        key: str,
        stamp: dict[str, Any],
        maps: bool,
        dtype: str,
        log: Log = print,
        rebuild: bool = False,
        verify: bool = False,
    ) -> None:
        self.path, self.key, self.stamp = Path(path), key, stamp
        self.stamp_key = cache_key(stamp)
        self.maps, self.dtype, self.log = maps, dtype, log
        self.segs = SegmentLog(self.path, key, stamp, self._policy(), log)  # every file change
        self.folder = self.segs.folder
        self.known = changes.Known()  # the old index's identities
        # its attributes and segments (no rows are held); lost ones set aside
        self.old = self._read_old(rebuild, verify)
        marker = rebuild_marker(self.path)
        self.rebuild_id = ""
        if marker.is_file():
            mid = marker.read_text().strip()
            if self.old is not None and self.old.attrs.get("rebuild_id") == mid:
                marker.unlink(missing_ok=True)  # that rebuild's index is in place: it finished
            else:
                self.rebuild_id = mid
                if not rebuild:
                    log("resuming an interrupted REBUILD=1 (the rows it embedded are kept)")
                rebuild = True
        if rebuild and not self.rebuild_id:
            self.rebuild_id = secrets.token_hex(8)
            tmp = marker.with_name(marker.name + f".tmp-{os.getpid()}")
            with replacing(tmp, marker):
                tmp.write_text(self.rebuild_id + "\n")
        self.rebuild = rebuild
        referenced = {e.name for e in self.old.entries} if self.old is not None else set()
        # segments no index names: a killed run's work, taken up; this run's batches join them
        self.staged = {info.name: info for info in self.segs.unnamed(referenced)}
        # what a killed run embedded, resumed now (idents survive merges; names do not)
        self.resumable = {h for info in self.staged.values() for h in info.meta.ident}
        self.where: dict[str, tuple[str, int]] = {}  # the staged rows (this run's, resumed)
        self.bad: dict[str, Failure] = {}
        for name, info in self.staged.items():
            self._index_staged(name, info)
        if rebuild:
            self.known = changes.Known()
        if self.old is not None and not rebuild:
            if not verify:
                for s in self.old.skipped:
                    if s.get("content") and s.get("stamp_key") == self.stamp_key and s["sha256"]:
                        self.bad.setdefault(s["sha256"], Failure(s["sha256"], s["reason"], True))
        if verify:
            self.bad = {}
        self.staged_merges_stopped = False

    def _policy(self) -> Policy:
        """The feature cache's: a lost segment's rows are embedded again, said."""
        held = (
            "{n} replaced segment file(s) kept while another process reads the cache (a "
            "train-head); the next `make features` deletes them"
        )
        return Policy("cache", self._takes_up, " and rebuilding", held=held)

    def _takes_up(self, info: SegInfo) -> bool:
        """Whether an unnamed segment is a killed run's work this run resumes: its versions
        (and, during a REBUILD, that rebuild's); a killed merge's output is garbage while an
        index names its sources (with none, a damaged one set aside, every one is taken up)."""
        return (
            info.stamp_key == self.stamp_key
            and not (self.rebuild and info.rebuild != self.rebuild_id)
            and (info.origin in staging.RESUMABLE or self.old is None)
        )

    # -- reading what is there -------------------------------------------------------------
    def _read_old(self, rebuild: bool = False, verify: bool = False) -> Index | None:
        """The current index, less its segments lost for good (set aside, their rows embedded
        again: `_lose`); `verify` reads every segment whole (checksums), as it does the
        segments a reader found damaged since the last run.

        A segment that cannot be read now stops the run with nothing changed (it may pass),
        unless REBUILD embeds every image again anyway (it is then left unused); only an index
        that is itself damaged or of other settings is moved aside.
        """
        if not self.path.exists():
            return None
        try:
            idx = read_summary(self.path, expect_key=self.key)
        except CacheError as e:
            self.segs.index_aside(e)  # its segments stay: their rows are taken up again
            self.old, self.known = None, changes.Known()
            return None
        self.old = idx
        noted = noted_damaged(self.folder)
        lost: list[tuple[Entry, SegmentDamaged]] = []
        if not rebuild:
            try:
                self.known = changes.Known.of(self.folder, idx.entries, True if verify else noted)
            except SegmentUnreadable as e:
                raise UserError(str(e)) from None
            lost = self.known.lost
        else:
            for e in idx.entries:  # a segment's header alone: is it there to count removed
                try:
                    open_segment(self.folder / e.name).close()
                except SegmentDamaged as err:
                    lost.append((e, err))
                except SegmentUnreadable as err:
                    why = err.reason
                    self.log(f"warning: the old cache cannot be read ({why}); REBUILD goes on")
                    return None
        (self.folder / NOTED).unlink(missing_ok=True)  # read whole (or set aside) just now
        self._lose(lost)
        return idx

    def _lose(self, lost: list[tuple[Entry, SegmentDamaged]]) -> None:
        """Leave segments lost for good out of the index this run writes: each is said once
        (which file, why, how many images), its file set aside, and its rows embedded again."""
        if self.old is None:
            return
        named = {e.name for e in self.old.entries}
        lost = [(e, err) for e, err in lost if e.name in named]  # each once
        if not lost:
            return
        names = self.segs.lose(lost)
        self.old.entries = [e for e in self.old.entries if e.name not in names]
        n = sum(e.live for e, _ in lost)
        self.old.attrs["lost_rows"] = int(self.old.attrs.get("lost_rows") or 0) + n

    def _index_staged(self, name: str, info: SegInfo) -> None:
        for i, h in enumerate(info.meta.ident):
            self.where.setdefault(h, (name, i))
        for x in info.failures:
            if x.content:
                self.bad.setdefault(x.ident, x)

    def feature_shape(self) -> tuple[int, ...] | None:
        """The (h, w, c) the rows hold: maps' shape, or (1, 1, c) with MAPS=0."""
        for info in self.staged.values():
            return info.maps_shape or (1, 1, info.channels)
        if self.old is not None and self.old.attrs.get("feature_shape"):
            return tuple(int(v) for v in self.old.attrs["feature_shape"])
        return None

    def has(self, ident: str) -> bool:
        """Whether the features of `ident` are on disk for this run (nothing to embed)."""
        return ident in self.where or self.known.has(ident)

    def has_many(self, idents: Sequence[str]) -> np.ndarray:
        """`has` of each identity at once (the old index's keys searched together)."""
        staged = np.fromiter((h in self.where for h in idents), bool, count=len(idents))
        return staged | self.known.has_many(idents)

    def known_files(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(paths, stats, content hashes) of the images the current index holds, a block of
        rows at a time (`changes.file_blocks`: bytes arrays and an (n, 3) array), streamed.

        A segment found damaged only now is set aside as when the run started (`_lose`): its
        rows are no longer known, so they are embedded again.
        """
        if self.old is None:
            return
        named = {e.name for e in self.old.entries}
        for e in list(self.old.entries):
            if e.name not in named:  # set aside meanwhile
                continue
            try:
                yield from changes.file_blocks(self.folder, [e])
            except SegmentDamaged as err:
                self._lose([(e, err)])
                self.known = changes.Known.of(self.folder, self.old.entries)
                self._lose(self.known.lost)
                named = {x.name for x in self.old.entries}
            except SegmentUnreadable as err:
                raise UserError(str(err)) from None

    def failure(self, ident: str) -> Failure | None:
        """A remembered content failure of `ident` under these versions (not with VERIFY)."""
        return self.bad.get(ident) or self.bad.get(ident.split("#", 1)[0])

    # -- staging ---------------------------------------------------------------------------
    def add_batch(
        self,
        meta: Meta,
        pooled: dict[str, np.ndarray],
        maps: np.ndarray | None,
        failures: list[Failure],
    ) -> None:
        """Write one embedded batch as a segment (complete on disk when this returns)."""
        channels = int(pooled["avg"].shape[1])
        shape = tuple(maps.shape[1:]) if (maps is not None and self.maps) else None
        name = self.segs.stage(
            meta, pooled, maps if shape else None, list(failures), self.rebuild_id
        )
        info = SegInfo(
            name, len(meta), self.stamp, self.stamp_key, self.rebuild_id, meta, list(failures),
            channels, shape, self.dtype,
        )  # fmt: skip
        self.staged[name] = info
        self._index_staged(name, info)
        if self.segs.limit is None and len(meta):
            self.segs.limit = max_rows(channels, shape, self.dtype)
        self._merge_staged()

    def _merge_staged(self) -> None:
        """Merge this run's staged segments like the index's (no index names them yet); a
        full disk stops them for this run (said once): the batches stay whole as they are."""
        limit = self.segs.limit
        if limit is None or self.staged_merges_stopped:
            return
        try:
            staging.merge(
                self.folder, self.key, self.staged, self.where, self.segs.unreadable, limit,
                self.stamp, self.stamp_key, self.rebuild_id, self.dtype,
            )  # fmt: skip
        except DiskFull as e:
            self.staged_merges_stopped = True
            self.log(f"warning: merging segments stopped ({e}); the batches stay as they are")

    # -- committing ------------------------------------------------------------------------
    def commit(
        self,
        rows: list[Row],
        classes: list[str],
        skipped: list[dict[str, Any]],
        attrs: dict[str, Any] | Callable[[], dict[str, Any]],
        same_source: bool,
    ) -> Committed:
        """Make the index hold exactly `rows` (in their order where new); see the module doc.

        The old index's rows are met segment by segment (`changes.compare`): what this holds
        grows with the rows changed, and by about 26 bytes with each row wanted.
        """
        old = self.old
        base = None
        if old is not None and not self.rebuild and not old.attrs.get("lost_rows"):
            base = stored_sum(old.attrs)
        try:
            cmp = changes.compare(
                self.folder,
                old.entries if old is not None else [],
                rows,
                keep=not self.rebuild,
                sum_kept=base is None,
            )
        except CacheError as e:
            if not self.rebuild:
                if isinstance(e, SegmentDamaged) and old is not None:
                    lost = [(x, e) for x in old.entries if x.name == e.path.name]
                    self._lose(lost)
                    n = sum(x.live for x, _ in lost)
                    raise UserError(
                        f"segment '{e.path.name}' of the cache was found damaged only now "
                        f"({e.reason}); it is set aside: rerun `make features` (it embeds its "
                        f"{n} image(s) again and keeps what this run embedded)"
                    ) from None
                raise
            # REBUILD replaces every row: the old ones were read only to count the removed
            cmp = changes.compare(self.folder, [], rows, keep=False)
        if self.rebuild:
            old = None
        resumed: set[str] = set()
        exact: dict[tuple[Any, ...], list[tuple[str, int]]] = {}
        for name, info in self.staged.items():
            m = info.meta
            for r in range(info.rows):
                exact.setdefault(
                    (m.path[r], m.view[r], m.ident[r], m.label[r], m.split[r], tuple(m.stat[r])),
                    [],
                ).append((name, r))
        used: dict[str, list[int]] = {}
        copies: list[tuple[Row, tuple[str, int] | None]] = []
        fresh: list[Row] = []  # rows the old index does not hold as they are: data_id adds them
        for j in np.flatnonzero(~cmp.kept).tolist():
            row = rows[j]
            fresh.append(row)
            hit = exact.get(row.key())
            if hit:
                name, r = hit.pop(0)
                used.setdefault(name, []).append(r)
                if row.ident in self.resumable:
                    resumed.add(row.ident)
                continue
            src = self.where.get(row.ident)
            if row.ident in self.resumable and src is not None and src[0] in self.staged:
                resumed.add(row.ident)
            copies.append((row, src))
        self._find_in_old(copies)
        old_skipped = [(s["path"], s["reason"]) for s in (old.skipped if old is not None else [])]
        unchanged = (
            old is not None
            and not copies
            and not used
            and not cmp.restated
            and not cmp.dropped
            and old.classes == classes
            and old_skipped == [(s["path"], s["reason"]) for s in skipped]
            and same_source
            and not old.attrs.get("lost_rows")  # its index still names a missing segment
            and base is not None  # an older index: its data_id is made anew
        )
        if unchanged:  # nothing written, unless a merge is due (one stopped earlier)
            es = old.entries  # type: ignore[union-attr]
            limit = self.segs.limit_for(es)
            sizes = [merging.Size(e.live, e.rows, e.stamp_key) for e in es]
            merges = 0
            if merging.next_merge(sizes, limit):
                keep = {k: v for k, v in old.attrs.items() if k not in ("rows", "format_version")}  # type: ignore[union-attr]
                merges = self._merge_safely(list(es), old.classes, old.skipped, keep)  # type: ignore[union-attr]
            else:
                self.segs.collect(es)
            return Committed(False, resumed, 0, merges, cmp.removed)
        entries: list[Entry] = list(cmp.entries) if old is not None else []
        for name, rs in used.items():
            info = self.staged[name]
            live = np.zeros(info.rows, bool)
            live[rs] = True
            entries.append(
                Entry(name, info.rows, info.stamp_key, np.flatnonzero(~live).astype(np.int64))
            )
        limit = self.segs.limit_for(entries)
        if copies:
            by_src: dict[str, tuple[list[int], list[Row]]] = {}
            for row, src in copies:
                assert src is not None  # _find_in_old found every source or raised
                name, r = src
                rs, them = by_src.setdefault(name, ([], []))
                rs.append(r)
                them.append(row)
            out = copy_rows(
                self.folder,
                self.key,
                [(n, np.array(rs, np.int64), Meta.of_rows(m)) for n, (rs, m) in by_src.items()],
                self.stamp,
                self.stamp_key,
                self.rebuild_id,
                limit,
                origin="copy",
            )
            entries += [Entry(n, k, self.stamp_key) for n, k in out]
        stamps = self._stamps()
        attrs = {
            **(attrs() if callable(attrs) else attrs),  # made only when something is written
            "embedders": [
                stamps[k] for k in dict.fromkeys(e.stamp_key for e in entries) if k in stamps
            ],
        }
        add = rows_sum((r.path, r.ident.split("#", 1)[0], r.label, r.split) for r in fresh)
        if old is None:
            total = add
        elif base is None:  # an older index (or one that lost a segment): summed once, here
            total = (cmp.kept_sum + add) % DATA_MOD
        else:  # the old sum, less the rows it no longer holds as they were, plus the new ones
            total = (base - cmp.dropped_sum + add) % DATA_MOD
        attrs[DATA_SUM], attrs["data_id"] = sum_attr(total), data_id_of(classes, total)
        attrs["rebuild_id"] = self.rebuild_id if self.rebuild else ""
        self.segs.write_index(entries, classes, skipped, attrs)
        rebuild_marker(self.path).unlink(missing_ok=True)
        self.segs.collect(entries)  # the old rows go now that the new index is in place
        merges = self._merge_safely(entries, classes, skipped, attrs)
        return Committed(True, resumed, len(copies), merges, cmp.removed)

    def _merge_safely(
        self,
        entries: list[Entry],
        classes: list[str],
        skipped: list[dict[str, Any]],
        attrs: dict[str, Any],
    ) -> int:
        """Merge the index's segments (`log.SegmentLog.merge`: the index rewritten after each),
        then collect the replaced ones; a failure (a full disk, a segment found damaged) is a
        warning: the index in place is complete, and the next run merges again."""

        def write(es: list[Entry]) -> None:
            self.segs.write_index(es, classes, skipped, attrs)

        try:
            entries, n = self.segs.merge(entries, write, self._stamps())
            self.segs.collect(entries)
            return n
        except (UserError, OSError) as e:  # the cache is complete; merging is retried later
            self.log(f"warning: merging segments stopped ({e}); the cache is complete as it is")
            return 0

    def _find_in_old(self, copies: list[tuple[Row, tuple[str, int] | None]]) -> None:
        """Find the rows to copy that no staged segment has in the old index's segments
        (their key tables: a cost in proportion to these rows)."""
        ask = [k for k, (_, src) in enumerate(copies) if src is None]
        if not ask:
            return
        es = self.old.entries if self.old is not None and not self.rebuild else []
        skipped: list[str] = []
        for stamp_key in dict.fromkeys(e.stamp_key for e in es):
            lookup = Lookup(self.folder, es, stamp_key)
            found = lookup.find([copies[k][0].ident for k in ask])
            skipped += sorted(lookup.unusable)
            for k, w in zip(ask, found, strict=True):
                if w is not None:
                    copies[k] = (copies[k][0], w)
            ask = [k for k in ask if copies[k][1] is None]
            if not ask:
                return
        row = copies[ask[0]][0]
        if skipped:  # a segment that could not be read may hold it: not a key collision
            raise CacheError(
                f"the features of {row.path} are in no segment readable now (segment "
                f"'{skipped[0]}' cannot be read); nothing was changed: rerun `make features` "
                "(a damaged segment is then set aside and its images embedded again)"
            )
        raise CacheError(
            f"internal: no cached features for {row.path} ({row.ident[:12]}), though its "
            "identity's key is in the index (two identities share a 64-bit key); rerun "
            "`make features REBUILD=1`"
        )

    def _stamps(self) -> dict[str, dict[str, Any]]:
        out = {self.stamp_key: self.stamp}
        for e in (self.old.attrs.get("embedders") or []) if self.old is not None else []:
            out.setdefault(cache_key(e), e)
        return out
