"""Heads in a small registry of configured scikit-learn estimators.

`make(info, params, seed)` returns one estimator: a `Pipeline(StandardScaler, classifier)`,
wrapped in a `GridSearchCV` when a hyperparameter is tuned, and for the SVM in a calibration step
that gives it probabilities. The same estimator is cross-validated and saved, so CV scores exactly
what `predict` uses. Metadata routing passes `groups` (one per image content: an image, its
augmented views and its identical copies) to every inner split: the grid search's folds, the
SVM's calibration folds and the Keras heads' early-stopping split. TensorFlow is imported only
when a Keras head is fitted or loaded, never by the scikit-learn heads.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from pipeline import outputs, streaming, views
from pipeline.errors import UserError
from pipeline.inner import INNER_FOLDS, InnerCV, fit
from pipeline.keras_heads import DenseHead, FineTuneHead, KerasClassifier
from pipeline.neighbours import KNNHead
from pipeline.streaming import StreamingSGD

# A kernel SVM's nested CV grows faster than n^2: about a minute at 2,500 rows on 2 cores, hours
# past 20,000. Above this, `svm` says so and names the heads that scale.
SVM_MAX_ROWS = 20_000


class TuneThenCalibrate(ClassifierMixin, BaseEstimator):
    """Probabilities for a classifier without them (SVC), at the cost of a few extra fits.

    Tunes once on its training data, then calibrates the chosen setting on `cv` folds and
    refits it on all of it (`CalibratedClassifierCV(..., ensemble=False)`, scikit-learn's
    replacement for `SVC(probability=True)`). Calibrating the whole grid search instead would
    repeat it per fold. Predictions are the argmax of the calibrated probabilities, and this
    whole estimator is what cross-validation scores.
    """

    __metadata_request__fit = {"groups": True}  # noqa: RUF012

    def __init__(self, estimator: Any, cv: Any = 3) -> None:
        self.estimator = estimator
        self.cv = cv

    def fit(
        self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None
    ) -> TuneThenCalibrate:
        tuned = fit(clone(self.estimator), X, y, groups)
        self.chosen_params_ = chosen_params(tuned)
        best = tuned.best_estimator_ if isinstance(tuned, GridSearchCV) else tuned
        # The folds are drawn here, with the groups: with ensemble=False, scikit-learn (1.9)
        # calls the splitter without the routed groups, so a splitter object would ignore them.
        # They must be a partition (cross_val_predict): views stay in the test folds, with
        # their images, and weigh nothing in the calibration, which fits on originals only.
        contents = None if groups is None else views.content(groups)
        folds = list(self.cv.split(X, y, contents)) if hasattr(self.cv, "split") else self.cv
        weight = None
        if groups is not None and not views.originals(groups).all():
            weight = views.originals(groups).astype(np.float64)
        # every fold's training side must hold every class (calibration predicts on a partition)
        n_classes = len(np.unique(y))
        if all(len(np.unique(y[tr])) == n_classes for tr, _ in folds):
            base = _unweighted(clone(best))
            self.calibrated_ = CalibratedClassifierCV(base, cv=folds, ensemble=False)
            self.calibrated_.fit(X, y, sample_weight=weight)
            self.calibration_ = "inner folds"
        else:  # a class with too few distinct images: calibrated on the training data itself
            from sklearn.frozen import FrozenEstimator

            fitted = clone(best).fit(X, y)
            self.calibrated_ = CalibratedClassifierCV(FrozenEstimator(fitted), ensemble=False)
            self.calibrated_.fit(X, y, sample_weight=weight)
            self.calibration_ = "training data (a class has too few distinct images for folds)"
        self.classes_ = self.calibrated_.classes_
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.calibrated_.predict_proba(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


def _unweighted(est: Any) -> Any:
    """`est` with every step fitted without sample weights: they are the calibrator's alone."""
    for _, step in est.steps if isinstance(est, Pipeline) else [(None, est)]:
        if "sample_weight" in inspect.signature(step.fit).parameters:
            step.set_fit_request(sample_weight=False)
    return est


