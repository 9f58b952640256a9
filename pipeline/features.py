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

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from pipeline import dataset, duplicates, embedding, hashing, images, layout, store
from pipeline.backbone import BackboneSpec, output_shape
from pipeline.cache_identity import RANDOM_BANNER, augment_settings, cache_settings
from pipeline.errors import UserError
from pipeline.provenance import difference, embedder, environment
from pipeline.store.format import SIGNATURE
from pipeline.store.segments import Failure, Meta, pooled
from pipeline.store.writer import Row, Writer

Log = Callable[[str], None]
Job = embedding.Job  # one row to be cached: a file, and which view of it (0: the image itself)
Jobs = embedding.Jobs  # the run's jobs as columns (a few bytes a file), a `Job` made when asked
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


def _skipped_hashes(w: Writer) -> Iterator[hashing.Known]:
    """(path, stat, sha256) of each file the current index lists as skipped with a hash."""
    for sk in w.old.skipped if w.old is not None else []:
        if sk.get("sha256"):
            yield sk["path"], sk["stat"], sk["sha256"]


def _each(ks: np.ndarray, step: int = 1024) -> Iterator[int]:
    """The values of `ks`, a block at a time (no Python int held per value)."""
    for a in range(0, len(ks), step):
        yield from ks[a : a + step].tolist()


class _Rows(Sequence[Row]):
    """The rows a commit is to hold, as jobs `ks` (columns): a `Row` made when one is read."""

    def __init__(self, jobs: Jobs, ks: np.ndarray, classes: list[str]) -> None:
        self.jobs, self.ks, self.classes = jobs, ks, classes

    def __len__(self) -> int:
        return len(self.ks)

    @overload
    def __getitem__(self, i: int) -> Row: ...
    @overload
    def __getitem__(self, i: slice) -> list[Row]: ...
    def __getitem__(self, i: int | slice) -> Row | list[Row]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._row(int(self.ks[i]))

    def __iter__(self) -> Iterator[Row]:
        for k in _each(self.ks):
            yield self._row(k)

    def _row(self, k: int) -> Row:
        j = self.jobs
        stat = j.hashed.stat_of(j.file(k))
        return Row(j.path(k), j.ident(k), self.classes[j.label(k)], j.split(k), j.view_of(k), stat)


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
        fresh = verify or rebuild  # every file hashed again, no hash reused
        hashed = hashing.hash_files(
            scan.root,
            scan.items,
            () if fresh else w.known_files(),  # streamed; a damaged segment is set aside
            () if fresh else _skipped_hashes(w),
        )
        jobs = Jobs(scan.root, scan.items, hashed)
        summary, rows = _sync(w, settings, jobs, ctx)
        del jobs
        if set_current:
            try:
                layout.set_current(artifacts, path)
            except OSError as e:  # no room even for its name: one line, the cache is complete
                kept = "the cache is complete; only `make train-head`'s default is not set"
                raise store.disk_error(e, fdir / "current", kept=kept) or e from None
        for sk in summary.skipped_rows:
            log(f"skipped {sk['path']}: {sk['reason']}")
        log(summary.line())
        for said in duplicates.lines(_duplicates(rows, scan.classes)):
            log(said)
        log(f"cache: {path}")
        if augment:
            aset = augment_settings(settings, spec.seed)
            akey = store.cache_key(aset)
            apath = layout.augment_path(path, spec.seed)
            train = np.flatnonzero(scan.items.split[rows.files()] == dataset.SPLITS.index("train"))
            ajobs = rows.take(
                np.repeat(train, augment), np.tile(np.arange(1, augment + 1), len(train))
            )
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
    jobs: Jobs,
    ctx: _Ctx,
    augment_seed: int = 0,
) -> tuple[Summary, Jobs]:
    """Make the cache `w` writes hold exactly `jobs`, embedding only what no segment has; the
    jobs it holds (the run's rows) are returned, as columns.

    A file rewritten between its hashing and its decoding (`changed`) is not cached this time:
    its row is skipped with `CHANGED` and no hash, so the next run hashes and embeds it again;
    files of the same old content, to be embedded from it, are skipped naming it. Only the jobs
    that are not simply kept (new, failed, unreadable) are looked at one by one.
    """
    t0 = time.perf_counter()
    n = len(jobs)
    ok = jobs.ok()  # unreadable: listed with its reason
    hashed = np.flatnonzero(ok)
    need = np.zeros(n, bool)  # to embed: on disk before this run embeds nothing of it
    need[hashed] = ~w.has_many(jobs.idents(hashed))
    del hashed
    failed: dict[int, Failure] = {}  # a content failure remembered (one content, every file)
    for k in _each(np.flatnonzero(ok)):
        fail = w.failure(jobs.ident(k))
        if fail is not None:
            failed[k] = fail
    need[list(failed)] = False
    todo = _first_of_each(jobs, np.flatnonzero(need))  # each content (and view) once, in order
    embed_s = 0.0
    if len(todo) and w.old is not None and not w.rebuild:
        _refuse_mixing(w.path, w.old, w.stamp, len(todo))
    now: dict[str, Failure] = {}
    changed: dict[str, str] = {}
    if len(todo):
        embed_s = _embed(jobs.take(todo), ctx, w, augment_seed, now, changed)
    first = {}  # the path a changed content was to be embedded from
    for k in todo.tolist() if changed else []:
        if jobs.ident(k) in changed:
            first[jobs.ident(k)] = jobs.path(k)

    kept = np.ones(n, bool)
    skipped: list[dict[str, Any]] = []
    n_changed = 0
    look = np.flatnonzero(~ok | need)
    look = np.union1d(look, np.fromiter(failed, np.int64, count=len(failed)))
    for k in look.tolist():  # the others are kept as they are
        kept[k] = False
        ident, path = jobs.ident(k), jobs.path(k)
        stat = jobs.hashed.stat_of(jobs.file(k))
        if ident in changed:  # rewritten after it was hashed: under neither hash this time
            own = first[ident] == path
            n_changed += own
            skipped.append(
                {
                    "path": path,
                    "reason": CHANGED
                    if own
                    else (
                        f"not cached this time: its content was to be embedded from "
                        f"'{first[ident]}', which changed while it was read; rerun "
                        "`make features`"
                    ),
                    "sha256": "" if own else (jobs.hashed.hex(jobs.file(k)) or ""),
                    "stat": stat,
                    "content": False,
                    "stamp_key": w.stamp_key,
                }
            )
            continue
        fail = now.get(ident) or failed.get(k)
        if not ok[k] or fail is not None or not w.has(ident):
            reason = jobs.hashed.reasons.get(jobs.file(k), "")
            skipped.append(
                {
                    "path": path,
                    "reason": fail.reason if fail else (reason or "could not be read"),
                    "sha256": jobs.hashed.hex(jobs.file(k)) or "",
                    "stat": stat,
                    "content": bool(fail and fail.content),
                    "stamp_key": w.stamp_key,
                }
            )
        else:
            kept[k] = True
    rows = np.flatnonzero(kept)
    del kept
    if n and not len(rows):
        for sk in skipped:
            ctx.log(f"skipped {sk['path']}: {sk['reason']}")
        raise UserError(
            f"none of the {n} files under '{ctx.scan.root}' could be read as an image "
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
        _Rows(jobs, rows, classes),  # type: ignore[arg-type]  # a sequence, made when read
        classes,
        skipped,
        lambda: _attrs(w, ctx, settings),  # made only when something is written
        same_source=old is not None and dataset.same_source(old.attrs, ctx.scan),
    )
    new = need[rows]
    n_new = int(np.count_nonzero(new))
    resumed = 0
    for k in _each(rows[~new]) if done.resumed else []:
        resumed += jobs.ident(k) in done.resumed
    summary = Summary(
        cache=w.path,
        new=n_new,
        cached=len(rows) - n_new,
        removed=done.removed,
        skipped=len(skipped),
        resumed=resumed,
        seconds=time.perf_counter() - t0,
        embed_seconds=embed_s,
        rewrote=done.rewrote,
        skipped_rows=skipped,
        changed=n_changed,
    )
    return summary, jobs.take(rows)


