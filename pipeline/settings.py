"""Every command's settings, defined once: type, default, help, Makefile variable and check.

One frozen dataclass per command (`ExtractSettings` for `make features`, ...). The command line
is built from them (`pipeline.cli.parser`), `pipeline.api`'s functions take one of them or its
fields (`takes`), and tests/test_settings.py checks the Makefile's `takes.<target>` lists and
defaults against them. A value is checked once, when the object is made, as scikit-learn checks
an estimator's parameters in one place: a refusal is a one-line UserError naming the setting by
its Makefile variable (or its option, for one the Makefile does not pass) and the value to fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.settings_base import (
    Params,
    PathLike,
    Setting,
    Settings,
    above,
    at_least,
    not_empty,
    one_of,
)

if TYPE_CHECKING:
    from pipeline.backbone import BackboneSpec
    from pipeline.features import Summary

# --- the settings commands share: each spelled here once (a command may change its help) ----

ARTIFACTS = Setting(
    "artifacts", "folder for caches, heads and reports (default: %(default)s)", "ARTIFACTS",
    kind="path",
)  # fmt: skip
SEED = Setting(0, "seed for every random choice (default %(default)s)", "SEED", kind="int")
DATA = Setting(
    "data",
    "DATA/train/<class>/ (+ optional DATA/validation/<class>/), DATA/<class>/, or a CSV file "
    "path,label[,split] (paths relative to the CSV's folder)",
    "DATA",
    kind="path",
)


def _backbones_help() -> str:
    from pipeline.backbone import FAMILIES

    return f"one of {', '.join(FAMILIES)} (default %(default)s); each with its own preprocessing"


BACKBONE = Setting("vgg16", _backbones_help, "BACKBONE")
WEIGHTS = Setting(
    "imagenet",
    "imagenet (Keras download), none (random, seeded), or a VGG16 no-top weights file "
    "(.h5 / .weights.h5)",
    "WEIGHTS",
)
SIZE = Setting(
    None,
    "input size in pixels (default: the backbone's own, 224; 299 for inceptionv3)",
    "SIZE",
    kind="int",
)
LAYER = Setting(
    None, "backbone layer to cache (default: its last feature stage, e.g. block5_pool)", "LAYER"
)
BATCH = Setting(
    32, "images per backbone batch (default %(default)s)", "BATCH", kind="int",
    check=at_least(1, "a positive integer"),
)  # fmt: skip
DTYPE = Setting("float16", "stored feature type: float16 or float32", "DTYPE")
PRECISION = Setting(
    "auto",
    "compute precision of the backbone: auto (default: mixed_bfloat16 where the CPU has "
    "avx512_bf16 or AMX, on a GPU its choice, float32 elsewhere), float32, mixed_float16 or "
    "mixed_bfloat16; each its own cache",
    "PRECISION",
)
CLUSTER = Setting(
    "",
    "run on Dask: local:N (N worker processes here) or tcp://host:8786 (a running scheduler; "
    "DATA and ARTIFACTS on a shared filesystem); default: this process",
    "CLUSTER",
)
FOLDS = Setting(
    None,
    "k-fold cross-validation with k folds (default: 5 folds up to 200,000 training images, one "
    "held-out split above; see the README)",
    "FOLDS",
    kind="int",
    check=at_least(2, "at least 2"),
)
REPEATS = Setting(
    None,
    "repeated CV: this many seeded k-fold partitions (default: as many as --budget holds at "
    "the first partition's cost, at most 10 up to 1,000 training images, 5 up to 5,000, 3 up "
    "to 20,000, then 1; a third of that for network heads)",
    "REPEATS",
    kind="int",
    check=at_least(1, "1 or more"),
)
BUDGET = Setting(
    None,
    "minutes one run's cross-validation may take when --repeats is not given (default 3, or "
    "PIPELINE_BUDGET): the first partition's time sets the repeats",
    "BUDGET",
    kind="float",
    check=above(0, "a positive number of minutes"),
)
PARAMS = Setting(
    None, "", "PARAMS", kind="params", flag="--param",
    cli={"action": "append", "metavar": "NAME=VALUE"},
)  # fmt: skip
POOL = Setting(None, "avg, max or flatten (default: avg for logreg/svm, flatten for dense)", "POOL")
VIEWS = Setting(
    0,
    "train on the originals plus K cached augmented views each; folds keep an image's views "
    "together and score originals only (default %(default)s)",
    "VIEWS",
    kind="int",
    check=at_least(0, "0 or a positive number of views"),
)
FEATURES = Setting(
    None, "cache file to use (default: the latest `features` run)", None, kind="path"
)
OUT = Setting(None, "", "OUT", kind="path")

# --- the commands -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractSettings(Settings):
    """`make features`."""

    command: ClassVar[str] = "features"
    function: ClassVar[str] = "extract"
    summary: ClassVar[str] = "embed every image once into the HDF5 feature cache"
    description: ClassVar[str | Callable[[], str] | None] = (
        "Run the frozen VGG16 over DATA; reruns embed only new or changed images."
    )

    data: PathLike = DATA()
    artifacts: PathLike = ARTIFACTS()
    backbone: str = BACKBONE()
    weights: str = WEIGHTS()
    size: int | None = SIZE()
    layer: str | None = LAYER()
    batch: int = BATCH()
    dtype: str = DTYPE()
    precision: str = PRECISION()
    augment: int = Setting(
        0,
        "also cache K augmented views of each training image (flip, zoom, shear, rotation; "
        "seeded), computed once (default %(default)s)",
        "AUGMENT",
        kind="int",
        check=at_least(0, "0 or a positive number of views"),
    )()
    rebuild: bool = Setting(
        False,
        "embed every image again (after a Pillow/TensorFlow/Keras upgrade: a cache never mixes "
        "rows made by two versions)",
        "REBUILD",
        kind="bool",
    )()
    verify: bool = Setting(
        False,
        "hash every file again, even when its size, mtime and inode are unchanged",
        "VERIFY",
        kind="bool",
    )()
    maps: bool = Setting(
        True,
        "1: store the feature maps and pooled vectors (default); 0: pooled vectors only (very "
        "large collections; POOL=flatten, dense on maps and finetune need the maps)",
        "MAPS",
        kind="bool01",
        check=lambda name, v: None if v in (0, 1) else f"{name} must be 0 or 1; got {v!r}",
    )()
    seed: int = SEED()
    cluster: str = CLUSTER()

    def run(
        self, log: Callable[[str], None], set_current: bool = True, embedder_fn: Any = None
    ) -> Summary:
        """`features.extract` with these settings (`embedder_fn`: e.g. on Dask workers)."""
        from pipeline.features import extract

        return extract(
            Path(self.data),
            Path(self.artifacts),
            self.spec(),
            batch_size=self.batch,
            dtype=self.dtype,
            augment=self.augment,
            rebuild=self.rebuild,
            verify=self.verify,
            maps=bool(self.maps),
            set_current=set_current,
            log=log,
            embedder_fn=embedder_fn,
        )

    def spec(self) -> BackboneSpec:
        """The backbone these settings run."""
        from pipeline.backbone import BackboneSpec

        return BackboneSpec(
            weights=self.weights,
            layer=self.layer,
            input_size=self.size,
            seed=self.seed,
            name=self.backbone,
            precision=self.precision,
        )


def _heads_help() -> str:
    from pipeline import heads

    return "; ".join(f"{h.name}: {h.description}" for h in heads.HEADS.values())


def _head_help() -> str:
    from pipeline import heads

    return f"one of {', '.join(heads.HEADS)}"


@dataclass(frozen=True)
class TrainHeadSettings(Settings):
    """`make train-head`."""

    command: ClassVar[str] = "train-head"
    function: ClassVar[str] = "train_head"
    summary: ClassVar[str] = "cross-validate and save a head on the cached features"
    description: ClassVar[str | Callable[[], str] | None] = lambda: (
        "Train a head on the feature cache only. Heads: " + _heads_help()
    )

    artifacts: PathLike = ARTIFACTS()
    head: str = Setting("logreg", _head_help, "HEAD")()
    pool: str | None = POOL()
    folds: int | None = FOLDS()
    seed: int = SEED()
    params: Params = PARAMS(
        help="head setting (e.g. C=0.1, learning_rate=1e-4); fixed instead of tuned; repeatable"
    )
    views: int = VIEWS()
    features: PathLike | None = FEATURES()
    jobs: int | None = Setting(None, "parallel folds (default: cores)", None, kind="int")()
    cluster: str = CLUSTER()
    repeats: int | None = REPEATS()
    budget: float | None = BUDGET()
    groups: str = Setting(
        "content",
        "what folds keep together: content (the same bytes) or near (near-duplicate sets "
        "too, as `make audit` finds them; a run of its own, -near)",
        "GROUPS",
        check=one_of("content", "near"),
    )()


@dataclass(frozen=True)
class FinetuneSettings(Settings):
    """`make finetune`."""

    command: ClassVar[str] = "finetune"
    function: ClassVar[str] = "finetune"
    summary: ClassVar[str] = (
        "cache where the last stage starts once, then cross-validate and save that stage "
        "+ head fine-tuned"
    )
    description: ClassVar[str | Callable[[], str] | None] = (
        "Caches the backbone's output where its last stage starts (VGG16: block4_pool; "
        "incremental, like features), then trains that stage (from the pretrained weights, "
        "BatchNorm frozen) and a dense head on it: head first, then the stage at a small "
        "learning rate. Cross-validated and saved like every head."
    )

    data: PathLike = DATA(help="as for features")
    artifacts: PathLike = ARTIFACTS()
    backbone: str = BACKBONE()
    weights: str = WEIGHTS()
    size: int | None = SIZE()
    batch: int = BATCH()
    dtype: str = DTYPE(help="stored feature type")
    precision: str = PRECISION()
    folds: int = FOLDS(default=5, help="cross-validation folds (default %(default)s)")
    seed: int = SEED()
    params: Params = PARAMS(
        help="finetune setting: hidden, dropout, head_lr, finetune_lr, head_epochs, "
        "finetune_epochs, batch_size, patience; repeatable"
    )
    cluster: str = CLUSTER()
    repeats: int | None = REPEATS()
    budget: float | None = BUDGET()


@dataclass(frozen=True)
class SweepSettings(Settings):
    """`make sweep`; with `backbones`, `data` to `precision` are each backbone's extraction."""

    command: ClassVar[str] = "sweep"
    function: ClassVar[str] = "sweep"
    summary: ClassVar[str] = (
        "heads x pooling x augmented views on the cache, ranked, with a learning curve"
    )

    artifacts: PathLike = ARTIFACTS()
    heads: str | Iterable[str] = Setting(
        "logreg,svm,dense", "comma-separated heads", "SWEEP_HEADS", kind="names"
    )()
    pools: str | Iterable[str] = Setting(
        "avg,max,flatten", "comma-separated poolings", "SWEEP_POOLS", kind="names"
    )()
    views: str | Iterable[int] = Setting(
        "0", "comma-separated augmented views, e.g. 0,4", "SWEEP_VIEWS", kind="names"
    )()
    folds: int | None = FOLDS(
        help="k-fold CV (default: 5 folds up to 200,000 training images, one held-out split above)"
    )
    seed: int = SEED()
    points: int = Setting(5, "learning-curve points (default %(default)s)", None, kind="int")()
    backbones: str | Iterable[str] = Setting(
        "",
        "comma-separated backbones, each extracted once from --data into its own cache and "
        "ranked together (default: the current cache only)",
        "SWEEP_BACKBONES",
        kind="names",
    )()
    data: PathLike | None = DATA(default=None, help="images, for --backbones")
    weights: str = WEIGHTS(help="weights, for --backbones")
    size: int | None = SIZE(help="input size, for --backbones")
    batch: int = BATCH(make=None, help="images per batch, for --backbones")
    precision: str = PRECISION()
    cluster: str = CLUSTER()
    repeats: int | None = REPEATS()
    budget: float | None = BUDGET()
    race: bool = Setting(
        True,
        "give every combination all its partitions (default: a race; after the first "
        "partition only those tied with the best, or within --margin of it, go on)",
        "RACE",
        kind="bool",
        flag="--no-race",
    )()
    margin: float | None = Setting(
        None,
        "a run this close to the best after the first partition races on even when its "
        "paired interval excludes 0 (default 0.01: one point of accuracy)",
        None,
        kind="float",
    )()

    def extraction(self) -> ExtractSettings | None:
        """Each backbone's extraction settings (its `backbone` set per backbone); None
        without `data`."""
        return None if self.data is None else ExtractSettings.of(self)


