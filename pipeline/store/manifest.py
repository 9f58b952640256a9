"""The index file: a small manifest naming a cache's segments, its removed rows and its facts.

Layout of `<cache>.h5` (readable with plain h5py; README "Reading a cache without this package"):
  /segments/name (S), /segments/rows, /segments/stamp_key   the segments, in row order
  /dead/segment, /dead/row        rows of those segments that are no longer in the cache
  /classes (C,) UTF-8             class names; a row's label is its class name's position
  /skipped/paths, reasons, sha256, stat, content, stamp_key    files not cached this time, why
  attrs: format_version, cache_key, data_id, data_sum, settings (JSON), embedders (JSON),
         feature_shape, maps, rows, each setting by name, environment
The rows themselves (path, label, split, content hash, stat, features) live in the segments
(`<cache>.shards/g*.h5`). The manifest grows with the number of segments and of removed rows not
yet merged away, never with the collection; it is replaced whole (write, fsync, rename).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import UserError
from pipeline.store import digests
from pipeline.store.damage import cause_of, segment_error
from pipeline.store.format import (
    FORMAT_VERSION,
    H5_OVERHEAD,
    CacheError,
    new_h5,
    open_files_error,
    prefix64,
    put,
    read_attrs_of,
    str_ds,
    strs,
    too_many_open_files,
    write_attrs,
)
from pipeline.store.segments import decoded, open_segment, read_rows


@dataclass
class Entry:
    """One segment of a cache: its name, row count, versions stamp and removed rows."""

    name: str
    rows: int
    stamp_key: str
    dead: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # rows whose file changed only its stat (touched, copied): the new stat, kept here until
    # the segment is rewritten, so that a `touch` never rewrites features
    restat_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    restat: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))

    @property
    def live(self) -> int:
        return self.rows - len(self.dead)


def shards_dir(path: Path) -> Path:
    """The folder of a cache's segments, next to its index."""
    path = Path(path)
    return path.with_name(path.stem + ".shards")


