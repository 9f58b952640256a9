"""`make predict`: classify new images with a saved head and exactly the backbone path of features.

The run's whole cache key is recomputed from this installation (backbone, weights by content,
layer, size, resize, preprocessing, loader version, dtype) and a mismatch is refused in one
line, so a head never sees features made differently from the ones it was trained on. Decoder
or framework versions that differ from the cache's are said. Writes `path,label,probability`,
then with `topk=K` the next best labels (`label_2,probability_2,...`), then the probability of
every class in class order (`p_<class>`), then `backbone_ran` (yes/no).

The backbone runs once per image content, for prediction too: an image found in the run's cache
or among the images predicted before (`pipeline.predicted`) is classified from its cached
features, and when every image is found the backbone is never built. New images are embedded
through the embedding stage (`pipeline.embedding`), here or on Dask workers (`client`), their
rows written in order all the same. The stage hashes the bytes it decodes: a file rewritten after
it was hashed is looked up and embedded again as it is now, under its own hash (at most `REDO`
times), never under the old bytes' hash.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import dataset, embedding, images, journal, layout, outputs, predicted, runs, store
from pipeline.backbone import BackboneSpec
from pipeline.cache_identity import check_features
from pipeline.diagnose import scaled
from pipeline.errors import UserError
from pipeline.novelty import QUANTILE, Novelty, of_run
from pipeline.progress import Progress
from pipeline.provenance import difference, embedder

Log = Callable[[str], None]
REDO = 2  # times an image whose file keeps changing while it is read is looked up again


@dataclass(frozen=True)
class _Item:
    path: str
    abspath: Path
    sha256: str | None = None
    view: int = 0


@dataclass
class _Planned:
    """One image to classify, hashed and looked up: its views' features found, or None."""

    item: _Item
    sha256: str | None = None
    reason: str = ""  # why it cannot be read (no sha256)
    stat: tuple[int, int, int] = (0, 0, 0)
    found: list[np.ndarray | None] = field(default_factory=list)  # views 0..TTA
    view: int = 0  # what `batches.decode` reads: the image itself; its views are drawn here

    @property
    def abspath(self) -> Path:
        return self.item.abspath

    @property
    def missing(self) -> list[int]:
        """The views to embed now (none for an image that cannot be read)."""
        return [] if self.reason else [v for v, f in enumerate(self.found) if f is None]


@dataclass(frozen=True)
class _ViewJob(embedding.Job):
    """One view of one planned image, for the embedding stage."""

    plan: _Planned | None = field(default=None, compare=False, repr=False)


def _view_jobs(p: _Planned) -> list[_ViewJob]:
    """The jobs of the views of `p` still missing (under its hash as it is now)."""
    return [
        _ViewJob(p.item.path, p.abspath, p.sha256, view=v, stat=p.stat, plan=p) for v in p.missing
    ]


def tta_seed(r: dict[str, Any]) -> int:
    """The seed of TTA's views: that of the views the run trained on, else of the cache.

    The cache's settings hold a seed for random weights only; a run without views then draws
    them as `make features AUGMENT=K SEED=<the run's seed>` would, never with a seed of 0.
    """
    feats = r["features"]
    views = feats.get("augmented") or {}
    if "seed" in views:
        return int(views["seed"])
    if "seed" in (feats.get("settings") or {}):
        return int(feats["settings"]["seed"])
    return int(r.get("seed", 0))


def _row(
    path: str, p: np.ndarray, classes: list[str], topk: int, ran: bool = True
) -> dict[str, Any]:
    """One prediction: best label, its probability, every class's, and the k best (descending)."""
    best = np.argsort(-p, kind="stable")[: max(topk, 1)]  # ties keep class order
    return {
        "path": path,
        "label": classes[int(best[0])],
        "probability": float(p[best[0]]),
        "probabilities": {c: float(v) for c, v in zip(classes, p, strict=True)},
        "top": [(classes[int(i)], float(p[i])) for i in best],
        "backbone_ran": ran,
        "error": "",
    }


