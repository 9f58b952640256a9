"""Content stores: features found by content alone (the images `make predict` embedded).

A content store has a cache's files and format (an index over immutable segments, under the
cache key of the features it holds: `read_index` reads it) but no labels: a row is found by its
identity (content hash and view, `format.ident`) and nothing else; its path, label ("") and
split ("predicted") are only a note of where it was first seen. It only grows: an identity is
added once and never replaced. It holds the rows of one decoder/framework versions stamp:
opened by other versions, it starts afresh (their rows would be other features).

Its files change only by the segment log's steps, as a cache's do (`log.SegmentLog`, whose
module doc says why a kill at any step loses nothing): new rows are gathered up to one block
(about 64 MB) and staged as one segment, then the index naming it is written. A writer killed
between the two leaves a segment that no index names: the next writer adopts it (rows it
already holds are marked removed there), so no identity is held twice; a damaged index is moved
aside and rebuilt from the segments the same way. Segments merge as the writer goes (after each
segment it writes) and when it closes, so a store holds about 7·log8(rows) segments plus full
ones at any time. A segment lost for good is only a miss: its images are embedded again when
asked. One writer per store (`locks.exclusive` on its shards folder).

A writer's memory is flat in the rows it writes: one block of rows being gathered, and per
segment its index entry and its key table's fence (`keys`); a written segment joins the
writer's `Lookup` at once (found through its key table), so a row written earlier in the same
run is found again without any per-row state.

Finding rows never reads a whole identity column, nor features: a `Lookup` reads, per segment,
only the chunks of its key table (`keys`) that the asked identities fall in and those rows'
identities, and features are read for the rows found only, one segment file open at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.store import keys
from pipeline.store.damage import SegmentDamaged, SegmentMissing, cause_of
from pipeline.store.format import POOLED, CacheError, read_attrs_of
from pipeline.store.locks import reading
from pipeline.store.log import Policy, SegmentLog
from pipeline.store.manifest import Entry, open_cache, read_entries, shards_dir
from pipeline.store.segments import BLOCK_BYTES, Meta, SegInfo, open_segment, pooled, read_rows

Log = Callable[[str], None]
Where = tuple[str, int]  # (segment name, row in it)
SPLIT = "predicted"
CACHE, STORE = "feature cache", "predicted-images store"  # what a lookup reads, in words


def _quiet(_: str) -> None:
    pass


def read_entries_of(path: Path, key: str) -> list[Entry]:
    """The segments an index names; CacheError if it is damaged or of another cache key."""
    with open_cache(path) as f:
        if read_attrs_of(f).get("cache_key") != key:
            raise CacheError(f"'{path}' was made with other settings (another cache key)")
        try:
            return read_entries(f)
        except (KeyError, OSError, ValueError) as e:
            raise CacheError(f"the index '{path}' is damaged ({cause_of(e)[0]})") from None


class Lookup:
    """Where the live rows of given identities are among the segments `entries` in `folder`.

    Only segments made with the versions stamp `stamp_key` are read (other decoders or
    frameworks make other features); a segment that cannot be read now is left out, said once.
    Nothing is read when it is made: `find` reads, per segment, its key table's fence (once),
    the table's chunks the asked identities fall in and those rows' identities (`keys`), so a
    lookup costs in proportion to the identities asked, never to the rows held. A writer
    hands it its segments as they change (`use`).
    """

    def __init__(
        self,
        folder: Path,
        entries: list[Entry],
        stamp_key: str,
        log: Log = _quiet,
        what: str = CACHE,
    ) -> None:
        self.folder = Path(folder)
        self.what = what  # CACHE or STORE: how its warnings name it
        self.stamp_key = stamp_key
        self.entries = [e for e in entries if e.stamp_key == stamp_key]
        self.names = [e.name for e in self.entries]
        self.log = log
        self.tables: dict[str, keys.Table] = {}  # per segment, read at its first use
        self.unusable: set[str] = set()
        self.source: tuple[Path, str] | None = None  # the index these entries are of (`of`)

    @classmethod
    def of(
        cls, path: Path, key: str, stamp_key: str, log: Log = _quiet, what: str = CACHE
    ) -> Lookup:
        """The lookup of the cache or content store at `path` (CacheError if it is unusable).

        It follows that index: a segment gone since (merged by its writer while this process
        ran) makes it read the index again, once per `find`, before anything is embedded anew.
        """
        out = cls(shards_dir(path), read_entries_of(path, key), stamp_key, log, what)
        out.source = (Path(path), key)
        return out

    def use(self, entries: list[Entry]) -> None:
        """Look among `entries` from now on (a writer's segments, after it wrote or merged
        some); what was held of the segments no longer named (key tables) is let go."""
        self.entries = [e for e in entries if e.stamp_key == self.stamp_key]
        self.names = [e.name for e in self.entries]
        named = set(self.names)
        self.tables = {n: t for n, t in self.tables.items() if n in named}
        self.unusable &= named

    def __len__(self) -> int:
        return sum(e.live for e in self.entries if e.name not in self.unusable)

    def find(self, idents: Sequence[str]) -> list[Where | None]:
        """(segment, row) of each identity's live row, or None where there is none (the first
        segment holding it, its lowest row, as the entries are ordered)."""
        out: list[Where | None] = [None] * len(idents)
        raw = keys.lookup_keys(idents)
        ask = [i for i in range(len(idents)) if raw[i] is not None]
        if not ask or not self.entries:
            return out
        with reading(self.folder.parent):
            missing: list[str] = []
            ask = self._find(raw, ask, out, missing)
            if missing and self._follow():
                missing = [n for n in missing if n in self.names]  # named still: lost
                self._find(raw, ask, out, missing)  # the segments of the index as it is now
            for name in missing:
                self.log(f"warning: segment '{name}' is missing; not used")
        return out

    def _find(
        self, raw: list[bytes | None], ask: list[int], out: list[Where | None], missing: list[str]
    ) -> list[int]:
        """Look for `ask` (positions of `raw`) segment by segment; the positions not found.
        Segments not on disk are added to `missing`."""
        for e in self.entries:
            if not ask:
                break
            if e.name in self.unusable:
                continue
            try:
                with open_segment(self.folder / e.name) as g:
                    table = self.tables.get(e.name)
                    if table is None:
                        table = self.tables[e.name] = keys.Table.of(g)
                    rows = table.find(g, [raw[i] or b"" for i in ask], e.dead)
            except SegmentMissing:
                self.unusable.add(e.name)  # merged away since? `_follow` reads the index again
                self.tables.pop(e.name, None)
                missing.append(e.name)
                continue
            except (CacheError, KeyError, OSError, ValueError, IndexError) as err:
                self._lost(e.name, err)
                continue
            for i, r in zip(ask, rows, strict=True):
                if r is not None:
                    out[i] = (e.name, r)
            ask = [i for i in ask if out[i] is None]
        return ask

    def _lost(self, name: str, err: BaseException) -> None:
        """Leave out a segment that cannot be read, saying so in one line (once: it is not
        read again): damaged for good, its images are embedded again, and for the feature
        cache `make features` sets it aside (a reader noted it, `damage.note_damaged`)."""
        self.unusable.add(name)
        self.tables.pop(name, None)
        index = f"{self.folder.name.removesuffix('.shards')}.h5"
        whose = f"segment '{name}' of the {self.what} '{index}'"
        if isinstance(err, SegmentDamaged):
            fix = (
                "`make features` sets it aside and embeds its rows again (only those)"
                if self.what == CACHE
                else "it is not used again"
            )
            self.log(
                f"warning: {whose} is damaged ({err.reason}); its images are embedded again "
                f"by this predict, and {fix}"
            )
            return
        why = getattr(err, "reason", None) or " ".join(str(err).split())
        self.log(f"warning: {whose} cannot be read now ({why}); not used")

    def _follow(self) -> bool:
        """Follow the index as it is now, if it names other segments than these entries (one
        of theirs was merged away by its writer while this process ran)."""
        if self.source is None:
            return False
        try:
            entries = read_entries_of(*self.source)
        except (CacheError, OSError):
            return False
        if {e.name for e in entries if e.stamp_key == self.stamp_key} == set(self.names):
            return False
        self.use(entries)
        return True

    def read(self, where: Sequence[Where], dataset: str) -> tuple[np.ndarray | None, np.ndarray]:
        """The rows `where` of one segment dataset ("pooled/avg", "features"...), in order, and
        which of them could be read (a segment gone or unreadable since: False)."""
        ok = np.zeros(len(where), bool)
        out: np.ndarray | None = None
        by_seg: dict[str, list[int]] = {}
        for i, (name, _) in enumerate(where):
            by_seg.setdefault(name, []).append(i)
        with reading(self.folder.parent):
            for name, idx in by_seg.items():
                rows = np.array([where[i][1] for i in idx], np.int64)
                order = np.argsort(rows, kind="stable")
                try:
                    with open_segment(self.folder / name) as g:
                        block = read_rows(g[dataset], rows[order])
                except SegmentDamaged as err:
                    if not isinstance(err, SegmentMissing) and name not in self.unusable:
                        self._lost(name, err)  # said once; its rows are embedded again
                    continue
                except (CacheError, KeyError, OSError):
                    continue  # merged away or unreadable since the lookup: embedded again
                if out is None:
                    out = np.zeros((len(where),) + block.shape[1:], block.dtype)
                out[np.asarray(idx)[order]] = block
                ok[idx] = True
        return out, ok


class ContentStore:
    """The one writer of the content store at `path` (the caller holds `locks.exclusive` on
    `shards_dir(path)`): rows found by identity, rows added by identity, see the module doc.

    `attrs` are written into the index (settings, weights...); `maps` says whether rows keep
    their feature maps (as the cache of the same key does) or the pooled vectors only.
    """

    def __init__(
        self,
        path: Path,
        key: str,
        stamp: dict[str, Any],
        maps: bool,
        dtype: str,
        attrs: dict[str, Any],
        log: Log = print,
    ) -> None:
        self.path, self.key = Path(path), key
        self.segs = SegmentLog(self.path, key, stamp, self._policy(), log)  # every file change
        self.folder, self.stamp, self.stamp_key = self.segs.folder, stamp, self.segs.stamp_key
        self.maps, self.dtype, self.attrs, self.log = maps, dtype, attrs, log
        self.shape: tuple[int, ...] | None = None
        self.pending: list[tuple[Meta, dict[str, np.ndarray], np.ndarray | None]] = []
        self.pending_ids: set[str] = set()
        self.pending_bytes = 0
        self.entries, changed = self._entries()
        self.lookup = Lookup(self.folder, self.entries, self.stamp_key, log, STORE)
        changed |= self._adopt()
        if changed:
            self._write_index()
        self.segs.collect(self.entries)

    def _policy(self) -> Policy:
        """The predicted-images store's: a lost segment is only a miss (a `Lookup` says it);
        a full disk's line says predictions are still written."""
        told = {
            "kept": f"the predicted-images store '{self.path}' is as it was and predictions "
            "are still written (only the features of new images are not kept)",
            "rerun": "`make predict` to keep them",
        }
        then = ", its segments are taken up again"
        return Policy(STORE, self._takes_up, then, told=told, says_lost=False)

    def _takes_up(self, info: SegInfo) -> bool:
        """Any unnamed segment of these versions (a killed writer's last batch, a killed
        merge's output, a damaged index's segments): `_adopt` keeps its new rows only."""
        return info.stamp_key == self.stamp_key

    # -- opening ---------------------------------------------------------------------------
    def _entries(self) -> tuple[list[Entry], bool]:
        """The index's segments of this versions stamp that are on disk, and whether that is
        fewer than it names (the index is then written again)."""
        if not self.path.exists():
            return [], False
        try:
            entries = read_entries_of(self.path, self.key)
        except CacheError as e:
            self.segs.index_aside(e)
            return [], True
        if any(e.stamp_key != self.stamp_key for e in entries):
            self.log(
                f"the features in '{self.path.name}' were embedded with other decoder/framework "
                "versions: they are not used, and embedded again as needed"
            )
        mine = [e for e in entries if e.stamp_key == self.stamp_key]
        missing = [e for e in mine if not (self.folder / e.name).is_file()]
        # lost for good: a miss, said by no line (their images are embedded again when asked)
        gone = self.segs.lose([(e, SegmentMissing(self.folder / e.name)) for e in missing])
        keep = [e for e in mine if e.name not in gone]
        return keep, len(keep) != len(entries)

    def _adopt(self) -> bool:
        """Take up the segments no index names that hold rows of this store (a killed writer's
        last batch, or a damaged index's segments); rows already held are marked removed."""
        adopted = False
        for info in self.segs.unnamed({e.name for e in self.entries}):
            # held already (the named segments and those adopted before: one lookup)
            found = self.lookup.find(info.meta.ident)
            dead = [i for i, w in enumerate(found) if w is not None]
            if len(dead) == info.rows:
                continue  # nothing new (a killed merge's output): garbage
            seen: set[str] = set()
            for i, h in enumerate(info.meta.ident):
                if found[i] is None:
                    if h in seen:
                        dead.append(i)  # twice in this segment: its first row is kept
                    seen.add(h)
            self.entries.append(
                Entry(info.name, info.rows, self.stamp_key, np.array(sorted(dead), np.int64))
            )
            self.lookup.use(self.entries)  # its rows are found from now on
            adopted = True
        return adopted

    # -- writing ---------------------------------------------------------------------------
    def add(
        self,
        idents: list[str],
        paths: list[str],
        stats: list[tuple[int, int, int]],
        maps: np.ndarray,
    ) -> None:
        """Keep the rows of identities not held yet (maps of stored type, (n, h, w, c)); they
        are on disk after the next `flush` (when a block's worth is gathered, and at close)."""
        keep = []
        for i, (h, there) in enumerate(zip(idents, self.lookup.find(idents), strict=True)):
            if there is None and h not in self.pending_ids:
                keep.append(i)
                self.pending_ids.add(h)
        if not keep:
            return
        m = np.asarray(maps)[keep].astype(self.dtype)
        self.shape = self.shape or tuple(m.shape[1:])
        meta = Meta(
            [idents[i] for i in keep],
            [paths[i] for i in keep],
            [""] * len(keep),
            [SPLIT] * len(keep),
            [_view_of(idents[i]) for i in keep],
            [tuple(stats[i]) for i in keep],
        )
        vectors = pooled(m)
        self.pending.append((meta, vectors, m if self.maps else None))
        self.pending_bytes += sum(v.nbytes for v in vectors.values()) + m.nbytes * self.maps
        if self.pending_bytes >= BLOCK_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the gathered rows as one segment, then the index naming it; then merge the
        segments by the policy (the index rewritten after each merge), so that their count
        stays small however many rows a run writes."""
        if self._write_pending() and self._merge():
            self.segs.collect(self.entries)

    def _write_pending(self) -> bool:
        """Write the gathered rows as one segment, then the index naming it (False: none)."""
        if not self.pending:
            return False
        meta = Meta()
        for m, _, _ in self.pending:
            meta.extend(m)
        vectors = {p: np.concatenate([v[p] for _, v, _ in self.pending]) for p in POOLED}
        maps = (
            np.concatenate([m for _, _, m in self.pending if m is not None]) if self.maps else None
        )
        name = self.segs.stage(meta, vectors, maps, [])
        self.entries.append(Entry(name, len(meta), self.stamp_key))
        self.lookup.use(self.entries)  # found through its key table: no per-row state
        self.pending, self.pending_ids, self.pending_bytes = [], set(), 0
        self._write_index()
        return True

    def close(self, merge: bool = True) -> None:
        """Write what is gathered; then (`merge`) merge segments by the policy and delete the
        files no index names (not `merge`, a stopped run: what is gathered is only written)."""
        self._write_pending()
        if merge:
            self._merge()
            self.segs.collect(self.entries)

    def _write_index(self) -> None:
        attrs = {
            **self.attrs,
            "cache_key": self.key,
            "content_store": True,
            "embedders": [self.stamp] if self.entries else [],
            "maps": self.maps,
        }
        if self.shape is None and self.entries:  # nothing added yet: the segments say it
            with open_segment(self.folder / self.entries[0].name) as g:
                has = "features" in g
                self.shape = (
                    tuple(g["features"].shape[1:]) if has else (1, 1, g["pooled/avg"].shape[1])
                )
        if self.shape is not None:
            attrs["feature_shape"] = list(self.shape if self.maps else (1, 1, self.shape[-1]))
        self.segs.write_index(self.entries, [""], [], attrs)

    def _merge(self) -> bool:
        """Merge segments by the policy until none needs it (`log.SegmentLog.merge`), the
        lookup and the index following each merge; whether any merged. The replaced files are
        left to `collect`."""
        if not self.entries:
            return False

        def write(entries: list[Entry]) -> None:
            self.entries = entries
            self.lookup.use(entries)  # the replaced segments' tables are let go
            self._write_index()

        return self.segs.merge(self.entries, write)[1] > 0


def _view_of(ident: str) -> int:
    return int(ident.split("#", 1)[1]) if "#" in ident else 0