@dataclass(frozen=True)
class ReportSettings(Settings):
    """`make report`."""

    command: ClassVar[str] = "report"
    function: ClassVar[str] = "report"
    summary: ClassVar[str] = "write report.json/.md/.html comparing every trained head"

    artifacts: PathLike = ARTIFACTS()
    gallery: str | None = Setting(
        None,
        "also show the misclassified images of this run (or 'all'); the best run's always",
        "GALLERY",
    )()


@dataclass(frozen=True)
class AuditSettings(Settings):
    """`make audit`."""

    command: ClassVar[str] = "audit"
    function: ClassVar[str] = "audit"
    summary: ClassVar[str] = (
        "know your data: likely label errors, near-duplicates and leaks, outliers, "
        "calibration and a map, from a run (never runs the backbone)"
    )

    artifacts: PathLike = ARTIFACTS()
    run: str | None = Setting(None, "trained head to audit (default: best CV accuracy)", "RUN")()
    seed: int = SEED()


@dataclass(frozen=True)
class PredictSettings(Settings):
    """`make predict`; `images` is a path or a list of image files."""

    command: ClassVar[str] = "predict"
    function: ClassVar[str] = "predict"
    summary: ClassVar[str] = "classify new images with a trained head"

    images: PathLike | Sequence[PathLike] = Setting(
        dataclasses.MISSING,
        "an image file, a folder, or a .txt/.lst (one path per line) or .csv (a path column) "
        "file listing images, paths relative to its folder",
        "IMAGES",
        kind="path",
        check=not_empty,
        cli={"required": True},
    )()
    artifacts: PathLike = ARTIFACTS()
    run: str | None = Setting(None, "trained head to use (default: best CV accuracy)", "RUN")()
    out: PathLike | None = OUT(help="CSV to write (default ARTIFACTS/predictions.csv)")
    tta: int = Setting(
        0,
        "test-time augmentation: average over the image and K augmented views",
        "TTA",
        kind="int",
        check=at_least(0, "0 or a positive number of views"),
    )()
    topk: int = Setting(
        0,
        "also write the K best labels with their probabilities (label_2,probability_2,...)",
        "TOPK",
        kind="int",
        check=at_least(0, "0 or a positive number of labels"),
    )()
    weights: str | None = WEIGHTS(
        default=None, help="weights file if not where `features` found it (checked by content)"
    )
    backbone: str | None = BACKBONE(
        default=None,
        help="the backbone you expect the run to use (refused if it is another one)",
    )
    batch: int = BATCH(make=None, help="images per backbone batch")
    cluster: str = CLUSTER()