def classify(
    artifacts: Path,
    images_path: Path | Sequence[str | os.PathLike[str]],
    run: str | None = None,
    out: Path | None = None,
    weights: str | None = None,
    batch_size: int = 32,
    tta: int = 0,
    log: Log = print,
    backbone: str | None = None,
    topk: int = 0,
    client: Any = None,
) -> tuple[list[dict[str, Any]], Path]:
    """Every row of `stream` in a list, and the CSV's path (`out` or the default)."""
    rows = list(
        stream(
            artifacts, images_path, run, out, weights, batch_size, tta, log, backbone, topk, client
        )
    )
    return rows, Path(out) if out else layout.predictions_file(artifacts)


def stream(
    artifacts: Path,
    images_path: Path | Sequence[str | os.PathLike[str]],
    run: str | None = None,
    out: Path | None = None,
    weights: str | None = None,
    batch_size: int = 32,
    tta: int = 0,
    log: Log = print,
    backbone: str | None = None,
    topk: int = 0,
    client: Any = None,
) -> Iterator[dict[str, Any]]:
    """Classify every image of `images_path`, one row at a time, in order, writing the CSV as
    the rows are made (memory stays flat in the number of images).

    `images_path`: an image file, a folder, a list file (`dataset.listed_images`), or a list of
    image files (paths kept as given). Each row: path, label, probability, `probabilities` (every
    class by name, in class order), `top` (the max(topk, 1) best (label, probability) pairs,
    most probable first), `backbone_ran` (False when every feature it needed was cached) and
    `error` ("" or, for a file that could not be read, why: then label and probabilities are
    None and the CSV, which holds readable images only, leaves it out; the log says it).
    `tta=K` averages the head's probabilities over the image and K augmented views of it (the
    same augmentation as `make features AUGMENT=K`).

    Features are found by content before anything is embedded (`pipeline.predicted`): in the
    run's cache, then among the images predicted before; what is embedded is kept for the
    next time. `client`: a Dask client (`pipeline.cluster.client`) that embeds the new images
    on its workers, at most a few batches per worker in flight; rows still come in order.

    Rows go to `<out>.partial`, flushed batch by batch and renamed onto `out` when every image
    is done; its sidecar `<out>.partial.jsonl` says what made it (run and its files, TOPK,
    TTA, the image list) and lists the unreadable images. A killed run, rerun with the same
    settings, predicts only the images not in the partial file (their rows come back from it,
    with the CSV's 6 digits); other settings start over, said in one line. When no image
    could be read, nothing is written and it is a UserError.
    """
    if topk < 0:
        raise UserError(f"TOPK must be 0 or a positive number of labels; got {topk}")
    listed = None if isinstance(images_path, (str, os.PathLike)) else [Path(p) for p in images_path]
    if listed is not None and not listed:
        raise UserError("IMAGES is an empty list; pass image files, a file or a folder")
    images_path = Path(images_path) if listed is None else Path(".")
    if listed is None and not images_path.exists() and not images_path.is_symlink():
        raise UserError(f"IMAGES '{images_path}' does not exist; pass an image file or a folder")
    out = outputs.a_file(out, "predictions.csv") if out else layout.predictions_file(artifacts)
    # this predict's OUT, its .partial and sidecar for the whole run: a second predict to
    # the same OUT stops at once, never writing into, nor deleting, this one's files
    with outputs.owned(out, "make predict", fix="set OUT= to another file"):
        r = runs.pick(artifacts, run)
        if not r["current"]:
            log(f"warning: run '{r['run']}' is stale ({r['stale_reason']})")
        spec = check_features(r, weights)
        if backbone and backbone != spec.name:
            raise UserError(
                f"run '{r['run']}' uses BACKBONE={spec.name}, not {backbone}; pick a {backbone} "
                "run with RUN=, or leave BACKBONE out"
            )
        est = runs.load_estimator(artifacts, r)
        if r["features"]["random_weights"]:
            log("*** RANDOM WEIGHTS: this head was trained on features of an untrained VGG16 ***")
        now = embedder()
        for e in r["features"].get("embedders") or []:
            if e != now:
                log(
                    "warning: the head's features were embedded with other decoder/framework "
                    f"versions ({difference(e, now)}); predictions may differ slightly from the "
                    "cached features: `make features REBUILD=1` and retrain to align them"
                )
                break
        if listed is not None:  # a list (the library): each path as given, in the given order
            todo = [_Item(dataset.display(str(f)), f) for f in listed]
        else:
            todo = [_Item(p, f) for p, f in dataset.images_in(images_path)]
        classes = r["classes"]
        if topk > len(classes):
            log(f"TOPK={topk} is more than the {len(classes)} classes: writing all {len(classes)}")
            topk = len(classes)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial, side = journal.partial_paths(out)
        made = {
            "format": journal.PARTIAL,
            "run": r["run"],
            "files": r.get("files") or {},
            "tta": tta,
            "topk": topk,
            "columns": journal.columns(classes, topk),
            "images": journal.digest(todo),
            "n": len(todo),
        }
        done, failed = journal.resume(partial, side, made, log)
        seed = tta_seed(r)
        left = Counter(done)
        remaining = []
        for j in todo:
            if left[j.path] > 0:
                left[j.path] -= 1
            elif j.path not in failed:
                remaining.append(j)
        old, fh, errs = journal.opened(partial, side, made, out)
        n_ok = n_bad = n_ran = n_unlike = 0
        first_bad: dict[str, Any] | None = None
        whole = False
        try:
            earlier = csv.reader(old)
            next(earlier)  # the header
            fresh = _predicted(
                remaining, spec, r, est, classes, topk, tta, seed, batch_size, fh, errs, log,
                artifacts, client,
            )  # fmt: skip
            left = Counter(done)
            for j in todo:
                if left[j.path] > 0:
                    left[j.path] -= 1
                    row = journal.from_csv(next(earlier), classes, topk)
                elif j.path in failed:
                    row = _failed(j.path, failed[j.path])
                else:
                    row = next(fresh)
                n_ok += not row["error"]
                n_bad += bool(row["error"])
                n_ran += bool(row["backbone_ran"])
                n_unlike += bool(row.get("unlike_training"))
                first_bad = first_bad or (row if row["error"] else None)
                yield row
            for _ in fresh:  # its last batch written and flushed
                pass
            whole = True
        finally:
            failed_close = journal.closed(old, fh, errs)  # each one, even after a full disk
        if whole and failed_close is not None:
            told = journal.told(partial, out)
            raise store.disk_error(failed_close, partial, **told) or failed_close
        if not n_ok:
            partial.unlink(missing_ok=True)
            side.unlink(missing_ok=True)
            assert first_bad is not None
            where = f"IMAGES '{images_path}'" if listed is None else "the IMAGES list"
            raise UserError(
                f"none of the {len(todo)} images in {where} could be read (e.g. "
                f"{first_bad['path']}: {first_bad['error']}); pass JPEG, PNG, GIF, WebP, BMP or "
                "TIFF images, a folder of them, or a .txt/.csv file listing them"
            )
        journal.commit(partial, side, out)
        log(
            f"predicted {n_ok} images with head {r['run']} (the backbone ran for {n_ran}, "
            f"{n_ok - n_ran} cached), {n_bad} unreadable, {n_unlike} unlike the training images "
            f"(distance above the {QUANTILE:.0%} quantile of the training images' own); wrote {out}"
        )


