"""`oof.h5`: a run's out-of-fold probabilities, written without holding every hash at once."""

from __future__ import annotations

import h5py
import numpy as np

from pipeline import oof
from pipeline.store.reader import ColumnOf


class Hashes(ColumnOf):
    """A hash column that records how many rows each read asks for."""

    def __init__(self, n: int) -> None:
        self.n, self.asked = n, []

    def __len__(self) -> int:
        return self.n

    def take(self, positions: np.ndarray) -> list[str]:
        self.asked.append(len(positions))
        return [f"{int(i):064x}" for i in positions]


def test_the_hashes_are_read_and_written_a_block_at_a_time(tmp_path):
    n, k = 1000, 3
    original = np.ones(n, bool)
    original[::7] = False  # views: not scored, not saved
    y = np.arange(n) % k
    every = oof.OOF.of(original, y, k)
    assert every.start()
    p = np.random.default_rng(0).dirichlet(np.ones(k), len(every.rows)).astype(np.float32)
    every.put(every.rows, p, 0)
    col = Hashes(n)
    every.save(tmp_path, col, block=100)
    assert col.asked and max(col.asked) <= 100  # never the whole list
    assert sum(col.asked) == len(every.rows)
    saved = oof.load(tmp_path)
    assert saved is not None
    assert [h.decode() for h in saved.sha256] == [f"{i:064x}" for i in every.rows]
    np.testing.assert_array_equal(saved.probabilities[0], p)
    np.testing.assert_array_equal(saved.label, y[every.rows])
    with h5py.File(tmp_path / oof.FILE) as f:
        assert f["sha256"].fletcher32 and f["sha256"].chunks[0] <= 100


def test_saving_holds_neither_every_hash_nor_a_stacked_copy(tmp_path):
    """Memory while `oof.h5` is written: a block of hashes and the partitions as they are,
    never the n x 64 bytes of every hash nor a stacked copy of the probabilities."""
    import tracemalloc

    n, k = 200_000, 2
    y = np.arange(n) % k
    every = oof.OOF.of(np.ones(n, bool), y, k)
    for _ in range(2):
        every.start()
        every.put(every.rows, np.full((n, k), 0.5, np.float32), 0)
    col = Hashes(n)
    tracemalloc.start()
    every.save(tmp_path, col, block=2048)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    every_hash, stacked = n * 64, 2 * n * k * 4  # 12.8 MB, 3.2 MB
    assert peak < every_hash / 2 and peak < 2 * stacked, peak
    saved = oof.load(tmp_path)
    assert saved is not None and saved.sha256[n - 1] == f"{n - 1:064x}".encode()
    np.testing.assert_array_equal(saved.probabilities[1], every.probabilities[1])
