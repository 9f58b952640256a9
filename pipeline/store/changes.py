"""What a commit changes: the rows a run wants compared with the index's, a segment at a time.

A `make features` run over ten million images changes a few rows; what it holds to find them
is sized to that, not to the collection:
- `Known`: which identities the index holds, as one sorted 64-bit key per row (`ident_key`: a
  hash of the whole identity, so a content's views differ), 8 bytes a row; its rows' places
  are found only for the identities that need a copy (`content.Lookup`, key tables);
- `compare`: the wanted rows, keyed by a 64-bit hash of (path, view) and sorted (about 26 bytes
  a row), met by the index's rows streamed from their segments a block of `STEP` rows at a
  time; every key match is confirmed on the full path, identity, label and split.
Nothing here holds a Python object per row of the collection.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.store import digests, segments
from pipeline.store import format as fmt
from pipeline.store.damage import SegmentDamaged, segment_error
from pipeline.store.format import DATA_MOD, CacheError, strs
from pipeline.store.manifest import Entry
from pipeline.store.segments import open_segment

STEP = 1024  # rows of a segment read at a time: the Python objects held are this many rows'
WIDTH = 80  # bytes of an identity in a segment (keys.IDENT)


@dataclass(frozen=True)
class Row:
    """A row the cache should hold: which file, which content and view, its label and split."""

    path: str
    ident: str
    label: str
    split: str
    view: int
    stat: tuple[int, int, int]

    def key(self) -> tuple[Any, ...]:
        return (self.path, self.view, self.ident, self.label, self.split, tuple(self.stat))


def ident_key(ident: str | bytes) -> int | None:
    """A 64-bit key of an identity: a hash of all its bytes (None: no segment can hold it)."""
    raw = ident.encode() if isinstance(ident, str) else ident
    if len(raw) > WIDTH or raw.endswith(b"\0"):
        return None
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def ident_keys(idents: np.ndarray) -> np.ndarray:
    """`ident_key` of each identity of a bytes array (as a segment holds them)."""
    return np.fromiter(
        (ident_key(h) or 0 for h in np.asarray(idents).tolist()), np.uint64, count=len(idents)
    )


def path_key(path: bytes, view: int) -> int:
    """A 64-bit key of a row's place: its path (UTF-8 bytes) and view."""
    d = hashlib.blake2b(path, digest_size=8, person=view.to_bytes(8, "little"))
    return int.from_bytes(d.digest(), "little")


class Known:
    """The identities an index holds, 8 bytes a row: `has` tells whether one is among them.

    Two identities sharing a key (odds about n / 2^64 per identity asked) make `has` answer yes
    for the new one; the commit then finds no row for it and says so, never using another's.
    """

    def __init__(self, keys: np.ndarray | None = None) -> None:
        self.keys = np.zeros(0, np.uint64) if keys is None else keys
        self.lost: list[tuple[Entry, SegmentDamaged]] = []  # segments left out, and why

    @classmethod
    def of(cls, folder: Path, entries: list[Entry], verify: bool | Collection[str] = ()) -> Known:
        """Read the live rows' identities, segment by segment and `1 << 16` rows at a time.

        A segment lost for good (damaged, unreadable to this user, missing) is left out and
        listed in `lost` with why: its rows are embedded again. One that cannot be read now
        (maybe passing) raises `SegmentUnreadable`. `verify`: every segment (True), or those
        named, is read whole first, so that a checksum that does not match is found now.
        """
        keys = np.zeros(sum(max(0, e.live) for e in entries), np.uint64)
        at = 0
        lost: list[tuple[Entry, SegmentDamaged]] = []
        for e in entries:
            start = at
            try:
                with open_segment(folder / e.name) as g:
                    try:
                        if verify is True or (verify is not False and e.name in verify):
                            segments.verify(g)
                        _check(g, e.rows)
                        live = np.ones(e.rows, bool)
                        live[e.dead] = False
                        step = 1 << 12  # its identities' bytes held: 80 bytes a row
                        for a in range(0, e.rows, step):
                            ids = digests.read(g["ident"], a, a + step)[live[a : a + step]]
                            keys[at : at + len(ids)] = ident_keys(ids)
                            at += len(ids)
                    except (KeyError, ValueError, IndexError) as err:
                        raise _damaged(folder / e.name, err) from None
            except SegmentDamaged as err:
                at = start
                lost.append((e, err))
        keys = keys[:at]
        keys.sort()
        out = cls(keys)
        out.lost = lost
        return out

    def has_many(self, idents: Sequence[str]) -> np.ndarray:
        """`has` of each identity, in one sorted search (a run asks it of every file)."""
        n = len(idents)
        keys = np.fromiter((ident_key(h) or 0 for h in idents), np.uint64, count=n)
        if not len(self.keys) or not n:
            return np.zeros(n, bool)
        i = np.minimum(self.keys.searchsorted(keys), len(self.keys) - 1)
        ok = self.keys[i] == keys
        if ok.any():  # a key of 0 may be an identity no segment can hold: asked one by one
            for j in np.flatnonzero(ok & (keys == 0)).tolist():
                ok[j] = self.has(idents[j])
        return ok

    def has(self, ident: str) -> bool:
        k = ident_key(ident)
        if k is None or not len(self.keys):
            return False
        i = int(self.keys.searchsorted(np.uint64(k)))
        return i < len(self.keys) and int(self.keys[i]) == k


