"""Content digests of a segment's datasets: what Fletcher-32 cannot see.

Fletcher-32, every dataset's checksum per chunk (`format.put`), sums 16-bit words modulo 65535:
a chunk whose bytes and stored checksum are all overwritten with zeros passes it, and so does a
word 0x0000 turned 0xFFFF (both are 0 modulo 65535). So a segment also keeps, per dataset, a
CRC-32 of each chunk of its rows as written: the table `crc32/<dataset>`
(`TABLES`; its attribute `rows` says how many rows a digest covers). Every read of whole chunks
checks them (`read`, `segments.read_rows`: the features a head trains on, predict's cached
rows, the index's columns), and VERIFY=1 checks every dataset (`segments.verify`). A digest that
does not match is a checksum failure like Fletcher-32's (`DigestMismatch`, an OSError the
segment's reader names: the segment is damaged, set aside once, its rows embedded again).

CRC-32 (zlib's, about 4.4 GB/s here against blake2b's 0.66) finds every burst of up to 32
flipped bits and a zeroed chunk; it guards against accidents, not tampering, as Fletcher-32
does. Segments written before have no tables and are read as they always were; the tables themselves
carry Fletcher-32 (a zeroed table no longer matches the data's digests either).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np

from pipeline.store.format import put

TABLES = "crc32"  # the group of a segment's digest tables, one per dataset
BLOCK = 64 << 20  # a read's size while digesting what is already on disk


class DigestMismatch(OSError):
    """A chunk of rows whose bytes are not those written (a checksum failure)."""

    def __init__(self, name: str, what: str) -> None:
        super().__init__(f"checksum (CRC-32) of '{name}' does not match: {what}")


def _digest(data: Any) -> int:
    return zlib.crc32(data)


def _rows(ds: h5py.Dataset) -> int:
    """How many rows a digest covers: a chunk's (the smallest read HDF5 makes anyway)."""
    return max(1, int(ds.chunks[0]) if ds.chunks else int(ds.shape[0]))


def _name(ds: h5py.Dataset) -> str:
    return str(ds.name).lstrip("/")


def _rows_of(block: np.ndarray, a: int, b: int) -> np.ndarray:
    return np.ascontiguousarray(block[a:b])