@dataclass(frozen=True)
class HeadInfo:
    """A registered head: how to build it, which settings it takes, which pooling suits it."""

    name: str
    description: str
    default_pooling: str
    params: dict[str, type]
    tuned: dict[str, list[float]]
    parallel_folds: bool
    build: Callable[[dict[str, Any], int, dict[str, Any]], Any]
    needs_layer: str | None = None
    calibrate: bool = False  # wrap in TuneThenCalibrate: probabilities for a classifier without
    max_rows: int | None = None  # above this, the head says it is impractical (PARAMS max_rows=)
    streams: bool = False  # learns from rows read block by block (`store.Rows`), never all


def _logreg(p: dict[str, Any], seed: int, ctx: dict[str, Any]) -> Any:
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("clf", LogisticRegression(C=p.get("C", 1.0), max_iter=p.get("max_iter", 2000))),
        ]
    )


def _svm(p: dict[str, Any], seed: int, ctx: dict[str, Any]) -> Any:
    p.pop("max_rows", None)  # a guard of the size, not a setting of the estimator
    return Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "clf",
                SVC(
                    C=p.get("C", 1.0),
                    kernel=p.get("kernel", "rbf"),
                    gamma="scale",
                    cache_size=1000,
                    random_state=seed,
                ),
            ),
        ]
    )


def _svm_linear(p: dict[str, Any], seed: int, ctx: dict[str, Any]) -> Any:
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("clf", LinearSVC(C=p.get("C", 1.0), max_iter=p.get("max_iter", 5000))),
        ]
    )


def _svm_nystroem(p: dict[str, Any], seed: int, ctx: dict[str, Any]) -> Any:
    # an RBF kernel approximated by n_components landmarks, then a linear SVM: linear in n
    return Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "map",
                Nystroem(
                    kernel="rbf",
                    n_components=p.get("n_components", 1000),
                    random_state=seed,
                ),
            ),
            ("clf", LinearSVC(C=p.get("C", 1.0), max_iter=p.get("max_iter", 5000))),
        ]
    )


def _sgd(p: dict[str, Any], seed: int, ctx: dict[str, Any]) -> Any:
    return StreamingSGD(
        alpha=p.get("alpha"),
        epochs=p.get("epochs", 5),
        tune_rows=p.get("tune_rows", streaming.TUNE_ROWS),
        random_state=seed,
        solver=p.get("solver", "auto"),
    )


def _knn(p: dict[str, Any], seed: int, ctx: dict[str, Any]) -> Any:
    if p.get("weights", "distance") not in ("uniform", "distance"):
        raise UserError(f"PARAMS weights={p['weights']}: use uniform or distance")
    knn = KNNHead(n_neighbors=p.get("n_neighbors", 5), weights=p.get("weights", "distance"))
    return Pipeline([("scale", StandardScaler()), ("clf", knn)])


def _dense(p: dict[str, Any], seed: int, ctx: dict[str, Any]) -> Any:
    return Pipeline([("scale", StandardScaler()), ("clf", DenseHead(random_state=seed, **p))])


def _finetune(p: dict[str, Any], seed: int, ctx: dict[str, Any]) -> Any:
    # No scaler: the stage's pretrained weights expect the backbone's raw activations.
    from pipeline.backbone import family

    fam = family(ctx.get("backbone", "vgg16"))
    return FineTuneHead(
        backbone=fam.name,
        weights=ctx["weights"],
        start_layer=ctx["layer"],
        end_layer=fam.layers[0],
        input_size=int(ctx["input_size"]),
        map_shape=tuple(ctx["feature_shape"]),
        backbone_seed=ctx.get("seed", 0),
        random_state=seed,
        **p,
    )


