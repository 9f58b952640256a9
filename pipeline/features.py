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
from dataclasses import dataclass, field
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
    skipped_rows: list[dict[str, str]] = field(default_factory=list)
    augmented: Summary | None = None

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


@dataclass(frozen=True)
class Job:
    """One row to be cached: a file, and which view of it (0: the image itself)."""

    path: str
    abspath: Path
    label: int
    split: str
    sha256: str | None
    view: int = 0

    @property
    def ident(self) -> str:
        if self.sha256 is None:
            return f"unhashable:{self.path}"
        return store.ident(self.sha256, self.view)


def _load(job: Job, size: int, augment_seed: int) -> np.ndarray | str:
    try:
        arr = images.load_image(job.abspath, size)
    except images.ImageError as e:
        return str(e)
    except MemoryError:
        return "image too large to decode in memory"
    if job.view:
        arr = images.augment(arr, images.view_rng(augment_seed, job.sha256 or "", job.view))
    return arr


def decoded_batches(
    todo: list[Job], size: int, batch: int, workers: int, augment_seed: int = 0
) -> Iterator[tuple[list[Job], list[np.ndarray | str]]]:
    """Decoded batches in order; the next batch decodes in threads while the caller embeds."""
    with ThreadPoolExecutor(max_workers=workers) as ex:
        chunks = [todo[i : i + batch] for i in range(0, len(todo), batch)]

        def submit(chunk: list[Job]) -> list[Any]:
            return [ex.submit(_load, j, size, augment_seed) for j in chunk]

        pending = submit(chunks[0]) if chunks else []
        for k, chunk in enumerate(chunks):
            current = pending
            if k + 1 < len(chunks):
                pending = submit(chunks[k + 1])
            yield chunk, [f.result() for f in current]


def augment_settings(settings: dict[str, Any], seed: int) -> dict[str, Any]:
    """The augmented-views cache's settings: the backbone's, plus the augmentation policy."""
    return {**settings, "augment": images.AUGMENT_POLICY, "augment_seed": seed}


def extract(
    data: Path,
    artifacts: Path,
    spec: BackboneSpec,
    batch_size: int = 32,
    dtype: str = "float16",
    workers: int | None = None,
    log: Log = print,
    model: Any = None,
    augment: int = 0,
    set_current: bool = True,
) -> Summary:
    """Bring the cache for `spec` up to date with the files under `data`; return what it did.

    With `augment=K`, also cache K augmented views of every training image (views 1..K) in a
    second file next to it; each view is seeded by the file's content and its number, so it is
    computed once, like the originals. `set_current=False` leaves `make train-head`'s default
    cache alone (used by `make finetune` for its block4_pool cache).
    """
    t0 = time.perf_counter()
    if batch_size < 1:
        raise UserError(f"BATCH must be a positive integer; got {batch_size}")
    if augment < 0:
        raise UserError(f"AUGMENT must be 0 or a positive number of views; got {augment}")
    settings = cache_settings(spec, dtype)
    key = store.cache_key(settings)
    scan = dataset.scan(data)
    for w in scan.warnings:
        log(f"warning: {w}")
    fdir = features_dir(artifacts)
    path = cache_path(artifacts, spec, key)
    if spec.random_weights:
        log(f"*** {RANDOM_BANNER} ***")
    ctx = _Ctx(spec, batch_size, dtype, workers, log, model, scan)
    with store.exclusive(fdir):
        for stale in fdir.glob("*.tmp-*"):
            stale.unlink(missing_ok=True)
        hashes = _hash_all(scan.root, scan.items)
        jobs = [
            Job(dataset.display(it.path), scan.root / it.path, it.label, it.split, h)
            for it, h in zip(scan.items, hashes, strict=True)
        ]
        summary, rows = _sync(path, key, settings, jobs, ctx)
        if set_current:
            _point_current(fdir, path)
        for s in summary.skipped_rows:
            log(f"skipped {s['path']}: {s['reason']}")
        log(summary.line())
        log(f"cache: {path}")
        if augment:
            aset = augment_settings(settings, spec.seed)
            akey = store.cache_key(aset)
            apath = augment_path(path)
            ajobs = [
                Job(r.path, r.abspath, r.label, r.split, r.sha256, v)
                for r in rows
                if r.split == "train"
                for v in range(1, augment + 1)
            ]
            asum, _ = _sync(apath, akey, aset, ajobs, ctx, augment_seed=spec.seed)
            log(f"augmented views ({augment} per training image): {asum.line()}")
            summary.augmented = asum
    summary.seconds = time.perf_counter() - t0
    return summary


def augment_path(path: Path) -> Path:
    """Where the augmented views of the cache at `path` live."""
    return path.with_name(path.stem + "-augmented.h5")


@dataclass
class _Ctx:
    spec: BackboneSpec
    batch_size: int
    dtype: str
    workers: int | None
    log: Log
    model: Any
    scan: dataset.Scan


