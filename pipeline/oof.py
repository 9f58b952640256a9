"""A run's out-of-fold probabilities: every class's, for every partition it can hold.

Cross-validation scores each training image once per partition with a head that never saw it.
Those probabilities are what the audit (likely label errors, every partition voting) and the
calibration (its temperature fitted across folds) learn from, so a run keeps them: `OOF`
collects them fold by fold, `save` writes `oof.h5` into the run (plain h5py: `probabilities`
(partitions, images, classes) float32, `fold` (partitions, images) the fold that scored each
image, `sha256` and `label` per image, rows in the run's canonical order) and `load` reads it
back. Memory stays bounded: partitions after the first are kept while they fit `MAX_BYTES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline import outputs
from pipeline.store.reader import file_order, texts

FILE = "oof.h5"
MAX_BYTES = 512 * 2**20  # partitions after the first are kept while all of them fit this
BLOCK = 65_536  # hashes read and written at a time


@dataclass
class OOF:
    """Out-of-fold probabilities of the scored images (originals), partition by partition."""

    rows: np.ndarray  # the training rows scored (originals), in the run's canonical order
    labels: np.ndarray  # their given labels
    n_classes: int
    probabilities: list[np.ndarray] = field(default_factory=list)  # (images, classes) each
    folds: list[np.ndarray] = field(default_factory=list)  # (images,) each, -1 unscored
    dropped: int = 0  # partitions scored but not kept (MAX_BYTES)

    @classmethod
    def of(cls, original: np.ndarray, y: np.ndarray, n_classes: int) -> OOF:
        rows = np.flatnonzero(original)
        return cls(rows, np.asarray(y)[rows].astype(np.int64), n_classes)

    def start(self) -> bool:
        """A new partition: False (nothing kept) when it would pass MAX_BYTES."""
        each = len(self.rows) * self.n_classes * 4
        if self.probabilities and each * (len(self.probabilities) + 1) > MAX_BYTES:
            self.dropped += 1
            return False
        self.probabilities.append(np.full((len(self.rows), self.n_classes), np.nan, np.float32))
        self.folds.append(np.full(len(self.rows), -1, np.int16))
        return True

    def put(self, te: np.ndarray, proba: np.ndarray, fold: int) -> None:
        """The scored rows `te` (training-row numbers) of the current partition."""
        at = np.searchsorted(self.rows, te)
        self.probabilities[-1][at] = proba
        self.folds[-1][at] = fold

    def spill(self, path: Path) -> Spilled:
        """Write what is held to `path` and return a handle that holds none of it: a sweep's
        race keeps each run's first partition on disk, not in memory, until it goes on."""
        with outputs.written(path) as tmp, h5py.File(tmp, "w") as f:
            f["rows"], f["labels"] = self.rows, self.labels
            for i, (p, fo) in enumerate(zip(self.probabilities, self.folds, strict=True)):
                f[f"p{i}"], f[f"f{i}"] = p, fo
            f.attrs["n_classes"], f.attrs["kept"] = self.n_classes, len(self.probabilities)
            f.attrs["dropped"] = self.dropped
        return Spilled(path)

    def save(self, folder: Path, sha256: Any, block: int = BLOCK) -> Path:
        """`oof.h5` in `folder`, written whole (`outputs.written`). `sha256` is the training
        set's hash column (`texts` reads it): the scored rows' hashes are read `block` rows at
        a time in the order the cache's files hold them (`store.reader.file_order`), never
        held as one list of strings."""
        path = folder / FILE
        n = len(self.rows)
        with (
            outputs.written(path) as tmp,
            h5py.File(tmp, "w") as f,
            outputs.scratch(folder, "oof") as scratch,
        ):
            k = self.n_classes if self.probabilities else 0
            for name, parts, shape in (
                ("probabilities", self.probabilities, (len(self.probabilities), n, k)),
                ("fold", self.folds, (len(self.folds), n)),
            ):  # a partition at a time: never a stacked copy of them all
                ds = f.create_dataset(
                    name, shape=shape, dtype=parts[0].dtype if parts else np.float32,
                    fletcher32=True, chunks=True if all(shape) else None, track_times=False,
                )  # fmt: skip
                for i, part in enumerate(parts):
                    ds[i] = part
            f.create_dataset("label", data=self.labels, fletcher32=True, track_times=False)
            # the hashes, read in the files' order, wait in a file (64 bytes a row on disk, not
            # in memory), then go into the dataset in its order, a block at a time
            hashes = np.lib.format.open_memmap(scratch / "sha256.npy", "w+", "S64", (n,))
            for pos in file_order(sha256, self.rows, block):
                at = np.searchsorted(self.rows, pos)
                hashes[at] = np.array([_hex(h) for h in texts(sha256, pos)], "S64")
            ds = f.create_dataset(
                "sha256", shape=(n,), dtype="S64", fletcher32=True, track_times=False,
                chunks=(max(1, min(n, block)),) if n else None,
            )  # fmt: skip
            for a in range(0, n, block):
                ds[a : a + block] = hashes[a : a + block]
            del hashes
            f.attrs["partitions_dropped"] = self.dropped
        return path


@dataclass(frozen=True)
class Spilled:
    """An `OOF` written to a file by `spill`; `resumed` reads it back (once) and removes it."""

    path: Path


def resumed(held: OOF | Spilled) -> OOF:
    """The `OOF` itself, or read back from its spilled file (then removed)."""
    if isinstance(held, OOF):
        return held
    with h5py.File(held.path, "r") as f:
        kept = int(f.attrs["kept"])
        out = OOF(
            f["rows"][...],
            f["labels"][...],
            int(f.attrs["n_classes"]),
            [f[f"p{i}"][...] for i in range(kept)],
            [f[f"f{i}"][...] for i in range(kept)],
            int(f.attrs["dropped"]),
        )
    held.path.unlink()
    return out


def _hex(h: Any) -> bytes:
    return h if isinstance(h, bytes) else str(h).encode()


@dataclass(frozen=True)
class Hashes:
    """`oof.h5`'s hashes, read from the file when indexed (64 bytes a row stay on disk)."""

    path: Path

    def __len__(self) -> int:
        with h5py.File(self.path, "r") as f:
            return len(f["sha256"])

    def __getitem__(self, key: Any) -> Any:
        with h5py.File(self.path, "r") as f:
            ds = f["sha256"]
            if isinstance(key, np.ndarray) and key.dtype != bool:  # any order, repeats
                u, back = np.unique(key, return_inverse=True)
                return ds[u][back] if len(u) else np.zeros(0, "S64")
            return ds[key]

    def __iter__(self) -> Any:
        for a in range(0, len(self), BLOCK):
            yield from self[a : a + BLOCK]


@dataclass(frozen=True)
class Saved:
    """`oof.h5` as read back: what the audit and the calibration take."""

    probabilities: np.ndarray  # (partitions, images, classes)
    fold: np.ndarray  # (partitions, images)
    label: np.ndarray
    sha256: Hashes  # hex, as bytes, read when indexed


def load(run_dir: Path) -> Saved | None:
    """The run's out-of-fold probabilities, or None for a run saved before they were kept."""
    path = run_dir / FILE
    if not path.exists():
        return None
    with h5py.File(path, "r") as f:
        return Saved(f["probabilities"][...], f["fold"][...], f["label"][...], Hashes(path))
