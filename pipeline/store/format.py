"""The store's on-disk conventions: format version, identities, keys, atomic writes, errors.

Every other store module builds on these; this one imports nothing of the store.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import DiskFull, UserError

# 4: a small index (the manifest) over few large immutable segments holding rows and features
FORMAT_VERSION = 4
STR = h5py.string_dtype("utf-8")
POOLINGS = ("avg", "max", "flatten")
POOLED = ("avg", "max")
# each row's image signature (`pipeline.signature`): a dataset of segments written since it was
# kept (float16, SIGNATURE_WIDTH a row); a row without one (an older segment's) holds NaN
SIGNATURE, SIGNATURE_WIDTH = "signature", 64


class CacheError(UserError):
    """A cache file that is damaged or was made with other settings."""


FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no room: the disk, a quota, the size limit


def disk_error(
    e: OSError,
    path: Path,
    *,
    needed: int | None = None,
    kept: str = "the existing cache is intact",
    rerun: str = "`make features`",
) -> UserError | None:
    """A clear user error for a full disk, an unwritable folder or too many open files.

    No room (ENOSPC, EDQUOT, EFBIG) is a `DiskFull` naming the file system, its free space and,
    when known, about how much more `path` needs; `kept` says what is intact, `rerun` what to
    run again once there is room.
    """
    text = str(e).lower()
    if e.errno in FULL or "no space left" in text or "quota exceeded" in text:
        return DiskFull(full_message(e, path, needed, kept, rerun))
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) or "read-only" in text:
        return UserError(
            f"cannot write '{path}' ({e.strerror or e}); make the folder writable or set "
            "ARTIFACTS to a writable folder"
        )
    if too_many_open_files(e):
        return open_files_error(path)
    return None


def full_message(e: OSError, path: Path, needed: int | None, kept: str, rerun: str) -> str:
    """One line: what ran out while writing `path`, how much room there is and is needed."""
    room = f"the file system at '{mount_of(path)}' has {_free(path)} free"
    need = f"; about {human_bytes(needed)} needed" if needed else ""
    if e.errno == errno.EFBIG:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        cap = "unlimited" if limit == resource.RLIM_INFINITY else human_bytes(limit)
        return (
            f"file too large while writing '{path}' (the file-size limit, `ulimit -f`, is "
            f"{cap}, or the file system's largest file; {room}{need}); {kept}: raise the "
            f"limit or write elsewhere and rerun {rerun}"
        )
    what = "disk quota exceeded" if e.errno == errno.EDQUOT else "disk full"
    return (
        f"{what} while writing '{path}' ({room}{need}); {kept}: free some space and rerun {rerun}"
    )


def mount_of(path: Path) -> str:
    """The mount point of the file system `path` is (or would be) on."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    while not os.path.ismount(p):
        p = os.path.dirname(p)
    return p


def _free(path: Path) -> str:
    try:
        st = os.statvfs(mount_of(path))
    except OSError:
        return "an unknown amount"
    return human_bytes(st.f_bavail * st.f_frsize)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


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
def replacing(tmp: Path, path: Path, rename: bool = True, **told: Any) -> Iterator[None]:
    """Write `tmp` in the block, then rename it onto `path`: readers see the old or the new file.

    On failure `tmp` is removed; a full disk or an unwritable folder becomes one clear line
    (`told`: `disk_error`'s needed, kept and rerun). `rename=False`: the caller renames later.
    """
    try:
        yield
        if rename:
            os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        err = disk_error(e, path, **told)
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
    """Text of a dataset: variable-length (older files) or fixed-width UTF-8 (`str_ds`)."""
    return list(ds.asstr(errors="surrogateescape")[()]) if ds.shape[0] else []


def str_ds(g: h5py.Group, name: str, values: list[str]) -> h5py.Dataset:
    """Text as fixed-width UTF-8, checksummed like every dataset (`put`): variable-length text
    lives in HDF5's global heap, which no checksum covers."""
    raw = [str(v).encode("utf-8", "surrogateescape") for v in values]
    width = max([1] + [len(b) for b in raw])
    return put(g, name, np.array(raw, dtype=h5py.string_dtype("utf-8", width)))


# -- HDF5 files: every dataset checksummed, every write failure one line --------------------
# Every dataset carries HDF5's Fletcher-32 checksum per chunk (a plain h5py reader still reads
# it): a flipped bit fails its read, it is never served. Files are written in the HDF5 1.10
# format (`LIBVER`), whose metadata (superblock, object headers, chunk indexes) carries its own
# checksums too. Files written before hold unchecksummed datasets and read as they always did.
LIBVER = ("v110", "latest")
CHUNK_BYTES = 128 << 10  # a chunk: whole rows, about this many bytes (a read's smallest unit)
H5_OVERHEAD = 12 << 10  # what a small segment or index takes besides its data (headers, indexes)