def _predicted(
    todo: list[_Item],
    spec: BackboneSpec,
    r: dict[str, Any],
    est: Any,
    classes: list[str],
    topk: int,
    tta: int,
    seed: int,
    batch_size: int,
    fh: Any,
    errs: Any,
    log: Log,
    artifacts: Path,
    client: Any = None,
) -> Iterator[dict[str, Any]]:
    """The rows of `todo` in order, each batch's written to `fh` (and its unreadable images to
    `errs`) and flushed before any of them is yielded.

    Each batch is hashed and looked up first (`predicted.Cache`); only the views not found are
    decoded and embedded, here (the backbone built at the first of them) or on `client`'s
    workers; what is embedded is kept for the next predict.
    """
    if not todo:
        return
    dtype = r["features"]["settings"]["dtype"]
    progress = Progress(len(todo), "predicting")
    w = csv.writer(fh)
    cache = predicted.Cache(artifacts, r, tta, seed, log)
    calib = r.get("calibration") or {}
    temperature = float(calib["temperature"]) if calib.get("applied") else 1.0
    if temperature != 1.0:
        log(f"probabilities scaled by the run's temperature {temperature:.3g} (its calibration)")
    novelty = of_run(artifacts, r, log=log)
    engine = embedding.Local() if client is None else embedding.Dask(client, source="IMAGES")
    finished = False
    try:
        with ThreadPoolExecutor(max_workers=4) as hashing:
            plans = _plans(todo, cache, batch_size, tta, hashing)
            batches = _embedded(plans, spec, engine, seed, cache, tta, dtype, r["pooling"])
            n_done = 0
            for b in batches:
                rows = _classified(*b, est, classes, topk, tta, temperature, novelty)
                ok = [journal.csv_row(row) for row in rows if not row["error"]]
                try:
                    w.writerows(ok)
                    fh.flush()
                    for row in rows:
                        if row["error"]:
                            errs.write(json.dumps({"path": row["path"], "error": row["error"]}))
                            errs.write("\n")
                            log(f"could not read {row['path']}: {row['error']}")
                    errs.flush()
                except OSError as e:  # no room: one line, roughly what the rest needs
                    row_bytes = sum(len(",".join(map(str, c))) + 2 for c in ok) / max(len(ok), 1)
                    partial = Path(fh.name)
                    out = partial.with_name(partial.name.removesuffix(".partial"))
                    told = journal.told(partial, out, int(row_bytes * (len(todo) - n_done)) or None)
                    raise store.disk_error(e, partial, **told) or e from None
                n_done += len(rows)
                progress.update(len(rows))
                yield from rows
        finished = True
    finally:
        cache.close(merge=finished)  # stopped: what was embedded is kept, merging waits


