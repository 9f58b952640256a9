"""Rows named, not read: what a streaming head and a cluster's workers learn from.

A `Rows` says where each row's features are (cache, segment, row in the segment, which pooled
dataset) and reads them only when asked, one segment file open at a time and at most about
64 MB at once, so a head can pass over ten million rows holding one block. It pickles small
(the names and a few integers per row): a cluster's workers read the rows themselves from
shared storage instead of receiving a feature matrix through the scheduler.

A shuffled pass takes randomly chosen chunks of consecutive rows (of this `Rows`' order) from
anywhere in the collection into a bounded buffer and shuffles the buffer (WebDataset's and
tf.data's shuffle buffer over interleaved shards), so every block mixes classes even when
segments hold rows in folder order. Blocks, chunks and shuffles follow the positions of this
`Rows`, never the files' order (each block is read file by file, then put in that order): a
head given rows in canonical order (`reader.canonical_rows`) learns the same, bit for bit,
however the cache was built. The price: a pass over more rows than one block reads each
block's rows from wherever the files keep them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.store.format import SIGNATURE, SIGNATURE_WIDTH
from pipeline.store.manifest import Index, shards_dir
from pipeline.store.pooling import dataset_of, pool
from pipeline.store.segments import BLOCK_BYTES, missing_maps, open_segment, read_rows

BUFFER_BYTES = 64 << 20  # one block of a pass
CHUNK_ROWS = 1024  # contiguous rows read together in a shuffled pass
READ = {"rows": 0, "blocks": 0}  # what this process has read through `Rows` (benches, tests)


@dataclass(frozen=True)
class Part:
    """One cache's segments and the dataset read from them."""

    folder: str  # the cache's segment folder, absolute
    names: tuple[str, ...]  # segment file names, by the rows' `seg` numbers
    dataset: str  # pooled/avg, pooled/max or features
    pooling: str
    dim: int


def _pool(block: np.ndarray, pooling: str) -> np.ndarray:
    return block if block.ndim == 2 and pooling != "flatten" else pool(block, pooling)


