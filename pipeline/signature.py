"""Image signatures: a small mirror-invariant picture of each image, kept beside its features.

A backbone's pooled features find re-encoded, resized and cropped copies (the audit's
near-duplicates), but a mirrored copy is another image to a network that was not trained to
ignore left and right (random weights, many fine-tunes). The signature is the image's lowest
8 x 8 2-D DCT-II coefficients of its grey levels at 32 x 32 (as perceptual hashes take them,
e.g. imagededup's PHash), with the coefficients of odd horizontal frequency taken by their
size: a left-right mirror flips exactly their sign, so an image and its mirror have the same
signature. Brightness (the DC term) is left out and the vector scaled to unit length, so
distances are cosines; a flat image has none to give (zeros). The DCT is a fixed NumPy matrix
(no library whose version could change the bits). The embedding stage computes it from the
decoded image it already holds (microseconds an image, NumPy and Pillow only: nothing more is
imported on a Dask worker); the cache keeps it (`signature`, float16, 128 bytes a row; NaN for a
row embedded before it was kept); `pipeline.near` searches it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from pipeline.store.format import SIGNATURE_WIDTH

SIDE = 8  # coefficients per axis
WIDTH = SIGNATURE_WIDTH  # values a row (SIDE x SIDE)
DTYPE = np.float16
PIXELS = 32  # the grey picture's side


def _dct_rows(n: int = PIXELS, k: int = SIDE) -> np.ndarray:
    """The first `k` rows of the orthonormal DCT-II matrix of size `n`."""
    i = np.arange(n)
    m = np.cos(np.pi * (2 * i[None, :] + 1) * np.arange(k)[:, None] / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m.astype(np.float64)


_D = _dct_rows()


def of_array(a: np.ndarray) -> np.ndarray:
    """The signature of one decoded uint8 image (H, W, 3) or (H, W): WIDTH floats, unit length
    (zeros for a flat image)."""
    im = Image.fromarray(np.asarray(a, np.uint8)).convert("L").resize((PIXELS, PIXELS), Image.BOX)
    c = _D @ np.asarray(im, np.float64) @ _D.T  # rows: vertical, columns: horizontal frequency
    c[0, 0] = 0.0  # brightness: not what makes a copy
    c[:, 1::2] = np.abs(c[:, 1::2])  # odd horizontal frequencies: a mirror flips their sign
    v = c.ravel()
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-6 else np.zeros_like(v)


def of_arrays(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """(len(arrays), WIDTH) signatures, as stored (float16)."""
    if not len(arrays):
        return np.zeros((0, WIDTH), DTYPE)
    return np.stack([of_array(a) for a in arrays]).astype(DTYPE)
