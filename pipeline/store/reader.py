"""Reading features: the rows a head needs, segment by segment, into one preallocated array.

One segment file is open at a time, read in contiguous blocks of about 64 MB, so reading costs
what reading the same bytes from one plain dataset costs, whatever the number of segments.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.store import digests
from pipeline.store.format import CacheError
from pipeline.store.manifest import Index, index_of, open_cache, shards_dir
from pipeline.store.pooling import dataset_of, pool
from pipeline.store.rows import Rows
from pipeline.store.segments import BLOCK_BYTES, decoded, missing_maps, open_segment, read_rows


@dataclass
class Features:
    """Pooled features of one split, ready for a head."""

    X: np.ndarray
    y: np.ndarray
    paths: list[str]
    sha256: list[str]
    view: np.ndarray


class ColumnOf:
    """Text of some rows of a cache (paths, or content hashes), read from the segments when
    asked: it holds the rows' names (the `Rows` of their features, shared), never a list of
    them all. `take` reads many at once, one segment open at a time."""

    def __init__(self, rows: Rows, name: str, prefix: np.ndarray | None = None) -> None:
        self.rows, self.name = rows, name
        self.prefix = prefix  # content hashes: their first 64 bits in memory (sorts, groups)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> str:
        return self.take(np.array([i]))[0]

    def take(self, positions: np.ndarray) -> list[str]:
        """The texts at `positions`, in that order."""
        text = decoded(self.rows[np.asarray(positions, np.int64)].column(self.name))
        return [t.split("#", 1)[0] for t in text] if self.name == "ident" else text


class WithViews:
    """A `ColumnOf` of a training set's images, then of its augmented views: a view's text is
    its image's (the same content hash, the path of the image in the current cache). It holds
    the views' image rows (`src`, 8 bytes a view) and the images' column, never the texts."""

    def __init__(self, base: ColumnOf, src: np.ndarray) -> None:
        self.base, self.src = base, np.asarray(src, np.int64)
        self.name = base.name

    @property
    def prefix(self) -> np.ndarray | None:
        """Every row's 64-bit hash prefix, made when asked (a temporary, not held)."""
        p = self.base.prefix
        return None if p is None else np.concatenate([p, p[self.src]])

    def __len__(self) -> int:
        return len(self.base) + len(self.src)

    def __getitem__(self, i: int) -> str:
        return self.take(np.array([i]))[0]

    def image_rows(self, positions: np.ndarray) -> np.ndarray:
        """The images' rows (of `base`) that `positions` name: a view names its image."""
        pos = np.array(positions, np.int64)  # a copy: rewritten in place
        if (pos < 0).any() or (pos >= len(self)).any():
            raise IndexError(f"positions outside the {len(self)} rows of this column")
        view = pos >= len(self.base)
        pos[view] = self.src[pos[view] - len(self.base)]
        return pos

    def take(self, positions: np.ndarray) -> list[str]:
        """The texts at `positions`, in that order."""
        return self.base.take(self.image_rows(positions))


def texts(col: Any, positions: Any) -> list[str]:
    """`col[i]` for each position: a list's items, or a `ColumnOf`'s read at once."""
    if isinstance(col, (ColumnOf, WithViews)):
        return col.take(np.asarray(positions, np.int64))
    return [col[int(i)] for i in positions]


def file_order(col: Any, positions: np.ndarray, block: int) -> Iterator[np.ndarray]:
    """`positions` of a text column (`texts`) a block at a time: in the order its cache's
    files hold them when it is read from a cache (one read of each segment over the pass,
    where blocks in position order would read every segment each), else as given."""
    positions = np.asarray(positions, np.int64)
    if isinstance(col, WithViews) and len(positions):  # a view reads its image's row
        positions = positions[col.base.rows[col.image_rows(positions)]._order()]
    elif getattr(col, "rows", None) is not None and len(positions):
        positions = positions[col.rows[positions]._order()]
    for a in range(0, len(positions), block):
        yield positions[a : a + block]


def load_features(
    path: Path, pooling: str, split: str, max_view: int = 0, canonical: bool = False
) -> Features:
    """Read and pool the rows of `split` (views up to `max_view`; `canonical`: in the order a
    head learns them, `canonical_rows`)."""
    with open_cache(path) as f:
        return features_of(f, index_of(f, path), pooling, split, max_view, canonical=canonical)


