"""`make features`: run the frozen backbone once per image content and cache the maps in HDF5.

A rerun reads no image whose size, mtime and inode are unchanged since it was hashed (`verify`
hashes every file again), embeds only content it has not seen under the same settings, and
writes only new segments plus a new index (`pipeline.store`): existing rows are never embedded
again, and merges keep the number of files small. A killed run's batches are resumed. Decoding
runs in threads, overlapped with the backbone; batches stream to segments, so memory does not
grow with the dataset. The bytes decoded are hashed again: a file rewritten after it was hashed
is not cached under the old bytes' hash; it is listed as changed, and the next run embeds it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import dataset, duplicates, embedding, images, layout, store
from pipeline.backbone import BackboneSpec, output_shape
from pipeline.cache_identity import RANDOM_BANNER, augment_settings, cache_settings
from pipeline.errors import UserError
from pipeline.provenance import difference, embedder, environment
from pipeline.store.segments import Failure, Meta, pooled
from pipeline.store.writer import Row, Writer

Log = Callable[[str], None]
Job = embedding.Job  # one row to be cached: a file, and which view of it (0: the image itself)
CHANGED = embedding.changed_reason("make features")


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
    changed: int = 0  # of the skipped: files rewritten while they were read (a rerun embeds them)

    def line(self) -> str:
        extra = f" ({self.resumed} resumed from an interrupted run)" if self.resumed else ""
        moved = (
            f" ({self.changed} changed while they were read: rerun `make features`)"
            if self.changed
            else ""
        )
        return (
            f"embedded {self.new} new, {self.cached} cached{extra}, {self.removed} removed, "
            f"{self.skipped} skipped{moved}"
        )


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


def _known_hashes(w: Writer) -> dict[str, tuple[Stat, str]]:
    """path -> (stat, sha256) of every file the existing cache hashed (readable or not)."""
    out: dict[str, tuple[Stat, str]] = {}
    for p, st, h in w.known_files():  # a damaged segment found here is set aside
        out[p] = (st, h)
    if w.old is None:
        return {}
    for sk in w.old.skipped:
        if sk.get("sha256"):
            out.setdefault(sk["path"], (tuple(sk["stat"]), sk["sha256"]))
    return out


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
    `embedder_fn`: the engine of the embedding stage (`pipeline.embedding`; default `Local`
    with `workers` threads and `model`), e.g. `cluster.embedder(client)` on Dask workers;
    results are still written here, by one writer.
    """
    t0 = time.perf_counter()
    if batch_size < 1:
        raise UserError(f"BATCH must be a positive integer; got {batch_size}")
    if augment < 0:
        raise UserError(f"AUGMENT must be 0 or a positive number of views; got {augment}")
    settings = cache_settings(spec, dtype, maps)
    key = store.cache_key(settings)
    log(spec.describe())  # first: what computes the features (precision: its resolved value)
    data, artifacts = Path(data).absolute(), Path(artifacts).absolute()  # workers see these
    scan = dataset.scan(data)
    for w in scan.warnings:
        log(f"warning: {w}")
    fdir = layout.features_dir(artifacts)
    path = cache_path(artifacts, spec, key)
    if spec.random_weights:
        log(f"*** {RANDOM_BANNER} ***")
    engine = embedder_fn if embedder_fn is not None else embedding.Local(workers, model)
    ctx = _Ctx(spec, batch_size, dtype, log, scan, engine, rebuild, maps)
    stamp = embedder()
    with store.exclusive(fdir):
        for stale in fdir.glob("*.tmp-*"):
            stale.unlink(missing_ok=True)
        w = Writer(path, key, stamp, maps, dtype, log, rebuild=rebuild, verify=verify)
        known = {} if (verify or rebuild) else _known_hashes(w)
        hashes = _hash_all(scan.root, scan.items, known)
        jobs = [
            Job(dataset.display(it.path), scan.root / it.path, h, it.label, it.split, 0, st, why)
            for it, (h, why, st) in zip(scan.items, hashes, strict=True)
        ]
        summary, rows = _sync(w, settings, jobs, ctx)
        if set_current:
            try:
                layout.set_current(artifacts, path)
            except OSError as e:  # no room even for its name: one line, the cache is complete
                kept = "the cache is complete; only `make train-head`'s default is not set"
                raise store.disk_error(e, fdir / "current", kept=kept) or e from None
        for sk in summary.skipped_rows:
            log(f"skipped {sk['path']}: {sk['reason']}")
        log(summary.line())
        for said in duplicates.lines(
            duplicates.find(
                [r.path for r in rows],
                [r.sha256 or "" for r in rows],
                [r.label for r in rows],
                [r.split for r in rows],
                scan.classes,
            )
        ):
            log(said)
        log(f"cache: {path}")
        if augment:
            aset = augment_settings(settings, spec.seed)
            akey = store.cache_key(aset)
            apath = layout.augment_path(path, spec.seed)
            ajobs = [
                Job(r.path, r.abspath, r.sha256, r.label, r.split, v, r.stat)
                for r in rows
                if r.split == "train"
                for v in range(1, augment + 1)
            ]
            aw = Writer(apath, akey, stamp, maps, dtype, log, rebuild=rebuild, verify=verify)
            asum, _ = _sync(aw, aset, ajobs, ctx, augment_seed=spec.seed)
            log(f"augmented views ({augment} per training image): {asum.line()}")
            summary.augmented = asum
    summary.seconds = time.perf_counter() - t0
    return summary


