"""Image loading: one code path from file to a fixed-size RGB uint8 array, for features and predict.

Decoding is by content (Pillow), never by extension. Awkward but valid images are normalised:
EXIF orientation applied, first frame of animations, 16-bit scaled to 8-bit, palette/alpha
composited on one fixed background, CMYK converted. JPEGs are decoded at reduced scale when the
target is much smaller (draft mode). Decompression bombs are rejected from the header, before any
pixel is allocated. Every failure is an `ImageError` whose message a person understands.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

BACKGROUND = (255, 255, 255)
MAX_PIXELS = 89_478_485  # Pillow's own warning threshold: rejected, not warned about
RESIZE_POLICY = "pil-bilinear-stretch"
LOADER_VERSION = 1  # bump when the decoding/normalisation below changes features


class ImageError(Exception):
    """A file that cannot be used as an image; the message is the reason shown to the user."""


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
        arr = (arr - lo) / (hi - lo if hi > lo else 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode != "RGB":
        return im.convert("RGB")
    return im


def load_image(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """Decode `path` to a (size, size, 3) uint8 RGB array, or raise ImageError with the reason."""
    path = os.fspath(path)
    if os.path.islink(path) and not os.path.exists(path):
        raise ImageError("broken symbolic link")
    try:
        nbytes = os.path.getsize(path)
    except OSError as e:
        raise ImageError(f"cannot read file ({e.strerror})") from None
    if nbytes == 0:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageError(
                        f"image too large ({w}x{h} = {w * h:,} pixels > {MAX_PIXELS:,}); "
                        "rejected as a possible decompression bomb"
                    )
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)
                if im.format == "JPEG":
                    im.draft("RGB", (size, size))  # decode at 1/2, 1/4 or 1/8 scale if enough
                im.load()
                im = ImageOps.exif_transpose(im)
                im = _to_rgb(im)
                if im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (no known image format in its content)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"rejected as a possible decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower():
            raise ImageError("truncated image (file ends before the image data does)") from None
        raise ImageError(f"corrupt image data ({msg})") from None
    if arr.shape != (size, size, 3):
        raise ImageError(f"unexpected decoded shape {arr.shape}")
    return arr


AUGMENT_POLICY = {
    "horizontal_flip": 0.5,
    "zoom": [0.8, 1.2],
    "shear_degrees": 11.5,
    "rotation_degrees": 10.0,
    "fill": "image mean color",
    "interpolation": "bilinear",
    "version": 1,
}


def view_rng(seed: int, sha256: str, view: int) -> np.random.Generator:
    """The generator of one augmented view: fixed by the seed, the file's content and the view."""
    return np.random.default_rng([seed, int(sha256[:16] or "0", 16), view])


def augment(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random view (flip, zoom, shear, rotation) of a square uint8 image, as one affine warp.

    The equivalent of Keras' RandomFlip/RandomZoom/RandomShear/RandomRotation, but seeded per
    image and view, so a view never depends on which batch it was computed in.
    """
    p = AUGMENT_POLICY
    n = arr.shape[0]
    flip = rng.random() < p["horizontal_flip"]
    zoom = rng.uniform(*p["zoom"])
    shear = np.deg2rad(rng.uniform(-p["shear_degrees"], p["shear_degrees"]))
    rot = np.deg2rad(rng.uniform(-p["rotation_degrees"], p["rotation_degrees"]))
    c = (n - 1) / 2.0
    to_c = np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1]], float)
    back = np.array([[1, 0, c], [0, 1, c], [0, 0, 1]], float)
    fl = np.diag([-1.0 if flip else 1.0, 1.0, 1.0])
    sc = np.diag([zoom, zoom, 1.0])
    sh = np.array([[1, np.tan(shear), 0], [0, 1, 0], [0, 0, 1]], float)
    ro = np.array([[np.cos(rot), -np.sin(rot), 0], [np.sin(rot), np.cos(rot), 0], [0, 0, 1]])
    forward = back @ ro @ sh @ sc @ fl @ to_c
    inv = np.linalg.inv(forward)  # PIL maps output pixels back to input pixels
    fill = tuple(int(v) for v in arr.reshape(-1, 3).mean(axis=0))
    out = Image.fromarray(arr).transform(
        (n, n),
        Image.Transform.AFFINE,
        tuple(inv[:2].ravel()),
        Image.Resampling.BILINEAR,
        fillcolor=fill,
    )
    return np.asarray(out, dtype=np.uint8)
