"""Writing segments: a whole one in one go, one block by block, and rows copied into new ones.

Each is written to a temporary name in the block of `format.new_h5` (checksums on every
dataset, room checked first, fsynced, renamed): complete on disk under its final name when the
call returns; a full disk, a quota or the file-size limit is one line, and nothing is left behind.
Merges and commits that give rows new metadata copy them (`copy_rows`), never embed them again.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.store import digests, keys
from pipeline.store.format import (
    H5_OVERHEAD,
    POOLED,
    SIGNATURE,
    SIGNATURE_WIDTH,
    new_h5,
    put,
    str_ds,
    write_attrs,
    write_error,
)
from pipeline.store.segments import (
    BLOCK_BYTES,
    Failure,
    Meta,
    encoded,
    info_of,
    open_segment,
    path_dtype,
    read_rows,
)

ROW_COLUMNS = ("ident", "path", "label", "split", "view", "stat")  # a row's metadata


def signatures_of(pooled: dict[str, np.ndarray], n: int) -> np.ndarray:
    """The rows' image signatures from a batch's vectors (`SIGNATURE`), NaN where it has none
    (predict's store, rows copied from a segment written before they were kept)."""
    s = pooled.get(SIGNATURE)
    if s is None:
        return np.full((n, SIGNATURE_WIDTH), np.nan, np.float16)
    return np.asarray(s, np.float16)


def new_name() -> str:
    """A segment name no other writer or merge can pick (random, not a counter)."""
    return f"g{secrets.token_hex(8)}.h5"


def _header(
    f: h5py.File, key: str, stamp: dict[str, Any], stamp_key: str, rebuild: str, origin: str
) -> None:
    """What made a segment: its cache, versions, rebuild and origin (batch, staged, merge...)."""
    meta = {"key": key, "stamp": stamp, "stamp_key": stamp_key, "rebuild": rebuild}
    write_attrs(f, {**meta, "origin": origin})


def _told(folder: Path) -> dict[str, str]:
    """What a full disk's line says while a segment of `folder` is written (`disk_error`); a
    writer of another store (predict's) says its own (`told`)."""
    cache = folder.name.removesuffix(".shards") + ".h5"
    return {"kept": f"the feature cache '{cache}' is intact (nothing embedded is lost)"}


def _segment_bytes(n: int, channels: int, maps: tuple[int, ...] | None, dtype: str) -> int:
    """The bytes of a segment's data alone (what `check_room` asks of the disk)."""
    row = 80 + 4 + 10 + 2 + 24 + 64 + 2 * 4 * channels + 2 * SIGNATURE_WIDTH
    if maps is not None:
        row += int(np.prod(maps)) * np.dtype(dtype).itemsize
    return n * row


class SegmentWriter:
    """Write one segment of a known number of rows, block by block, then commit it atomically."""

    def __init__(
        self,
        folder: Path,
        key: str,
        n: int,
        channels: int,
        maps_shape: tuple[int, ...] | None,
        maps_dtype: str,
        stamp: dict[str, Any],
        stamp_key: str,
        rebuild: str = "",
        path_len: int = 256,
        origin: str = "batch",
        told: dict[str, str] | None = None,
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.name = new_name()
        self.path = folder / self.name
        self.tmp = folder / f".tmp-{self.name}-{os.getpid()}"
        self.n, self.done = n, 0
        self.keys = np.zeros(n, np.uint64)  # the key table's, written at close (8 bytes a row)
        self.classes: dict[str, int] = {}
        self.failures: list[Failure] = []
        self.needed = _segment_bytes(n, channels, maps_shape, maps_dtype) + n * path_len
        self.needed += H5_OVERHEAD
        # the file is written in the block of `new_h5` (checksums, the chunk cache off, one
        # line for a full disk), entered here and left by `close` or `abort`
        self._file = new_h5(self.tmp, self.path, self.needed, **(told or _told(folder)))
        self.f = self._file.__enter__()
        try:
            f = self.f
            _header(f, key, stamp, stamp_key, rebuild, origin)
            f.attrs["rows"] = n
            put(f, "ident", shape=(n,), dtype="S80")
            put(f, "path", shape=(n,), dtype=path_dtype(np.zeros(0, f"S{path_len}")))
            put(f, "label", shape=(n,), dtype=np.int32)
            put(f, "split", shape=(n,), dtype="S10")
            put(f, "view", shape=(n,), dtype=np.int16)
            put(f, "stat", shape=(n, 3), dtype=np.int64)
            for p in POOLED:
                put(f, f"pooled/{p}", shape=(n, channels), dtype=np.float32)
            put(f, SIGNATURE, shape=(n, SIGNATURE_WIDTH), dtype=np.float16)
            if maps_shape is not None:
                put(f, "features", shape=(n,) + tuple(maps_shape), dtype=maps_dtype)
            # the row columns' digests as their rows are written (`digests`)
            rows = [*ROW_COLUMNS, *(f"pooled/{p}" for p in POOLED), SIGNATURE]
            rows += ["features"] if maps_shape is not None else []
            self.digests: dict[str, Any] = {name: digests.Digester(f[name]) for name in rows}
        except BaseException as e:
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        """Leave the block of `new_h5` with `e`: the file is closed and removed, and a full
        disk raised as one line; `e` itself otherwise."""
        file, self._file = self._file, None
        if file is not None:
            file.__exit__(type(e), e, e.__traceback__)  # raises the line, or returns
        raise e

    def write(self, meta: Meta, pooled: dict[str, np.ndarray], maps: np.ndarray | None) -> None:
        """Append len(meta) rows."""
        a, b = self.done, self.done + len(meta)
        if b == a:
            return
        f = self.f
        try:
            ids = np.array([h.encode() for h in meta.ident], "S80")
            self._put("ident", a, b, ids)
            self.keys[a:b] = keys.key_of(ids)
            self._put("path", a, b, encoded(meta.path))
            labels = [self.classes.setdefault(c, len(self.classes)) for c in meta.label]
            self._put("label", a, b, np.array(labels, np.int32))
            self._put("split", a, b, np.array([s.encode() for s in meta.split], "S10"))
            self._put("view", a, b, np.array(meta.view, np.int16))
            self._put("stat", a, b, np.array(meta.stat, np.int64).reshape(-1, 3))
            for p in POOLED:
                self._put(f"pooled/{p}", a, b, pooled[p])
            self._put(SIGNATURE, a, b, signatures_of(pooled, b - a))
            if "features" in f and maps is not None:
                self._put("features", a, b, maps)
        except BaseException as e:
            self._fail(e)
        self.done = b

    def _put(self, name: str, a: int, b: int, values: np.ndarray) -> None:
        """Rows a..b of a column, converted here to its stored type, and their digests."""
        ds = self.f[name]
        v = np.ascontiguousarray(values, dtype=ds.dtype)
        ds[a:b] = v
        self.digests[name].add(v)

    def close(self) -> str:
        """Finish: the file is complete on disk under its final name when this returns."""
        assert self.done == self.n, (self.done, self.n)
        f = self.f
        try:
            str_ds(f, "classes", list(self.classes))
            put(f, "skipped/ident", np.array([x.ident.encode() for x in self.failures], "S80"))
            str_ds(f, "skipped/reason", [x.reason for x in self.failures])
            put(f, "skipped/content", np.array([x.content for x in self.failures], bool))
            self.digests.update(keys.write_table(f, self.keys))
            digests.seal(f, self.digests)  # the small rest (classes, skipped) read back
        except BaseException as e:
            self._fail(e)
        file, self._file = self._file, None
        assert file is not None
        file.__exit__(None, None, None)  # closed, fsynced, renamed (or one line, removed)
        return self.name

    def abort(self) -> None:
        """Give up the segment: its temporary file is closed and removed."""
        file, self._file = self._file, None
        if file is not None:
            try:
                file.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)
            except KeyboardInterrupt:
                pass


def write_segment(
    folder: Path,
    key: str,
    meta: Meta,
    pooled: dict[str, np.ndarray],
    maps: np.ndarray | None,
    failures: list[Failure],
    stamp: dict[str, Any],
    stamp_key: str,
    rebuild: str = "",
    origin: str = "batch",
    told: dict[str, str] | None = None,
) -> str:
    """Write a whole segment in one go (a batch, or a small merge); return its name.

    Complete on disk under its final name when this returns (temporary name, fsync, rename);
    every dataset checksummed; a full disk, a quota or the file-size limit is one line, and
    nothing is left behind.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, folder, **(told or _told(folder))) or e from None
    name = new_name()
    path, tmp = folder / name, folder / f".tmp-{name}-{os.getpid()}"
    classes: dict[str, int] = {}
    labels = np.array([classes.setdefault(c, len(classes)) for c in meta.label], np.int32)
    enc = encoded(meta.path)
    vectors = {p: np.asarray(pooled[p], np.float32) for p in POOLED}
    needed = sum(v.nbytes for v in vectors.values()) + enc.nbytes + 200 * len(meta) + H5_OVERHEAD
    needed += 2 * SIGNATURE_WIDTH * len(meta)
    needed += maps.nbytes if maps is not None else 0
    with new_h5(tmp, path, needed, **(told or _told(folder))) as f:
        _header(f, key, stamp, stamp_key, rebuild, origin)
        f.attrs["rows"] = len(meta)
        cols: dict[str, Any] = {}  # each column as written: its digests made from memory

        def column(name: str, data: np.ndarray) -> None:
            cols[name] = np.asarray(data)
            put(f, name, cols[name])

        ids = np.array([h.encode() for h in meta.ident], "S80")
        column("ident", ids)
        cols.update(keys.write_table(f, keys.key_of(ids)))
        column("path", np.asarray(enc, path_dtype(enc)))
        column("label", labels)
        column("split", np.array([x.encode() for x in meta.split], "S10"))
        column("view", np.array(meta.view, np.int16))
        column("stat", np.array(meta.stat, np.int64).reshape(-1, 3))
        for p in POOLED:
            column(f"pooled/{p}", vectors[p])
        column(SIGNATURE, signatures_of(pooled, len(meta)))
        if maps is not None:
            column("features", maps)
        str_ds(f, "classes", list(classes))
        column("skipped/ident", np.array([x.ident.encode() for x in failures], "S80"))
        str_ds(f, "skipped/reason", [x.reason for x in failures])
        column("skipped/content", np.array([x.content for x in failures], bool))
        digests.seal(f, cols)  # the text columns (classes, reasons) read back: a few values
    return name


def copy_rows(
    folder: Path,
    key: str,
    sources: list[tuple[str, np.ndarray, Meta | None]],
    stamp: dict[str, Any],
    stamp_key: str,
    rebuild: str,
    limit: int,
    failures: list[Failure] | None = None,
    known: dict[str, Meta] | None = None,
    origin: str = "merge",
    told: dict[str, str] | None = None,
) -> list[tuple[str, int]]:
    """New segments holding the given rows of existing ones, in order; at most `limit` rows each.

    `sources` are (segment name, its rows, new metadata for them or None to keep theirs). Used by
    merges (live rows only: removed rows' bytes are reclaimed) and by commits that give a row
    new metadata (a moved or relabelled file: its features are copied, never embedded again).
    `known` gives segments' metadata already in memory (it is read from the file otherwise).
    """
    total = sum(len(r) for _, r, _ in sources)
    out: list[tuple[str, int]] = []
    if total == 0:
        return out
    first = next(name for name, rows, _ in sources if len(rows))  # empty ones may lack maps
    with open_segment(folder / first) as f:
        channels = int(f["pooled/avg"].shape[1])
        maps_shape = tuple(f["features"].shape[1:]) if "features" in f else None
        maps_dtype = str(f["features"].dtype) if maps_shape else "float16"
    row_bytes = (
        8 * channels
        + 2 * SIGNATURE_WIDTH
        + (int(np.prod(maps_shape)) * np.dtype(maps_dtype).itemsize if maps_shape else 0)
    )
    step = max(1, BLOCK_BYTES // row_bytes)

    def blocks():  # (meta, pooled, maps) of the wanted rows, a block at a time, in order
        for name, rows, meta in sources:
            rows = np.asarray(rows, np.int64)
            if not len(rows):
                continue
            order = np.argsort(rows, kind="stable")
            srt = rows[order]
            with open_segment(folder / name) as f:
                own = None
                if meta is None:
                    own = (known or {}).get(name) or info_of(f, name).meta
                for a in range(0, len(srt), step):
                    part = srt[a : a + step]
                    pooled = {p: read_rows(f[f"pooled/{p}"], part) for p in POOLED}
                    if SIGNATURE in f:  # kept since signatures are: copied as they are
                        pooled[SIGNATURE] = read_rows(f[SIGNATURE], part)
                    maps = read_rows(f["features"], part) if maps_shape else None
                    m = own.take(part) if own is not None else meta.take(order[a : a + step])  # type: ignore[union-attr]
                    yield m, pooled, maps

    fails = list(failures or [])
    path_len = 1
    for name, _, meta in sources:  # the longest path decides the segment's path width
        m = meta if meta is not None else (known or {}).get(name)
        if m is None:
            with open_segment(folder / name) as f:
                path_len = max(path_len, f["path"].dtype.itemsize)
        else:
            path_len = max(path_len, encoded(m.path).dtype.itemsize if len(m) else 1)
    if total <= min(limit, step):  # small: gather in memory, write once
        meta, pooled, maps = Meta(), {p: [] for p in (*POOLED, SIGNATURE)}, []
        for m, pv, mp in blocks():
            meta.extend(m)
            for p in POOLED:
                pooled[p].append(pv[p])
            pooled[SIGNATURE].append(signatures_of(pv, len(m)))
            maps.append(mp)
        name = write_segment(
            folder,
            key,
            meta,
            {p: np.concatenate(v) for p, v in pooled.items()},
            np.concatenate(maps) if maps_shape else None,
            fails,
            stamp,
            stamp_key,
            rebuild,
            origin,
            told,
        )
        return [(name, total)]
    w: SegmentWriter | None = None
    left = total
    try:
        for m, pooled, maps in blocks():
            k = 0
            while k < len(m):
                if w is None:
                    w = SegmentWriter(
                        folder,
                        key,
                        min(limit, left),
                        channels,
                        maps_shape,
                        maps_dtype,
                        stamp,
                        stamp_key,
                        rebuild,
                        path_len,
                        origin,
                        told,
                    )
                take = min(len(m) - k, w.n - w.done)
                w.write(
                    m.take(range(k, k + take)),
                    {p: v[k : k + take] for p, v in pooled.items()},
                    maps[k : k + take] if maps is not None else None,
                )
                k += take
                left -= take
                if w.done == w.n:
                    if not out:
                        w.failures = fails
                    out.append((w.close(), w.n))
                    w = None
    except BaseException:
        if w is not None:
            w.abort()
        raise
    return out
