"""Where things live in ARTIFACTS: the one module that knows the folder conventions.

ARTIFACTS/
  features/<backbone>-<layer>-<size>-<key12>.h5   a feature cache (+ `-augmented-seed<S>.h5` views)
  features/<...>.shards/g*.h5                       its segments (rows and features)
  features/current                                 name of the cache the latest `features` wrote
  features/predicted/<cache name>.h5 (+ .shards/)  features of predicted images, by content
  heads/<run>/                                     one trained head: result.json + saved files
  sweep/sweep.json                                 the latest sweep's ranking and learning curve
  report/report.{json,md,html}                     the report
  predictions.csv                                  the latest `predict` output (default)
"""

from __future__ import annotations

from pathlib import Path

from pipeline import outputs
from pipeline.errors import UserError


def features_dir(artifacts: Path) -> Path:
    return Path(artifacts) / "features"


def cache_path(artifacts: Path, name: str, layer: str, size: int, key: str) -> Path:
    """The cache file of one setting: its name says what it is, its key what made it."""
    return features_dir(artifacts) / f"{name}-{layer}-{size}-{key[:12]}.h5"


def augment_path(cache: Path, seed: int = 0) -> Path:
    """Where the augmented views of the cache at `cache`, drawn with `seed`, live.

    Each seed has its own file: changing SEED never discards the views of another.
    """
    cache = Path(cache)
    return cache.with_name(f"{cache.stem}-augmented-seed{int(seed)}.h5")


def predicted_path(cache: Path) -> Path:
    """Where the features of images predicted with the settings of the cache at `cache` live.

    A content store (`store.content`) in a folder of its own beside the caches, so that nothing
    that lists the caches (`features/*.h5`) takes it for one; its name is the cache's (same
    key). The views of TTA live beside it: `augment_path(predicted_path(cache), seed)`.
    """
    cache = Path(cache)
    return cache.parent / "predicted" / cache.name


def current_cache(artifacts: Path) -> Path:
    """The cache written by the latest `make features` in this artifacts folder."""
    ptr = features_dir(artifacts) / "current"
    if not ptr.is_file():
        raise UserError(
            f"no feature cache in '{features_dir(artifacts)}'; run `make features` first"
        )
    path = features_dir(artifacts) / ptr.read_text().strip()
    if not path.is_file():
        raise UserError(f"feature cache '{path}' is missing; rerun `make features`")
    return path


def set_current(artifacts: Path, cache: Path) -> None:
    """Point `current` at `cache` atomically."""
    outputs.write_text(features_dir(artifacts) / "current", Path(cache).name + "\n")


def cache_by_name(artifacts: Path, name: str) -> Path:
    """A cache file named in a run's record (records keep names, never absolute paths)."""
    return features_dir(artifacts) / name


def heads_dir(artifacts: Path) -> Path:
    return Path(artifacts) / "heads"


def sweep_file(artifacts: Path) -> Path:
    return Path(artifacts) / "sweep" / "sweep.json"


def report_dir(artifacts: Path) -> Path:
    return Path(artifacts) / "report"


def predictions_file(artifacts: Path) -> Path:
    return Path(artifacts) / "predictions.csv"


def export_file(artifacts: Path, cache: Path, pooling: str, fmt: str) -> Path:
    """Where `make export` writes when OUT is not given: export/<cache name>-<pool>.<fmt>."""
    return Path(artifacts) / "export" / f"{Path(cache).stem}-{pooling}.{fmt}"