@dataclass(frozen=True)
class ExportSettings(Settings):
    """`make export`."""

    command: ClassVar[str] = "export"
    function: ClassVar[str] = "export"
    summary: ClassVar[str] = (
        "write the cache's pooled features with paths, labels, split and SHA-256 (NPZ or CSV) "
        "for other tools"
    )

    artifacts: PathLike = ARTIFACTS()
    format: str = Setting(
        "npz",
        "npz: arrays X, y, labels, paths, split, sha256, classes; csv: one row per image, "
        "path,label,split,sha256 then the features (default %(default)s)",
        "FORMAT",
        check=one_of("npz", "csv"),
    )()
    pool: str = POOL(default="avg", help="avg, max or flatten (default %(default)s)")
    out: PathLike | None = OUT(
        help="file to write (default ARTIFACTS/export/<cache>-<pool>.<format>)"
    )
    features: PathLike | None = FEATURES(
        help="cache file to export (default: the latest `features` run)"
    )


@dataclass(frozen=True)
class DemoSettings(Settings):
    """`make demo` (`pipeline.demo.run_demo`)."""

    command: ClassVar[str] = "demo"
    function: ClassVar[str] = "run_demo"
    summary: ClassVar[str] = "end to end on scikit-learn's digits, written as PNGs"

    artifacts: PathLike = ARTIFACTS()
    weights: str = WEIGHTS(help="as for features")
    size: int | None = SIZE(
        default=64, make=None, help="input size for the demo (default %(default)s)"
    )
    folds: int = FOLDS(default=5, make=None, help="cross-validation folds (default %(default)s)")


# every command, in the order `python -m pipeline --help` lists them
COMMANDS: tuple[type[Settings], ...] = (
    ExtractSettings,
    TrainHeadSettings,
    FinetuneSettings,
    SweepSettings,
    ReportSettings,
    AuditSettings,
    PredictSettings,
    ExportSettings,
    DemoSettings,
)
