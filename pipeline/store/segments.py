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

Every dataset carries a Fletcher-32 checksum per chunk (`format.put`; segments written before
have none and read as they did): a changed byte fails its read and is never served. A segment
that cannot be read is classified (`segment_error`): damaged for good (truncated, a checksum,
not HDF5, a column missing, permission denied) or missing (`SegmentDamaged`: `make features`
moves it into `damaged/` and embeds its rows again, only those), or maybe passing (an I/O
error: `SegmentUnreadable`, nothing changed). A reader that finds one notes it (`NOTED`) for
the next `make features`, which then reads that segment whole.

Readers open one segment at a time (`open_segment`), so a cache of any size needs one open file.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import UserError
from pipeline.store import keys
from pipeline.store.format import (
    H5_OVERHEAD,
    POOLED,
    CacheError,
    close_h5,
    new_h5,
    open_files_error,
    put,
    read_attrs_of,
    str_ds,
    strs,
    too_many_open_files,
    write_attrs,
    write_error,
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


DAMAGED_DIR = "damaged"  # in a cache's segment folder: the segments set aside, kept for a look
NOTED = ".damaged-seen"  # in a cache's segment folder: segments a reader found damaged
PASSING = {
    errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.ENOMEM,
    errno.EBUSY, errno.ENOLCK, errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTUNREACH,
    errno.ENETDOWN, errno.ENETUNREACH, errno.ENOTCONN,
}  # fmt: skip


def cache_name(path: Path) -> str:
    """The index file a segment belongs to (`<cache>.shards/g*.h5` -> `<cache>.h5`)."""
    return Path(path).parent.name.removesuffix(".shards") + ".h5"


class SegmentDamaged(CacheError):
    """A segment lost for good: damaged (truncated, a checksum that does not match, not HDF5, a
    column missing), unreadable to this user, or missing. `make features` sets it aside and
    embeds its rows again (only those); a reader stops, naming it."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(
            f"segment '{self.path.name}' of the feature cache '{cache_name(self.path)}' is "
            f"damaged ({reason}); run `make features`: it sets the file aside and embeds that "
            "segment's images again (only those)"
        )


class SegmentMissing(SegmentDamaged):
    """A segment an index names is not on disk."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        CacheError.__init__(
            self,
            f"feature cache points at a missing segment file '{path.name}' in "
            f"'{path.parent.name}'; rerun `make features` (it embeds the missing rows again)",
        )
        self.path, self.reason = path, "missing"


