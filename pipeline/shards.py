"""Immutable shard files: where a cache's feature rows live, written once, never modified.

Each batch that `make features` embeds becomes one shard (`<cache>.shards/s<seq>.h5`), written
to a temporary name, fsynced and renamed: after `add` returns, a crash cannot lose it. A shard
holds its rows' identities (content hash and view), their maps (unless MAPS=0), their pooled
vectors (avg and max), and the identities it could not read with the reasons. The cache's index
file maps its rows onto shard rows with HDF5 virtual datasets, so adding images writes only the
new shards and a new index; shards no index refers to are either a crashed run's work (resumed
when made by the same versions) or garbage (deleted once a new index is in place).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import UserError

POOLED = ("avg", "max")
STR = h5py.string_dtype("utf-8")


def pooled(maps: np.ndarray) -> dict[str, np.ndarray]:
    """Global average and max of (n, h, w, c) maps as float32 (n, c): what pooled heads read."""
    return {
        "avg": maps.astype(np.float32).mean(axis=(1, 2)),
        "max": maps.max(axis=(1, 2)).astype(np.float32),
    }


@dataclass
class ShardSet:
    """The shards of one cache: which identity lives where, and what could not be read."""

    folder: Path
    key: str
    where: dict[str, tuple[str, int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)  # shard name -> number of rows
    stamp_of: dict[str, str] = field(default_factory=dict)  # shard name -> versions stamp key
    keep: set[str] = field(default_factory=set)  # shards an index refers to: never deleted here
    _seq: int = 0

    def __post_init__(self) -> None:
        if self.folder.is_dir():
            self._load()

    def _load(self) -> None:
        for p in sorted(self.folder.glob("s*.h5")):
            try:
                with h5py.File(p, "r") as f:
                    if f.attrs.get("key") != self.key:
                        raise ValueError("another cache's shard")
                    idents = f["ident"][()].astype(str).tolist()
                    for i, h in enumerate(idents):
                        self.where.setdefault(h, (p.name, i))
                    for h, r in zip(
                        f["skipped/ident"][()].astype(str).tolist(),
                        f["skipped/reason"].asstr()[()].tolist(),
                        strict=True,
                    ):
                        self.skipped.setdefault(h, r)
                    self.rows[p.name] = len(idents)
                    self.stamp_of[p.name] = str(f.attrs.get("stamp", ""))
                self._seq = max(self._seq, int(p.stem[1:]) + 1)
            except (OSError, ValueError, KeyError) as e:
                if p.name in self.keep:
                    from pipeline.store import CacheError

                    raise CacheError(
                        f"shard '{p}' of the cache cannot be read ({e}); move it aside and "
                        "rerun `make features` (its rows are embedded again)"
                    ) from None
                p.unlink(missing_ok=True)  # torn by a crash, or not ours: never trusted
        for p in self.folder.glob(".tmp-*"):
            p.unlink(missing_ok=True)

    def add(
        self,
        idents: list[str],
        maps: np.ndarray | None,
        vectors: dict[str, np.ndarray],
        skipped: dict[str, str],
        stamp: str,
    ) -> str:
        """Write one shard atomically; return its name."""
        from pipeline.store import disk_error

        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"s{self._seq:08d}.h5"
        self._seq += 1
        path, tmp = self.folder / name, self.folder / f".tmp-{name}-{os.getpid()}"
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs["key"] = self.key
                f.attrs["stamp"] = stamp
                f.create_dataset("ident", data=np.array([h.encode() for h in idents], "S80"))
                if maps is not None:
                    f.create_dataset("features", data=maps)
                for p in POOLED:
                    f.create_dataset(f"pooled/{p}", data=vectors[p].astype(np.float32))
                f.create_dataset(
                    "skipped/ident", data=np.array([h.encode() for h in skipped], "S80")
                )
                f.create_dataset(
                    "skipped/reason", data=np.array(list(skipped.values()), object), dtype=STR
                )
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            err = disk_error(e, path)
            if err is not None:
                raise err from None
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        for i, h in enumerate(idents):
            self.where.setdefault(h, (name, i))
        self.skipped.update(skipped)
        self.rows[name] = len(idents)
        self.stamp_of[name] = stamp
        return name

    def forget(self, names: set[str]) -> None:
        """Drop shards (garbage, or another versions' unfinished work) from disk and memory."""
        for n in names:
            (self.folder / n).unlink(missing_ok=True)
            self.rows.pop(n, None)
            self.stamp_of.pop(n, None)
        self.where = {h: w for h, w in self.where.items() if w[0] not in names}

    def shape(self, name: str, dataset: str) -> tuple[int, ...]:
        with h5py.File(self.folder / name, "r") as f:
            return tuple(f[dataset].shape)

    def read(self, name: str, dataset: str, rows: list[int]) -> np.ndarray:
        with h5py.File(self.folder / name, "r") as f:
            data = f[dataset][()]
        return data[rows]


def missing_maps(what: str) -> UserError:
    return UserError(
        f"{what} needs the feature maps, and this cache holds pooled vectors only (MAPS=0); "
        "rerun `make features MAPS=1` (another cache) or use POOL=avg / POOL=max"
    )


def info(folder: Path) -> dict[str, Any]:
    """Shard count and bytes on disk, for the bench and the waste check."""
    files = list(folder.glob("s*.h5")) if folder.is_dir() else []
    return {"shards": len(files), "bytes": sum(p.stat().st_size for p in files)}
