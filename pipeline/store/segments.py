"""Segment files: immutable HDF5 files holding whole rows (what the image is, and its features).

A segment (`<cache>.shards/g<id>.h5`) is written once to a temporary name, fsynced and renamed;
it is never modified afterwards, only merged into larger ones and then deleted. Each row carries
its identity (content hash and view), path, label, split, file stat, its pooled vectors (avg and
max) and, unless MAPS=0, its feature maps. A segment also lists the files of its batch whose
bytes could not be decoded (content failures), so a killed run's work is resumed whole.

Datasets (plain h5py reads them): `ident` (S80), `path`, `label` (into `classes`), `split`,
`view`, `stat` (size, mtime_ns, inode), `pooled/avg` and `pooled/max` (float32), `features` (the
maps, unless MAPS=0), `skipped/ident|reason|content`, and the key table `keys/prefix`,
`keys/row`, `keys/fence` (`pipeline.store.keys`: rows found by identity reading only the chunks
asked for; segments written before it have none and still work).

Readers open one segment at a time (`open_segment`), so a cache of any size needs one open file.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import UserError
from pipeline.store import keys
from pipeline.store.format import (
    POOLED,
    STR,
    CacheError,
    disk_error,
    fsync,
    open_files_error,
    read_attrs_of,
    strs,
    too_many_open_files,
    write_attrs,
)

BLOCK_BYTES = 64 << 20  # one read or copy step: about 64 MB


def encoded(paths: list[str]) -> np.ndarray:
    """Paths as fixed-length UTF-8 bytes: read back at memory speed (variable-length strings
    cost microseconds each in HDF5), at the price of padding to the segment's longest path."""
    return np.array([p.encode("utf-8", "surrogateescape") for p in paths], dtype=bytes)


def path_dtype(enc: np.ndarray) -> Any:
    """Fixed-width bytes holding UTF-8 (decode after reading: `p.decode()`)."""
    return np.dtype(f"S{max(1, enc.dtype.itemsize)}")


def decoded(raw: np.ndarray) -> list[str]:
    return [
        b.decode("utf-8", "surrogateescape") if isinstance(b, bytes) else str(b)
        for b in raw.tolist()
    ]


def pooled(maps: np.ndarray) -> dict[str, np.ndarray]:
    """Global average and max of (n, h, w, c) maps as float32 (n, c): what pooled heads read."""
    return {
        "avg": maps.astype(np.float32).mean(axis=(1, 2)),
        "max": maps.max(axis=(1, 2)).astype(np.float32),
    }


def segment_bytes() -> int:
    """The size a segment grows to by merging (1 GiB; PIPELINE_SEGMENT_BYTES for tests)."""
    return int(os.environ.get("PIPELINE_SEGMENT_BYTES", 1 << 30))