def write_manifest(
    path: Path,
    entries: list[Entry],
    classes: list[str],
    skipped: list[dict[str, Any]],
    attrs: dict[str, Any],
    told: dict[str, str] | None = None,
) -> None:
    """Write the index atomically: readers see the old manifest or the new one, never a mix.

    Every dataset checksummed (`format.put`); a full disk is one line, the old index intact
    (`told`: what that line says instead, `format.disk_error`'s kept and rerun).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    n_dead = sum(len(e.dead) for e in entries)
    n_restat = sum(len(e.restat_rows) for e in entries)
    needed = 100 * len(entries) + 12 * n_dead + 36 * n_restat + 300 * len(skipped)
    needed += H5_OVERHEAD
    kept = f"the index '{path.name}' as it was is intact" if path.exists() else "nothing changed"
    with new_h5(tmp, path, needed, **(told or {"kept": kept})) as f:
        put(f, "segments/name", np.array([e.name.encode() for e in entries], "S40"))
        put(f, "segments/rows", np.array([e.rows for e in entries], np.int64))
        put(f, "segments/stamp_key", np.array([e.stamp_key.encode() for e in entries], "S64"))
        seg = [np.full(len(e.dead), i, np.int32) for i, e in enumerate(entries)]
        put(f, "dead/segment", np.concatenate(seg) if seg else np.zeros(0, np.int32))
        rseg = [np.full(len(e.restat_rows), i, np.int32) for i, e in enumerate(entries)]
        put(f, "restat/segment", np.concatenate(rseg) if rseg else np.zeros(0, np.int32))
        put(
            f,
            "restat/row",
            np.concatenate([e.restat_rows for e in entries]) if entries else np.zeros(0, np.int64),
        )
        put(
            f,
            "restat/stat",
            np.concatenate([e.restat.reshape(-1, 3) for e in entries])
            if entries
            else np.zeros((0, 3), np.int64),
        )
        put(
            f,
            "dead/row",
            np.concatenate([e.dead for e in entries]) if entries else np.zeros(0, np.int64),
        )
        str_ds(f, "classes", classes)
        g = f.create_group("skipped")
        for name, key in (("paths", "path"), ("reasons", "reason"), ("sha256", "sha256")):
            str_ds(g, name, [s.get(key, "") for s in skipped])
        put(
            g,
            "stat",
            np.array([s.get("stat", (0, 0, 0)) for s in skipped], np.int64).reshape(-1, 3),
        )
        put(g, "content", np.array([bool(s.get("content")) for s in skipped], bool))
        put(g, "stamp_key", np.array([s.get("stamp_key", "").encode() for s in skipped], "S64"))
        write_attrs(f, attrs)
        f.attrs["rows"] = sum(e.live for e in entries)
        f.attrs["format_version"] = FORMAT_VERSION


def read_entries(f: h5py.File) -> list[Entry]:
    names = f["segments/name"][()].astype(str).tolist()
    rows = f["segments/rows"][()].tolist()
    stamps = f["segments/stamp_key"][()].astype(str).tolist()
    dseg, drow = f["dead/segment"][()], f["dead/row"][()].astype(np.int64)
    order = np.lexsort((drow, dseg))
    dseg, drow = dseg[order], drow[order]
    cut = np.searchsorted(dseg, np.arange(len(names) + 1))
    out = [
        Entry(n, int(r), s, drow[cut[i] : cut[i + 1]])
        for i, (n, r, s) in enumerate(zip(names, rows, stamps, strict=True))
    ]
    if "restat" in f:
        rseg, rrow, rst = f["restat/segment"][()], f["restat/row"][()], f["restat/stat"][()]
        order = np.lexsort((rrow, rseg))
        rseg, rrow, rst = rseg[order], rrow[order].astype(np.int64), rst[order]
        cut = np.searchsorted(rseg, np.arange(len(names) + 1))
        for i, e in enumerate(out):
            e.restat_rows, e.restat = rrow[cut[i] : cut[i + 1]], rst[cut[i] : cut[i + 1]]
    return out


def read_skipped(f: h5py.File) -> list[dict[str, Any]]:
    sk = f["skipped"]
    return [
        {
            "path": p,
            "reason": r,
            "sha256": h,
            "stat": tuple(int(v) for v in st),
            "content": bool(c),
            "stamp_key": k,
        }
        for p, r, h, st, c, k in zip(
            strs(sk["paths"]),
            strs(sk["reasons"]),
            strs(sk["sha256"]),
            sk["stat"][()],
            sk["content"][()].tolist(),
            sk["stamp_key"][()].astype(str).tolist(),
            strict=True,
        )
    ]


class Index:
    """A cache's live rows and attributes, without the features: NumPy columns, one per field.

    `seg` and `seg_row` say where each row's features are: segment entries[seg], row seg_row.
    Python lists (`paths`, `sha256`, `split`, `view`, ...) are made on first use only, so that
    reading features for a head costs NumPy work per row, not Python objects per row.
    A lean index (`index_of(lean=True)`, what a streaming head reads) holds about 40 bytes a
    row: no identities, paths, stats or stamps (`ident_col`, `path_parts`, `stat` and
    `made_col` are None); `idents_of` and `paths_of` read the rows asked from the segments.
    """

    def __init__(
        self,
        path: Path,
        classes: list[str],
        skipped: list[dict[str, Any]],
        attrs: dict[str, Any],
        entries: list[Entry],
        ident: np.ndarray | None,
        paths: list[np.ndarray] | None,
        labels: np.ndarray,
        split: np.ndarray,
        view: np.ndarray,
        stat: np.ndarray | None,
        made: np.ndarray | None,
        seg: np.ndarray,
        seg_row: np.ndarray,
        key64: np.ndarray | None = None,
    ) -> None:
        self.path, self.classes, self.skipped, self.attrs = Path(path), classes, skipped, attrs
        self.entries = entries
        self.ident_col, self.path_parts, self.labels = ident, paths, labels
        if key64 is None:
            key64 = prefix64(ident) if ident is not None else np.zeros(0, np.uint64)
        self.key64 = key64  # each row's content hash as its first 64 bits: sorts as the hashes
        self._path_col: np.ndarray | None = None
        self.split_col, self.view_col, self.stat = split, view, stat
        self.made_col, self.seg, self.seg_row = made, seg, seg_row
        self._lists: dict[str, list[Any]] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def summary(self) -> Index:
        """This cache's attributes, classes, skipped files and segments, without its rows'
        columns: what a long reader keeps once it has taken the rows it needs."""
        return Index.rowless(self.path, self.classes, self.skipped, self.attrs, self.entries)

    @classmethod
    def rowless(
        cls,
        path: Path,
        classes: list[str],
        skipped: list[dict[str, Any]],
        attrs: dict[str, Any],
        entries: list[Entry],
    ) -> Index:
        """An index of a cache's attributes, classes, skipped files and segments, no rows."""
        return cls(
            path, classes, skipped, attrs, entries, np.zeros(0, "S80"), [],
            np.zeros(0, np.int64), np.zeros(0, "S10"), np.zeros(0, np.int16),
            np.zeros((0, 3), np.int64), np.zeros(0, np.int16), np.zeros(0, np.int32),
            np.zeros(0, np.int64),
        )  # fmt: skip

    @property
    def lean(self) -> bool:
        return self.ident_col is None

    def _from_segments(self, rows: np.ndarray, name: str) -> np.ndarray:
        """Column `name` of `rows` (sorted), read from their segments (one open at a time)."""
        parts = []
        folder = shards_dir(self.path)
        seg = self.seg[rows]
        cut = np.searchsorted(seg, np.arange(len(self.entries) + 1))
        for k, e in enumerate(self.entries):
            mine = rows[cut[k] : cut[k + 1]]
            if len(mine):
                with open_segment(folder / e.name) as g:
                    parts.append(read_rows(g[name], self.seg_row[mine]))
        return np.concatenate(parts) if parts else np.zeros(0, "S1")

    def idents_of(self, rows: np.ndarray) -> np.ndarray:
        """The identities of `rows` (sorted) as bytes: from memory, or read from the segments."""
        rows = np.asarray(rows, np.int64)
        if self.ident_col is not None:
            return self.ident_col[rows]
        return self._from_segments(rows, "ident")

    @property
    def path_col(self) -> np.ndarray:
        """Every row's path as UTF-8 bytes (made on first use: per segment until then)."""
        if self.path_parts is None:
            raise ValueError("a lean index holds no paths: use paths_of(rows)")
        if self._path_col is None:
            parts = [p.astype(object) for p in self.path_parts]
            self._path_col = np.concatenate(parts) if parts else np.zeros(0, object)
        return self._path_col

    def paths_of(self, rows: np.ndarray) -> list[str]:
        """The paths of `rows` (sorted), decoded from their segments' columns only."""
        if not len(rows):
            return []
        if self.path_parts is None:
            return decoded(self._from_segments(np.asarray(rows, np.int64), "path"))
        if self._path_col is not None:
            return decoded(self.path_col[rows])
        starts = np.searchsorted(self.seg, np.arange(len(self.path_parts) + 1))
        out: list[str] = []
        seg = self.seg[rows]
        cut = np.searchsorted(seg, np.arange(len(self.path_parts) + 1))
        for k, part in enumerate(self.path_parts):
            mine = rows[cut[k] : cut[k + 1]]
            if len(mine):
                out += decoded(part[mine - starts[k]])
        return out

    def _list(self, name: str, make: Any) -> list[Any]:
        if name not in self._lists:
            self._lists[name] = make()
        return self._lists[name]

    @property
    def paths(self) -> list[str]:
        return self._list("paths", lambda: decoded(self.path_col))

    @property
    def idents(self) -> list[str]:
        if self.ident_col is None:
            raise ValueError("a lean index holds no identities: use idents_of(rows)")
        return self._list("idents", lambda: self.ident_col.astype(str).tolist())

    @property
    def sha256(self) -> list[str]:
        return self._list("sha256", lambda: [h.split("#", 1)[0] for h in self.idents])

    @property
    def split(self) -> list[str]:
        return self._list("split", lambda: self.split_col.astype(str).tolist())

    @property
    def view(self) -> list[int]:
        return self._list("view", lambda: self.view_col.astype(int).tolist())

    @property
    def embedded_with(self) -> list[int]:
        return self._list("made", lambda: self.made_col.astype(int).tolist())

    @property
    def labels_by_name(self) -> list[str]:
        return self._list("names", lambda: [self.classes[i] for i in self.labels.tolist()])

    def mask(self, split: str, max_view: int = 0) -> np.ndarray:
        """Rows of `split` with views up to `max_view` (0: the images themselves)."""
        return (self.split_col == split.encode()) & (self.view_col <= max_view)