def _sync(
    path: Path,
    key: str,
    settings: dict[str, Any],
    jobs: list[Job],
    ctx: _Ctx,
    augment_seed: int = 0,
) -> tuple[Summary, list[Job]]:
    """Make the cache at `path` hold exactly `jobs`, embedding only what no cache or journal has."""
    t0 = time.perf_counter()
    old = _read_old(path, key, ctx.log)
    journal = store.Journal(path.with_suffix(".journal"), key)
    old_rows = set(old.row_of) if old else set()
    known_bad = {s["sha256"]: s["reason"] for s in (old.skipped if old else []) if s["sha256"]}
    known_bad.update(journal.skipped)
    have = old_rows | set(journal.features)
    resumed = set(journal.features) - old_rows

    todo: dict[str, Job] = {}
    for j in jobs:
        if j.ident not in have and j.ident not in known_bad and j.ident not in todo:
            todo[j.ident] = j
    embed_s = 0.0
    if todo:
        if ctx.model is None:
            from pipeline import backbone

            ctx.model = backbone.build(ctx.spec)
        embed_s = _embed(list(todo.values()), ctx, journal, augment_seed)

    rows: list[Job] = []
    skipped: list[dict[str, str]] = []
    bad = {**known_bad, **journal.skipped}
    for j in jobs:
        if j.sha256 is None and j.ident not in bad:
            bad[j.ident] = "could not be read"
        if j.ident in bad:
            skipped.append({"path": j.path, "reason": bad[j.ident], "sha256": j.sha256 or ""})
        else:
            rows.append(j)
    new_paths = {(r.path, r.view) for r in rows}
    removed = (
        len({(p, v) for p, v in zip(old.paths, old.view, strict=True)} - new_paths) if old else 0
    )
    fresh = set(journal.features) - resumed
    n_new = sum(1 for r in rows if r.ident in fresh)
    n_resumed = sum(1 for r in rows if r.ident in resumed)
    unchanged = (
        old is not None
        and not journal.features
        and [(r.path, r.sha256, r.label, r.split, r.view) for r in rows]
        == list(zip(old.paths, old.sha256, old.labels.tolist(), old.split, old.view, strict=True))
        and [(s["path"], s["reason"]) for s in skipped]
        == [(s["path"], s["reason"]) for s in old.skipped]
        and old.classes == ctx.scan.classes
    )
    if not unchanged:
        _write(path, rows, skipped, old, journal, ctx, settings, key)
        journal.clear()
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
        skipped_rows=skipped,
    )
    return summary, rows


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


def _embed(todo: list[Job], ctx: _Ctx, journal: store.Journal, augment_seed: int) -> float:
    from pipeline import backbone

    workers = ctx.workers or min(8, (os.cpu_count() or 2) + 2)
    progress = Progress(
        len(todo),
        "embedding" if not augment_seed and not todo[0].view else "embedding augmented views",
    )
    t0 = time.perf_counter()
    size = ctx.spec.input_size
    for chunk, decoded in decoded_batches(todo, size, ctx.batch_size, workers, augment_seed):
        ok = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        bad = {chunk[i].ident: d for i, d in enumerate(decoded) if isinstance(d, str)}
        feats = np.zeros((0,) + output_shape(ctx.spec), ctx.dtype)
        if ok:
            x = backbone.preprocess(np.stack([decoded[i] for i in ok]))
            feats = np.asarray(ctx.model.predict_on_batch(x))
        journal.add([chunk[i].ident for i in ok], feats.astype(ctx.dtype), bad)
        progress.update(len(chunk))
    return time.perf_counter() - t0


def _write(
    path: Path,
    rows: list[Job],
    skipped: list[dict[str, str]],
    old: store.Index | None,
    journal: store.Journal,
    ctx: _Ctx,
    settings: dict[str, Any],
    key: str,
) -> None:
    from_old: dict[int, list[int]] = {}
    from_journal: dict[str, list[int]] = {}
    for r, row in enumerate(rows):
        if row.ident in journal.features:
            from_journal.setdefault(row.ident, []).append(r)
        else:
            from_old.setdefault(old.row_of[row.ident], []).append(r)

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
            yield idx, block.astype(ctx.dtype)

    spec, scan = ctx.spec, ctx.scan
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
        path,
        [
            {"path": r.path, "sha256": r.sha256, "label": r.label, "split": r.split, "view": r.view}
            for r in rows
        ],
        sources(),
        output_shape(spec),
        ctx.dtype,
        scan.classes,
        skipped,
        attrs,
    )


def _point_current(fdir: Path, path: Path) -> None:
    tmp = fdir / f".current.tmp-{os.getpid()}"
    tmp.write_text(path.name + "\n")
    os.replace(tmp, fdir / "current")
