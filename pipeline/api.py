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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pipeline.errors import UserError

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


def _setting(v: Any) -> str:
    """A value as PARAMS would spell it: 50.0 -> "50" (an integer setting accepts it)."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def head_params(params: Mapping[str, Any] | Iterable[str] | str | None) -> dict[str, str]:
    """PARAMS as the head reads them: "C=0.1 epochs=5", ["C=0.1"] or {"C": 0.1}."""
    if params is None:
        return {}
    if isinstance(params, Mapping):
        return {str(k).strip(): _setting(v) for k, v in params.items()}
    items = params.split() if isinstance(params, str) else list(params)
    out = {}
    for v in items:
        if "=" not in v:
            raise UserError(f"head setting '{v}' must look like name=value, e.g. C=0.1")
        k, _, val = v.partition("=")
        out[k.strip()] = val.strip()
    return out


def _names(value: str | Iterable[Any]) -> str:
    """A comma-separated setting (SWEEP_HEADS=logreg,svm) from a string or a list."""
    return value if isinstance(value, str) else ",".join(str(v) for v in value)


def extract(
    data: PathLike,
    artifacts: PathLike = "artifacts",
    backbone: str = "vgg16",
    weights: str = "imagenet",
    size: int | None = None,
    layer: str | None = None,
    batch: int = 32,
    dtype: str = "float16",
    precision: str = "auto",
    augment: int = 0,
    rebuild: bool = False,
    verify: bool = False,
    maps: bool = True,
    seed: int = 0,
    cluster: str = "",
    log: Log | None = print,
) -> Summary:
    """`make features`: embed every image of `data` once into the ARTIFACTS feature cache.

    `data` is an image folder (class folders, or train/ and validation/ with class folders) or
    a `path,label[,split]` CSV file. Reruns embed only new or changed images. Returns what the
    run did (`.cache` is the cache file, `.skipped_rows` the files that could not be read).
    `precision="auto"` computes in bfloat16 where the processor does so natively (AVX512-BF16 or
    AMX; on a GPU, its own choice) and in float32 elsewhere; the precision it resolves to is in
    the cache key and the first line logged. `log=None` prints nothing, progress included.
    """
    from pipeline import cluster as dask_cluster
    from pipeline.backbone import BackboneSpec
    from pipeline.features import extract as run

    spec = BackboneSpec(
        weights=weights,
        layer=layer,
        input_size=size,
        seed=seed,
        name=backbone,
        precision=precision,
    )
    with _progress(log), dask_cluster.client(cluster) as c:
        return run(
            Path(data),
            Path(artifacts),
            spec,
            batch_size=batch,
            dtype=dtype,
            augment=augment,
            rebuild=rebuild,
            verify=verify,
            maps=bool(maps),
            log=_log(log),
            embedder_fn=dask_cluster.embedder(c) if c is not None else None,
        )


def train_head(
    artifacts: PathLike = "artifacts",
    head: str = "logreg",
    pool: str | None = None,
    folds: int | None = None,
    seed: int = 0,
    params: Mapping[str, Any] | Iterable[str] | str | None = None,
    views: int = 0,
    features: PathLike | None = None,
    jobs: int | None = None,
    cluster: str = "",
    log: Log | None = print,
    repeats: int | None = None,
    budget: float | None = None,
) -> dict[str, Any]:
    """`make train-head`: cross-validate, validate and save one head on the cached features.

    `repeats` partitions of `folds` folds (default: as many as `budget` minutes hold at the
    first partition's cost, default 3, at most a number chosen by the training images; see
    the README), each run's mean with its 95 % interval in `result["cv"]`. `folds=None`
    sizes the evaluation to the data: 5 folds up to 200,000 training images, one held-out
    split above (`result["cv"]["protocol"]` says which, and why).

    Returns the run's result (as in `heads/<run>/result.json`): `result["cv"]` holds the fold
    accuracies and out-of-fold predictions, `result["validation"]` the validation scores.
    """
    from pipeline import cluster as dask_cluster
    from pipeline.train import train_head as run

    with _progress(log), dask_cluster.client(cluster) as c:
        return run(
            Path(artifacts),
            head=head,
            pooling=pool,
            folds=folds,
            seed=seed,
            params=head_params(params),
            features=Path(features) if features else None,
            n_jobs=jobs,
            views=views,
            log=_log(log),
            client=c,
            repeats=repeats,
            budget=budget,
        )


def finetune(
    data: PathLike,
    artifacts: PathLike = "artifacts",
    backbone: str = "vgg16",
    weights: str = "imagenet",
    size: int | None = None,
    batch: int = 32,
    dtype: str = "float16",
    precision: str = "auto",
    folds: int = 5,
    seed: int = 0,
    params: Mapping[str, Any] | Iterable[str] | str | None = None,
    cluster: str = "",
    log: Log | None = print,
    repeats: int | None = None,
    budget: float | None = None,
) -> dict[str, Any]:
    """`make finetune`: cache where the backbone's last stage starts, then fine-tune it + a head.

    `repeats` and `budget` as for `train_head`. Returns the run's result, like `train_head`.
    """
    from pipeline import cluster as dask_cluster
    from pipeline.backbone import BackboneSpec, family
    from pipeline.features import extract as run_extract
    from pipeline.train import train_head as run_train

    start = family(backbone).finetune_from
    if start is None:
        raise UserError(
            f"BACKBONE={backbone} has no last stage to fine-tune; use `make train-head`"
        )
    spec = BackboneSpec(
        weights=weights,
        layer=start,
        input_size=size,
        seed=seed,
        name=backbone,
        precision=precision,
    )
    with _progress(log), dask_cluster.client(cluster) as c:
        s = run_extract(
            Path(data),
            Path(artifacts),
            spec,
            batch_size=batch,
            dtype=dtype,
            set_current=False,
            log=_log(log),
            embedder_fn=dask_cluster.embedder(c) if c is not None else None,
        )
        return run_train(
            Path(artifacts),
            head="finetune",
            folds=folds,
            seed=seed,
            params=head_params(params),
            features=s.cache,
            log=_log(log),
            client=c,
            repeats=repeats,
            budget=budget,
        )


def sweep(
    artifacts: PathLike = "artifacts",
    heads: str | Iterable[str] = "logreg,svm,dense",
    pools: str | Iterable[str] = "avg,max,flatten",
    views: str | Iterable[int] = "0",
    folds: int | None = None,
    seed: int = 0,
    points: int = 5,
    backbones: str | Iterable[str] = "",
    data: PathLike | None = None,
    weights: str = "imagenet",
    size: int | None = None,
    batch: int = 32,
    precision: str = "auto",
    cluster: str = "",
    log: Log | None = print,
    repeats: int | None = None,
    budget: float | None = None,
    race: bool = True,
    margin: float | None = None,
) -> dict[str, Any]:
    """`make sweep`: every head x pooling x views (x backbone) on the cache, ranked.

    `race` (default): every run is scored on the first partition and only those the data
    cannot yet tell from the best (or within `margin` of it, default 0.01) get their other
    partitions; `repeats` and `budget` as for `train_head`.

    `heads`, `pools`, `views` and `backbones` take a comma-separated string or a list, like
    SWEEP_HEADS, SWEEP_POOLS, SWEEP_VIEWS and SWEEP_BACKBONES. `folds=None` sizes the
    evaluation to the data, as `train_head` does. Returns the sweep's summary.
    """
    from pipeline import cluster as dask_cluster
    from pipeline import stats
    from pipeline.sweeping import run_sweep

    with _progress(log), dask_cluster.client(cluster) as c:
        return run_sweep(
            Path(artifacts),
            _names(heads),
            _names(pools),
            _names(views),
            folds=folds,
            seed=seed,
            curve_points=points,
            repeats=repeats,
            budget=budget,
            race=race,
            margin=stats.RACE_MARGIN if margin is None else margin,
            log=_log(log),
            client=c,
            backbones=_names(backbones),
            extraction={
                "data": Path(data) if data is not None else None,
                "weights": weights,
                "size": size,
                "batch": batch,
                "precision": precision,
                "embedder_fn": dask_cluster.embedder(c) if c is not None else None,
            },
        )


def report(
    artifacts: PathLike = "artifacts", gallery: str | None = None, log: Log | None = print
) -> dict[str, Any]:
    """`make report`: write ARTIFACTS/report/report.{json,md,html}; return the report's content.

    `gallery`: a run name (or "all") whose misclassified images are shown too.
    """
    from pipeline.reporting import build_report

    with _progress(log):
        return build_report(Path(artifacts), log=_log(log), gallery_runs=gallery)


def predict(
    images: PathLike | Sequence[PathLike],
    artifacts: PathLike = "artifacts",
    run: str | None = None,
    out: PathLike | None = None,
    tta: int = 0,
    topk: int = 0,
    weights: str | None = None,
    backbone: str | None = None,
    batch: int = 32,
    cluster: str = "",
    log: Log | None = print,
) -> list[dict[str, Any]]:
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
    args = (images, artifacts, run, out, tta, topk, weights, backbone, batch, cluster, log)
    return list(predict_rows(*args))


def predict_rows(
    images: PathLike | Sequence[PathLike],
    artifacts: PathLike = "artifacts",
    run: str | None = None,
    out: PathLike | None = None,
    tta: int = 0,
    topk: int = 0,
    weights: str | None = None,
    backbone: str | None = None,
    batch: int = 32,
    cluster: str = "",
    log: Log | None = print,
) -> Iterator[dict[str, Any]]:
    """`predict`'s rows one at a time, as `make predict` makes them: the CSV is written as they
    come (`out + ".partial"`, renamed onto `out` after the last one) and memory stays flat in
    the number of images. A killed run, rerun with the same settings, resumes: only images not
    yet in the partial file are predicted (see `pipeline.prediction.stream`).
    """
    from pipeline import cluster as dask_cluster
    from pipeline.prediction import stream

    with _progress(log), dask_cluster.client(cluster) as c:
        yield from stream(
            Path(artifacts),
            Path(images) if isinstance(images, (str, os.PathLike)) else list(images),
            run=run,
            out=Path(out) if out else None,
            weights=weights,
            batch_size=batch,
            tta=tta,
            log=_log(log),
            backbone=backbone,
            topk=topk,
            client=c,
        )


def export(
    artifacts: PathLike = "artifacts",
    format: str = "npz",
    pool: str = "avg",
    out: PathLike | None = None,
    features: PathLike | None = None,
    log: Log | None = print,
) -> Path:
    """`make export`: the pooled features of the current cache as an NPZ or CSV file; its path.

    Every original image with its path, label (class name), split and SHA-256 (see
    `pipeline.exporting`'s module docstring for the exact layout).
    """
    from pipeline.exporting import export as run

    return run(
        Path(artifacts),
        format,
        pool,
        Path(out) if out else None,
        Path(features) if features else None,
        log=_log(log),
    )


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
