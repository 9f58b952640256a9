"""The feature store's index file: one HDF5 file per backbone setting, readable with plain h5py.

Layout (N rows, one per image or augmented view):
  /features (N, h, w, c)     virtual dataset over the shards: the backbone's maps (not with MAPS=0)
  /pooled/avg, /pooled/max (N, c) float32   virtual datasets: what pooled heads read (2 KB a row)
  /paths    (N,) UTF-8, relative to DATA        /labels (N,) int32 into /classes
  /split    (N,) 'train' | 'validation'         /sha256 (N,) content hash of each file
  /view     (N,) int16: 0 the image itself, k its k-th augmented view
  /embedded_with (N,) int16 into attrs `embedders`: the decoder/framework versions of each row
  /stat     (N, 3) int64: size, mtime (ns), inode of the file when it was hashed
  /shard, /shard_row (N,): where each row lives (attrs `shards` names the files)
  /classes  (C,) UTF-8 class names
  /skipped/paths, /skipped/reasons, /skipped/sha256, /skipped/stat   unreadable files, and why
  attrs: cache_key, data_id, settings (JSON), embedders (JSON), each setting by name, environment

The rows' features live in immutable shard files next to it (`pipeline.shards`); this index is
small (about 200 bytes a row) and is only ever replaced whole (write, fsync, rename), so adding
or removing images writes the new shards and a new index, never the existing features again.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import UserError

FORMAT_VERSION = 3  # 3: index + immutable shards (virtual datasets), pooled vectors, stat
STR = h5py.string_dtype("utf-8")
POOLINGS = ("avg", "max", "flatten")
CHUNK_ROWS = 256


def disk_error(e: OSError, path: Path) -> UserError | None:
    """A clear user error for a full disk or an unwritable folder; None for other OS errors."""
    text = str(e).lower()
    if e.errno in (errno.ENOSPC, errno.EDQUOT) or "no space left" in text:
        return UserError(
            f"disk full while writing '{path}'; the existing cache is intact: free some space "
            "and rerun `make features`"
        )
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) or "read-only" in text:
        return UserError(
            f"cannot write '{path}' ({e.strerror or e}); make the folder writable or set "
            "ARTIFACTS to a writable folder"
        )
    return None


def ident(sha256: str, view: int = 0) -> str:
    """A cached row's identity: its content hash, and which augmented view (0: none)."""
    return sha256 if view == 0 else f"{sha256}#{view}"


@contextmanager
def replacing(tmp: Path, path: Path) -> Iterator[None]:
    """Write `tmp` in the block, then rename it onto `path`: readers see the old or the new file.

    On failure `tmp` is removed; a full disk or an unwritable folder becomes one clear line.
    """
    try:
        yield
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        err = disk_error(e, path)
        if err is not None:
            raise err from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cache_key(settings: dict[str, Any]) -> str:
    """SHA-256 of the settings that determine the features (canonical JSON)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def data_id(
    paths: list[str], sha256: list[str], labels: list[int], split: list[str], classes: list[str]
) -> str:
    """SHA-256 of what a cache says about the images: every row's path, content, label, split."""
    h = hashlib.sha256(json.dumps(classes).encode())
    for row in sorted(zip(paths, sha256, (int(v) for v in labels), split, strict=True)):
        h.update(json.dumps(row).encode())
    return h.hexdigest()


@dataclass
class Index:
    """A cache file's rows and attributes, without the features themselves."""

    path: Path
    paths: list[str]
    sha256: list[str]
    labels: np.ndarray
    split: list[str]
    classes: list[str]
    skipped: list[dict[str, str]]
    attrs: dict[str, Any]
    view: list[int] = field(default_factory=list)
    embedded_with: list[int] = field(default_factory=list)
    stat: np.ndarray | None = None
    shard: list[str] = field(default_factory=list)
    shard_row: list[int] = field(default_factory=list)
    row_of: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.view:
            self.view = [0] * len(self.paths)
        if not self.embedded_with:
            self.embedded_with = [0] * len(self.paths)
        self.row_of = {
            ident(h, v): i for i, (h, v) in enumerate(zip(self.sha256, self.view, strict=True))
        }


class CacheError(UserError):
    """A cache file that is damaged or was made with other settings."""