def features_of(
    f: h5py.File | None,
    idx: Index,
    pooling: str,
    split: str,
    max_view: int = 0,
    lazy: bool = False,
    canonical: bool = False,
) -> Features:
    """Rows of `split` of the cache `idx` (one consistent version), as float32.

    avg and max read the stored pooled vectors (never the maps); flatten reads the maps. Rows
    are filled into one preallocated array, one segment and one block at a time. `lazy`: X
    names the rows (`Rows`) and nothing is read. `canonical`: the rows in `canonical_rows`
    order (what a head learns from), else in the cache's own order.
    """
    pool(np.zeros((1, 1, 1, 1), np.float32), pooling)  # validates the name first
    if max_view == 0 and "augment" in (idx.attrs.get("settings") or {}):
        name = Path(idx.path).name
        base = name.split("-augmented", 1)[0] + ".h5"
        raise CacheError(
            f"'{name}' holds augmented views, not the images; pass the cache it belongs "
            f"to ('{base}') or its ARTIFACTS folder"
        )
    rows = np.flatnonzero(idx.mask(split, max_view))
    if canonical:
        rows = canonical_rows(idx, rows)
    if lazy:  # a few bytes per row: hashes as 64-bit prefixes, texts read when asked
        X = Rows.of_index(idx, rows, pooling)
        return Features(
            X=X,  # type: ignore[arg-type]
            y=idx.labels[rows] if len(rows) else np.zeros(0, np.int64),
            paths=ColumnOf(X, "path"),  # type: ignore[arg-type]
            sha256=ColumnOf(X, "ident", idx.key64[rows]),  # type: ignore[arg-type]
            view=idx.view_col[rows].astype(np.int64),
        )
    name, d = dataset_of(idx, pooling)
    X = np.empty((len(rows), d), np.float32)
    folder = shards_dir(idx.path)
    at = np.argsort(rows, kind="stable")  # X's positions in file order
    ordered = rows[at]  # in segment order: each segment's rows are one run
    moved = bool(len(rows)) and not np.array_equal(ordered, rows)

    def into(a: int, n: int) -> Any:  # where rows a..a+n (in file order) go in X
        return at[a : a + n] if moved else np.s_[a : a + n]

    seg = idx.seg[ordered]
    bounds = np.searchsorted(seg, np.arange(len(idx.entries) + 1))
    done = 0
    for k, e in enumerate(idx.entries):
        mine = ordered[bounds[k] : bounds[k + 1]]
        if not len(mine):
            continue
        srows = idx.seg_row[mine]
        with open_segment(folder / e.name) as g:
            if name not in g:
                raise missing_maps("POOL=flatten")
            ds = g[name]
            if name != "features" and not moved and digests.Table.of(ds) is not None:
                # straight into X, whole chunks read and checked against their digests
                read_rows(ds, srows, X[done : done + len(srows)])
                done += len(srows)
                continue
            if name != "features" and not moved:  # long runs straight into X: no copy
                cuts = np.flatnonzero(np.diff(srows) != 1) + 1
                if len(cuts) < max(1, len(srows) // 256):
                    for run in np.split(srows, cuts):
                        a, n = int(run[0]), len(run)
                        ds.read_direct(X, np.s_[a : a + n], np.s_[done : done + n])
                        done += n
                    continue
            step = max(1, BLOCK_BYTES // max(1, int(np.prod(ds.shape[1:])) * ds.dtype.itemsize))
            for a in range(0, len(srows), step):
                block = read_rows(ds, srows[a : a + step])
                X[into(done, len(block))] = pool(block, pooling) if name == "features" else block
                done += len(block)
    idents = idx.idents_of(ordered).astype(str).tolist()
    return Features(
        X=X,
        y=idx.labels[rows] if len(rows) else np.zeros(0, np.int64),
        paths=_placed(idx.paths_of(ordered), at, moved),
        sha256=_placed([h.split("#", 1)[0] for h in idents], at, moved),
        view=idx.view_col[rows].astype(np.int64),
    )


def _placed(items: list[str], at: np.ndarray, moved: bool) -> list[str]:
    """`items` (in file order) put at positions `at`: the order of the rows asked."""
    if not moved:
        return items
    out = np.empty(len(items), object)
    out[at] = items
    return out.tolist()


def canonical_rows(idx: Index, rows: np.ndarray) -> np.ndarray:
    """`rows` of `idx` in canonical order: by content hash, view, whole identity, then path.

    The order follows from the rows' identities alone, never from where the cache keeps them:
    a cache built in one run, resumed after a kill, grown folder by folder or merged another
    way hands a head the same rows in the same order, so every fold, inner split, shuffle and
    sample drawn from positions, and every list a run records, is the same. It sorts the
    64-bit hash prefixes and views held in memory; whole identities and paths are read only
    for the rows that tie on both (identical copies, or hashes sharing a prefix).
    """
    rows = np.asarray(rows, np.int64)
    if len(rows) < 2:
        return rows
    rows = rows[np.lexsort((idx.view_col[rows], idx.key64[rows]))]
    k, v = idx.key64[rows], idx.view_col[rows]
    run = np.cumsum(np.r_[True, (k[1:] != k[:-1]) | (v[1:] != v[:-1])]) - 1
    tied = np.flatnonzero(np.bincount(run)[run] > 1)
    if len(tied):
        mine = np.sort(rows[tied])  # read in file order, then matched back
        back = np.searchsorted(mine, rows[tied])
        ident = idx.idents_of(mine)[back]
        path = np.array(idx.paths_of(mine), dtype=object)[back].astype(str)
        rows[tied] = rows[tied][np.lexsort((path, ident, run[tied]))]
    return rows


def read_column(path: Path, name: str) -> np.ndarray:
    """Every row of one segment dataset (`features`, `pooled/avg`, ...) in index order, as stored.

    For tests and tools that want a whole column; heads use `features_of`.
    """
    with open_cache(path) as f:
        idx = index_of(f, path)
    folder = shards_dir(path)
    parts = []
    for k, e in enumerate(idx.entries):
        with open_segment(folder / e.name) as g:
            if name not in g:
                raise KeyError(name)
            parts.append(read_rows(g[name], idx.seg_row[idx.seg == k]))
    if not parts:
        return np.zeros((0,), np.float32)
    return np.concatenate(parts)
