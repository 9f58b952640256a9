"""`make features`: run the frozen backbone once per image content and cache the maps in HDF5.

A rerun hashes every file, embeds only content it has not seen under the same settings, drops
rows of removed files, and reuses a crashed run's journal. Decoding runs in threads, overlapped
with the backbone; batches stream to the journal, so memory does not grow with the dataset.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import dataset, images, store
from pipeline.backbone import BackboneSpec, file_sha256, output_shape
from pipeline.errors import UserError
from pipeline.progress import Progress
from pipeline.provenance import environment

DTYPES = ("float16", "float32")
RANDOM_BANNER = (
    "RANDOM WEIGHTS: features come from an untrained VGG16 (WEIGHTS=none); accuracies are NOT "
    "those of transfer learning"
)

Log = Callable[[str], None]


@dataclass
class Summary:
    """What a `make features` run did."""

    cache: Path
    new: int
    cached: int
    removed: int
    skipped: int
    resumed: int
    seconds: float
    embed_seconds: float
    rewrote: bool

    def line(self) -> str:
        extra = f" ({self.resumed} resumed from an interrupted run)" if self.resumed else ""
        return (
            f"embedded {self.new} new, {self.cached} cached{extra}, {self.removed} removed, "
            f"{self.skipped} skipped"
        )


def features_dir(artifacts: Path) -> Path:
    return Path(artifacts) / "features"


def cache_settings(spec: BackboneSpec, dtype: str) -> dict[str, Any]:
    """Every setting that determines the cached features; hashed into the cache key."""
    if dtype not in DTYPES:
        raise UserError(f"DTYPE must be one of {', '.join(DTYPES)}; got '{dtype}'")
    return {
        **spec.settings(),
        "resize": images.RESIZE_POLICY,
        "background": list(images.BACKGROUND),
        "loader_version": images.LOADER_VERSION,
        "dtype": dtype,
        "format_version": store.FORMAT_VERSION,
    }


def cache_path(artifacts: Path, spec: BackboneSpec, key: str) -> Path:
    return features_dir(artifacts) / f"{spec.name}-{spec.layer}-{spec.input_size}-{key[:12]}.h5"


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


def _hash_all(root: Path, items: list[dataset.Item]) -> list[str | None]:
    def one(it: dataset.Item) -> str | None:
        try:
            return file_sha256(root / it.path)
        except OSError:
            return None

    with ThreadPoolExecutor(max_workers=4) as ex:
        return list(ex.map(one, items))


def _load(path: Path, size: int) -> np.ndarray | str:
    try:
        return images.load_image(path, size)
    except images.ImageError as e:
        return str(e)
    except MemoryError:
        return "image too large to decode in memory"


def _batches(
    todo: list[tuple[str, Path]], size: int, batch: int, workers: int
) -> Iterator[tuple[list[str], list[np.ndarray | str]]]:
    """Decoded batches in order; the next batch decodes in threads while the caller embeds."""
    with ThreadPoolExecutor(max_workers=workers) as ex:
        chunks = [todo[i : i + batch] for i in range(0, len(todo), batch)]
        pending = [ex.submit(_load, p, size) for _, p in chunks[0]] if chunks else []
        for k, chunk in enumerate(chunks):
            current = pending
            if k + 1 < len(chunks):
                pending = [ex.submit(_load, p, size) for _, p in chunks[k + 1]]
            yield [h for h, _ in chunk], [f.result() for f in current]


def extract(
    data: Path,
    artifacts: Path,
    spec: BackboneSpec,
    batch_size: int = 32,
    dtype: str = "float16",
    workers: int | None = None,
    log: Log = print,
    model: Any = None,
) -> Summary:
    """Bring the cache for `spec` up to date with the files under `data`; return what it did."""
    t0 = time.perf_counter()
    if batch_size < 1:
        raise UserError(f"BATCH must be a positive integer; got {batch_size}")
    settings = cache_settings(spec, dtype)
    key = store.cache_key(settings)
    scan = dataset.scan(data)
    for w in scan.warnings:
        log(f"warning: {w}")
    fdir = features_dir(artifacts)
    path = cache_path(artifacts, spec, key)
    if spec.random_weights:
        log(f"*** {RANDOM_BANNER} ***")
    with store.exclusive(fdir):
        for stale in fdir.glob("*.tmp-*"):
            stale.unlink(missing_ok=True)
        old = _read_old(path, key, log)
        journal = store.Journal(path.with_suffix(".journal"), key)
        hashes = _hash_all(scan.root, scan.items)
        known_bad = {s["sha256"]: s["reason"] for s in (old.skipped if old else []) if s["sha256"]}
        known_bad.update(journal.skipped)
        have = set(old.row_of if old else ()) | set(journal.features)
        resumed_idents = set(journal.features) - set(old.row_of if old else ())

        todo: dict[str, Path] = {}
        for it, h in zip(scan.items, hashes, strict=True):
            ident = h if h is not None else f"unhashable:{it.path}"
            if ident not in have and ident not in known_bad and ident not in todo:
                todo[ident] = scan.root / it.path

        embedded, embed_s = 0, 0.0
        if todo:
            embedded, embed_s = _embed(todo, spec, batch_size, workers, journal, dtype, model)

        rows: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        bad = {**known_bad, **journal.skipped}
        for it, h in zip(scan.items, hashes, strict=True):
            ident = h if h is not None else f"unhashable:{it.path}"
            if h is None and ident not in bad:
                bad[ident] = "could not be read"
            if ident in bad:
                skipped.append(
                    {"path": dataset.display(it.path), "reason": bad[ident], "sha256": h or ""}
                )
            else:
                rows.append(
                    {
                        "path": dataset.display(it.path),
                        "sha256": h,
                        "label": it.label,
                        "split": it.split,
                    }
                )
        new_paths = {r["path"] for r in rows}
        removed = sum(1 for p in (old.paths if old else []) if p not in new_paths)
        counts_new = {h for h in journal.features if h not in resumed_idents}
        n_new = sum(1 for r in rows if r["sha256"] in counts_new)
        n_resumed = sum(1 for r in rows if r["sha256"] in resumed_idents)

        unchanged = (
            old is not None
            and not journal.features
            and [(r["path"], r["sha256"], r["label"], r["split"]) for r in rows]
            == list(zip(old.paths, old.sha256, old.labels.tolist(), old.split, strict=True))
            and [(s["path"], s["reason"]) for s in skipped]
            == [(s["path"], s["reason"]) for s in old.skipped]
            and old.classes == scan.classes
        )
        if not unchanged:
            _write(path, rows, skipped, old, journal, scan, spec, settings, key, dtype)
            journal.clear()
        _point_current(fdir, path)
    for s in skipped:
        log(f"skipped {s['path']}: {s['reason']}")
    summary = Summary(
        cache=path,
        new=n_new,
        cached=len(rows) - n_new,
        removed=removed,
        skipped=len(skipped),
        resumed=n_resumed,
        seconds=time.perf_counter() - t0,
        embed_seconds=embed_s,
        rewrote=not unchanged,
    )
    log(summary.line())
    log(f"cache: {path}")
    return summary


def _read_old(path: Path, key: str, log: Log) -> store.Index | None:
    if not path.exists():
        return None
    try:
        return store.read_index(path, expect_key=key)
    except store.CacheError as e:
        aside = path.with_name(path.name + f".damaged-{int(time.time())}")
        os.replace(path, aside)
        log(f"warning: {e}; moved aside to '{aside.name}' and rebuilding")
        return None


def _embed(
    todo: dict[str, Path],
    spec: BackboneSpec,
    batch_size: int,
    workers: int | None,
    journal: store.Journal,
    dtype: str,
    model: Any,
) -> tuple[int, float]:
    from pipeline import backbone

    if model is None:
        model = backbone.build(spec)
    workers = workers or min(8, (os.cpu_count() or 2) + 2)
    progress = Progress(len(todo), "embedding")
    t0 = time.perf_counter()
    done = 0
    for idents, decoded in _batches(list(todo.items()), spec.input_size, batch_size, workers):
        ok = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        bad = {idents[i]: d for i, d in enumerate(decoded) if isinstance(d, str)}
        feats = np.zeros((0,) + output_shape(spec), np.float16)
        if ok:
            x = backbone.preprocess(np.stack([decoded[i] for i in ok]))
            feats = np.asarray(model.predict_on_batch(x))
        journal.add([idents[i] for i in ok], feats.astype(dtype), bad)
        done += len(ok)
        progress.update(len(idents))
    return done, time.perf_counter() - t0


def _write(
    path: Path,
    rows: list[dict[str, Any]],
    skipped: list[dict[str, str]],
    old: store.Index | None,
    journal: store.Journal,
    scan: dataset.Scan,
    spec: BackboneSpec,
    settings: dict[str, Any],
    key: str,
    dtype: str,
) -> None:
    from_old: dict[int, list[int]] = {}
    from_journal: dict[str, list[int]] = {}
    for r, row in enumerate(rows):
        h = row["sha256"]
        if h in journal.features:
            from_journal.setdefault(h, []).append(r)
        else:
            from_old.setdefault(old.row_of[h], []).append(r)

    def sources() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if from_old:
            with store.open_cache(old.path) as f:
                ds = f["features"]
                src = sorted(from_old)
                for i in range(0, len(src), store.CHUNK_ROWS):
                    part = src[i : i + store.CHUNK_ROWS]
                    block = ds[part]
                    idx = [r for s in part for r in from_old[s]]
                    rep = [j for j, s in enumerate(part) for _ in from_old[s]]
                    yield np.array(idx, dtype=np.int64), block[rep]
        for idx, block in journal.blocks(from_journal):
            yield idx, block.astype(dtype)

    attrs = {
        "cache_key": key,
        "settings": settings,
        **{k: v for k, v in settings.items() if isinstance(v, (str, int, float, bool))},
        "weights": spec.weights,
        "random_weights": spec.random_weights,
        "feature_shape": list(output_shape(spec)),
        "layout": scan.layout,
        "data_root": str(Path(scan.root).resolve()),
        "environment": environment(),
    }
    if spec.random_weights:
        attrs["banner"] = RANDOM_BANNER
    store.write_cache(
        path, rows, sources(), output_shape(spec), dtype, scan.classes, skipped, attrs
    )


def _point_current(fdir: Path, path: Path) -> None:
    tmp = fdir / f".current.tmp-{os.getpid()}"
    tmp.write_text(path.name + "\n")
    os.replace(tmp, fdir / "current")
