"""`make features`: run the frozen backbone once per image content and cache the maps in HDF5.

A rerun reads no image whose size, mtime and inode are unchanged since it was hashed (`verify`
hashes every file again), embeds only content it has not seen under the same settings, and
writes only new shards plus a new index: existing rows are never rewritten, removed rows cost
nothing but the index. A crashed run's shards are resumed. Decoding runs in threads, overlapped
with the backbone; batches stream to shards, so memory does not grow with the dataset.
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

from pipeline import dataset, duplicates, images, layout, store
from pipeline.backbone import BackboneSpec, output_shape
from pipeline.batches import decoded_batches
from pipeline.errors import UserError
from pipeline.progress import Progress
from pipeline.provenance import difference, embedder, environment
from pipeline.shards import ShardSet, pooled

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


def cache_settings(spec: BackboneSpec, dtype: str, maps: bool = True) -> dict[str, Any]:
    """Every setting that determines the cached features; hashed into the cache key.

    The weights enter by content (`weights_id`), never by path or spelling.
    """
    if dtype not in DTYPES:
        raise UserError(f"DTYPE must be one of {', '.join(DTYPES)}; got '{dtype}'")
    return {
        **spec.settings(),
        "resize": images.RESIZE_POLICY,
        "background": list(images.BACKGROUND),
        "loader_version": images.LOADER_VERSION,
        "dtype": dtype,
        "maps": maps,
        "format_version": store.FORMAT_VERSION,
    }


def cache_path(artifacts: Path, spec: BackboneSpec, key: str) -> Path:
    return layout.cache_path(artifacts, spec.name, spec.layer, spec.input_size, key)


Stat = tuple[int, int, int]


def file_stat(path: Path) -> Stat | None:
    """(size, mtime in ns, inode) of the file a path leads to, without opening it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _hash_all(
    root: Path, items: list[dataset.Item], known: dict[str, tuple[Stat, str]]
) -> list[tuple[str | None, str, Stat]]:
    """(content hash, "", stat) of every file, or (None, the reason it cannot be read, stat).

    A file whose path, size, mtime and inode match `known` is not read: its hash is reused.
    """

    def one(it: dataset.Item) -> tuple[str | None, str, Stat]:
        if it.problem:  # a CSV row that names no usable file: listed as skipped with its reason
            return None, it.problem, (0, 0, 0)
        st = file_stat(root / it.path)
        prev = known.get(dataset.display(it.path))
        if st is not None and prev is not None and prev[0] == st and prev[1]:
            return prev[1], "", st
        try:
            return images.content_sha256(root / it.path), "", st or (0, 0, 0)
        except images.ImageError as e:
            return None, str(e), st or (0, 0, 0)

    with ThreadPoolExecutor(max_workers=4) as ex:
        return list(ex.map(one, items))


def _known_hashes(path: Path, key: str) -> dict[str, tuple[Stat, str]]:
    """path -> (stat, sha256) of every file the existing cache hashed (readable or not)."""
    if not path.is_file():
        return {}
    try:
        idx = store.read_index(path, expect_key=key)
    except store.CacheError:
        return {}
    out: dict[str, tuple[Stat, str]] = {}
    if idx.stat is not None:
        for p, h, st, v in zip(idx.paths, idx.sha256, idx.stat.tolist(), idx.view, strict=True):
            if v == 0:
                out[p] = (tuple(st), h)
    for sk in idx.skipped:
        if sk.get("sha256"):
            out.setdefault(sk["path"], (tuple(sk["stat"]), sk["sha256"]))
    return out