def _not_a_cache(f: h5py.File, path: Path) -> CacheError | None:
    if "stamp_key" in f.attrs and "ident" in f:  # a segment given instead of its cache
        folder = Path(path).resolve().parent
        cache = folder.with_name(folder.name.removesuffix(".shards") + ".h5")
        return CacheError(
            f"'{Path(path).name}' is one segment of the feature cache '{cache.name}', not a "
            f"cache; pass '{cache}' (or its ARTIFACTS folder) instead"
        )
    if f.attrs.get("format_version") != FORMAT_VERSION or "segments/name" not in f:
        return CacheError(
            f"'{path}' is not a feature cache of format {FORMAT_VERSION} (made by another "
            "version of the pipeline, or not a cache); rerun `make features` (it writes a new one)"
        )
    return None


def damaged_index(path: Path, e: BaseException) -> CacheError:
    """One line for an index that cannot be read: what is wrong in words (a checksum that
    does not match, truncated...; `damage.cause_of`, never HDF5's text) and the fix."""
    return CacheError(
        f"the index of the feature cache, '{path}', is damaged ({cause_of(e)[0]}); rerun "
        "`make features` (it rebuilds the index from the segments, embedding nothing again)"
    )


@contextmanager
def open_cache(path: Path) -> Iterator[h5py.File]:
    """Open a cache's index read-only; a damaged or foreign file is a CacheError naming the fix."""
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise UserError(
            f"feature cache '{path}' does not exist; run `make features` first"
        ) from None
    except OSError as e:
        if too_many_open_files(e):
            raise open_files_error(path) from None
        if not Path(path).exists():
            raise UserError(
                f"feature cache '{path}' does not exist; run `make features` first"
            ) from None
        raise damaged_index(path, e) from None
    try:
        try:
            err = _not_a_cache(f, path)
        except (KeyError, OSError, RuntimeError, ValueError) as e:
            err = damaged_index(path, e)
        if err is not None:
            raise err
        yield f
    finally:
        f.close()


