"""Transfer learning done right: cached VGG16 features, cross-validated heads, one report."""

import os as _os

# TensorFlow reads these at import; set before any submodule can import it. Errors still show.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"
