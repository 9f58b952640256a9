"""Command line: `python -m pipeline <command>`; the Makefile's targets call these commands.

A user error (bad data, settings or order of commands) prints one line and exits with code 2;
a full disk (or quota, or file-size limit) prints one line and exits with code 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import UserError

EPILOG = "Every option has a Makefile variable of the same name in capitals (make help)."


def _path(text: str) -> Path:
    """A path argument: `~` expanded (the Makefile quotes paths, so the shell does not)."""
    return Path(text).expanduser()


def _images(text: str) -> Path:
    """IMAGES: never empty (an empty path would be the current folder, classified whole)."""
    if not text.strip():
        raise UserError(
            "IMAGES is empty; name what to classify: make predict IMAGES=path/to/image-or-folder"
            " (or a .txt/.csv list)"
        )
    return _path(text)


def _common(p: argparse.ArgumentParser, seed: bool = True) -> None:
    p.add_argument(
        "--artifacts",
        default="artifacts",
        type=_path,
        help="folder for caches, heads and reports (default: artifacts)",
    )
    if seed:
        p.add_argument(
            "--seed", type=int, default=0, help="seed for every random choice (default 0)"
        )


def _backbone(p: argparse.ArgumentParser, layer: bool = True) -> None:
    from pipeline.backbone import FAMILIES

    p.add_argument(
        "--backbone",
        default="vgg16",
        help=f"one of {', '.join(FAMILIES)} (default vgg16); each with its own preprocessing",
    )
    p.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet (Keras download), none (random, seeded), or a VGG16 no-top "
        "weights file (.h5 / .weights.h5)",
    )
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="input size in pixels (default: the backbone's own, 224; 299 for inceptionv3)",
    )
    if layer:
        p.add_argument(
            "--layer",
            default=None,
            help="backbone layer to cache (default: its last feature stage, e.g. block5_pool)",
        )
    p.add_argument("--batch", type=int, default=32, help="images per backbone batch (default 32)")
    _precision(p)


def _precision(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        default="auto",
        help="compute precision of the backbone: auto (default: mixed_bfloat16 where the CPU "
        "has avx512_bf16 or AMX, on a GPU its choice, float32 elsewhere), float32, "
        "mixed_float16 or mixed_bfloat16; each its own cache",
    )


def _cluster(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cluster",
        default="",
        help="run on Dask: local:N (N worker processes here) or tcp://host:8786 (a running "
        "scheduler; DATA and ARTIFACTS on a shared filesystem); default: this process",
    )


def _repeats(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="repeated CV: this many seeded k-fold partitions (default: as many as --budget "
        "holds at the first partition's cost, at most 10 up to 1,000 training images, 5 up "
        "to 5,000, 3 up to 20,000, then 1; a third of that for network heads)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="minutes one run's cross-validation may take when --repeats is not given "
        "(default 3, or PIPELINE_BUDGET): the first partition's time sets the repeats",
    )


def _param(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument(
        "--param",
        action="append",
        default=[],
        dest="params",
        metavar="NAME=VALUE",
        help=help + "; repeatable",
    )


def parser() -> argparse.ArgumentParser:
    from pipeline import heads

    ap = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Transfer learning done right: cache VGG16 features once, train and "
        "cross-validate heads on the cache, compare them in one report.",
        epilog=EPILOG,
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser(
        "features",
        help="embed every image once into the HDF5 feature cache",
        description="Run the frozen VGG16 over DATA; reruns embed only new or changed images.",
        epilog=EPILOG,
    )
    p.add_argument(
        "--data",
        default="data",
        type=_path,
        help="DATA/train/<class>/ (+ optional DATA/validation/<class>/), DATA/<class>/, or a "
        "CSV file path,label[,split] (paths relative to the CSV's folder)",
    )
    p.add_argument("--dtype", default="float16", help="stored feature type: float16 or float32")
    p.add_argument(
        "--augment",
        type=int,
        default=0,
        help="also cache K augmented views of each training image (flip, zoom, "
        "shear, rotation; seeded), computed once (default 0)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="hash every file again, even when its size, mtime and inode are unchanged",
    )
    p.add_argument(
        "--maps",
        type=int,
        choices=(0, 1),
        default=1,
        help="1: store the feature maps and pooled vectors (default); 0: pooled vectors only "
        "(very large collections; POOL=flatten, dense on maps and finetune need the maps)",
    )
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="embed every image again (after a Pillow/TensorFlow/Keras upgrade: a cache never "
        "mixes rows made by two versions)",
    )
    _backbone(p)
    _cluster(p)
    _common(p)

    head_help = "; ".join(f"{h.name}: {h.description}" for h in heads.HEADS.values())
    p = sub.add_parser(
        "train-head",
        help="cross-validate and save a head on the cached features",
        description="Train a head on the feature cache only. Heads: " + head_help,
        epilog=EPILOG,
    )
    p.add_argument("--head", default="logreg", help=f"one of {', '.join(heads.HEADS)}")
    p.add_argument(
        "--pool",
        default=None,
        help="avg, max or flatten (default: avg for logreg/svm, flatten for dense)",
    )
    p.add_argument(
        "--folds",
        type=int,
        default=None,
        help="k-fold cross-validation with k folds (default: 5 folds up to 200,000 training "
        "images, one held-out split above; see the README)",
    )
    _repeats(p)
    _param(p, "head setting (e.g. C=0.1, learning_rate=1e-4); fixed instead of tuned")
    p.add_argument(
        "--features",
        type=_path,
        default=None,
        help="cache file to use (default: the latest `features` run)",
    )
    p.add_argument("--jobs", type=int, default=None, help="parallel folds (default: cores)")
    p.add_argument(
        "--views",
        type=int,
        default=0,
        help="train on the originals plus K cached augmented views each; folds keep "
        "an image's views together and score originals only (default 0)",
    )
    _cluster(p)
    _common(p)

    p = sub.add_parser(
        "finetune",
        help="cache where the last stage starts once, then cross-validate and save that stage "
        "+ head fine-tuned",
        description="Caches the backbone's output where its last stage starts (VGG16: "
        "block4_pool; incremental, like features), then trains that stage (from the pretrained "
        "weights, BatchNorm frozen) and a dense head on it: head first, then the stage at a "
        "small learning rate. Cross-validated and saved like every head.",
        epilog=EPILOG,
    )
    p.add_argument("--data", default="data", type=_path, help="as for features")
    p.add_argument("--dtype", default="float16", help="stored feature type")
    _backbone(p, layer=False)  # fine-tuning starts where the last stage does
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    _repeats(p)
    _param(
        p,
        "finetune setting: hidden, dropout, head_lr, finetune_lr, head_epochs, "
        "finetune_epochs, batch_size, patience",
    )
    _cluster(p)
    _common(p)

    p = sub.add_parser(
        "sweep",
        help="heads x pooling x augmented views on the cache, ranked, with a learning curve",
        epilog=EPILOG,
    )
    p.add_argument("--heads", default="logreg,svm,dense", help="comma-separated heads")
    p.add_argument("--pools", default="avg,max,flatten", help="comma-separated poolings")
    p.add_argument("--views", default="0", help="comma-separated augmented views, e.g. 0,4")
    p.add_argument(
        "--folds",
        type=int,
        default=None,
        help="k-fold CV (default: 5 folds up to 200,000 training images, one held-out split above)",
    )
    _repeats(p)
    p.add_argument(
        "--no-race",
        dest="race",
        action="store_false",
        help="give every combination all its partitions (default: a race; after the first "
        "partition only those tied with the best, or within --margin of it, go on)",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=None,
        help="a run this close to the best after the first partition races on even when its "
        "paired interval excludes 0 (default 0.01: one point of accuracy)",
    )
    p.add_argument("--points", type=int, default=5, help="learning-curve points (default 5)")
    p.add_argument(
        "--backbones",
        default="",
        help="comma-separated backbones, each extracted once from --data into its own cache and "
        "ranked together (default: the current cache only)",
    )
    p.add_argument("--data", default=None, type=_path, help="images, for --backbones")
    p.add_argument("--weights", default="imagenet", help="weights, for --backbones")
    p.add_argument("--size", type=int, default=None, help="input size, for --backbones")
    p.add_argument("--batch", type=int, default=32, help="images per batch, for --backbones")
    _precision(p)
    _cluster(p)
    _common(p)

    p = sub.add_parser(
        "report", help="write report.json/.md/.html comparing every trained head", epilog=EPILOG
    )
    p.add_argument(
        "--gallery",
        default=None,
        help="also show the misclassified images of this run (or 'all'); the best run's always",
    )
    _common(p, seed=False)

    p = sub.add_parser("predict", help="classify new images with a trained head", epilog=EPILOG)
    p.add_argument(
        "--images",
        required=True,
        type=_images,
        help="an image file, a folder, or a .txt/.lst (one path per line) or .csv (a path "
        "column) file listing images, paths relative to its folder",
    )
    p.add_argument("--run", default=None, help="trained head to use (default: best CV accuracy)")
    p.add_argument(
        "--out", default=None, type=_path, help="CSV to write (default ARTIFACTS/predictions.csv)"
    )
    p.add_argument(
        "--weights",
        default=None,
        help="weights file if not where `features` found it (checked by content)",
    )
    p.add_argument("--batch", type=int, default=32, help="images per backbone batch")
    p.add_argument(
        "--backbone",
        default=None,
        help="the backbone you expect the run to use (refused if it is another one)",
    )
    p.add_argument(
        "--tta",
        type=int,
        default=0,
        help="test-time augmentation: average over the image and K augmented views",
    )
    p.add_argument(
        "--topk",
        type=int,
        default=0,
        help="also write the K best labels with their probabilities (label_2,probability_2,...)",
    )
    _cluster(p)
    _common(p, seed=False)

    p = sub.add_parser(
        "export",
        help="write the cache's pooled features with paths, labels, split and SHA-256 "
        "(NPZ or CSV) for other tools",
        epilog=EPILOG,
    )
    p.add_argument(
        "--format",
        default="npz",
        choices=("npz", "csv"),
        help="npz: arrays X, y, labels, paths, split, sha256, classes; csv: one row per image, "
        "path,label,split,sha256 then the features (default npz)",
    )
    p.add_argument("--pool", default="avg", help="avg, max or flatten (default avg)")
    p.add_argument(
        "--out",
        default=None,
        type=_path,
        help="file to write (default ARTIFACTS/export/<cache>-<pool>.<format>)",
    )
    p.add_argument(
        "--features",
        type=_path,
        default=None,
        help="cache file to export (default: the latest `features` run)",
    )
    _common(p, seed=False)

    p = sub.add_parser(
        "demo", help="end to end on scikit-learn's digits, written as PNGs", epilog=EPILOG
    )
    p.add_argument("--weights", default="imagenet", help="as for features")
    p.add_argument("--size", type=int, default=64, help="input size for the demo (default 64)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    _common(p, seed=False)
    return ap


# each command's function in `pipeline.api`; its options are that function's parameters
COMMANDS = {
    "features": "extract",
    "train-head": "train_head",
    "finetune": "finetune",
    "sweep": "sweep",
    "report": "report",
    "predict": "predict",
    "export": "export",
}


def run(args: argparse.Namespace) -> None:
    """Run one command through `pipeline.api`, the functions a script calls, with its options
    as keyword arguments (an option the function lacks is a TypeError, never ignored)."""
    from pipeline import api
    from pipeline.progress import StreamLines, end_line, lines_to

    def log(s: str) -> None:
        end_line()  # a progress line rewritten on the terminal ends before a result's line
        print(s, flush=True)

    settings = {k: v for k, v in vars(args).items() if k != "command"}
    with lines_to(StreamLines()):  # progress: stderr, rewritten in place on a terminal
        if args.command == "demo":
            from pipeline.demo import run_demo

            run_demo(**settings, log=log)
        elif args.command == "predict":  # row by row, none kept: memory flat in the images
            for _ in api.predict_rows(**settings, log=log):
                pass
        else:
            getattr(api, COMMANDS[args.command])(**settings, log=log)


def main(argv: list[str] | None = None) -> int:
    # past `ulimit -f` a write fails with EFBIG (one line): CPython ignores SIGXFSZ at start
    from pipeline.progress import end_line

    try:
        args = parser().parse_args(argv)
    except UserError as e:  # a setting refused while the command line is read
        print(f"error: {e}", file=sys.stderr)
        return 2

    try:
        run(args)
    except UserError as e:  # 2; no room on the disk (DiskFull): 1
        end_line()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        end_line()
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        end_line()
    return 0