def read_attrs(path: Path) -> dict[str, Any]:
    """A cache's attributes alone (cheap: no rows are read)."""
    with open_cache(path) as f:
        return read_attrs_of(f)


def read_index(path: Path, expect_key: str | None = None, drop_missing: bool = False) -> Index:
    """Read a cache's rows and attributes; check its key when one is expected.

    `drop_missing`: leave out the rows of segments that are not on disk (the writer embeds
    them again) instead of refusing.
    """
    with open_cache(path) as f:
        return index_of(f, path, expect_key, drop_missing)


def read_summary(path: Path, expect_key: str | None = None, drop_missing: bool = False) -> Index:
    """A cache's attributes, classes, skipped files and segments, reading no rows (`read_index`'s
    checks; `lost_rows` counts the live rows of segments not on disk, with `drop_missing`)."""
    with open_cache(path) as f:
        attrs, entries, classes, skipped = _head(f, path, expect_key, drop_missing)
    return Index.rowless(Path(path), classes, skipped, attrs, entries)


def _head(
    f: h5py.File, path: Path, expect_key: str | None, drop_missing: bool
) -> tuple[dict[str, Any], list[Entry], list[str], list[dict[str, Any]]]:
    """An open cache's attributes, segments, classes and skipped files (no rows read)."""
    attrs = read_attrs_of(f)
    if expect_key is not None and attrs.get("cache_key") != expect_key:
        raise CacheError(
            f"feature cache '{path}' was made with other settings "
            f"(key {str(attrs.get('cache_key'))[:12]}, expected {expect_key[:12]})"
        )
    try:
        entries = read_entries(f)
        classes = strs(f["classes"])
        skipped = read_skipped(f)
    except (KeyError, OSError, RuntimeError, ValueError) as e:
        raise damaged_index(path, e) from None
    if drop_missing:
        folder = shards_dir(path)
        gone = [e for e in entries if not (folder / e.name).is_file()]
        if gone:
            names = {e.name for e in gone}
            entries = [e for e in entries if e.name not in names]
            attrs["lost_rows"] = sum(e.live for e in gone)
    return attrs, entries, classes, skipped