def chunks_of(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks of whole rows of about CHUNK_BYTES (at least one row)."""
    row = max(1, int(np.prod(shape[1:], dtype=np.int64)) * max(1, itemsize))
    return (max(1, min(shape[0], CHUNK_BYTES // row)),) + tuple(shape[1:])


def put(
    g: h5py.Group,
    name: str,
    data: Any = None,
    shape: tuple[int, ...] | None = None,
    dtype: Any = None,
) -> h5py.Dataset:
    """Create dataset `name` (from `data`, or empty of `shape` and `dtype`) with a Fletcher-32
    checksum per chunk of whole rows."""
    if data is not None:
        data = np.asarray(data) if dtype is None else np.asarray(data, dtype=dtype)
        shape, dtype = data.shape, data.dtype
    assert shape is not None and dtype is not None
    shape = tuple(int(v) for v in shape)
    if not shape:  # a scalar: no chunks, no filter
        return g.create_dataset(name, data=data, shape=shape, dtype=dtype)
    chunks: Any = chunks_of(shape, np.dtype(dtype).itemsize) if shape[0] else True
    return g.create_dataset(
        name, shape=shape, dtype=dtype, data=data, chunks=chunks, fletcher32=True
    )


def os_error_of(e: BaseException) -> OSError | None:
    """The operating system's error behind an HDF5 failure, or None.

    h5py raises RuntimeError when closing a file that could not be written ("Can't decrement
    id ref count (... errno = 27, error message = 'File too large')"), and OSError without an
    errno for some write failures: the errno is only in the text.
    """
    if isinstance(e, OSError) and e.errno:
        return e
    if not isinstance(e, (OSError, RuntimeError)):
        return None
    text = str(e)
    m = re.search(r"errno = (\d+)", text)
    code = int(m.group(1)) if m else None
    low = text.lower()
    for words, c in (
        ("no space left", errno.ENOSPC),
        ("file too large", errno.EFBIG),
        ("quota exceeded", errno.EDQUOT),
    ):
        if code is None and words in low:
            code = c
    if code is None:
        return e if isinstance(e, OSError) else None
    return OSError(code, os.strerror(code))


def write_error(e: BaseException, path: Path, **told: Any) -> UserError | None:
    """`disk_error` of an OS or HDF5 error (its errno found in HDF5's text), or None."""
    os_err = os_error_of(e)
    return None if os_err is None else disk_error(os_err, path, **told)


def check_room(folder: Path, path: Path, needed: int | None, **told: Any) -> None:
    """Refuse, before writing, a file of at least `needed` bytes that the file-size limit
    (`ulimit -f`) or the free space of `folder`'s file system cannot hold: a write failing
    half-way costs more, and the line can say how much is needed."""
    if not needed:
        return
    import resource

    code = None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and needed > limit:
        code = errno.EFBIG
    else:
        try:
            st = os.statvfs(folder)
        except OSError:
            return
        free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
        if st.f_blocks > 0 and needed > free:  # some file systems report no sizes at all
            code = errno.ENOSPC
    if code is not None:
        err = disk_error(OSError(code, os.strerror(code)), path, needed=needed, **told)
        assert err is not None
        raise err


def close_h5(f: h5py.File) -> BaseException | None:
    """Close an HDF5 file; the error closing it (a write it could not finish) or None, so
    that it never reaches h5py's destructor ("Exception ignored ...")."""
    try:
        f.close()
    except Exception as e:  # noqa: BLE001 - returned to the caller, who names it
        return e
    return None


@contextmanager
def new_h5(tmp: Path, path: Path, needed: int | None = None, **told: Any) -> Iterator[h5py.File]:
    """A new HDF5 file to write in the block at `tmp`; closed, fsynced and renamed onto `path`
    when the block ends well (readers see the old file or the new one).

    The chunk cache is off, so a write that fails (no room) raises where it is made, never
    later in a destructor (h5py then says "Exception ignored" and HDF5 may crash); every
    failure closes the file explicitly, removes `tmp`, and a full disk, a quota or the
    file-size limit is one line (`disk_error`; `needed` and `told` say how much and what is
    intact). `needed`: the bytes the data alone takes, checked against the room first.
    """
    check_room(tmp.parent, path, needed, **told)
    f: h5py.File | None = None
    try:
        f = h5py.File(tmp, "w", libver=LIBVER, rdcc_nbytes=0)
        yield f
        done, f = f, None
        failed = close_h5(done)
        if failed is not None:
            raise failed
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if f is not None:
            close_h5(f)
        tmp.unlink(missing_ok=True)
        err = write_error(e, path, needed=needed, **told)
        if err is not None:
            raise err from None
        raise
