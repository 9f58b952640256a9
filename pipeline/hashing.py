"""Each listed file's stat and content hash, as columns; a hash is reused where the stat says
the file is the one the cache hashed.

What a run holds per file here: its stat (size, mtime in ns, inode: 24 bytes) and its SHA-256
(32 raw bytes), a flag, and while it reuses the cache's hashes a sorted 64-bit key of its path
and its place (16 bytes); the cache's own rows are met as they stream from its segments. Files
are stat-ed and hashed in threads, a block at a time.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TypeVar

import numpy as np

from pipeline import images
from pipeline.listing import Listing

Stat = tuple[int, int, int]  # size, mtime in ns, inode
Known = tuple[str, Sequence[int], str]  # a path as shown, its stat when hashed, its hex hash
# the same for a block of files: UTF-8 paths and hex hashes (bytes arrays), stats (n, 3)
Block = tuple[np.ndarray, np.ndarray, np.ndarray]
STEP = 256  # files a block: what threads stat or hash together, the cache's rows met together
WORKERS = 4
T = TypeVar("T")


@dataclass
class Hashed:
    """Per listed file: its stat (zeros when it cannot be stat-ed) and, where `ok`, its content
    hash (32 raw bytes); else `reasons` says why it cannot be read."""

    stat: np.ndarray  # (n, 3) int64
    sha: np.ndarray  # (n, 32) uint8
    ok: np.ndarray  # bool
    reasons: dict[int, str] = field(default_factory=dict)
    read: int = 0  # files read to hash them (the others' hashes reused)

    def hex(self, i: int) -> str | None:
        return self.sha[i].tobytes().hex() if self.ok[i] else None

    def stat_of(self, i: int) -> Stat:
        a, b, c = self.stat[i].tolist()
        return (a, b, c)


def _key(path: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(path, digest_size=8).digest(), "little")


def blocks_of(items: Iterable[Known]) -> Iterator[Block]:
    """`Known` rows as blocks of `STEP`."""
    it = iter(items)
    while block := list(islice(it, STEP)):
        yield (
            np.array([p.encode() for p, _, _ in block], bytes),
            np.array([list(st) for _, st, _ in block], np.int64).reshape(-1, 3),
            np.array([h.encode() for _, _, h in block], bytes),
        )


def _stat(path: str) -> Stat | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _sha(path: str) -> str:
    """The file's hex SHA-256, or "!" and why it cannot be read."""
    try:
        return images.content_sha256(path)
    except images.ImageError as e:
        return "!" + str(e)


def _each(
    ex: ThreadPoolExecutor, fn: Callable[[str], T], base: str, listing: Listing, ks: np.ndarray
) -> Iterator[tuple[int, T]]:
    """(k, fn of listed file k) for each of `ks`, in threads, `STEP` files a block (a slice of
    it a task: no future per file)."""
    for a in range(0, len(ks), STEP):
        part = ks[a : a + STEP].tolist()
        paths = [os.path.join(base, listing.path(i)) for i in part]
        cut = -(-len(paths) // (4 * WORKERS))
        done = ex.map(
            lambda ps: [fn(p) for p in ps], [paths[b : b + cut] for b in range(0, len(paths), cut)]
        )
        yield from zip(part, (r for rs in done for r in rs), strict=True)


def hash_files(
    root: Path,
    listing: Listing,
    known: Iterable[Block] = (),
    also: Iterable[Known] = (),
    workers: int = WORKERS,
) -> Hashed:
    """Stat every listed file and hash it, unless `known` (blocks streamed: the cache's files,
    the last one of a path counting) or else `also` (the first one of a path) has its path with
    this stat and a hash: that hash is reused, the file not opened. A listed row with a problem
    is not touched: its problem is its reason."""
    n = len(listing)
    out = Hashed(np.zeros((n, 3), np.int64), np.zeros((n, 32), np.uint8), np.zeros(n, bool))
    out.reasons.update(listing.problems)
    base = os.fspath(root)
    statted = np.zeros(n, bool)
    todo = np.ones(n, bool)
    todo[list(listing.problems)] = False
    with ThreadPoolExecutor(max_workers=workers) as ex:
        for i, st in _each(ex, _stat, base, listing, np.flatnonzero(todo)):
            if st is not None:
                out.stat[i], statted[i] = st, True
        _reuse(listing, out, statted, known, also)
        todo &= ~out.ok
        out.read = int(np.count_nonzero(todo))
        for i, h in _each(ex, _sha, base, listing, np.flatnonzero(todo)):
            if h.startswith("!"):
                out.reasons[i] = h[1:]
            else:
                out.sha[i] = np.frombuffer(bytes.fromhex(h), np.uint8)
                out.ok[i] = True
    return out


def _reuse(
    listing: Listing,
    out: Hashed,
    statted: np.ndarray,
    known: Iterable[Block],
    also: Iterable[Known],
) -> None:
    """Mark `ok` the files whose path and stat a known row has, with its hash."""
    n = len(listing)
    keys = np.fromiter((_key(listing.shown(i).encode()) for i in range(n)), np.uint64, count=n)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    named = np.zeros(n, bool)  # a file some row of `known` names
    for source, first in ((known, False), (blocks_of(also), True)):
        for paths, stats, hashes in source:
            ks = np.fromiter((_key(p) for p in paths.tolist()), np.uint64, count=len(paths))
            lo = np.searchsorted(keys, ks, "left")
            hi = np.searchsorted(keys, ks, "right")
            for e in np.flatnonzero(hi > lo).tolist():
                for i in order[lo[e] : hi[e]].tolist():
                    if first and named[i]:
                        continue  # `also` does not override
                    if listing.shown(i).encode() != paths[e]:
                        continue
                    named[i] = True
                    h = bytes(hashes[e])
                    same = len(h) == 64 and statted[i] and bool((out.stat[i] == stats[e]).all())
                    out.ok[i] = same
                    if same:
                        out.sha[i] = np.frombuffer(bytes.fromhex(h.decode()), np.uint8)
            del paths, stats, hashes, ks, lo, hi  # freed before the next block is read
