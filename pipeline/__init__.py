"""Transfer learning done right: cached backbone features, cross-validated heads, one report.

The commands are functions here, with the Makefile's names and settings (see `pipeline.api`):
`extract`, `train_head`, `finetune`, `sweep`, `report`, `predict`, `export`, `load_features`.
Importing the package loads none of their dependencies (no TensorFlow, no scikit-learn): each
function imports what it needs when it runs.
"""

import os as _os

# Quiet TensorFlow's C++ start-up chatter and pin Keras 3 to TensorFlow before anything imports it.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from pipeline.api import (  # noqa: E402  (light: imports nothing heavy until called)
    Features,
    export,
    extract,
    finetune,
    load_features,
    predict,
    report,
    sweep,
    train_head,
)

__version__ = "0.1.0"
__all__ = [
    "Features",
    "export",
    "extract",
    "finetune",
    "load_features",
    "predict",
    "report",
    "sweep",
    "train_head",
]