class Digester:
    """The digests of one dataset's rows, fed in order as they are written (`add`)."""

    def __init__(self, ds: h5py.Dataset) -> None:
        self.name, self.dtype = _name(ds), ds.dtype
        self.n, self.rows = int(ds.shape[0]), _rows(ds)
        self.sums = np.zeros(-(-self.n // self.rows), np.uint64)
        self.k = self.filled = 0
        self.crc = 0

    def add(self, block: np.ndarray) -> None:
        """The next rows, as stored (the dataset's dtype)."""
        assert block.dtype == self.dtype, (self.name, block.dtype, self.dtype)
        i = 0
        while i < len(block):
            take = min(len(block) - i, self.rows - self.filled)
            self.crc = zlib.crc32(_rows_of(block, i, i + take), self.crc)
            self.filled += take
            i += take
            if self.filled == self.rows or self.k * self.rows + self.filled == self.n:
                self.sums[self.k] = self.crc
                self.k, self.filled = self.k + 1, 0
                self.crc = 0

    @property
    def done(self) -> bool:
        return self.k == len(self.sums)

    def write(self, f: h5py.File) -> None:
        assert self.done, (self.name, self.k, len(self.sums))
        put(f, f"{TABLES}/{self.name}", self.sums).attrs["rows"] = self.rows


def _datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return [n for n in names if not n.startswith(TABLES + "/")]


def seal(f: h5py.File, known: Mapping[str, Digester | np.ndarray] | None = None) -> None:
    """Write the digest table of every dataset of the segment being written in `f` (call it
    last): from `known` (a `Digester` fed as rows were written, or the whole data in memory),
    else from the data read back (the small columns: metadata, key table, classes)."""
    known = known or {}
    for name in _datasets(f):
        ds = f[name]
        if not ds.shape or not ds.shape[0]:
            continue
        d = known.get(name)
        if isinstance(d, Digester) and d.done:
            d.write(f)
            continue
        out = Digester(ds)
        if isinstance(d, np.ndarray):
            out.add(np.asarray(d, ds.dtype))
        else:
            step = _step(ds, out.rows)
            for a in range(0, out.n, step):
                out.add(ds[a : a + step])
        out.write(f)


def _step(ds: h5py.Dataset, rows: int) -> int:
    """Rows of about BLOCK bytes, a whole number of digests."""
    row = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
    return max(rows, BLOCK // row // rows * rows)


class Table:
    """The digests of one dataset of an open segment (`of`: None for a segment without)."""

    def __init__(self, name: str, sums: h5py.Dataset, rows: int, n: int) -> None:
        self.name, self.sums, self.rows, self.n = name, sums, rows, n  # sums: read as needed
        self.seen = np.zeros(len(sums), bool)  # chunks checked already (read again: skipped)

    @classmethod
    def of(cls, ds: h5py.Dataset) -> Table | None:
        if not ds.shape or not ds.shape[0]:
            return None
        f = getattr(ds, "file", None)
        if f is None or TABLES not in f:
            return None  # written before digests (Fletcher-32 alone), or not a file's dataset
        name = _name(ds)
        where = f"{TABLES}/{name}"
        if where not in f:
            raise DigestMismatch(name, "its digest table is missing")
        t = f[where]
        rows, n = int(t.attrs.get("rows", 0)), int(ds.shape[0])
        if rows < 1 or t.shape != (-(-n // rows),):
            raise DigestMismatch(name, "its digest table does not fit its rows")
        return cls(name, t, rows, n)

    def span(self, a: int, b: int) -> tuple[int, int]:
        """The whole chunks of digests rows a..b lie in."""
        return a // self.rows * self.rows, min(self.n, -(-b // self.rows) * self.rows)

    def check(self, a: int, block: np.ndarray) -> None:
        """`block` is rows a.. (a whole number of digests, `span`): each digest must match."""
        r = self.rows
        assert a % r == 0 and (len(block) % r == 0 or a + len(block) == self.n)
        first = a // r
        if self.seen[first : first + -(-len(block) // r)].all():
            return
        sums = self.sums[first : first + -(-len(block) // r)]  # only the digests asked
        for i in range(0, len(block), r):
            k = (a + i) // r
            if self.seen[k]:
                continue
            if _digest(_rows_of(block, i, i + r)) != int(sums[k - first]):
                raise DigestMismatch(self.name, f"rows {a + i}..{min(self.n, a + i + r)}")
            self.seen[k] = True


def read(ds: h5py.Dataset, a: int = 0, b: int | None = None, table: Any = False) -> np.ndarray:
    """Rows a..b of `ds` (all by default), every chunk of them checked against its digest
    (the chunks are read whole: HDF5 reads and checksums them whole anyway). `table`: the
    dataset's `Table` if known (None: it has none)."""
    n = int(ds.shape[0]) if ds.shape else 0
    b = n if b is None else min(b, n)
    t = Table.of(ds) if table is False else table
    if t is None or b <= a:
        return ds[()] if not ds.shape else ds[a:b]
    a0, b0 = t.span(a, b)
    block = ds[a0:b0]
    t.check(a0, block)
    return block[a - a0 : b - a0]


def check_all(ds: h5py.Dataset) -> None:
    """Read `ds` whole, about BLOCK bytes at a time: Fletcher-32 and the digests (VERIFY=1)."""
    if not ds.shape:
        ds[()]
        return
    t = None if _name(ds).startswith(TABLES + "/") else Table.of(ds)
    step = _step(ds, t.rows if t is not None else 1)
    for a in range(0, int(ds.shape[0]), step):
        read(ds, a, a + step, t)