def index_of(
    f: h5py.File,
    path: Path,
    expect_key: str | None = None,
    drop_missing: bool = False,
    lean: bool = False,
) -> Index:
    """The live rows of the open cache `f`, read segment by segment (one file open at a time).

    `lean`: only what a head needs to name its rows (about 40 bytes a row, see `Index`).
    """
    attrs, entries, classes, skipped = _head(f, path, expect_key, drop_missing)
    embedders = attrs.get("embedders") or []
    class_of = {c: i for i, c in enumerate(classes)}
    folder = shards_dir(path)
    # every column allocated once at its final size and filled segment by segment: reading
    # the index costs its bytes, never twice them (no list of parts to concatenate)
    total = sum(max(0, e.live) for e in entries)
    ident = None if lean else np.zeros(total, "S80")
    key64 = np.zeros(total, np.uint64)
    labels = np.zeros(total, np.int64)
    split = np.zeros(total, "S10")
    view = np.zeros(total, np.int16)
    stat_col = None if lean else np.zeros((total, 3), np.int64)
    made_col = None if lean else np.zeros(total, np.int16)
    seg_col = np.zeros(total, np.int32)
    row_col = np.zeros(total, np.int64)
    path_parts: list[np.ndarray] | None = None if lean else []
    at = 0
    for k, e in enumerate(entries):
        with open_segment(folder / e.name) as g:
            try:
                live = np.ones(e.rows, bool)
                live[e.dead] = False
                n = int(live.sum())
                if at + n > total:
                    raise ValueError("more live rows than the index says")
                digests.read(g["classes"])  # every column's chunks checked (`digests`)
                own = strs(g["classes"])
                remap = np.array([class_of.get(c, -1) for c in own] + [-1], np.int64)
                stamp = read_attrs_of(g).get("stamp") or {}
                step, to = 1 << 16, at  # the identities a slice at a time: bounded temporaries
                for a in range(0, e.rows, step):
                    ids = digests.read(g["ident"], a, a + step)[live[a : a + step]]
                    key64[to : to + len(ids)] = prefix64(ids)
                    if ident is not None:
                        ident[to : to + len(ids)] = ids
                    to += len(ids)
                labels[at : at + n] = remap[digests.read(g["label"])[live]]
                split[at : at + n] = digests.read(g["split"])[live]
                view[at : at + n] = digests.read(g["view"])[live]
                if path_parts is not None and stat_col is not None:
                    path_parts.append(digests.read(g["path"])[live])
                    stat = digests.read(g["stat"])
                    if len(e.restat_rows):
                        stat[e.restat_rows] = e.restat
                    stat_col[at : at + n] = stat[live]
            except (KeyError, OSError, RuntimeError, ValueError, IndexError) as err:
                raise segment_error(folder / e.name, err) from None
        if made_col is not None:
            made_col[at : at + n] = embedders.index(stamp) if stamp in embedders else 0
        seg_col[at : at + n] = k
        row_col[at : at + n] = np.flatnonzero(live)
        at += n
    if (labels < 0).any():
        raise CacheError(
            f"feature cache '{path}' is damaged (a row's label is not among its classes); "
            "rerun `make features`"
        )
    return Index(
        path=Path(path),
        classes=classes,
        skipped=skipped,
        attrs=attrs,
        entries=entries,
        ident=None if ident is None else ident[:at],
        paths=path_parts,
        labels=labels[:at],
        split=split[:at],
        view=view[:at],
        stat=None if stat_col is None else stat_col[:at],
        made=None if made_col is None else made_col[:at],
        seg=seg_col[:at],
        seg_row=row_col[:at],
        key64=key64[:at],
    )