COLUMNS = ("ident", "path", "label", "split", "view", "stat")


def _check(g: h5py.File, rows: int) -> None:
    """A segment's row columns are all there, `rows` long, its labels among its classes
    (ValueError if not): a damaged one is found when the run starts, not at its commit."""
    for name in COLUMNS:
        if len(g[name]) != rows:
            raise ValueError(f"column '{name}' holds {len(g[name])} rows, not {rows}")
    n = len(strs(g["classes"]))
    step = 1 << 16
    for a in range(0, rows, step):
        lab = digests.read(g["label"], a, a + step)
        if len(lab) and (lab.min() < 0 or lab.max() >= n):
            raise ValueError("a row's label is not among its classes")


Damaged = SegmentDamaged  # a segment whose columns cannot be read: its bytes are at fault


def _damaged(path: Path, err: BaseException) -> CacheError:
    """A read of segment `path` that failed: damaged for good, or maybe passing
    (`damage.segment_error`)."""
    out = segment_error(path, err)
    if not isinstance(out, CacheError):  # the open-file limit: not the segment's fault
        raise out
    return out


@dataclass
class Block:
    """Up to `STEP` live rows of one segment, as the index holds them (stats as restated)."""

    rows: np.ndarray  # their rows in the segment
    path: list[bytes]
    ident: np.ndarray  # bytes (ASCII): `ident_of` reads one as text
    label: list[str]  # class names
    split: list[str]
    view: list[int]
    stat: np.ndarray  # (n, 3)

    def ident_of(self, i: int) -> str:
        return bytes(self.ident[i]).decode()


def _columns(
    folder: Path, e: Entry, names: Sequence[str] = COLUMNS
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], list[str]]]:
    """(rows, their columns `names`, the segment's classes) of the live rows of segment `e`,
    `STEP` at a time (one file open while they are read; stats as restated)."""
    with open_segment(folder / e.name) as g:
        try:
            classes = strs(g["classes"])
            live = np.ones(e.rows, bool)
            live[e.dead] = False
            tables = {n: digests.Table.of(g[n]) for n in names}  # each chunk checked once
            for a in range(0, e.rows, STEP):
                b = min(e.rows, a + STEP)
                mine = live[a:b]
                rows = a + np.flatnonzero(mine)
                if not len(rows):
                    continue
                col = {n: digests.read(g[n], a, b, tables[n])[mine] for n in names}
                at = np.searchsorted(e.restat_rows, [a, b])
                if "stat" in col and at[1] > at[0]:
                    over = e.restat_rows[at[0] : at[1]]
                    pos = np.searchsorted(rows, over)
                    col["stat"][pos] = e.restat[at[0] : at[1]]
                yield rows, col, classes
                del rows, col  # one block held at a time, by whoever reads it
        except (KeyError, OSError, RuntimeError, ValueError, IndexError) as err:
            raise _damaged(folder / e.name, err) from None


def blocks(folder: Path, e: Entry) -> Iterator[Block]:
    """The live rows of segment `e`, `STEP` at a time (one file open while they are read)."""
    for rows, col, classes in _columns(folder, e):
        splits = {s: s.decode() for s in set(col["split"].tolist())}  # one str per split
        yield Block(
            rows,
            col["path"].tolist(),
            col["ident"],
            [classes[i] for i in col["label"].tolist()],
            [splits[s] for s in col["split"].tolist()],
            col["view"].astype(int).tolist(),
            col["stat"],
        )


def _term(b: Block, i: int) -> int:
    path = b.path[i].decode("utf-8", "surrogateescape")
    return fmt.row_term(path, b.ident_of(i).split("#", 1)[0], b.label[i], b.split[i])


