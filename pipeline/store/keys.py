"""Key tables: a segment's rows found by identity without reading its identity column.

Each segment carries its own sorted key table, written once with it (a cost in proportion to
its rows; readable with plain h5py):

- `keys/prefix` (uint64, one per row): the 64-bit prefix of every row's identity
  (`format.prefix64` of its first 16 bytes), sorted;
- `keys/row` (int64, one per row): the row of each prefix, in that order (equal prefixes: rows
  ascending);
- `keys/fence` (uint64): every `step`-th prefix (`keys.attrs["step"]`), the table's chunks.

A lookup reads a segment's fence once (one value per `step` rows), then per batch of
identities only the chunks their prefixes fall in, then the identity values of the candidate
rows alone: different identities sharing a prefix (a content and its views, `hash#1`...) are
told apart exactly. Removed rows (`Entry.dead`) are never returned. A segment written before
the tables existed (no `keys` group) gets its table built in memory from its identity column,
once per lookup (16 bytes a row held).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import h5py
import numpy as np

from pipeline.store.format import prefix64, put

STEP = 128  # prefixes per chunk: one query reads about 1 KB of a segment's table
KIND = "prefix64"  # what `keys/prefix` holds; a table of another kind is not trusted
IDENT = "S80"  # the segments' identity column
# what this process has read to find rows (benches, tests): identity values, table entries
READ = {"idents": 0, "keys": 0}


def key_of(idents: np.ndarray) -> np.ndarray:
    """The uint64 key of each identity (bytes): `prefix64` of its first 16 bytes.

    Any bytes give a key (hex hashes give their sorted prefix); identities sharing a key are
    told apart by their full value.
    """
    return prefix64(np.asarray(idents).astype("S16"))


def write_table(f: h5py.File, keys: np.ndarray) -> dict[str, np.ndarray]:
    """Write the key table of a segment whose rows have `keys` (`key_of` its identities); its
    datasets as written, by name (the writer digests them, `digests.seal`)."""
    keys = np.asarray(keys, np.uint64)
    order = np.argsort(keys, kind="stable")
    prefix = keys[order]
    g = f.create_group("keys")
    g.attrs["kind"] = KIND
    g.attrs["step"] = STEP
    out = {"keys/prefix": prefix, "keys/row": order.astype(np.int64), "keys/fence": prefix[::STEP]}
    for name, values in out.items():
        put(g, name.split("/", 1)[1], values)
    return out


@dataclass
class Table:
    """What a lookup holds of one segment's key table: its fence (the table itself stays on
    disk), or for a segment without one the whole table, built in memory."""

    rows: int
    step: int
    fence: np.ndarray
    prefix: np.ndarray | None = None  # in memory (a segment without a table) or None
    row: np.ndarray | None = None

    @classmethod
    def of(cls, g: h5py.File) -> Table:
        """The table of the open segment `g`: its fence, or built from its identity column."""
        t = g.get("keys")
        n = int(g["ident"].shape[0])
        whole = isinstance(t, h5py.Group) and all(k in t for k in ("prefix", "row", "fence"))
        step = int(t.attrs.get("step", 0)) if whole else 0
        if (
            whole
            and t.attrs.get("kind") == KIND
            and step >= 1
            and len(t["prefix"]) == len(t["row"]) == n
            and len(t["fence"]) == -(-n // step)
        ):
            fence = t["fence"][()]
            READ["keys"] += len(fence)
            return cls(n, step, fence)
        col = g["ident"][()]  # none, of another kind, or damaged: made from the identities
        READ["idents"] += len(col)
        keys = key_of(col)
        order = np.argsort(keys, kind="stable")
        prefix = keys[order]
        return cls(len(col), STEP, prefix[::STEP], prefix, order.astype(np.int64))

    def find(self, g: h5py.File, idents: Sequence[bytes], dead: np.ndarray) -> list[int | None]:
        """The lowest live row of each identity in the open segment `g`, or None.

        Reads the chunks of the table the identities' keys fall in, and the identity values of
        the live rows whose key matches; nothing else.
        """
        out: list[int | None] = [None] * len(idents)
        if not self.rows or not len(idents):
            return out
        want = np.unique(key_of(np.array(list(idents), IDENT)))
        on_disk = self.prefix is None
        prefix = g["keys/prefix"] if on_disk else self.prefix
        row = g["keys/row"] if on_disk else self.row
        assert prefix is not None and row is not None
        # the chunks holding each key: from the last one starting below it (equal keys may
        # begin there) to the last one starting at or below it
        lo = np.maximum(np.searchsorted(self.fence, want, "left") - 1, 0)
        hi = np.searchsorted(self.fence, want, "right") - 1
        lo, hi = lo[hi >= 0], hi[hi >= 0]  # a key below the first one is not here
        spans: list[list[int]] = []
        for a, b in zip((lo * self.step).tolist(), ((hi + 1) * self.step).tolist(), strict=True):
            b = min(b, self.rows)  # `want` is sorted: so are the spans
            if spans and a <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], b)
            else:
                spans.append([a, b])
        if not spans:
            return out
        read = [prefix[a:b] for a, b in spans]
        at = np.concatenate([np.arange(a, b) for a, b in spans])
        pos = at[np.isin(np.concatenate(read), want)]  # sorted positions in the table
        if on_disk:
            READ["keys"] += len(at)
        if not len(pos):
            return out
        rows = []
        for run in np.split(pos, np.flatnonzero(np.diff(pos) > self.step) + 1):
            x, y = int(run[0]), int(run[-1]) + 1
            rows.append(row[x:y][run - x])
            READ["keys"] += (y - x) * on_disk
        cand = np.unique(np.concatenate(rows))
        if len(cand) and (cand[0] < 0 or cand[-1] >= self.rows):
            raise ValueError("the key table names rows the segment does not have")
        if len(dead):
            i = np.minimum(np.searchsorted(dead, cand), len(dead) - 1)
            cand = cand[dead[i] != cand]
        if not len(cand):
            return out
        READ["idents"] += len(cand)
        values = g["ident"][cand]  # increasing rows: h5py reads these alone
        first: dict[bytes, int] = {}
        for v, r in zip(values.tolist(), cand.tolist(), strict=True):
            first.setdefault(v, r)  # rows ascending: the lowest wins
        return [first.get(h) for h in idents]


def lookup_keys(idents: Sequence[str]) -> list[bytes | None]:
    """Identities as the bytes a segment holds, or None for one no segment can hold."""
    width = np.dtype(IDENT).itemsize
    out: list[bytes | None] = []
    for h in idents:
        b = h.encode()
        out.append(b if len(b) <= width and not b.endswith(b"\0") else None)
    return out
