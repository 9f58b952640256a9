"""The commands as Python functions, with the Makefile's names and settings (in lower case).

`python -m pipeline` (and so every `make` target) calls these very functions, so a script gets
the same cache, runs, report and predictions as the commands. Each function imports what it
needs when it runs: `import pipeline` stays fast and never loads TensorFlow.

    import pipeline
    pipeline.extract("photos", "artifacts", weights="imagenet")
    pipeline.train_head("artifacts", head="logreg")
    X, y, paths, classes = pipeline.load_features("artifacts", pooling="avg", split="train")
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pipeline.errors import UserError
from pipeline.settings import (
    AuditSettings,
    ExportSettings,
    ExtractSettings,
    FinetuneSettings,
    PredictSettings,
    ReportSettings,
    SweepSettings,
    TrainHeadSettings,
)
from pipeline.settings_base import head_params as head_params  # scripts import it here
from pipeline.settings_base import takes

if TYPE_CHECKING:
    import numpy as np

    from pipeline.features import Summary

Log = Callable[[str], None]
PathLike = str | os.PathLike[str]


def _quiet(_: str) -> None:
    pass


def _log(log: Log | None) -> Log:
    return _quiet if log is None else log


def _progress(log: Log | None) -> AbstractContextManager[None]:
    """Progress lines ("embedding 224/640 ...") go to `log` too; `log=None`: nothing is printed.

    The command line keeps its own choice (progress on stderr, results on stdout).
    """
    from pipeline.progress import lines_to

    return lines_to(log, keep_outer=True)


@takes(ExtractSettings)
def extract(s: ExtractSettings, log: Log | None = print) -> Summary:
    """`make features`: embed every image of `data` once into the ARTIFACTS feature cache.

    `data` is an image folder (class folders, or train/ and validation/ with class folders) or
    a `path,label[,split]` CSV file. Reruns embed only new or changed images. Returns what the
    run did (`.cache` is the cache file, `.skipped_rows` the files that could not be read).
    `precision="auto"` computes in bfloat16 where the processor does so natively (AVX512-BF16 or
    AMX; on a GPU, its own choice) and in float32 elsewhere; the precision it resolves to is in
    the cache key and the first line logged. `log=None` prints nothing, progress included.
    Settings and defaults: `pipeline.settings.ExtractSettings` (pass one, or its fields).
    """
    from pipeline import cluster as dask_cluster

    with _progress(log), dask_cluster.client(s.cluster) as c:
        return _extract(s, _log(log), c)


def _extract(s: ExtractSettings, log: Log, client: Any, set_current: bool = True) -> Summary:
    """`features.extract` run with these settings (on the Dask `client`'s workers, if any)."""
    from pipeline import cluster as dask_cluster

    embedder = dask_cluster.embedder(client) if client is not None else None
    return s.run(log, set_current=set_current, embedder_fn=embedder)


@takes(TrainHeadSettings)
def train_head(s: TrainHeadSettings, log: Log | None = print) -> dict[str, Any]:
    """`make train-head`: cross-validate, validate and save one head on the cached features.

    `repeats` partitions of `folds` folds (default: as many as `budget` minutes hold at the
    first partition's cost, default 3, at most a number chosen by the training images; see
    the README), each run's mean with its 95 % interval in `result["cv"]`. `folds=None`
    sizes the evaluation to the data: 5 folds up to 200,000 training images, one held-out
    split above (`result["cv"]["protocol"]` says which, and why). `params` ("C=0.1", a list
    of such, or a dict) are fixed instead of tuned.

    Returns the run's result (as in `heads/<run>/result.json`): `result["cv"]` holds the fold
    accuracies and out-of-fold predictions, `result["validation"]` the validation scores.
    """
    from pipeline import cluster as dask_cluster
    from pipeline.train import train_head as run

    with _progress(log), dask_cluster.client(s.cluster) as c:
        return run(
            Path(s.artifacts),
            head=s.head,
            pooling=s.pool,
            folds=s.folds,
            seed=s.seed,
            params=s.params,
            features=s.features,
            n_jobs=s.jobs,
            views=s.views,
            log=_log(log),
            client=c,
            repeats=s.repeats,
            budget=s.budget,
            groups=s.groups,
        )


@takes(FinetuneSettings)
def finetune(s: FinetuneSettings, log: Log | None = print) -> dict[str, Any]:
    """`make finetune`: cache where the backbone's last stage starts, then fine-tune it + a head.

    `repeats` and `budget` as for `train_head`. Returns the run's result, like `train_head`.
    """
    from pipeline import cluster as dask_cluster
    from pipeline.backbone import family
    from pipeline.train import train_head as run_train

    start = family(s.backbone).finetune_from
    if start is None:
        raise UserError(
            f"BACKBONE={s.backbone} has no last stage to fine-tune; use `make train-head`"
        )
    with _progress(log), dask_cluster.client(s.cluster) as c:
        cached = _extract(ExtractSettings.of(s, layer=start), _log(log), c, set_current=False)
        return run_train(
            Path(s.artifacts),
            head="finetune",
            folds=s.folds,
            seed=s.seed,
            params=s.params,
            features=cached.cache,
            log=_log(log),
            client=c,
            repeats=s.repeats,
            budget=s.budget,
        )


@takes(SweepSettings)
def sweep(s: SweepSettings, log: Log | None = print) -> dict[str, Any]:
    """`make sweep`: every head x pooling x views (x backbone) on the cache, ranked.

    `race` (default): every run is scored on the first partition and only those the data
    cannot yet tell from the best (or within `margin` of it, default 0.01) get their other
    partitions; `repeats` and `budget` as for `train_head`.

    `heads`, `pools`, `views` and `backbones` take a comma-separated string or a list, like
    SWEEP_HEADS, SWEEP_POOLS, SWEEP_VIEWS and SWEEP_BACKBONES; with `backbones`, each is
    extracted from `data` with `weights`, `size`, `batch` and `precision` (the features
    settings, `SweepSettings.extraction`). `folds=None` sizes the evaluation to the data, as
    `train_head` does. Returns the sweep's summary.
    """
    from pipeline import cluster as dask_cluster
    from pipeline import stats
    from pipeline.sweeping import run_sweep

    with _progress(log), dask_cluster.client(s.cluster) as c:
        return run_sweep(
            Path(s.artifacts),
            s.heads,
            s.pools,
            s.views,
            folds=s.folds,
            seed=s.seed,
            curve_points=s.points,
            repeats=s.repeats,
            budget=s.budget,
            race=s.race,
            margin=stats.RACE_MARGIN if s.margin is None else s.margin,
            log=_log(log),
            client=c,
            backbones=s.backbones,
            extraction=s.extraction(),
            embedder_fn=dask_cluster.embedder(c) if c is not None else None,
        )


@takes(ReportSettings)
def report(s: ReportSettings, log: Log | None = print) -> dict[str, Any]:
    """`make report`: write ARTIFACTS/report/report.{json,md,html}; return the report's content.

    `gallery`: a run name (or "all") whose misclassified images are shown too.
    """
    from pipeline.reporting import build_report

    with _progress(log):
        return build_report(Path(s.artifacts), log=_log(log), gallery_runs=s.gallery)


@takes(AuditSettings)
def audit(s: AuditSettings, log: Log | None = print) -> dict[str, Any]:
    """`make audit`: know your data from run `run` (default: the best current run), written to
    ARTIFACTS/audit (CSV files, audit.json, map.html) and shown by `make report`: likely label
    errors (confident learning on its out-of-fold probabilities, every partition voting),
    near-duplicate sets and the ones that cross training and validation, outliers, its
    calibration and a map of the collection. Never runs the backbone. Returns audit.json's
    content."""
    from pipeline.auditing import run_audit

    with _progress(log):
        return run_audit(Path(s.artifacts), s.run, seed=s.seed, log=_log(log))


@takes(PredictSettings)
def predict(s: PredictSettings, log: Log | None = print) -> list[dict[str, Any]]:
    """`make predict`: classify images with a trained head (default: the best current run).

    `images`: an image file, a folder (walked like IMAGES), a `.txt`/`.lst` file of paths (one
    per line, relative to its folder; blank lines and `#` comments ignored), a `.csv` file with
    a `path` column, or a list of image files. Writes the same CSV as the command (`out`,
    default ARTIFACTS/predictions.csv) and returns one dict per image, in order: `path`,
    `label`, `probability`, `probabilities` (every class by name, in class order), `top` (the
    max(topk, 1) best (label, probability) pairs, best first), `backbone_ran` (False when the
    image's features were found cached: in the run's cache, or from an earlier predict) and
    `error` ("" or why the file could not be read; then label and probabilities are None).
    `cluster="local:N"` or a scheduler address embeds the new images on Dask workers, as for
    `extract`. `predict_rows` gives the same rows one at a time, never holding them all.
    """
    return list(predict_rows(s, log=log))


@takes(PredictSettings)
def predict_rows(s: PredictSettings, log: Log | None = print) -> Iterator[dict[str, Any]]:
    """`predict`'s rows one at a time, as `make predict` makes them: the CSV is written as they
    come (`out + ".partial"`, renamed onto `out` after the last one) and memory stays flat in
    the number of images. A killed run, rerun with the same settings, resumes: only images not
    yet in the partial file are predicted (see `pipeline.prediction.stream`).
    """
    from pipeline import cluster as dask_cluster
    from pipeline.prediction import stream

    images = s.images
    with _progress(log), dask_cluster.client(s.cluster) as c:
        yield from stream(
            Path(s.artifacts),
            Path(images) if isinstance(images, str | os.PathLike) else list(images),
            run=s.run,
            out=s.out,
            weights=s.weights,
            batch_size=s.batch,
            tta=s.tta,
            log=_log(log),
            backbone=s.backbone,
            topk=s.topk,
            client=c,
        )


@takes(ExportSettings)
def export(s: ExportSettings, log: Log | None = print) -> Path:
    """`make export`: the pooled features of the current cache as an NPZ or CSV file; its path.

    Every original image with its path, label (class name), split and SHA-256 (see
    `pipeline.exporting`'s module docstring for the exact layout).
    """
    from pipeline.exporting import export as run

    return run(Path(s.artifacts), s.format, s.pool, s.out, s.features, log=_log(log))


class Features(NamedTuple):
    """Pooled features of one split: unpack as `X, y, paths, classes`."""

    X: np.ndarray  # (n, d) float32
    y: np.ndarray  # (n,) int64, indices into classes
    paths: list[str]  # relative to DATA
    classes: list[str]


def load_features(cache: PathLike, pooling: str = "avg", split: str = "train") -> Features:
    """The cached features of one split, ready for any scikit-learn estimator.

    `cache` is a cache file (`ARTIFACTS/features/*.h5`) or an ARTIFACTS folder (its current
    cache, the one the latest `make features` wrote). `pooling`: avg, max or flatten; `split`:
    train or validation. Original images only (no augmented view), in cache order.
    """
    from pipeline import dataset, store
    from pipeline.exporting import cache_of

    if split not in dataset.SPLITS:
        raise UserError(f"split must be one of {', '.join(dataset.SPLITS)}; got '{split}'")
    path = cache_of(cache)
    with store.reading(path.parent), store.open_cache(path) as f:
        idx = store.index_of(f, path)
        feats = store.features_of(f, idx, pooling, split)
    return Features(feats.X, feats.y, feats.paths, list(idx.classes))
