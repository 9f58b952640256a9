"""Seeds in one place: every random choice in the pipeline derives from the seed given here."""

from __future__ import annotations

import os
import random
import sys

import numpy as np

DEFAULT_SEED = 0


def set_seeds(seed: int = DEFAULT_SEED) -> np.random.Generator:
    """Seed Python, NumPy and (only if already imported) Keras/TensorFlow; return a NumPy generator.

    TensorFlow is never imported from here so that the scikit-learn path stays TensorFlow-free.
    """
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    if "keras" in sys.modules:
        import keras

        keras.utils.set_random_seed(seed)
    return np.random.default_rng(seed)