@dataclass
class _Ctx:
    spec: BackboneSpec
    batch_size: int
    dtype: str
    log: Log
    scan: dataset.Scan
    engine: embedding.Engine
    rebuild: bool = False
    maps: bool = True


def _sync(
    w: Writer,
    settings: dict[str, Any],
    jobs: list[Job],
    ctx: _Ctx,
    augment_seed: int = 0,
) -> tuple[Summary, list[Job]]:
    """Make the cache `w` writes hold exactly `jobs`, embedding only what no segment has.

    A file rewritten between its hashing and its decoding (`changed`) is not cached this time:
    its row is skipped with `CHANGED` and no hash, so the next run hashes and embeds it again;
    files of the same old content, to be embedded from it, are skipped naming it.
    """
    t0 = time.perf_counter()
    todo: dict[str, Job] = {}
    hashed = [j for j in jobs if j.sha256 is not None]  # unreadable: listed with its reason
    had = w.has_many([j.ident for j in hashed])  # on disk before this run embeds anything
    for j, h in zip(hashed, had.tolist(), strict=True):
        if not h and w.failure(j.ident) is None and j.ident not in todo:
            todo[j.ident] = j
    del hashed
    embed_s = 0.0
    if todo and w.old is not None and not w.rebuild:
        _refuse_mixing(w.path, w.old, w.stamp, len(todo))
    now: dict[str, Failure] = {}
    changed: dict[str, str] = {}
    if todo:
        embed_s = _embed(list(todo.values()), ctx, w, augment_seed, now, changed)

    rows: list[Job] = []
    skipped: list[dict[str, Any]] = []
    n_changed = 0
    for j in jobs:
        if j.ident in changed:  # rewritten after it was hashed: under neither hash this time
            first = todo[j.ident].path
            own = first == j.path
            n_changed += own
            skipped.append(
                {
                    "path": j.path,
                    "reason": CHANGED
                    if own
                    else (
                        f"not cached this time: its content was to be embedded from '{first}', "
                        "which changed while it was read; rerun `make features`"
                    ),
                    "sha256": "" if own else (j.sha256 or ""),  # "": hashed again next run
                    "stat": j.stat,
                    "content": False,
                    "stamp_key": w.stamp_key,
                }
            )
            continue
        fail = now.get(j.ident) or (w.failure(j.ident) if j.sha256 else None)
        if j.sha256 is None or fail is not None or (j.ident in todo and not w.has(j.ident)):
            skipped.append(
                {
                    "path": j.path,
                    "reason": fail.reason if fail else (j.reason or "could not be read"),
                    "sha256": j.sha256 or "",
                    "stat": j.stat,
                    "content": bool(fail and fail.content),
                    "stamp_key": w.stamp_key,
                }
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
    old = w.old
    classes = ctx.scan.classes
    done = w.commit(
        [Row(r.path, r.ident, classes[r.label], r.split, r.view, r.stat) for r in rows],
        classes,
        skipped,
        lambda: _attrs(w, ctx, settings),  # made only when something is written
        same_source=old is not None and dataset.same_source(old.attrs, ctx.scan),
    )
    n_new = sum(1 for r in rows if r.ident in todo)
    summary = Summary(
        cache=w.path,
        new=n_new,
        cached=len(rows) - n_new,
        removed=done.removed,
        skipped=len(skipped),
        resumed=sum(1 for r in rows if r.ident in done.resumed and r.ident not in todo),
        seconds=time.perf_counter() - t0,
        embed_seconds=embed_s,
        rewrote=done.rewrote,
        skipped_rows=skipped,
        changed=n_changed,
    )
    return summary, rows


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


def _embed(
    todo: list[Job],
    ctx: _Ctx,
    w: Writer,
    augment_seed: int,
    failures: dict[str, Failure],
    changed: dict[str, str],
) -> float:
    """Embed `todo` through the embedding stage (here, or on a cluster); each batch is staged
    as a segment by `w`, the stage's writer here.

    The stage checks the bytes it decodes: a job whose file no longer has its hash (rewritten
    since it was hashed) is neither embedded nor a failure; `changed` maps its ident to the
    hash of the bytes read, and the caller lists it as not cached this time.
    """
    classes = ctx.scan.classes
    t0 = time.perf_counter()

    def staged(b: embedding.Embedded) -> None:
        moved = {j.ident: r.sha256 for j, r in b.failed if isinstance(r, images.Changed)}
        changed.update(moved)
        ok = b.done
        maps = b.maps if b.maps is not None else np.zeros((0,) + output_shape(ctx.spec))
        maps = maps.astype(ctx.dtype)
        meta = Meta(
            [j.ident for j in ok],
            [j.path for j in ok],
            [classes[j.label] for j in ok],
            [j.split for j in ok],
            [j.view for j in ok],
            [j.stat for j in ok],
        )
        fails = [
            Failure(j.ident, str(r), bool(getattr(r, "content", False)))
            for j, r in b.failed
            if j.ident not in moved  # the old content did not fail: it was not there to read
        ]
        if ok or fails:
            w.add_batch(meta, pooled(maps), maps, fails)
        failures.update({x.ident: x for x in fails})

    views = augment_seed or todo[0].view
    for _ in embedding.embed(
        embedding.batched(todo, ctx.batch_size),
        ctx.spec,
        ctx.engine,
        augment_seed=augment_seed,
        sink=staged,
        label="embedding augmented views" if views else "embedding",
        total=len(todo),
    ):
        pass
    return time.perf_counter() - t0


def _attrs(w: Writer, ctx: _Ctx, settings: dict[str, Any]) -> dict[str, Any]:
    """The index's attributes: settings, DATA's record, versions (data_id: the writer's)."""
    spec, scan = ctx.spec, ctx.scan
    shape = w.feature_shape() or output_shape(spec)
    attrs = {
        "cache_key": w.key,
        "settings": settings,
        **{k: v for k, v in settings.items() if isinstance(v, (str, int, float, bool))},
        "weights": spec.weights,
        "random_weights": spec.random_weights,
        "feature_shape": list(shape),
        "maps": ctx.maps,
        **dataset.source_attrs(scan),
        "environment": environment(),
    }
    if spec.random_weights:
        attrs["banner"] = RANDOM_BANNER
    return attrs
