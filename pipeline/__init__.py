"""Transfer learning done right: cached backbone features, cross-validated heads, one report.

The commands are functions here, with the Makefile's names and settings (see `pipeline.api`):
`extract`, `train_head`, `finetune`, `sweep`, `report`, `predict`, `export`, `load_features`.
Importing the package loads none of their dependencies (no TensorFlow, no scikit-learn): each
function imports what it needs when it runs.
"""

import os as _os

# Pin Keras 3 to TensorFlow, and keep TensorFlow's C++ lines below ERROR quiet, before anything
# imports it (its start-up lines are held back by pipeline.progress.quiet_frameworks); VERBOSE=1
# (PIPELINE_VERBOSE=1) shows them all.
_verbose = _os.environ.get("PIPELINE_VERBOSE", "").strip() not in ("", "0")
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if _verbose else "2")
_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from pipeline.api import (  # noqa: E402  (light: imports nothing heavy until called)
    Features,
    audit,
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
    "audit",
    "export",
    "extract",
    "finetune",
    "load_features",
    "predict",
    "report",
    "sweep",
    "train_head",
]
