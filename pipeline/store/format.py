"""The store's on-disk conventions: format version, identities, keys, atomic writes, errors.

Every other store module builds on these; this one imports nothing of the store.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import UserError

# 4: a small index (the manifest) over few large immutable segments holding rows and features
FORMAT_VERSION = 4
STR = h5py.string_dtype("utf-8")
POOLINGS = ("avg", "max", "flatten")
POOLED = ("avg", "max")


class CacheError(UserError):
    """A cache file that is damaged or was made with other settings."""


def disk_error(e: OSError, path: Path) -> UserError | None:
    """A clear user error for a full disk, an unwritable folder or too many open files."""
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
    if too_many_open_files(e):
        return open_files_error(path)
    return None


def too_many_open_files(e: BaseException) -> bool:
    """Whether an OS or HDF5 error is the process's open-file limit (EMFILE, errno 24)."""
    text = str(e)
    return getattr(e, "errno", None) == errno.EMFILE or (
        "errno = 24" in text or "Too many open files" in text
    )


def open_files_error(path: Path) -> UserError:
    """The open-file limit, named with its value and the fix (never a missing file)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return UserError(
        f"too many open files while opening '{path}' (this process may open {soft}; "
        f"`ulimit -n` says so): raise the limit, e.g. `ulimit -n {max(4096, soft * 4)}` "
        f"(at most {hard} here), and rerun"
    )


def ident(sha256: str, view: int = 0) -> str:
    """A cached row's identity: its content hash, and which augmented view (0: none)."""
    return sha256 if view == 0 else f"{sha256}#{view}"


def prefix64(keys: np.ndarray) -> np.ndarray:
    """The first 16 hex digits of each hash in a bytes array, as uint64 (8 bytes a row).

    They sort as the hashes do; two contents share a prefix with odds of about 1 in 2^64 / n^2.
    """
    out = np.zeros(len(keys), np.uint64)
    step = 1 << 16  # a bounded temporary, whatever the number of rows
    for a in range(0, len(keys), step):
        part = np.ascontiguousarray(keys[a : a + step])
        raw = part.view(np.uint8).reshape(len(part), part.dtype.itemsize)[:, :16]
        nib = np.where(raw >= ord("a"), raw - (ord("a") - 10), raw - ord("0")).astype(np.uint64)
        acc = np.zeros(len(part), np.uint64)
        for i in range(16):
            acc = (acc << np.uint64(4)) | nib[:, i]
        out[a : a + step] = acc
    return out


def cache_key(settings: dict[str, Any]) -> str:
    """SHA-256 of the settings that determine the features (canonical JSON)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# data_id is a multiset hash: the sum modulo 2^256 of one SHA-256 per row, kept in the index
# (attribute DATA_SUM, 64 hex digits), so that a change adds and subtracts only the rows it
# changes; the id itself hashes this tag, the classes and that sum
DATA_ID_TAG = "data_id/2 sum mod 2^256 of sha256 [path, sha256, class, split]"
DATA_SUM = "data_sum"
DATA_MOD = 1 << 256


def row_term(path: str, sha256: str, label: str, split: str) -> int:
    """One row's share of data_id: SHA-256 of its path, content hash, class NAME and split.

    The class by name, not by position, so that a new class leaves the other rows' terms be.
    """
    text = json.dumps([path, sha256, label, split])
    return int.from_bytes(hashlib.sha256(text.encode()).digest(), "big")


def rows_sum(rows: Iterable[tuple[str, str, str, str]]) -> int:
    """The sum of `row_term` over (path, sha256, class name, split) rows, modulo 2^256."""
    return sum(row_term(*r) for r in rows) % DATA_MOD


def data_id_of(classes: list[str], total: int) -> str:
    """The content id of a cache whose rows' `rows_sum` is `total`."""
    h = hashlib.sha256(DATA_ID_TAG.encode())
    h.update(json.dumps(classes).encode())
    h.update(f"{total % DATA_MOD:064x}".encode())
    return h.hexdigest()


def stored_sum(attrs: dict[str, Any]) -> int | None:
    """The rows' sum an index keeps (DATA_SUM), or None: absent (an older cache) or unreadable."""
    v = attrs.get(DATA_SUM)
    if not isinstance(v, str) or len(v) != 64:
        return None
    try:
        return int(v, 16)
    except ValueError:
        return None


def sum_attr(total: int) -> str:
    """`total` as the DATA_SUM attribute writes it."""
    return f"{total % DATA_MOD:064x}"


def data_id(
    paths: list[str], sha256: list[str], labels: list[int], split: list[str], classes: list[str]
) -> str:
    """What a cache says about its images (every row's path, content, label, split), in full.

    Costs every row: the writer keeps the same id from the rows it changes (`stored_sum`).
    """
    names = (classes[int(v)] for v in labels)
    return data_id_of(classes, rows_sum(zip(paths, sha256, names, split, strict=True)))


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


def fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_attrs(obj: h5py.File | h5py.Group, attrs: dict[str, Any]) -> None:
    """Small scalar attributes as they are; dicts and lists as one JSON string each.

    Nothing that grows with the collection is ever an attribute (HDF5 caps them at 64 KiB).
    """
    for k, v in attrs.items():
        if isinstance(v, (dict, list, tuple)):
            v = json.dumps(v)
        obj.attrs[k] = v


JSON_ATTRS = ("settings", "environment", "extra", "embedders", "stamp", "feature_shape")


def read_attrs_of(obj: h5py.File | h5py.Group) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, np.ndarray):
            v = [x.decode() if isinstance(x, bytes) else x for x in v.tolist()]
        if isinstance(v, str) and (k in JSON_ATTRS or k == "data_stat"):
            try:
                v = json.loads(v)
            except ValueError:
                pass
        out[k] = v
    return out


def strs(ds: h5py.Dataset) -> list[str]:
    return list(ds.asstr()[()]) if ds.shape[0] else []


def str_ds(g: h5py.Group, name: str, values: list[str]) -> None:
    g.create_dataset(name, data=np.array(values, dtype=object), dtype=STR)