class SegmentUnreadable(CacheError):
    """A segment that exists but cannot be read now (maybe passing: a network filesystem)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message  # the error alone, for a warning of one line


class ForeignSegment(Exception):
    """A segment of another cache (another key): never used here."""


def _errno_of(e: BaseException) -> int | None:
    code = getattr(e, "errno", None)
    if code:
        return int(code)
    m = re.search(r"errno = (\d+)", str(e))
    return int(m.group(1)) if m else None


def cause_of(e: BaseException) -> tuple[str, bool]:
    """What a failed open or read of a segment says, in a few words, and whether the file is
    at fault (True: damaged for good) rather than the moment (False: maybe passing)."""
    text = " ".join(str(e).split())
    low = text.lower()
    code = _errno_of(e)
    if code in (errno.EACCES, errno.EPERM) or "permission denied" in low:
        return "Permission denied", True
    if isinstance(e, (KeyError, ValueError, IndexError)):
        return text.strip("'\"")[:160] or type(e).__name__, True
    m = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", low)
    if m:
        return f"truncated: {m.group(1)} of its {m.group(2)} bytes are on disk", True
    if "truncated" in low:
        return "truncated", True
    if "checksum" in low or "filter returned failure" in low or "data error detected" in low:
        return "a checksum does not match: its bytes changed on disk", True
    if "file signature not found" in low:
        return "not an HDF5 file (no HDF5 signature)", True
    if code in PASSING or any(w in low for w in ("input/output error", "stale", "timed out")):
        return text[:160], False
    if code is not None:
        return text[:160], False  # another error of the system: it may pass
    # HDF5's own errors (no errno): the file's structure is at fault
    inner = re.search(r"\(([^()]*)\)", text)
    return (inner.group(1) if inner else text)[:160], True


def note_damaged(path: Path) -> None:
    """Remember that a reader found segment `path` damaged, for the next `make features` (it
    then reads that segment whole and sets it aside): best effort, a reader may not write."""
    try:
        with open(Path(path).parent / NOTED, "a", encoding="utf-8") as fh:
            fh.write(Path(path).name + "\n")
    except OSError:
        pass


def noted_damaged(folder: Path) -> set[str]:
    """The segments readers found damaged since the last `make features` (`note_damaged`)."""
    try:
        return set((Path(folder) / NOTED).read_text(encoding="utf-8").split())
    except OSError:
        return set()


def segment_error(path: Path, e: BaseException) -> UserError:
    """The error of a failed open or read of segment `path`: the open-file limit, damaged for
    good (`SegmentDamaged`, remembered for the next `make features`) or maybe passing."""
    path = Path(path)
    if isinstance(e, FileNotFoundError) or not path.exists():
        return SegmentMissing(path)
    if too_many_open_files(e):
        return open_files_error(path)
    why, damaged = cause_of(e)
    if damaged:
        note_damaged(path)
        return SegmentDamaged(path, why)
    return SegmentUnreadable(
        f"segment '{path}' of the cache cannot be read ({why}); nothing was changed: rerun "
        "when this passes (a network filesystem; a disk error stays: the system log, `dmesg`, "
        "says which)",
        why,
    )


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
    checksum does not match raises (VERIFY=1, or a segment a reader found damaged)."""
    names: list[str] = []
    g.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    for name in names:
        ds = g[name]
        if not ds.shape:
            ds[()]
            continue
        row = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
        step = max(1, BLOCK_BYTES // row)
        for a in range(0, ds.shape[0], step):
            ds[a : a + step]


def _header(
    f: h5py.File, key: str, stamp: dict[str, Any], stamp_key: str, rebuild: str, origin: str
) -> None:
    """What made a segment: its cache, versions, rebuild and origin (batch, staged, merge...)."""
    meta = {"key": key, "stamp": stamp, "stamp_key": stamp_key, "rebuild": rebuild}
    write_attrs(f, {**meta, "origin": origin})


def _told(folder: Path) -> dict[str, str]:
    """What a full disk's line says while a segment of `folder` is written (`disk_error`)."""
    cache = folder.name.removesuffix(".shards") + ".h5"
    return {"kept": f"the feature cache '{cache}' is intact (nothing embedded is lost)"}


def _segment_bytes(n: int, channels: int, maps: tuple[int, ...] | None, dtype: str) -> int:
    """The bytes of a segment's data alone (what `check_room` asks of the disk)."""
    row = 80 + 4 + 10 + 2 + 24 + 64 + 2 * 4 * channels
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
        self._file = new_h5(self.tmp, self.path, self.needed, **_told(folder))
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
            if maps_shape is not None:
                put(f, "features", shape=(n,) + tuple(maps_shape), dtype=maps_dtype)
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
            self._fail(e)
        self.done = b

    def close(self) -> str:
        """Finish: the file is complete on disk under its final name when this returns."""
        assert self.done == self.n, (self.done, self.n)
        f = self.f
        try:
            str_ds(f, "classes", list(self.classes))
            put(f, "skipped/ident", np.array([x.ident.encode() for x in self.failures], "S80"))
            str_ds(f, "skipped/reason", [x.reason for x in self.failures])
            put(f, "skipped/content", np.array([x.content for x in self.failures], bool))
            keys.write_table(f, self.keys)
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
) -> str:
    """Write a whole segment in one go (a batch, or a small merge); return its name.

    Complete on disk under its final name when this returns (temporary name, fsync, rename);
    every dataset checksummed; a full disk, a quota or the file-size limit is one line, and
    nothing is left behind.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, folder, **_told(folder)) or e from None
    name = new_name()
    path, tmp = folder / name, folder / f".tmp-{name}-{os.getpid()}"
    classes: dict[str, int] = {}
    labels = np.array([classes.setdefault(c, len(classes)) for c in meta.label], np.int32)
    enc = encoded(meta.path)
    vectors = {p: np.asarray(pooled[p], np.float32) for p in POOLED}
    needed = sum(v.nbytes for v in vectors.values()) + enc.nbytes + 200 * len(meta) + H5_OVERHEAD
    needed += maps.nbytes if maps is not None else 0
    with new_h5(tmp, path, needed, **_told(folder)) as f:
        _header(f, key, stamp, stamp_key, rebuild, origin)
        f.attrs["rows"] = len(meta)
        ids = np.array([h.encode() for h in meta.ident], "S80")
        put(f, "ident", ids)
        keys.write_table(f, keys.key_of(ids))
        put(f, "path", enc, dtype=path_dtype(enc))
        put(f, "label", labels)
        put(f, "split", np.array([x.encode() for x in meta.split], "S10"))
        put(f, "view", np.array(meta.view, np.int16))
        put(f, "stat", np.array(meta.stat, np.int64).reshape(-1, 3))
        for p in POOLED:
            put(f, f"pooled/{p}", vectors[p])
        if maps is not None:
            put(f, "features", maps)
        str_ds(f, "classes", list(classes))
        put(f, "skipped/ident", np.array([x.ident.encode() for x in failures], "S80"))
        str_ds(f, "skipped/reason", [x.reason for x in failures])
        put(f, "skipped/content", np.array([x.content for x in failures], bool))
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