@dataclass
class Comparison:
    """The index's rows met by the wanted ones: what stays, what goes, what is new."""

    entries: list[Entry] = field(default_factory=list)  # the old segments' still-live rows
    kept: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # per wanted row
    restated: int = 0  # kept rows whose file changed only its stat
    dropped: int = 0  # old rows not kept (removed, moved, relabelled or changed)
    removed: int = 0  # old rows whose (path, view) no wanted row has
    dropped_sum: int = 0  # `row_term` sum of the dropped rows
    kept_sum: int = 0  # of the kept ones (with `sum_kept` only: an index without its sum)


def compare(
    folder: Path,
    entries: list[Entry],
    rows: Sequence[Row],
    keep: bool = True,
    sum_kept: bool = False,
) -> Comparison:
    """Meet the wanted `rows` with the live rows of `entries`.

    A wanted row is kept where the first old row of its (path, view) has its identity, label
    and split (a new stat alone is restated, no feature rewritten); every other old row is
    dropped. `keep=False` drops every old row (REBUILD), still counting `removed`.
    """
    n = len(rows)
    wk = np.fromiter(
        (path_key(r.path.encode("utf-8", "surrogateescape"), r.view) for r in rows),
        np.uint64,
        count=n,
    )
    order = np.argsort(wk, kind="stable")
    wk = wk[order]
    out = Comparison(kept=np.zeros(n, bool))
    claimed = np.zeros(n, bool)  # the wanted rows whose (path, view) an old row had first
    for e in entries:
        dead = [e.dead]
        over = dict(zip(e.restat_rows.tolist(), map(tuple, e.restat.tolist()), strict=True))
        for b in blocks(folder, e):
            ok = np.fromiter(
                (path_key(p, v) for p, v in zip(b.path, b.view, strict=True)),
                np.uint64,
                count=len(b.rows),
            )
            lo_ = np.searchsorted(wk, ok, "left")
            hi_ = np.searchsorted(wk, ok, "right")
            first = order[np.minimum(lo_, max(0, n - 1))].tolist() if n else []
            lo, hi = lo_.tolist(), hi_.tolist()
            stats = b.stat.tolist()
            gone = []
            for i in range(len(b.rows)):
                j, r = -1, None
                if hi[i] > lo[i]:
                    path = b.path[i].decode("utf-8", "surrogateescape")
                    cands = [first[i]] if hi[i] - lo[i] == 1 else order[lo[i] : hi[i]].tolist()
                    for c in cands:
                        r = rows[c]
                        if r.path == path and r.view == b.view[i]:
                            j = c
                            break
                if j < 0 or r is None:
                    out.removed += 1
                elif keep and not claimed[j]:
                    claimed[j] = True
                    same = r.ident == b.ident_of(i) and r.label == b.label[i]
                    if same and r.split == b.split[i]:
                        out.kept[j] = True
                        if list(r.stat) != stats[i]:
                            over[int(b.rows[i])] = tuple(int(v) for v in r.stat)
                            out.restated += 1
                        if sum_kept:
                            out.kept_sum += _term(b, i)
                        continue
                gone.append(i)
                out.dropped_sum += _term(b, i)
            out.dropped += len(gone)
            dead.append(b.rows[gone].astype(np.int64))
            del b, first, lo, hi, stats  # freed before the next block is read
        d = np.unique(np.concatenate(dead))
        if len(d) == e.rows:
            continue
        over = {r: st for r, st in over.items() if not _in(d, r)}
        rr = np.array(sorted(over), np.int64)
        st = np.array([over[r] for r in rr.tolist()], np.int64).reshape(-1, 3)
        out.entries.append(Entry(e.name, e.rows, e.stamp_key, d, rr, st))
    out.dropped_sum %= DATA_MOD
    out.kept_sum %= DATA_MOD
    return out


def _in(sorted_: np.ndarray, r: int) -> bool:
    i = int(np.searchsorted(sorted_, r))
    return i < len(sorted_) and int(sorted_[i]) == r


def files(folder: Path, entries: list[Entry]) -> Iterator[tuple[str, tuple[int, int, int], str]]:
    """(path, stat, content hash) of each live image row (view 0), streamed from the segments."""
    for paths, stats, hashes in file_blocks(folder, entries):
        for p, st, h in zip(paths.tolist(), stats.tolist(), hashes.tolist(), strict=True):
            yield p.decode("utf-8", "surrogateescape"), tuple(st), h.decode()


def file_blocks(
    folder: Path, entries: list[Entry]
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(paths, stats, content hashes) of the live image rows (view 0), `STEP` rows at a time:
    paths (UTF-8) and hex hashes as bytes arrays, stats (n, 3): no object per row."""
    for e in entries:
        for _, col, _ in _columns(folder, e, ("path", "view", "stat", "ident")):
            v0 = col["view"] == 0
            yield col["path"][v0], col["stat"][v0], np.char.partition(col["ident"][v0], b"#")[:, 0]