@dataclass(frozen=True)
class Job:
    """One row to be cached: a file, and which view of it (0: the image itself)."""

    path: str
    abspath: Path
    label: int
    split: str
    sha256: str | None
    view: int = 0
    reason: str = ""  # why the file could not be hashed (sha256 is None)
    stat: Stat = (0, 0, 0)

    @property
    def ident(self) -> str:
        if self.sha256 is None:
            return f"unhashable:{self.path}"
        return store.ident(self.sha256, self.view)


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
    rebuild: bool = False,
    verify: bool = False,
    maps: bool = True,
    embedder_fn: Any = None,
) -> Summary:
    """Bring the cache for `spec` up to date with the files under `data`; return what it did.

    With `augment=K`, also cache K augmented views of every training image (views 1..K) in a
    second file next to it; each view is seeded by the file's content and its number, so it is
    computed once, like the originals. `set_current=False` leaves `make train-head`'s default
    cache alone (used by `make finetune` for its block4_pool cache). `rebuild=True` embeds
    every image again (after a decoder or framework upgrade), replacing the cache whole.
    `verify=True` hashes every file even when its size, mtime and inode are unchanged.
    `maps=False` stores pooled vectors only (very large collections; another cache).
    `embedder_fn(spec, batches)` embeds somewhere else (a Dask cluster), yielding
    (jobs, decoded-or-reasons, maps) per batch; results are still written here, by one writer.
    """
    t0 = time.perf_counter()
    if batch_size < 1:
        raise UserError(f"BATCH must be a positive integer; got {batch_size}")
    if augment < 0:
        raise UserError(f"AUGMENT must be 0 or a positive number of views; got {augment}")
    settings = cache_settings(spec, dtype, maps)
    key = store.cache_key(settings)
    log(spec.describe())  # first: what computes the features (precision: its resolved value)
    scan = dataset.scan(data)
    for w in scan.warnings:
        log(f"warning: {w}")
    fdir = layout.features_dir(artifacts)
    path = cache_path(artifacts, spec, key)
    if spec.random_weights:
        log(f"*** {RANDOM_BANNER} ***")
    ctx = _Ctx(spec, batch_size, dtype, workers, log, model, scan, rebuild, maps, embedder_fn)
    with store.exclusive(fdir):
        for stale in fdir.glob("*.tmp-*"):
            stale.unlink(missing_ok=True)
        known = {} if (verify or rebuild) else _known_hashes(path, key)
        hashes = _hash_all(scan.root, scan.items, known)
        jobs = [
            Job(dataset.display(it.path), scan.root / it.path, it.label, it.split, h, 0, why, st)
            for it, (h, why, st) in zip(scan.items, hashes, strict=True)
        ]
        summary, rows = _sync(path, key, settings, jobs, ctx)
        if set_current:
            layout.set_current(artifacts, path)
        for sk in summary.skipped_rows:
            log(f"skipped {sk['path']}: {sk['reason']}")
        log(summary.line())
        for w in duplicates.lines(
            duplicates.find(
                [r.path for r in rows],
                [r.sha256 or "" for r in rows],
                [r.label for r in rows],
                [r.split for r in rows],
                scan.classes,
            )
        ):
            log(w)
        log(f"cache: {path}")
        if augment:
            aset = augment_settings(settings, spec.seed)
            akey = store.cache_key(aset)
            apath = layout.augment_path(path)
            ajobs = [
                Job(r.path, r.abspath, r.label, r.split, r.sha256, v, "", r.stat)
                for r in rows
                if r.split == "train"
                for v in range(1, augment + 1)
            ]
            asum, _ = _sync(apath, akey, aset, ajobs, ctx, augment_seed=spec.seed)
            log(f"augmented views ({augment} per training image): {asum.line()}")
            summary.augmented = asum
    summary.seconds = time.perf_counter() - t0
    return summary


@dataclass
class _Ctx:
    spec: BackboneSpec
    batch_size: int
    dtype: str
    workers: int | None
    log: Log
    model: Any
    scan: dataset.Scan
    rebuild: bool = False
    maps: bool = True
    embedder_fn: Any = None


