"""Finding images by content costs in proportion to the identities asked, never to the rows
held: each segment carries a sorted key table, and a lookup reads only the chunks it needs."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.store import keys
from pipeline.store.content import Lookup
from pipeline.store.manifest import Entry
from pipeline.store.segment_writer import copy_rows, write_segment
from pipeline.store.segments import Meta

KEY, STAMP = "k" * 64, "s" * 64


def _sha(i: int) -> str:
    return f"{(i * 2654435761) % (1 << 64):016x}" + f"{i:048x}"


def _segment(folder: Path, idents: list[str], value: float = 0.0) -> Entry:
    """A segment of `idents` (pooled vectors only, one channel: the row's number + `value`)."""
    n = len(idents)
    meta = Meta(idents, ["x.png"] * n, [""] * n, ["predicted"] * n, [0] * n, [(1, 1, 1)] * n)
    v = (np.arange(n, dtype=np.float32) + value).reshape(n, 1)
    name = write_segment(folder, KEY, meta, {"avg": v, "max": v}, None, [], {}, STAMP)
    return Entry(name, n, STAMP)


@pytest.fixture
def read():
    """keys.READ from zero: what the lookup reads from now on."""
    for k in keys.READ:
        keys.READ[k] = 0
    return keys.READ


@pytest.fixture
def h5_reads(monkeypatch):
    """Values read from each dataset (by its name in the file), whoever reads them."""
    seen: dict[str, int] = {}
    real = h5py.Dataset.__getitem__

    def spy(self, *a, **k):
        out = real(self, *a, **k)
        seen[self.name] = seen.get(self.name, 0) + int(np.size(out))
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    return seen


def test_a_lookup_reads_in_proportion_to_the_identities_asked(tmp_path, read, h5_reads):
    folder = tmp_path / "c.shards"
    n = 50_000
    entries = [_segment(folder, [_sha(i) for i in range(k, n, 2)]) for k in (0, 1)]
    asked = [_sha(i) for i in range(0, n, n // 10)] + [_sha(n + 1)]  # 10 held, 1 not
    lookup = Lookup(folder, entries, STAMP)
    found = lookup.find(asked)
    assert [w is not None for w in found] == [True] * 10 + [False]
    # each found one's own row, read back
    block, ok = lookup.read([w for w in found if w], "pooled/avg")
    assert ok.all() and block[:, 0].tolist() == [i // 2 for i in range(0, n, n // 10)]
    # old code: every row's identity (50,000 values of 80 bytes); now the few candidates, and
    # per segment its fence plus a chunk of the table per identity asked
    assert h5_reads.get("/ident", 0) <= 11 and read["idents"] == h5_reads.get("/ident", 0)
    table = sum(v for k, v in h5_reads.items() if k.startswith("/keys/"))
    assert table == read["keys"] <= 2 * (n // 2 // keys.STEP + 1) + 2 * 11 * 2 * keys.STEP
    before = dict(read)
    lookup.find(asked[:2])  # the fences are held: a second batch reads its chunks only
    assert read["idents"] - before["idents"] <= 2
    assert read["keys"] - before["keys"] <= 2 * 2 * 2 * keys.STEP


def test_found_not_found_dead_rows_and_the_first_segment(tmp_path, read):
    folder = tmp_path / "c.shards"
    a = _segment(folder, [_sha(i) for i in range(300)] + [_sha(5)], value=0.0)  # 5 twice
    b = _segment(folder, [_sha(i) for i in range(200, 400)], value=1000.0)
    lookup = Lookup(folder, [a, b], STAMP)
    found = lookup.find([_sha(5), _sha(250), _sha(350), _sha(999), "", "x" * 81])
    assert found == [(a.name, 5), (a.name, 250), (b.name, 150), None, None, None]
    # removed rows are never found: the other copy is, or the next segment's row
    a.dead = np.array([5, 250], np.int64)
    found = Lookup(folder, [a, b], STAMP).find([_sha(5), _sha(250), _sha(7)])
    assert found == [(a.name, 300), (b.name, 50), (a.name, 7)]
    a.dead = np.array([5, 300], np.int64)
    assert Lookup(folder, [a, b], STAMP).find([_sha(5)]) == [None]
    # segments of other versions are never read
    other = Lookup(folder, [Entry(b.name, b.rows, "o" * 64)], STAMP)
    assert other.find([_sha(250), _sha(350)]) == [None, None]
    assert len(other) == 0


def test_identities_sharing_a_prefix_are_told_apart(tmp_path, read):
    folder = tmp_path / "c.shards"
    base = _sha(7)
    tie = base[:16] + "f" * 48  # another content with the same 64-bit prefix
    idents = [base, f"{base}#1", f"{base}#2", tie] + [_sha(i) for i in range(1000)]
    idents = idents[4:500] + idents[:4] + idents[500:]  # among other rows
    e = _segment(folder, [h for h in idents if h != _sha(7)] + [_sha(7)])
    at = {h: i for i, h in enumerate([h for h in idents if h != _sha(7)] + [_sha(7)])}
    ask = [tie, f"{base}#2", base, f"{base}#1", f"{base}#3", base[:16] + "e" * 48, "h0", "a"]
    found = Lookup(folder, [e], STAMP).find(ask)
    assert found[:4] == [(e.name, at[h]) for h in ask[:4]]
    assert found[4:] == [None] * 4
    assert read["idents"] <= 4 * 4  # the four rows sharing the prefix, per tied identity


def test_a_segment_without_a_key_table_is_still_found(tmp_path, read):
    folder = tmp_path / "c.shards"
    old = _segment(folder, [_sha(i) for i in range(500)] + ["h0", "late"])
    new = _segment(folder, [_sha(i) for i in range(500, 600)])
    with h5py.File(folder / old.name, "a") as f:  # as written before the tables existed
        del f["keys"]
    old.dead = np.array([3], np.int64)
    lookup = Lookup(folder, [old, new], STAMP)
    found = lookup.find([_sha(2), _sha(3), _sha(550), "late", "h0", _sha(700)])
    assert found == [(old.name, 2), None, (new.name, 50), (old.name, 501), (old.name, 500), None]
    assert read["idents"] >= 502  # its identity column, once: its table is built in memory
    before = read["idents"]
    assert lookup.find([_sha(9)]) == [(old.name, 9)]
    assert read["idents"] - before == 1


def test_merged_segments_carry_their_table(tmp_path):
    folder = tmp_path / "c.shards"
    e = _segment(folder, [_sha(i) for i in range(40)])
    out = copy_rows(folder, KEY, [(e.name, np.arange(3, 40), None)], {}, STAMP, "", limit=16)
    assert [k for _, k in out] == [16, 16, 5]  # written block by block (SegmentWriter)
    entries = [Entry(name, k, STAMP) for name, k in out]
    for name, k in out:
        with h5py.File(folder / name, "r") as f:
            prefix, row = f["keys/prefix"][()], f["keys/row"][()]
            assert len(prefix) == k and (np.diff(prefix.astype(np.float64)) >= 0).all()
            assert sorted(row.tolist()) == list(range(k))
            assert (keys.key_of(f["ident"][()])[row] == prefix).all()
    found = Lookup(folder, entries, STAMP).find([_sha(2), _sha(3), _sha(20), _sha(39)])
    assert found == [None, (out[0][0], 0), (out[1][0], 1), (out[2][0], 4)]