def _attrs(f: h5py.File) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, np.ndarray):
            v = [x.decode() if isinstance(x, bytes) else x for x in v.tolist()]
        if isinstance(v, str) and k in ("settings", "environment", "extra", "embedders"):
            v = json.loads(v)
        out[k] = v
    return out


def _strs(ds: h5py.Dataset) -> list[str]:
    return [s for s in ds.asstr()[()]] if ds.shape[0] else []


@contextmanager
def open_cache(path: Path) -> Iterator[h5py.File]:
    """Open a cache read-only; a damaged or foreign file is a CacheError naming the fix."""
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise UserError(
            f"feature cache '{path}' does not exist; run `make features` first"
        ) from None
    except OSError as e:
        raise CacheError(
            f"feature cache '{path}' is damaged ({str(e).splitlines()[0][:120]}); "
            "delete it and rerun `make features`"
        ) from None
    try:
        if f.attrs.get("format_version") != FORMAT_VERSION or "pooled/avg" not in f:
            raise CacheError(
                f"'{path}' is not a complete feature cache of format {FORMAT_VERSION}; "
                "delete it and rerun `make features`"
            )
        yield f
    finally:
        f.close()


def read_attrs(path: Path) -> dict[str, Any]:
    """A cache's attributes alone (cheap: no rows are read)."""
    with open_cache(path) as f:
        return _attrs(f)


def read_index(path: Path, expect_key: str | None = None) -> Index:
    """Read a cache's rows and attributes; check its key when one is expected."""
    with open_cache(path) as f:
        return index_of(f, path, expect_key)


def missing_shards(path: Path, names: list[str]) -> list[str]:
    """The shard files an index names that are not on disk."""
    folder = shards_dir(path)
    return [n for n in names if not (folder / n).is_file()]


def index_of(f: h5py.File, path: Path, expect_key: str | None = None) -> Index:
    """The rows and attributes of the open cache `f`."""
    attrs = _attrs(f)
    if expect_key is not None and attrs.get("cache_key") != expect_key:
        raise CacheError(
            f"feature cache '{path}' was made with other settings "
            f"(key {str(attrs.get('cache_key'))[:12]}, expected {expect_key[:12]})"
        )
    try:
        sk = f["skipped"]
        sk_stat = sk["stat"][()] if "stat" in sk else np.zeros((len(sk["paths"]), 3), np.int64)
        skipped = [
            {"path": p, "reason": r, "sha256": h, "stat": tuple(int(v) for v in st)}
            for p, r, h, st in zip(
                _strs(sk["paths"]),
                _strs(sk["reasons"]),
                _strs(sk["sha256"]),
                sk_stat,
                strict=True,
            )
        ]
        names = list(attrs.get("shards", []))
        return Index(
            path=path,
            paths=_strs(f["paths"]),
            sha256=_strs(f["sha256"]),
            labels=f["labels"][()].astype(np.int64),
            split=_strs(f["split"]),
            classes=_strs(f["classes"]),
            skipped=skipped,
            attrs=attrs,
            view=f["view"][()].astype(int).tolist() if "view" in f else [],
            embedded_with=(
                f["embedded_with"][()].astype(int).tolist() if "embedded_with" in f else []
            ),
            stat=f["stat"][()] if "stat" in f else None,
            shard=[names[i] for i in f["shard"][()]] if "shard" in f else [],
            shard_row=f["shard_row"][()].astype(int).tolist() if "shard_row" in f else [],
        )
    except (KeyError, OSError, ValueError) as e:
        raise CacheError(
            f"feature cache '{path}' is damaged ({e}); delete it and rerun `make features`"
        ) from None


def _str_ds(g: h5py.Group, name: str, values: list[str]) -> None:
    g.create_dataset(name, data=np.array(values, dtype=object), dtype=STR)


def _runs(shard: list[str], row: list[int]) -> list[tuple[int, int, str, int]]:
    """(start, stop, shard, first shard row) for each run of consecutive rows of one shard."""
    out: list[tuple[int, int, str, int]] = []
    for i, (s, r) in enumerate(zip(shard, row, strict=True)):
        if out and out[-1][2] == s and out[-1][3] + (i - out[-1][0]) == r and out[-1][1] == i:
            a, _, s0, r0 = out[-1]
            out[-1] = (a, i + 1, s0, r0)
        else:
            out.append((i, i + 1, s, r))
    return out