def _sync(
    path: Path,
    key: str,
    settings: dict[str, Any],
    jobs: list[Job],
    ctx: _Ctx,
    augment_seed: int = 0,
) -> tuple[Summary, list[Job]]:
    """Make the cache at `path` hold exactly `jobs`, embedding only what no shard has.

    Writes new shards for new content and, when anything changed, a new index; shards no
    index refers to afterwards are deleted.
    """
    t0 = time.perf_counter()
    stamp = embedder()
    stamp_key = store.cache_key(stamp)
    old = None if ctx.rebuild else _read_old(path, key, ctx.log)
    referenced = set(old.shard) if old else set()
    shards = ShardSet(store.shards_dir(path), key, keep=referenced)
    # unfinished work of a crashed run is resumed only when made by these same versions
    shards.forget(
        {n for n, st in shards.stamp_of.items() if n not in referenced and st != stamp_key}
    )
    if ctx.rebuild:  # nothing is reused; the old shards go once the new index is in place
        shards.where.clear()
        shards.skipped.clear()
    old_where = (
        {h: (s, r) for h, s, r in zip(_idents(old), old.shard, old.shard_row, strict=True)}
        if old
        else {}
    )
    lost = {h for h, (n, _) in old_where.items() if n not in shards.rows}
    if lost:  # rows whose shard file is gone are embedded again, never served as NaN
        ctx.log(f"warning: {len(lost)} cached row(s) lost their shard file; embedding them again")
        old_where = {h: w for h, w in old_where.items() if h not in lost}
    known_bad = {s["sha256"]: s["reason"] for s in (old.skipped if old else []) if s["sha256"]}
    known_bad.update(shards.skipped)
    pending = {h for h, (n, _) in shards.where.items() if n not in referenced}
    resumed = pending - set(old_where)

    todo: dict[str, Job] = {}
    for j in jobs:
        if (
            j.sha256 is not None  # unreadable: listed with the reason its hashing gave
            and j.ident not in old_where
            and j.ident not in shards.where
            and j.ident not in known_bad
            and j.ident not in todo
        ):
            todo[j.ident] = j
    embed_s = 0.0
    if todo and old is not None:
        _refuse_mixing(path, old, stamp, len(todo))
    if todo:
        embed_s = _embed(list(todo.values()), ctx, shards, augment_seed, stamp_key)

    rows: list[Job] = []
    skipped: list[dict[str, Any]] = []
    bad = {**known_bad, **shards.skipped}
    for j in jobs:
        if j.sha256 is None and j.ident not in bad:
            bad[j.ident] = j.reason or "could not be read"
        if j.ident in bad:
            skipped.append(
                {"path": j.path, "reason": bad[j.ident], "sha256": j.sha256 or "", "stat": j.stat}
            )
        else:
            rows.append(j)
    if jobs and not rows:
        for sk in skipped:
            ctx.log(f"skipped {sk['path']}: {sk['reason']}")
        raise UserError(
            f"none of the {len(jobs)} files under '{ctx.scan.root}' could be read as an image "
            f"(e.g. {skipped[0]['path']}: {skipped[0]['reason']}); "
            + (
                "list JPEG, PNG, GIF, WebP, BMP or TIFF images in the CSV, with paths relative "
                "to its folder"
                if ctx.scan.layout == "csv"
                else "put JPEG, PNG, GIF, WebP, BMP or TIFF images in the class folders"
            )
        )
    # existing rows keep their place (the shards' runs stay contiguous); new rows go last
    position = {h: i for i, h in enumerate(_idents(old))} if old else {}
    rows.sort(key=lambda r: position.get(r.ident, len(position)))
    new_paths = {(r.path, r.view) for r in rows}
    removed = (
        len({(p, v) for p, v in zip(old.paths, old.view, strict=True)} - new_paths) if old else 0
    )
    n_new = sum(1 for r in rows if r.ident in todo)
    n_resumed = sum(1 for r in rows if r.ident in resumed)
    unchanged = (
        old is not None
        and not todo
        and not resumed
        and [(r.path, r.sha256, r.label, r.split, r.view, r.stat) for r in rows]
        == list(
            zip(
                old.paths,
                old.sha256,
                old.labels.tolist(),
                old.split,
                old.view,
                [tuple(s) for s in old.stat.tolist()],
                strict=True,
            )
        )
        and [(s["path"], s["reason"]) for s in skipped]
        == [(s["path"], s["reason"]) for s in old.skipped]
        and old.classes == ctx.scan.classes
        and dataset.same_source(old.attrs, ctx.scan)
    )
    if not unchanged:
        where = {**{h: w for h, w in shards.where.items()}, **old_where}
        _write(path, rows, skipped, old, where, shards, ctx, settings, key, stamp, stamp_key)
        used = {where[r.ident][0] for r in rows}
        with store.reading(path.parent, exclusive_=True):  # no reader mid-way through a read
            shards.forget(set(shards.rows) - used)
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


def _shard_shape(shards: ShardSet, name: str) -> tuple[int, ...]:
    """The feature shape one shard holds: its maps' shape, or (1, 1, C) from its pooled vectors."""
    try:
        return shards.shape(name, "features")[1:]
    except KeyError:  # MAPS=0: no maps; only the channel count is known and needed
        return (1, 1) + shards.shape(name, "pooled/avg")[1:]


def _idents(idx: store.Index | None) -> list[str]:
    if idx is None:
        return []
    return [store.ident(h, v) for h, v in zip(idx.sha256, idx.view, strict=True)]