HEADS: dict[str, HeadInfo] = {
    h.name: h
    for h in (
        HeadInfo(
            "logreg",
            "multinomial logistic regression (linear probe), C tuned by inner CV",
            "avg",
            {"C": float, "max_iter": int},
            {"C": list(streaming.C_GRID)},
            True,
            _logreg,
        ),
        HeadInfo(
            "svm",
            "support vector machine (RBF by default), C tuned by inner CV",
            "avg",
            {"C": float, "kernel": str},
            {"C": [0.1, 1.0, 10.0]},
            True,
            _svm,
            calibrate=True,
            max_rows=SVM_MAX_ROWS,
        ),
        HeadInfo(
            "svm-linear",
            "linear SVM (LinearSVC), C tuned by inner CV, calibrated probabilities: any size",
            "avg",
            {"C": float, "max_iter": int},
            {"C": [1e-3, 1e-2, 1e-1, 1.0]},
            True,
            _svm_linear,
            calibrate=True,
        ),
        HeadInfo(
            "svm-nystroem",
            "RBF kernel approximated (Nystroem, 1000 components) + linear SVM, C tuned by inner "
            "CV, calibrated probabilities: a kernel SVM for large collections",
            "avg",
            {"C": float, "max_iter": int, "n_components": int},
            {"C": [1e-2, 1e-1, 1.0]},
            True,
            _svm_nystroem,
            calibrate=True,
        ),
        HeadInfo(
            "sgd",
            "logistic regression by averaged SGD, streamed over the cache block by block "
            "(scaler in one pass, alpha tuned by inner CV on a sample): never holds the features",
            "avg",
            {"alpha": float, "epochs": int, "tune_rows": int, "solver": str},
            {},
            True,
            _sgd,
            streams=True,
        ),
        HeadInfo(
            "knn",
            "k nearest neighbours on standardised, normalised features (cosine), k and the "
            "weighting tuned by inner CV: no training pass, often good with few images a class",
            "avg",
            {"n_neighbors": int, "weights": str},
            {"n_neighbors": [1, 3, 5, 10, 20], "weights": ["uniform", "distance"]},
            True,
            _knn,
        ),
        HeadInfo(
            "dense",
            "Keras Flatten-Dense(512, relu)-Dropout-softmax, Adam, early stopping",
            "flatten",
            {
                "hidden": int,
                "dropout": float,
                "learning_rate": float,
                "epochs": int,
                "batch_size": int,
                "patience": int,
            },
            {},
            False,
            _dense,
        ),
        HeadInfo(
            "finetune",
            "the backbone's last stage (from the pretrained weights; VGG16: block5) + dense "
            "head on the cached maps where it starts: head first, then the stage at a small "
            "learning rate, BatchNorm frozen",
            "flatten",
            {
                "hidden": int,
                "dropout": float,
                "head_lr": float,
                "finetune_lr": float,
                "head_epochs": int,
                "finetune_epochs": int,
                "batch_size": int,
                "patience": int,
            },
            {},
            False,
            _finetune,
            needs_layer="finetune_from",
        ),
    )
}


def get(name: str) -> HeadInfo:
    """The registered head called `name`; an unknown name lists the valid ones."""
    if name not in HEADS:
        raise UserError(f"HEAD must be one of {', '.join(HEADS)}; got '{name}'")
    return HEADS[name]


def check_size(info: HeadInfo, n_rows: int, params: dict[str, Any]) -> None:
    """A head that would not finish at this size says so and names what works (no silent switch)."""
    limit = params.get("max_rows", info.max_rows)
    if limit is None or n_rows <= limit or params.get("kernel") == "linear":
        return
    raise UserError(
        f"HEAD={info.name} is a kernel SVM: its nested cross-validation grows faster than n^2 and "
        f"would run for hours on {n_rows:,} training rows (limit {limit:,}); use "
        "HEAD=svm-nystroem (the same RBF kernel, approximated, linear in n) or HEAD=svm-linear, "
        f'or PARAMS="max_rows={n_rows}" to run it anyway'
    )


MEMORY_FACTOR = 4  # a head in memory peaks at about 4x its features (copies: fold, scaler, fit)


def available_memory() -> int:
    """Bytes this machine can give now without swapping (psutil: Linux's MemAvailable)."""
    import psutil

    return int(psutil.virtual_memory().available)


def check_memory(info: HeadInfo, n_rows: int, dim: int, client: Any = None) -> None:
    """A head that holds the features says when they would not fit, and names HEAD=sgd.

    With a Dask `client` the fits run on its workers: the one with the least memory
    available decides (each holds a training fold, or every row for the final fit).
    """
    if info.streams:
        return
    need = MEMORY_FACTOR * n_rows * dim * 4
    where = ""
    if client is not None:
        free = client.run(available_memory)  # {worker address: bytes}
        worker, have = min(free.items(), key=lambda kv: kv[1]) if free else ("?", 0)
        where = f" on the cluster's worker {worker}"
    else:
        have = available_memory()
    if need <= have:
        return
    raise UserError(
        f"HEAD={info.name} holds the features in memory: {n_rows:,} rows of {dim:,} floats "
        f"need about {need / 2**30:,.1f} GiB while fitting, more than the "
        f"{have / 2**30:,.1f} GiB available{where}; use HEAD=sgd (logistic regression streamed "
        "over the cache, never holding the features), or a smaller POOL"
    )


