"""The files a scan lists, as columns: a few bytes a file, not a Python object each.

A collection of ten million files is listed in about 40 bytes a file beyond its paths' own
bytes: every path in one UTF-8 blob (the file system's bytes as they are, `surrogateescape`)
with an offset each, a label (int32) and a split (uint8, an index into `SPLITS`); the few rows
that name no usable file carry their reason apart. An `Item` is made only when one is asked.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

import numpy as np

SPLITS = ("train", "validation")


@dataclass(frozen=True)
class Item:
    """One candidate file: `path` is relative to the data root (POSIX separators)."""

    path: str
    label: int
    split: str
    problem: str = ""  # why it cannot be used (a CSV row's); listed as skipped, never dropped


def _bytes(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


@dataclass
class Listing(Sequence[Item]):
    """Candidate files in their order: paths (`blob[offsets[i]:offsets[i + 1]]`), labels,
    splits and, by position, the reasons of the rows that name no usable file."""

    blob: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    label: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    split: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    problems: dict[int, str] = field(default_factory=dict)

    @classmethod
    def of(cls, items: Iterable[Item]) -> Listing:
        b = Builder()
        for it in items:
            b.add(it.path, it.label, it.split, it.problem)
        return b.done()

    def __len__(self) -> int:
        return len(self.label)

    @overload
    def __getitem__(self, i: int) -> Item: ...
    @overload
    def __getitem__(self, i: slice) -> list[Item]: ...
    def __getitem__(self, i: int | slice) -> Item | list[Item]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        split = SPLITS[int(self.split[i])]
        return Item(self.path(i), int(self.label[i]), split, self.problems.get(i, ""))

    def __iter__(self) -> Iterator[Item]:
        for i in range(len(self)):
            yield self[i]

    def raw(self, i: int) -> bytes:
        """The path's bytes as the file system gave them."""
        return self.blob[int(self.offsets[i]) : int(self.offsets[i + 1])].tobytes()

    def path(self, i: int) -> str:
        """The path as the file system names it (undecodable bytes as `surrogateescape`)."""
        return self.raw(i).decode("utf-8", "surrogateescape")

    def shown(self, i: int) -> str:
        """The path as valid UTF-8 (`dataset.display`): as the cache and the report name it."""
        return self.raw(i).decode("utf-8", "backslashreplace")

    def count(self, split: str) -> int:
        return int(np.count_nonzero(self.split == SPLITS.index(split)))

    def nbytes(self) -> int:
        """Bytes the columns hold (the reasons apart)."""
        cols = (self.blob, self.offsets, self.label, self.split)
        return sum(int(c.nbytes) for c in cols)


class Builder:
    """A listing grown a file at a time, in compact buffers (no object kept per file)."""

    def __init__(self) -> None:
        self.blob = bytearray()
        self.offsets = array("q", [0])
        self.label = array("i")
        self.split = array("B")
        self.problems: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.label)

    def add(self, path: str, label: int, split: str, problem: str = "") -> None:
        if problem:
            self.problems[len(self.label)] = problem
        self.blob += _bytes(path)
        self.offsets.append(len(self.blob))
        self.label.append(label)
        self.split.append(SPLITS.index(split))

    def extend(self, folder: str, names: Sequence[str], label: int, split: str) -> None:
        """Add `folder/name` for each name (one folder's files, in order)."""
        prefix = _bytes(folder + "/") if folder not in ("", ".") else b""
        for name in names:
            self.blob += prefix
            self.blob += _bytes(name)
            self.offsets.append(len(self.blob))
        self.label.extend([label] * len(names))
        self.split.extend([SPLITS.index(split)] * len(names))

    def done(self) -> Listing:
        """The listing (the buffers are shared, not copied)."""
        return Listing(
            np.frombuffer(self.blob, np.uint8) if self.blob else np.zeros(0, np.uint8),
            np.frombuffer(self.offsets, np.int64),
            np.frombuffer(self.label, np.int32) if self.label else np.zeros(0, np.int32),
            np.frombuffer(self.split, np.uint8) if self.split else np.zeros(0, np.uint8),
            self.problems,
        )
