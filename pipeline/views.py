"""Which training rows are augmented views, told by the sign of their group.

A training row's group is its content (an image, its identical copies and its augmented views
share one). An augmented view's group is stored as `-(g + 1)`, so the one `groups` array that
metadata routing passes to every inner split (grid search, calibration, early stopping) also
says which rows are originals: those splits keep a content on one side, as before, and score
original images only, as the outer folds do.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def mark(groups: np.ndarray) -> np.ndarray:
    """The groups of augmented views of images in `groups` (non-negative content groups)."""
    return -np.asarray(groups, dtype=np.int64) - 1


def content(groups: Any) -> np.ndarray:
    """Every row's content group, views and originals alike."""
    g = np.asarray(groups)
    return np.where(g < 0, -g - 1, g)


def originals(groups: Any) -> np.ndarray:
    """True for the rows that are images themselves, False for augmented views."""
    return np.asarray(groups) >= 0