def _refuse_mixing(path: Path, old: store.Index, stamp: dict[str, Any], n_new: int) -> None:
    """New rows made by other decoder/framework versions than the cached ones: refused."""
    made_with = old.attrs.get("embedders") or []
    others = [e for e in made_with if e != stamp]
    if not others:
        return
    raise UserError(
        f"the cache '{path.name}' was embedded with other decoder/framework versions "
        f"({difference(others[0], stamp)}); embedding {n_new} new image(s) now would mix two in "
        "one cache: rerun with REBUILD=1 to embed every image with this environment, or "
        "reinstall the versions the cache was made with"
    )


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
    todo: list[Job], ctx: _Ctx, shards: ShardSet, augment_seed: int, stamp_key: str
) -> float:
    """Embed `todo` batch by batch (here, or on a cluster); each batch becomes one shard."""
    workers = ctx.workers or min(8, (os.cpu_count() or 2) + 2)
    progress = Progress(
        len(todo),
        "embedding" if not augment_seed and not todo[0].view else "embedding augmented views",
    )
    t0 = time.perf_counter()
    if ctx.embedder_fn is not None:
        batches = ctx.embedder_fn(ctx.spec, todo, ctx.batch_size, augment_seed)
    else:
        batches = _local_batches(todo, ctx, workers, augment_seed)
    for chunk, reasons, maps in batches:
        ok = [j.ident for j in chunk if j.ident not in reasons]
        maps = np.asarray(maps).astype(ctx.dtype)
        shards.add(ok, maps if ctx.maps else None, pooled(maps), reasons, stamp_key)
        progress.update(len(chunk))
    return time.perf_counter() - t0


def _local_batches(
    todo: list[Job], ctx: _Ctx, workers: int, augment_seed: int
) -> Iterator[tuple[list[Job], dict[str, str], np.ndarray]]:
    """(jobs, {ident: reason} of the unreadable ones, maps of the others) per batch."""
    from pipeline import backbone

    if ctx.model is None:
        ctx.model = backbone.build(ctx.spec)
    size = ctx.spec.input_size
    for chunk, decoded in decoded_batches(todo, size, ctx.batch_size, workers, augment_seed):
        ok = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        bad = {chunk[i].ident: d for i, d in enumerate(decoded) if isinstance(d, str)}
        feats = np.zeros((0,) + output_shape(ctx.spec), np.float32)
        if ok:
            x = backbone.preprocess(np.stack([decoded[i] for i in ok]), ctx.spec.name)
            feats = np.asarray(ctx.model.predict_on_batch(x))
        yield chunk, bad, feats


def _write(
    path: Path,
    rows: list[Job],
    skipped: list[dict[str, Any]],
    old: store.Index | None,
    where: dict[str, tuple[str, int]],
    shards: ShardSet,
    ctx: _Ctx,
    settings: dict[str, Any],
    key: str,
    stamp: dict[str, Any],
    stamp_key: str,
) -> None:
    """Write the index: every row pointing at its shard row; no feature is copied."""
    old_embedders = (old.attrs.get("embedders") or []) if old else []
    embedders = [stamp] + [e for e in old_embedders if e != stamp]
    old_stamp = {}
    if old:
        old_stamp = {
            ident: embedders.index(old_embedders[e]) if e < len(old_embedders) else 0
            for ident, e in zip(_idents(old), old.embedded_with, strict=True)
        }
    made_with = [old_stamp.get(r.ident, 0) for r in rows]
    used = sorted(set(made_with))
    embedders = [embedders[i] for i in used]
    made_with = [used.index(i) for i in made_with]
    spec, scan = ctx.spec, ctx.scan
    # the shape the shards hold (read from a shard: no model is built when nothing was embedded)
    shape = _shard_shape(shards, where[rows[0].ident][0]) if rows else output_shape(spec)
    attrs = {
        "cache_key": key,
        "data_id": store.data_id(
            [r.path for r in rows],
            [r.sha256 or "" for r in rows],
            [r.label for r in rows],
            [r.split for r in rows],
            scan.classes,
        ),
        "embedders": embedders,
        "settings": settings,
        **{k: v for k, v in settings.items() if isinstance(v, (str, int, float, bool))},
        "weights": spec.weights,
        "random_weights": spec.random_weights,
        "feature_shape": list(shape),
        **dataset.source_attrs(scan),
        "environment": environment(),
    }
    if spec.random_weights:
        attrs["banner"] = RANDOM_BANNER
    store.write_index(
        path,
        [
            {
                "path": r.path,
                "sha256": r.sha256,
                "label": r.label,
                "split": r.split,
                "view": r.view,
                "embedded_with": e,
                "stat": r.stat,
                "shard": where[r.ident][0],
                "shard_row": where[r.ident][1],
            }
            for r, e in zip(rows, made_with, strict=True)
        ],
        dict(shards.rows),
        shape,
        ctx.dtype,
        ctx.maps,
        scan.classes,
        skipped,
        attrs,
    )