def _virtual(
    f: h5py.File,
    name: str,
    runs: list[tuple[int, int, str, int]],
    shard_dir: str,
    shard_rows: dict[str, int],
    row_shape: tuple[int, ...],
    dtype: Any,
) -> None:
    n = runs[-1][1] if runs else 0
    layout = h5py.VirtualLayout(shape=(n,) + row_shape, dtype=dtype)
    for a, b, s, r in runs:
        src = h5py.VirtualSource(f"{shard_dir}/{s}", name, shape=(shard_rows[s],) + row_shape)
        layout[a:b] = src[r : r + (b - a)]
    f.create_virtual_dataset(name, layout, fillvalue=np.nan)


def write_index(
    path: Path,
    rows: list[dict[str, Any]],
    shard_rows: dict[str, int],
    feature_shape: tuple[int, ...],
    dtype: str,
    maps: bool,
    classes: list[str],
    skipped: list[dict[str, Any]],
    attrs: dict[str, Any],
) -> None:
    """Write a cache's index atomically: row metadata, plus virtual datasets over its shards.

    `rows` are dicts with path, sha256, label, split, view, embedded_with, stat, shard and
    shard_row; `shard_rows` gives each shard's row count. No feature is copied.
    """
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shard_dir = shards_dir(path).name
    runs = _runs([r["shard"] for r in rows], [int(r["shard_row"]) for r in rows])
    names = sorted({r["shard"] for r in rows})
    with replacing(tmp, path):
        with h5py.File(tmp, "w") as f:
            if maps:
                _virtual(f, "features", runs, shard_dir, shard_rows, tuple(feature_shape), dtype)
            for p in ("avg", "max"):
                _virtual(f, f"pooled/{p}", runs, shard_dir, shard_rows, (feature_shape[-1],), "f4")
            _str_ds(f, "paths", [r["path"] for r in rows])
            _str_ds(f, "sha256", [r["sha256"] for r in rows])
            _str_ds(f, "split", [r["split"] for r in rows])
            f.create_dataset("labels", data=np.array([r["label"] for r in rows], dtype=np.int32))
            f.create_dataset("view", data=np.array([r.get("view", 0) for r in rows], np.int16))
            f.create_dataset(
                "embedded_with", data=np.array([r.get("embedded_with", 0) for r in rows], np.int16)
            )
            f.create_dataset(
                "stat", data=np.array([r.get("stat", (0, 0, 0)) for r in rows], np.int64)
            )
            f.create_dataset(
                "shard", data=np.array([names.index(r["shard"]) for r in rows], np.int32)
            )
            f.create_dataset("shard_row", data=np.array([r["shard_row"] for r in rows], np.int32))
            _str_ds(f, "classes", classes)
            g = f.create_group("skipped")
            for name, key in (("paths", "path"), ("reasons", "reason"), ("sha256", "sha256")):
                _str_ds(g, name, [s[key] for s in skipped])
            g.create_dataset(
                "stat", data=np.array([s.get("stat", (0, 0, 0)) for s in skipped], np.int64)
            )
            for k, v in {**attrs, "shards": names, "maps": maps}.items():
                if isinstance(v, dict) or (isinstance(v, list) and v and isinstance(v[0], dict)):
                    v = json.dumps(v)
                elif isinstance(v, list):
                    v = np.array(v, dtype=object) if v and isinstance(v[0], str) else np.asarray(v)
                f.attrs[k] = v
            f.attrs["format_version"] = FORMAT_VERSION
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())


def shards_dir(path: Path) -> Path:
    """The folder of a cache's shards, next to its index (the VDS names it relatively)."""
    path = Path(path)
    return path.with_name(path.stem + ".shards")


def pool(block: np.ndarray, pooling: str) -> np.ndarray:
    """Pool (n, h, w, c) maps to (n, d) float32: global average, global max, or flatten."""
    if pooling == "avg":
        return block.astype(np.float32).mean(axis=(1, 2))
    if pooling == "max":
        return block.max(axis=(1, 2)).astype(np.float32)
    if pooling == "flatten":
        return block.reshape(len(block), -1).astype(np.float32)
    raise UserError(f"POOL must be one of {', '.join(POOLINGS)}; got '{pooling}'")


@dataclass
class Features:
    """Pooled features of one split, ready for a head."""

    X: np.ndarray
    y: np.ndarray
    paths: list[str]
    sha256: list[str]
    view: np.ndarray


