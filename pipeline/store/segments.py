"""Segment files: immutable HDF5 files holding whole rows (what the image is, and its features).

A segment (`<cache>.shards/g<id>.h5`) is written once to a temporary name, fsynced and renamed
(`segment_writer`); it is never modified afterwards, only merged into larger ones and then
deleted. Each row carries its identity (content hash and view), path, label, split, file stat,
its pooled vectors (avg and max) and, unless MAPS=0, its feature maps. A segment also lists the
files of its batch whose bytes could not be decoded (content failures), so a killed run's work
is resumed whole.

Datasets (plain h5py reads them): `ident` (S80), `path`, `label` (into `classes`), `split`,
`view`, `stat` (size, mtime_ns, inode), `pooled/avg` and `pooled/max` (float32), `features` (the
maps, unless MAPS=0), `skipped/ident|reason|content`, and the key table `keys/prefix`,
`keys/row`, `keys/fence` (`pipeline.store.keys`: rows found by identity reading only the chunks
asked for; segments written before it have none and still work).

Every dataset carries a Fletcher-32 checksum per chunk (`format.put`; segments written before
have none and read as they did): a changed byte fails its read and is never served. What
Fletcher-32 cannot see (a chunk zeroed with its checksum, words 0x0000 turned 0xFFFF) the
CRC-32 of each chunk of rows finds (`digests`: tables `crc32/<dataset>`). A segment
that cannot be read is named for what it is (`damage`), never an HDF5 error.

Readers open one segment at a time (`open_segment`), so a cache of any size needs one open file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import UserError
from pipeline.store import digests
from pipeline.store.damage import SegmentDamaged, cause_of, segment_error
from pipeline.store.format import close_h5, read_attrs_of, strs

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

    @classmethod
    def of_rows(cls, rows: Sequence[Any]) -> Meta:
        """The metadata of rows that carry it (`changes.Row`: ident, path, label, split, ...)."""
        return cls(
            [r.ident for r in rows], [r.path for r in rows], [r.label for r in rows],
            [r.split for r in rows], [r.view for r in rows], [tuple(r.stat) for r in rows],
        )  # fmt: skip

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


class ForeignSegment(Exception):
    """A segment of another cache (another key): never used here."""


class Opened:
    """An open segment: `with open_segment(p) as g` gives the h5py file; a read that fails in
    the block is named (`segment_error`), never an HDF5 error, never a wrong value."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.f = h5py.File(self.path, "r")
        except OSError as e:
            raise segment_error(self.path, e) from None

    def __enter__(self) -> h5py.File:
        return self.f

    def __exit__(self, kind: Any, e: BaseException | None, tb: Any) -> bool:
        self.close()
        if isinstance(e, (OSError, RuntimeError)):
            raise segment_error(self.path, e) from None
        return False

    def close(self) -> None:
        close_h5(self.f)


def open_segment(path: Path) -> Opened:
    """Open a segment read-only; a missing one, the open-file limit and damage are named."""
    return Opened(path)


def verify(g: h5py.File) -> None:
    """Read every dataset of the open segment `g` whole, about 64 MB at a time: a chunk whose
    checksum (Fletcher-32) or content digest (`digests`) does not match raises (VERIFY=1, or a
    segment a reader found damaged)."""
    names: list[str] = []
    g.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    for name in names:
        digests.check_all(g[name])


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
    """A segment's rows without features; ForeignSegment if it belongs to another cache,
    SegmentDamaged if its columns do not read (a missing one, a label outside its classes)."""
    with open_segment(path) as f:
        try:
            return info_of(f, path.name, key)
        except (KeyError, ValueError, IndexError) as e:
            raise SegmentDamaged(path, cause_of(e)[0]) from None


def info_of(f: h5py.File, name: str, key: str | None = None) -> SegInfo:
    a = read_attrs_of(f)
    if key is not None and a.get("key") != key:
        raise ForeignSegment(name)

    def col(name: str) -> np.ndarray:  # a whole column, each chunk checked (`digests`)
        return digests.read(f[name])

    col("classes"), col("skipped/reason")  # text read below, checked here
    classes = strs(f["classes"])
    labels = col("label")
    meta = Meta(
        ident=col("ident").astype(str).tolist(),
        path=decoded(col("path")),
        label=[classes[i] for i in labels.tolist()],
        split=col("split").astype(str).tolist(),
        view=col("view").astype(int).tolist(),
        stat=[tuple(r) for r in col("stat").tolist()],
    )
    failures = [
        Failure(h, r, bool(c))
        for h, r, c in zip(
            col("skipped/ident").astype(str).tolist(),
            strs(f["skipped/reason"]),
            col("skipped/content").tolist(),
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
    own bytes (their whole chunks), not the blocks around them. Every chunk read is checked
    against its digest (`digests`; a segment written before has none).
    """
    row_bytes = int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
    step = max(1, BLOCK_BYTES // max(1, row_bytes))
    gap = max(1, (1 << 20) // max(1, row_bytes))
    if out is None:
        out = np.empty((len(rows),) + ds.shape[1:], ds.dtype)
    if not len(rows):
        return out
    table = digests.Table.of(ds)  # whole chunks read, each checked against its digest
    r = table.rows if table is not None else 1
    step = max(r, step // r * r)
    done = 0
    for span in np.split(rows, np.flatnonzero(np.diff(rows) > gap) + 1):
        lo, hi = int(span[0]), int(span[-1]) + 1
        for a in range(lo // r * r, hi, step):
            b = min(hi, a + step)
            i, j = np.searchsorted(span, [a, b])
            if i == j:
                continue
            block = digests.read(ds, a, b, table)
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


def missing_maps(what: str) -> UserError:
    return UserError(
        f"{what} needs the feature maps, and this cache holds pooled vectors only (MAPS=0); "
        "rerun `make features MAPS=1` (another cache) or use POOL=avg / POOL=max"
    )