@dataclass
class Meta:
    """Row metadata, one entry per row, aligned across fields."""

    ident: list[str] = field(default_factory=list)
    path: list[str] = field(default_factory=list)
    label: list[str] = field(default_factory=list)  # class names
    split: list[str] = field(default_factory=list)
    view: list[int] = field(default_factory=list)
    stat: list[tuple[int, int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ident)

    def take(self, rows: np.ndarray | list[int]) -> Meta:
        return Meta(
            [self.ident[i] for i in rows],
            [self.path[i] for i in rows],
            [self.label[i] for i in rows],
            [self.split[i] for i in rows],
            [self.view[i] for i in rows],
            [self.stat[i] for i in rows],
        )

    def extend(self, other: Meta) -> None:
        for name in ("ident", "path", "label", "split", "view", "stat"):
            getattr(self, name).extend(getattr(other, name))


@dataclass
class Failure:
    """A file of a batch that could not be embedded: its identity, why, and whether its bytes
    are at fault (remembered) or something passing (I/O, memory: retried on the next run)."""

    ident: str
    reason: str
    content: bool


def new_name() -> str:
    """A segment name no other writer or merge can pick (random, not a counter)."""
    return f"g{secrets.token_hex(8)}.h5"


class SegmentMissing(CacheError):
    """A segment an index names is not on disk."""


class SegmentUnreadable(CacheError):
    """A segment that exists but cannot be read now (maybe passing: a network filesystem)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message  # the error alone, for a warning of one line


class ForeignSegment(Exception):
    """A segment of another cache (another key): never used here."""


def open_segment(path: Path) -> h5py.File:
    """Open a segment read-only; a missing one, the open-file limit and damage are named."""
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise SegmentMissing(
            f"feature cache points at a missing segment file '{path.name}' in "
            f"'{path.parent.name}'; rerun `make features` (it embeds the missing rows again)"
        ) from None
    except OSError as e:
        if too_many_open_files(e):
            raise open_files_error(path) from None
        if not path.exists():
            raise SegmentMissing(
                f"feature cache points at a missing segment file '{path.name}' in "
                f"'{path.parent.name}'; rerun `make features` (it embeds the missing rows "
                "again)"
            ) from None
        reason = str(e).splitlines()[0][:120]
        raise SegmentUnreadable(
            f"segment '{path}' of the cache cannot be read ({reason}); "
            "nothing was changed: if this passes (a network filesystem), rerun; if the file is "
            "damaged, `make features REBUILD=1` embeds every image again without it",
            reason,
        ) from None


def _header(
    f: h5py.File, key: str, stamp: dict[str, Any], stamp_key: str, rebuild: str, origin: str
) -> None:
    """What made a segment: its cache, versions, rebuild and origin (batch, staged, merge...)."""
    meta = {"key": key, "stamp": stamp, "stamp_key": stamp_key, "rebuild": rebuild}
    write_attrs(f, {**meta, "origin": origin})


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
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.name = new_name()
        self.path = folder / self.name
        self.tmp = folder / f".tmp-{self.name}-{os.getpid()}"
        self.n, self.done = n, 0
        self.keys = np.zeros(n, np.uint64)  # the key table's, written at close (8 bytes a row)
        self.classes: dict[str, int] = {}
        self.failures: list[Failure] = []
        try:
            self.f = h5py.File(self.tmp, "w")
            f = self.f
            _header(f, key, stamp, stamp_key, rebuild, origin)
            f.attrs["rows"] = n
            f.create_dataset("ident", (n,), "S80")
            f.create_dataset("path", (n,), path_dtype(np.zeros(0, f"S{path_len}")))
            f.create_dataset("label", (n,), np.int32)
            f.create_dataset("split", (n,), "S10")
            f.create_dataset("view", (n,), np.int16)
            f.create_dataset("stat", (n, 3), np.int64)
            for p in POOLED:
                f.create_dataset(f"pooled/{p}", (n, channels), np.float32)
            if maps_shape is not None:
                f.create_dataset("features", (n,) + tuple(maps_shape), maps_dtype)
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError) and (err := disk_error(e, self.path)) is not None:
                raise err from None
            raise

    def write(self, meta: Meta, pooled: dict[str, np.ndarray], maps: np.ndarray | None) -> None:
        """Append len(meta) rows."""
        a, b = self.done, self.done + len(meta)
        if b == a:
            return
        f = self.f
        try:
            ids = np.array([h.encode() for h in meta.ident], "S80")
            f["ident"][a:b] = ids
            self.keys[a:b] = keys.key_of(ids)
            f["path"][a:b] = encoded(meta.path)
            labels = [self.classes.setdefault(c, len(self.classes)) for c in meta.label]
            f["label"][a:b] = np.array(labels, np.int32)
            f["split"][a:b] = np.array([s.encode() for s in meta.split], "S10")
            f["view"][a:b] = np.array(meta.view, np.int16)
            f["stat"][a:b] = np.array(meta.stat, np.int64).reshape(-1, 3)
            for p in POOLED:
                f[f"pooled/{p}"][a:b] = pooled[p]
            if "features" in f and maps is not None:
                f["features"][a:b] = maps
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError) and (err := disk_error(e, self.path)) is not None:
                raise err from None
            raise
        self.done = b

    def close(self) -> str:
        """Finish: the file is complete on disk under its final name when this returns."""
        assert self.done == self.n, (self.done, self.n)
        f = self.f
        try:
            f.create_dataset("classes", data=np.array(list(self.classes), dtype=object), dtype=STR)
            f.create_dataset(
                "skipped/ident",
                data=np.array([x.ident.encode() for x in self.failures], "S80"),
            )
            f.create_dataset(
                "skipped/reason",
                data=np.array([x.reason for x in self.failures], dtype=object),
                dtype=STR,
            )
            f.create_dataset(
                "skipped/content", data=np.array([x.content for x in self.failures], bool)
            )
            keys.write_table(f, self.keys)
            f.close()
            fsync(self.tmp)
            os.replace(self.tmp, self.path)
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError) and (err := disk_error(e, self.path)) is not None:
                raise err from None
            raise
        return self.name

    def abort(self) -> None:
        try:
            self.f.close()
        except Exception:  # noqa: BLE001 - closing a half-made file on the way out
            pass
        self.tmp.unlink(missing_ok=True)


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
) -> str:
    """Write a whole segment in one go (a batch, or a small merge); return its name.

    Complete on disk under its final name when this returns (temporary name, fsync, rename).
    """
    folder.mkdir(parents=True, exist_ok=True)
    name = new_name()
    path, tmp = folder / name, folder / f".tmp-{name}-{os.getpid()}"
    classes: dict[str, int] = {}
    labels = np.array([classes.setdefault(c, len(classes)) for c in meta.label], np.int32)
    try:
        with h5py.File(tmp, "w") as f:
            _header(f, key, stamp, stamp_key, rebuild, origin)
            f.attrs["rows"] = len(meta)
            ids = np.array([h.encode() for h in meta.ident], "S80")
            f.create_dataset("ident", data=ids)
            keys.write_table(f, keys.key_of(ids))
            enc = encoded(meta.path)
            f.create_dataset("path", data=enc, dtype=path_dtype(enc))
            f.create_dataset("label", data=labels)
            f.create_dataset("split", data=np.array([x.encode() for x in meta.split], "S10"))
            f.create_dataset("view", data=np.array(meta.view, np.int16))
            f.create_dataset("stat", data=np.array(meta.stat, np.int64).reshape(-1, 3))
            for p in POOLED:
                f.create_dataset(f"pooled/{p}", data=np.asarray(pooled[p], np.float32))
            if maps is not None:
                f.create_dataset("features", data=maps)
            f.create_dataset("classes", data=np.array(list(classes), dtype=object), dtype=STR)
            f.create_dataset(
                "skipped/ident", data=np.array([x.ident.encode() for x in failures], "S80")
            )
            f.create_dataset(
                "skipped/reason",
                data=np.array([x.reason for x in failures], dtype=object),
                dtype=STR,
            )
            f.create_dataset("skipped/content", data=np.array([x.content for x in failures], bool))
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and (err := disk_error(e, path)) is not None:
            raise err from None
        raise
    return name


@dataclass
class SegInfo:
    """One segment's header and row metadata (no features)."""

    name: str
    rows: int
    stamp: dict[str, Any]
    stamp_key: str
    rebuild: str
    meta: Meta
    failures: list[Failure]
    channels: int
    maps_shape: tuple[int, ...] | None
    maps_dtype: str
    origin: str = "batch"


def read_info(path: Path, key: str | None = None) -> SegInfo:
    """A segment's rows without features; ValueError if it belongs to another cache."""
    with open_segment(path) as f:
        return info_of(f, path.name, key)


def info_of(f: h5py.File, name: str, key: str | None = None) -> SegInfo:
    a = read_attrs_of(f)
    if key is not None and a.get("key") != key:
        raise ForeignSegment(name)
    classes = strs(f["classes"])
    labels = f["label"][()]
    meta = Meta(
        ident=f["ident"][()].astype(str).tolist(),
        path=decoded(f["path"][()]),
        label=[classes[i] for i in labels.tolist()],
        split=f["split"][()].astype(str).tolist(),
        view=f["view"][()].astype(int).tolist(),
        stat=[tuple(r) for r in f["stat"][()].tolist()],
    )
    failures = [
        Failure(h, r, bool(c))
        for h, r, c in zip(
            f["skipped/ident"][()].astype(str).tolist(),
            strs(f["skipped/reason"]),
            f["skipped/content"][()].tolist(),
            strict=True,
        )
    ]
    has_maps = "features" in f
    return SegInfo(
        name=name,
        rows=len(meta),
        stamp=a.get("stamp") or {},
        stamp_key=str(a.get("stamp_key", "")),
        rebuild=str(a.get("rebuild", "")),
        origin=str(a.get("origin", "batch")),
        meta=meta,
        failures=failures,
        channels=int(f["pooled/avg"].shape[1]),
        maps_shape=tuple(f["features"].shape[1:]) if has_maps else None,
        maps_dtype=str(f["features"].dtype) if has_maps else "float16",
    )


def read_rows(ds: h5py.Dataset, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows `rows` (sorted) of a dataset, read in contiguous blocks of at most about 64 MB.

    Rows further apart than about 1 MB are read separately: a few scattered rows cost their
    own bytes, not the blocks around them.
    """
    row_bytes = int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
    step = max(1, BLOCK_BYTES // max(1, row_bytes))
    gap = max(1, (1 << 20) // max(1, row_bytes))
    if out is None:
        out = np.empty((len(rows),) + ds.shape[1:], ds.dtype)
    if not len(rows):
        return out
    done = 0
    for span in np.split(rows, np.flatnonzero(np.diff(rows) > gap) + 1):
        lo, hi = int(span[0]), int(span[-1]) + 1
        for a in range(lo, hi, step):
            b = min(hi, a + step)
            i, j = np.searchsorted(span, [a, b])
            if i == j:
                continue
            block = ds[a:b]
            out[done : done + (j - i)] = block[span[i:j] - a]
            done += j - i
    return out


def limit_of(path: Path) -> int:
    """How many rows a full segment of the same shape as the one at `path` holds (header only)."""
    with open_segment(path) as f:
        has = "features" in f
        return max_rows(
            int(f["pooled/avg"].shape[1]),
            tuple(f["features"].shape[1:]) if has else None,
            str(f["features"].dtype) if has else "float16",
        )


def max_rows(channels: int, maps_shape: tuple[int, ...] | None, maps_dtype: str) -> int:
    """How many rows a full segment holds (segment_bytes() of features and pooled vectors)."""
    row = 2 * 4 * channels + 200
    if maps_shape is not None:
        row += int(np.prod(maps_shape)) * np.dtype(maps_dtype).itemsize
    return max(1, segment_bytes() // row)


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
    row_bytes = 8 * channels + (
        int(np.prod(maps_shape)) * np.dtype(maps_dtype).itemsize if maps_shape else 0
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
        meta, pooled, maps = Meta(), {p: [] for p in POOLED}, []
        for m, pv, mp in blocks():
            meta.extend(m)
            for p in POOLED:
                pooled[p].append(pv[p])
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


def missing_maps(what: str) -> UserError:
    return UserError(
        f"{what} needs the feature maps, and this cache holds pooled vectors only (MAPS=0); "
        "rerun `make features MAPS=1` (another cache) or use POOL=avg / POOL=max"
    )