def load_features(path: Path, pooling: str, split: str, max_view: int = 0) -> Features:
    """Read and pool the rows of `split` (views up to `max_view`) block by block."""
    with open_cache(path) as f:
        return features_of(f, index_of(f, path), pooling, split, max_view)


def features_of(f: h5py.File, idx: Index, pooling: str, split: str, max_view: int = 0) -> Features:
    """Rows of `split` from the open cache `f` (one consistent version of the file), as float32.

    avg and max read the stored pooled vectors (never the maps); flatten reads the maps. The
    result is filled into one preallocated array, block by block: no second copy at peak.
    """
    pool(np.zeros((1, 1, 1, 1), np.float32), pooling)  # validates the name first
    if max_view == 0 and "augment" in (idx.attrs.get("settings") or {}):
        name = Path(idx.path).name
        raise CacheError(
            f"'{name}' holds augmented views, not the images; pass the cache it belongs "
            f"to ('{name.replace('-augmented.h5', '.h5')}') or its ARTIFACTS folder"
        )
    keep = np.array(
        [s == split and v <= max_view for s, v in zip(idx.split, idx.view, strict=True)], bool
    )
    rows = np.flatnonzero(keep)
    shape = f_shape(idx)
    if pooling in ("avg", "max"):
        ds, d = f[f"pooled/{pooling}"], shape[-1]
    else:
        if "features" not in f:
            from pipeline.shards import missing_maps

            raise missing_maps("POOL=flatten")
        ds, d = f["features"], int(np.prod(shape))
    gone = missing_shards(idx.path, sorted({idx.shard[i] for i in rows}))
    if gone:
        raise CacheError(
            f"feature cache '{idx.path}' points at {len(gone)} missing shard file(s) in "
            f"'{shards_dir(idx.path).name}' (e.g. {gone[0]}); rerun `make features` (it embeds "
            "the missing rows again)"
        )
    X = np.empty((len(rows), d), np.float32)
    if len(rows):
        done, lo, hi = 0, int(rows[0]), int(rows[-1]) + 1
        step = max(1, (64 << 20) // (d * 4))  # about 64 MB a block
        for a in range(lo, hi, step):
            b = min(hi, a + step)
            sel = keep[a:b]
            m = int(sel.sum())
            if m:
                block = ds[a:b][sel]
                X[done : done + m] = pool(block, pooling) if pooling == "flatten" else block
                done += m
    if np.isnan(X).any():  # a virtual row whose shard vanished while reading
        raise CacheError(
            f"feature cache '{idx.path}' returned rows without features (a shard file went "
            "missing); rerun `make features`"
        )
    return Features(
        X=X,
        y=idx.labels[rows] if len(rows) else np.zeros(0, np.int64),
        paths=[idx.paths[i] for i in rows],
        sha256=[idx.sha256[i] for i in rows],
        view=np.array([idx.view[i] for i in rows], dtype=np.int64),
    )


def f_shape(idx: Index) -> tuple[int, ...]:
    return tuple(int(v) for v in idx.attrs["feature_shape"])


@contextmanager
def reading(folder: Path, exclusive_: bool = False) -> Iterator[None]:
    """Readers hold this shared while they read a cache; shard deletion holds it exclusive.

    A reader that opened an index keeps the shards it names: `make features` deletes unused
    shards only when no reader is between opening an index and having read its rows.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fh = open(folder / ".readers", "a+")
    except OSError:  # a read-only artifacts folder: nothing can delete shards either
        yield
        return
    try:
        fcntl.flock(fh, fcntl.LOCK_EX if exclusive_ else fcntl.LOCK_SH)
        yield
    finally:
        fh.close()


@contextmanager
def exclusive(folder: Path, what: str = "make features") -> Iterator[None]:
    """One writer per artifacts folder: a second one stops with a clear message."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fh = open(folder / ".lock", "a+")
    except OSError as e:
        raise UserError(
            f"cannot write to '{folder}' ({e.strerror}); make it writable or set ARTIFACTS "
            "to a writable folder"
        ) from None
    if not os.access(folder, os.W_OK):
        fh.close()
        raise UserError(
            f"cannot write to '{folder}' (read-only); make it writable or set ARTIFACTS "
            "to a writable folder"
        )
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another {what} is already writing to '{folder}'; wait for it to finish "
                "or use another ARTIFACTS folder"
            ) from None
        yield
    finally:
        fh.close()
