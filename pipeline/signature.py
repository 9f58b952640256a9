"""Image signatures: a small mirror-invariant picture of each image, kept beside its features.

A backbone's pooled features find re-encoded, resized and cropped copies (the audit's
near-duplicates), but a mirrored copy is another image to a network that was not trained to
ignore left and right (random weights, many fine-tunes). The signature is the image's lowest
8 x 8 2-D DCT coefficients of its grey levels at 32 x 32 (as perceptual hashes take them, e.g.
imagededup's PHash), with the coefficients of odd horizontal frequency taken by their size:
a left-right mirror flips exactly their sign, so an image and its mirror have the same
signature. Brightness (the DC term) is left out and the vector scaled to unit length, so
distances are cosines. It is computed by the embedding stage from the decoded image it already
holds (microseconds an image), stored in the cache's segments (`signature`, float16, 128 bytes
a row) and searched like the features (`edges`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.fft import dctn

from pipeline import diagnose, neighbours
from pipeline.store.format import SIGNATURE_WIDTH

SIDE = 8  # coefficients per axis
WIDTH = SIGNATURE_WIDTH  # values a row (SIDE x SIDE)
DTYPE = np.float16


def of_array(a: np.ndarray) -> np.ndarray:
    """The signature of one decoded uint8 image (H, W, 3) or (H, W): WIDTH floats, unit length."""
    im = Image.fromarray(np.asarray(a, np.uint8)).convert("L").resize((32, 32), Image.BOX)
    c = dctn(np.asarray(im, np.float32), norm="ortho")[:SIDE, :SIDE]
    c[0, 0] = 0.0  # brightness: not what makes a copy
    c[:, 1::2] = np.abs(c[:, 1::2])  # odd horizontal frequencies: a mirror flips their sign
    v = c.ravel()
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v  # a flat image: zeros (never a near-duplicate by this)


def of_arrays(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """(len(arrays), WIDTH) signatures, as stored (float16)."""
    if not len(arrays):
        return np.zeros((0, WIDTH), DTYPE)
    return np.stack([of_array(a) for a in arrays]).astype(DTYPE)


def _blocks(part: Any, block: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions, signatures) of a `store.Rows` a block at a time (zeros: none kept)."""
    for a in range(0, len(part), block):
        pos = np.arange(a, min(len(part), a + block))
        yield pos, part.signatures(pos)


def edges(
    parts: Sequence[Any], folder: Path, k: int = diagnose.K, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Near-duplicate pairs (rows, cols: positions in `parts` one after the other) by their
    signatures (`diagnose.near_pairs` with `diagnose.SIGNATURE_RATIO`), and how many rows
    have none (embedded before signatures were kept: they join no pair by this)."""
    S = neighbours.space_of(parts, folder, seed, blocks=_blocks, width=WIDTH)
    kept = np.ones(len(S), bool)
    for a in range(0, len(S), 65_536):
        kept[a : a + 65_536] = np.any(S[a : a + 65_536] != 0, axis=1)
    if kept.sum() < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), int((~kept).sum())
    dist, idx = neighbours.search(S, k, seed=seed)
    del S
    r, c, _ = diagnose.near_pairs(dist, idx, diagnose.SIGNATURE_RATIO, valid=kept)
    return r, c, int((~kept).sum())