def _first_of_each(jobs: Jobs, ks: np.ndarray) -> np.ndarray:
    """Jobs `ks`, less those whose content and view an earlier one of them has (in order)."""
    if len(ks) < 2:
        return ks
    files = jobs.files()[ks]
    key = np.zeros((len(ks), 40), np.uint8)
    key[:, :32] = jobs.hashed.sha[files]
    if jobs.view is not None:
        key[:, 32:] = jobs.view[ks].astype("<i8").view(np.uint8).reshape(-1, 8)
    _, first = np.unique(key.view("V40").ravel(), return_index=True)
    return ks[np.sort(first)]


def _duplicates(rows: Jobs, classes: list[str]) -> dict[str, Any]:
    """`duplicates.find` over the run's rows, in NumPy: Python objects only for the rows whose
    content another row may share (a 64-bit prefix of its hash in common)."""
    files = rows.files()
    prefix = rows.hashed.sha[files, :8].copy().view("<u8").ravel()
    twins = duplicates.sharing(prefix)
    return duplicates.find(
        [rows.path(k) for k in twins.tolist()],
        [rows.hashed.hex(rows.file(k)) or "" for k in twins.tolist()],
        [rows.label(k) for k in twins.tolist()],
        [rows.split(k) for k in twins.tolist()],
        classes,
    )


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
    todo: Sequence[Job],
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
            vectors = pooled(maps)
            if b.signatures is not None:
                vectors[SIGNATURE] = b.signatures
            w.add_batch(meta, vectors, maps, fails)
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