class Rows:
    """Features of chosen rows of one or more caches, read block by block when asked.

    Indexing with integer arrays, a boolean mask or a slice gives another `Rows` (nothing is
    read); `blocks()` yields (positions, float32 features) a block at a time; `load()` reads
    them all (for a head that needs them in memory).
    """

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(
        self, parts: tuple[Part, ...], part: np.ndarray, seg: np.ndarray, row: np.ndarray
    ) -> None:
        self.parts = parts
        self.part = np.asarray(part, np.int8)
        self.seg = np.asarray(seg, np.int32)
        self.row = np.asarray(row, np.int64)
        self._whole: tuple[np.ndarray, np.ndarray] | None = None  # see `_read`

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_whole": None}  # sent to a worker: names, not features

    @classmethod
    def of_index(cls, idx: Index, rows: np.ndarray, pooling: str) -> Rows:
        """Rows `rows` of the cache `idx` (one consistent version of it) under `pooling`."""
        pool(np.zeros((1, 1, 1, 1), np.float32), pooling)  # validates the name
        name, d = dataset_of(idx, pooling)
        part = Part(
            str(shards_dir(idx.path).resolve()),
            tuple(e.name for e in idx.entries),
            name,
            pooling,
            int(d),
        )
        rows = np.asarray(rows, np.int64)
        return cls((part,), np.zeros(len(rows), np.int8), idx.seg[rows], idx.seg_row[rows])

    @staticmethod
    def concat(a: Rows, b: Rows) -> Rows:
        """The rows of `a`, then those of `b` (another cache: the augmented views)."""
        if a.shape[1] != b.shape[1]:
            raise ValueError("rows of different widths")
        return Rows(
            a.parts + b.parts,
            np.concatenate([a.part, b.part + len(a.parts)]),
            np.concatenate([a.seg, b.seg]),
            np.concatenate([a.row, b.row]),
        )

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.row), self.parts[0].dim if self.parts else 0)

    def __len__(self) -> int:
        return len(self.row)

    def __getitem__(self, key: Any) -> Rows:
        return Rows(self.parts, self.part[key], self.seg[key], self.row[key])

    def block_rows(self) -> int:
        """Rows per block: about BUFFER_BYTES of float32 features."""
        return max(1, BUFFER_BYTES // max(1, 4 * self.shape[1]))

    def _order(self) -> np.ndarray:
        """Positions sorted by file and row: the order that reads each file once, forwards."""
        return np.lexsort((self.row, self.seg, self.part))

    def _read(self, pos: np.ndarray) -> np.ndarray:
        """Features of positions `pos` (sorted by file and row), one segment open at a time."""
        whole = len(pos) == len(self) and len(pos) <= self.block_rows()
        if whole and self._whole is not None and np.array_equal(self._whole[0], pos):
            return self._whole[1].copy()  # every row in one block: read once, for every pass
        d = self.shape[1]
        out = np.empty((len(pos), d), np.float32)
        if not len(pos):
            return out
        READ["rows"] += len(pos)
        READ["blocks"] += 1
        key = self.part[pos].astype(np.int64) << 32 | self.seg[pos].astype(np.int64)
        cuts = np.flatnonzero(np.diff(key)) + 1
        done = 0
        for run in np.split(np.arange(len(pos)), cuts):
            p = self.parts[int(self.part[pos[run[0]]])]
            name = p.names[int(self.seg[pos[run[0]]])]
            rows = self.row[pos[run]]
            with open_segment(Path(p.folder) / name) as g:
                if p.dataset not in g:
                    raise missing_maps("POOL=flatten")
                ds = g[p.dataset]
                raw = int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
                step = max(1, BLOCK_BYTES // max(1, raw))  # at most about 64 MB read at once
                for a in range(0, len(rows), step):
                    part = rows[a : a + step]
                    into = out[done : done + len(part)]
                    if ds.ndim == 2 and ds.dtype == np.float32 and p.pooling != "flatten":
                        read_rows(ds, part, into)  # stored pooled vectors: straight into out
                    else:
                        into[:] = _pool(read_rows(ds, part), p.pooling)
                    done += len(part)
        if whole:
            self._whole = (pos.copy(), out.copy())
        return out

    def _in_order(self, pos: np.ndarray) -> np.ndarray:
        """Features of positions `pos` in that order: read file by file, then put in order."""
        by_file = np.lexsort((self.row[pos], self.seg[pos], self.part[pos]))
        X = self._read(pos[by_file])
        if np.array_equal(by_file, np.arange(len(pos))):
            return X
        back = np.empty_like(by_file)
        back[by_file] = np.arange(len(by_file))
        return X[back]

    def blocks(self, shuffle: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions, features) about 64 MB at a time, every row once, in an order set by the
        positions alone (never by the files'): the same rows in the same order give the same
        blocks, however the cache holding them was built.

        `shuffle=None` goes forwards through the positions; `shuffle=seed` takes seeded random
        chunks of consecutive positions into each block and shuffles the block.
        """
        n, per = len(self), self.block_rows()
        if shuffle is None:
            for a in range(0, n, per):
                pos = np.arange(a, min(n, a + per))
                yield pos, self._in_order(pos)
            return
        rng = np.random.default_rng(shuffle)
        chunk = max(1, min(CHUNK_ROWS, per // 8))
        chunks = np.arange(0, n, chunk)
        rng.shuffle(chunks)
        per_block = max(1, per // chunk)
        for a in range(0, len(chunks), per_block):
            pos = np.concatenate(
                [np.arange(c, min(n, c + chunk)) for c in chunks[a : a + per_block]]
            )
            pos = pos[rng.permutation(len(pos))]
            yield pos, self._in_order(pos)

    def file_blocks(self, per: int | None = None) -> Iterator[np.ndarray]:
        """Every position once, a block of at most `per` (default `block_rows`) at a time, in
        the order the files hold them: each segment is read once over a whole pass, whatever
        the positions' own order (a pass in position order would read every segment per block)."""
        order, per = self._order(), per or self.block_rows()
        for a in range(0, len(order), per):
            yield order[a : a + per]

    def file_order_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions, float32 features) about 64 MB at a time, every row once, in the order
        the files hold them (`file_blocks`): one read of each segment over the pass."""
        for pos in self.file_blocks():
            yield pos, self._read(pos)

    def column(self, name: str) -> np.ndarray:
        """Dataset `name` (`ident`, `path`, ...) of these rows in this order, as stored."""
        order = self._order()
        parts: list[np.ndarray] = []
        key = self.part[order].astype(np.int64) << 32 | self.seg[order].astype(np.int64)
        for run in np.split(order, np.flatnonzero(np.diff(key)) + 1) if len(order) else []:
            p = self.parts[int(self.part[run[0]])]
            with open_segment(Path(p.folder) / p.names[int(self.seg[run[0]])]) as g:
                parts.append(read_rows(g[name], self.row[run]))
        if not parts:
            return np.zeros(0, "S1")
        out = np.empty(len(order), parts[0].dtype if len(parts) == 1 else object)
        out[order] = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return out

    def signatures(self, pos: np.ndarray) -> np.ndarray:
        """The image signatures of positions `pos` (float32, in that order): NaN for rows
        whose segment was written before signatures were kept."""
        sub = self[np.asarray(pos, np.int64)]
        out = np.full((len(sub), SIGNATURE_WIDTH), np.nan, np.float32)
        order = sub._order()
        key = sub.part[order].astype(np.int64) << 32 | sub.seg[order].astype(np.int64)
        for run in np.split(order, np.flatnonzero(np.diff(key)) + 1) if len(order) else []:
            p = sub.parts[int(sub.part[run[0]])]
            with open_segment(Path(p.folder) / p.names[int(sub.seg[run[0]])]) as g:
                if SIGNATURE in g:
                    out[run] = read_rows(g[SIGNATURE], sub.row[run])
        return out

    def load(self) -> np.ndarray:
        """Every row's features in this order, in memory."""
        X = np.empty(self.shape, np.float32)
        order, per = self._order(), self.block_rows()  # each file once, forwards
        for a in range(0, len(order), per):
            pos = order[a : a + per]
            X[pos] = self._read(pos)
        return X


def materialize(X: Any) -> np.ndarray:
    """`X` as an array: the rows read when it names them, else as it is."""
    return X.load() if isinstance(X, Rows) else X
