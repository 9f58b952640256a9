"""The feature store: one HDF5 file per backbone setting, readable with plain h5py.

Layout (N rows, one per image):
  /features (N, h, w, c) float16 or float32    the backbone's map, enough for any pooling
  /paths    (N,) UTF-8, relative to DATA        /labels (N,) int32 into /classes
  /split    (N,) 'train' | 'validation'         /sha256 (N,) content hash of each file
  /classes  (C,) UTF-8 class names
  /view     (N,) int16: 0 the image itself, k its k-th augmented view
  /embedded_with (N,) int16 into attrs `embedders`: the decoder/framework versions of each row
  /skipped/paths, /skipped/reasons, /skipped/sha256   files that could not be read, and why
  attrs: cache_key, data_id, settings (JSON), embedders (JSON), each setting by name, environment

Crash safety: the .h5 file is only ever replaced whole (write to a temporary file, fsync, rename).
New features first go to a journal of per-batch `.npz` files (each written atomically), which a
rerun after a crash reuses, so a killed run loses at most the batch in flight.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import UserError

FORMAT_VERSION = 2  # 2: data_id, per-row embedded_with and embedders
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
            v = v.tolist()
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
        if f.attrs.get("format_version") != FORMAT_VERSION or "features" not in f:
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
        skipped = [
            {"path": p, "reason": r, "sha256": h}
            for p, r, h in zip(
                _strs(sk["paths"]), _strs(sk["reasons"]), _strs(sk["sha256"]), strict=True
            )
        ]
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
        )
    except (KeyError, OSError, ValueError) as e:
        raise CacheError(
            f"feature cache '{path}' is damaged ({e}); delete it and rerun `make features`"
        ) from None


def _str_ds(g: h5py.Group, name: str, values: list[str]) -> None:
    g.create_dataset(name, data=np.array(values, dtype=object), dtype=STR)


def write_cache(
    path: Path,
    rows: list[dict[str, Any]],
    sources: Iterator[tuple[np.ndarray, np.ndarray]],
    feature_shape: tuple[int, ...],
    dtype: str,
    classes: list[str],
    skipped: list[dict[str, str]],
    attrs: dict[str, Any],
) -> None:
    """Write a complete cache to `path` atomically.

    `rows` are dicts with path, sha256, label, split; `sources` yields (row_indices, features)
    blocks that together fill every row, so memory stays bounded by one block.
    """
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    n = len(rows)
    with replacing(tmp, path):
        with h5py.File(tmp, "w") as f:
            chunk = (max(1, min(n, 16)),) + tuple(feature_shape)
            ds = f.create_dataset(
                "features", shape=(n,) + tuple(feature_shape), dtype=dtype, chunks=chunk
            )
            filled = np.zeros(n, dtype=bool)
            for idx, feats in sources:
                order = np.argsort(idx)
                ds[idx[order]] = feats[order]
                filled[idx] = True
            if not filled.all():
                raise RuntimeError(f"{int((~filled).sum())} rows have no features")
            _str_ds(f, "paths", [r["path"] for r in rows])
            _str_ds(f, "sha256", [r["sha256"] for r in rows])
            _str_ds(f, "split", [r["split"] for r in rows])
            f.create_dataset("labels", data=np.array([r["label"] for r in rows], dtype=np.int32))
            f.create_dataset("view", data=np.array([r.get("view", 0) for r in rows], np.int16))
            f.create_dataset(
                "embedded_with", data=np.array([r.get("embedded_with", 0) for r in rows], np.int16)
            )
            _str_ds(f, "classes", classes)
            g = f.create_group("skipped")
            for name, key in (("paths", "path"), ("reasons", "reason"), ("sha256", "sha256")):
                _str_ds(g, name, [s[key] for s in skipped])
            for k, v in attrs.items():
                if isinstance(v, dict) or (isinstance(v, list) and v and isinstance(v[0], dict)):
                    v = json.dumps(v)
                elif isinstance(v, list):
                    v = np.asarray(v)
                f.attrs[k] = v
            f.attrs["format_version"] = FORMAT_VERSION
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())


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
    """Pooled rows of `split` from the open cache `f` (one consistent version of the file)."""
    pool(np.zeros((1, 1, 1, 1), np.float32), pooling)  # validates the name first
    rows = np.array(
        [
            i
            for i, (s, v) in enumerate(zip(idx.split, idx.view, strict=True))
            if s == split and v <= max_view
        ],
        dtype=np.int64,
    )
    ds = f["features"]
    blocks = [pool(ds[rows[i : i + CHUNK_ROWS]], pooling) for i in range(0, len(rows), CHUNK_ROWS)]
    d = int(np.prod(f_shape(idx))) if pooling == "flatten" else f_shape(idx)[-1]
    X = np.concatenate(blocks) if blocks else np.zeros((0, d), np.float32)
    return Features(
        X=X,
        y=idx.labels[rows] if len(rows) else np.zeros(0, np.int64),
        paths=[idx.paths[i] for i in rows],
        sha256=[idx.sha256[i] for i in rows],
        view=np.array([idx.view[i] for i in rows], dtype=np.int64),
    )


def f_shape(idx: Index) -> tuple[int, ...]:
    return tuple(int(v) for v in idx.attrs["feature_shape"])


class Journal:
    """Per-batch `.npz` files of features not yet in the .h5, written atomically, keyed by hash."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.key = folder, key
        self.features: dict[str, tuple[Path, int]] = {}
        self.skipped: dict[str, str] = {}
        self._seq = 0
        if folder.is_dir():
            self._load()

    def _load(self) -> None:
        for p in sorted(self.folder.glob("batch-*.npz")):
            try:
                with np.load(p, allow_pickle=False) as z:
                    if str(z["key"]) != self.key:
                        p.unlink()
                        continue
                    for i, h in enumerate(z["sha256"].astype(str)):
                        self.features[h] = (p, i)
                    for h, r in zip(
                        z["skipped_sha256"].astype(str),
                        z["skipped_reason"].astype(str),
                        strict=True,
                    ):
                        self.skipped[h] = r
                self._seq = max(self._seq, int(p.stem.split("-")[1]) + 1)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                p.unlink(missing_ok=True)  # a partial write from a crash: never trusted

    def add(self, sha256: list[str], feats: np.ndarray, skipped: dict[str, str]) -> None:
        """Persist one batch: after this returns, a crash cannot lose it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        p = self.folder / f"batch-{self._seq:07d}.npz"
        tmp = self.folder / f".tmp-{self._seq:07d}-{os.getpid()}.npz"
        self._seq += 1
        with replacing(tmp, p):
            np.savez(
                tmp,
                key=np.array(self.key),
                sha256=np.array([h.encode() for h in sha256], dtype="S80"),
                features=feats,
                skipped_sha256=np.array([s.encode("utf-8", "replace") for s in skipped], "S"),
                skipped_reason=np.array(list(skipped.values()), dtype=str),
            )
        for i, h in enumerate(sha256):
            self.features[h] = (p, i)
        self.skipped.update(skipped)

    def blocks(self, row_lists: dict[str, list[int]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row indices, features) for every journal entry that some row needs, file by file."""
        by_file: dict[Path, list[tuple[int, list[int]]]] = {}
        for h, rows in row_lists.items():
            p, i = self.features[h]
            by_file.setdefault(p, []).append((i, rows))
        for p, entries in by_file.items():
            with np.load(p, allow_pickle=False) as z:
                feats = z["features"]
            idx = [r for _, rows in entries for r in rows]
            src = [i for i, rows in entries for _ in rows]
            yield np.array(idx, dtype=np.int64), feats[src]

    def clear(self) -> None:
        if self.folder.is_dir():
            for p in self.folder.iterdir():
                p.unlink(missing_ok=True)
            self.folder.rmdir()
        self.features.clear()
        self.skipped.clear()


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