def parse_params(info: HeadInfo, raw: dict[str, str]) -> dict[str, Any]:
    """Convert `name=value` settings to the head's types; unknown or bad ones name the fix."""
    out: dict[str, Any] = {}
    if info.max_rows is not None and "max_rows" in raw:
        raw = dict(raw)
        try:
            out["max_rows"] = int(raw.pop("max_rows"))
        except ValueError:
            raise UserError("The 'max_rows' parameter must be an integer.") from None
    for k, v in raw.items():
        if k not in info.params:
            raise UserError(
                f"'{k}' is not a setting of head '{info.name}'; valid: {', '.join(info.params)}"
            )
        try:
            out[k] = info.params[k](v)
        except ValueError:
            raise UserError(
                f"The '{k}' parameter of head '{info.name}' must be of type "
                f"{info.params[k].__name__}. Got {v!r} instead."
            ) from None
        if info.params[k] in (int, float) and out[k] <= 0 and k != "dropout":
            raise UserError(
                f"The '{k}' parameter of head '{info.name}' must be positive. Got {v!r} instead."
            )
    if "dropout" in out and not 0 <= out["dropout"] < 1:
        raise UserError(f"The 'dropout' parameter must be in [0, 1). Got {out['dropout']} instead.")
    return out


def make(
    info: HeadInfo,
    params: dict[str, Any],
    seed: int,
    context: dict[str, Any] | None = None,
    n_jobs: int | None = 1,
) -> Any:
    """The head as one configured estimator, the same for cross-validation and the saved head.

    `n_jobs` parallelises the grid search (the final fit on a cluster: joblib's active backend).

    Hyperparameters the user did not fix are chosen by a GridSearchCV on group-aware inner
    folds of whatever it is fitted on (a training fold, or all of train for the saved head).
    """
    est = info.build(dict(params), seed, context or {})
    grid = {f"clf__{k}": v for k, v in info.tuned.items() if k not in params}
    if grid:
        est = GridSearchCV(
            est, grid, cv=InnerCV(INNER_FOLDS, seed), scoring="accuracy", n_jobs=n_jobs, refit=True
        )
    if info.calibrate:
        est = TuneThenCalibrate(est, cv=InnerCV(INNER_FOLDS, seed))
    return est


def chosen_params(est: Any) -> dict[str, Any]:
    """The hyperparameters a fitted (possibly tuned) estimator ended up with."""
    if isinstance(est, TuneThenCalibrate):
        return est.chosen_params_
    if isinstance(est, GridSearchCV):
        return {k.removeprefix("clf__"): v for k, v in est.best_params_.items()}
    if isinstance(est, StreamingSGD):
        return {"alpha": est.alpha_}
    return {}


def _keras_of(est: Any) -> KerasClassifier | None:
    if isinstance(est, TuneThenCalibrate):
        est = est.calibrated_.calibrated_classifiers_[0].estimator
    inner = est.best_estimator_ if isinstance(est, GridSearchCV) else est
    clf = inner.steps[-1][1] if isinstance(inner, Pipeline) else inner
    return clf if isinstance(clf, KerasClassifier) else None


def save_head(est: Any, folder: Path) -> list[Path]:
    """Save a fitted head: `head.joblib`, plus `model.keras` for the Keras heads."""
    written = [folder / "head.joblib"]
    with outputs.written(written[0]) as tmp:
        joblib.dump(est, tmp)
    keras_est = _keras_of(est)
    if keras_est is not None:
        written.append(folder / "model.keras")
        with outputs.written(written[1], suffix=".keras") as tmp:  # Keras wants the suffix
            keras_est.model_.save(tmp)
    return written


def load_head(folder: Path) -> Any:
    """Load a head saved by `save_head`."""
    path = folder / "head.joblib"
    if not path.is_file():
        raise UserError(f"no saved head in '{folder}'; run `make train-head` first")
    return joblib.load(path)