def _stat(path: Path) -> tuple[int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _hashed(item: _Item) -> tuple[str | None, str, tuple[int, int, int]]:
    """(content SHA-256, "", stat) of an image, or (None, why it cannot be read, stat)."""
    stat = _stat(item.abspath)
    try:
        return images.content_sha256(item.abspath), "", stat
    except images.ImageError as e:
        return None, str(e), stat


def _replanned(p: _Planned, sha256: str, cache: predicted.Cache, tta: int) -> None:
    """`p` as its file is now, after it was rewritten since it was hashed: its content hash
    `sha256` (of the bytes read last), its stat, and its views looked up again under that hash.
    Nothing found or embedded for the old bytes is used for its row or kept under the new hash.
    """
    p.sha256 = sha256
    p.stat = _stat(p.abspath)
    p.found = cache.find([sha256], tta)[0]


LOOKUP_IMAGES = 2048  # hashed and looked up together: each segment's key table once for all


def _plans(
    todo: list[_Item], cache: predicted.Cache, batch_size: int, tta: int, hashing: Executor
) -> Iterator[list[_Planned]]:
    """Batches of `todo`, hashed and looked up LOOKUP_IMAGES at a time (a lookup opens every
    segment of the caches once, whatever the number of images asked), yielded a batch at a
    time (memory: LOOKUP_IMAGES plans, never the list's features)."""
    for a in range(0, len(todo), LOOKUP_IMAGES):
        chunk = todo[a : a + LOOKUP_IMAGES]
        hashed = list(hashing.map(_hashed, chunk))
        found = cache.find([h for h, _, _ in hashed], tta)
        planned = [
            _Planned(j, h, why, st, f)
            for j, (h, why, st), f in zip(chunk, hashed, found, strict=True)
        ]
        for b in range(0, len(planned), batch_size):
            yield planned[b : b + batch_size]


def _embedded(
    plans: Iterable[list[_Planned]],
    spec: BackboneSpec,
    engine: embedding.Engine,
    seed: int,
    cache: predicted.Cache,
    tta: int,
    dtype: str,
    pooling: str,
) -> Iterator[tuple[list[_Planned], dict[int, str], set[int]]]:
    """Each batch of plans with its missing views embedded by the embedding stage and kept
    (`cache.add`, the stage's writer here): (plans, {image: why it cannot be read}, the images
    the backbone ran for). A batch with nothing missing passes through without work; the next
    batch is planned while the stage embeds this one.

    An image whose file was rewritten since it was hashed is planned again as it is now
    (`_replanned`: looked up under the new bytes' hash, what is still missing embedded), at
    most `REDO` times, then its row names the reason; its old views are neither used nor kept.
    """
    chunks: deque[list[_Planned]] = deque()

    def jobs_of(chunk: list[_Planned]) -> list[_ViewJob]:
        chunks.append(chunk)
        return [j for p in chunk for j in _view_jobs(p)]

    def again(job: _ViewJob, sha256: str) -> list[_ViewJob]:
        p = job.plan
        if p is None or p.sha256 != job.sha256:  # another of its views planned it again already
            return []
        _replanned(p, sha256, cache, tta)
        return _view_jobs(p)

    def kept(b: embedding.Embedded) -> None:
        if b.done:
            maps = np.asarray(b.maps).astype(dtype)
            cache.add([(j.path, j.sha256 or "", j.view, j.plan.stat) for j in b.done], maps)
            for j, x in zip(b.done, store.pool(maps, pooling), strict=True):
                j.plan.found[j.view] = x

    for b in embedding.embed(
        map(jobs_of, plans),
        spec,
        engine,
        augment_seed=seed,
        retries=REDO,
        again=again,
        sink=kept,
        command="make predict",
    ):
        chunk = chunks.popleft()
        where = {id(p): i for i, p in enumerate(chunk)}
        reasons = {i: p.reason for i, p in enumerate(chunk) if p.reason}
        for j, why in b.failed:
            reasons.setdefault(where[id(j.plan)], str(why))
        yield chunk, reasons, {where[id(j.plan)] for j in b.done}


def _classified(
    plans: list[_Planned],
    reasons: dict[int, str],
    ran: set[int],
    est: Any,
    classes: list[str],
    topk: int,
    tta: int,
    temperature: float = 1.0,
    novelty: Novelty | None = None,
) -> list[dict[str, Any]]:
    """The rows of one batch: the head on each image's features (cached, or embedded now and
    kept), averaged over its views, scaled by the run's temperature (`audit.calibrate`), with
    the image's distance to the training set (`novelty`)."""
    ok = [i for i in range(len(plans)) if i not in reasons]
    full = np.zeros((len(ok), len(classes)))  # a class the head never saw: 0
    dist, unlike = np.full(len(ok), np.nan), np.zeros(len(ok), bool)
    if ok:
        x = np.stack([f for i in ok for f in plans[i].found])  # type: ignore[misc]
        proba = est.predict_proba(x).reshape(len(ok), tta + 1, -1).mean(axis=1)  # TTA: mean
        full[:, np.asarray(est.classes_, dtype=int)] = proba
        if temperature != 1.0:
            full = scaled(full, temperature)
        if novelty is not None:
            dist, unlike = novelty.score(x.reshape(len(ok), tta + 1, -1)[:, 0])
    at = {i: j for j, i in enumerate(ok)}
    return [
        _failed(p.item.path, reasons[i])
        if i in reasons
        else {
            **_row(p.item.path, full[at[i]], classes, topk, i in ran),
            "distance_to_training": float(dist[at[i]]),
            "unlike_training": bool(unlike[at[i]]),
        }
        for i, p in enumerate(plans)
    ]


def _failed(path: str, reason: str) -> dict[str, Any]:
    return {
        "path": path,
        "label": None,
        "probability": None,
        "probabilities": None,
        "top": [],
        "backbone_ran": False,
        "distance_to_training": None,
        "unlike_training": None,
        "error": reason,
    }
