"""Image loading: one code path from file to a fixed-size RGB uint8 array, for features and predict.

Decoding is by content (Pillow), never by extension. Awkward but valid images are normalised:
EXIF orientation applied, first frame of animations, 16-bit scaled to 8-bit, palette/alpha
composited on one fixed background, CMYK converted. JPEGs are decoded at reduced scale when the
target is much smaller (draft mode). Decompression bombs are rejected from the header, before any
pixel is allocated. Every failure is an `ImageError` whose message a person understands.

Only regular files are read (a FIFO or a device would block or never end), and only the formats
in `FORMATS` are opened: Pillow's other plugins (EPS runs Ghostscript) are never entered.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import warnings
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

BACKGROUND = (255, 255, 255)
MAX_PIXELS = 89_478_485  # Pillow's own warning threshold: rejected, not warned about
RESIZE_POLICY = "pil-bilinear-stretch"
LOADER_VERSION = 2  # bump when decoding changes features (2: only the listed formats)
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")  # the README's formats; no other plugin
CHUNK = 1 << 20  # bytes read at a time when hashing
SPOOL = 32 << 20  # a file decoded from its hashed copy is held in memory up to this size
_KINDS = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISDIR, "folder"),
)


class ImageError(Exception):
    """A file that cannot be used as an image; the message is the reason shown to the user.

    `content` is True when the bytes themselves are at fault (not an image, corrupt,
    truncated, a decompression bomb): the same bytes fail the same way under the same decoder,
    so the store may remember it. Anything else (I/O, permission, memory) is retried next run.
    """

    def __init__(self, message: str, content: bool = False) -> None:
        super().__init__(message)
        self.content = content


class Unreadable(str):
    """The reason a file could not be decoded (a str), with whether its bytes are at fault."""

    content: bool = False

    def __new__(cls, reason: str, content: bool = False) -> Unreadable:
        obj = super().__new__(cls, reason)
        obj.content = content
        return obj

    def __reduce__(self) -> tuple[Any, ...]:  # keep `content` across processes (Dask)
        return (Unreadable, (str(self), self.content))


class Changed(Unreadable):
    """A file whose bytes are no longer those hashed before it was decoded (rewritten in
    between): `sha256` is the hash of the bytes read now, `array` those bytes decoded (kept in
    this process only). Never remembered: the file is fine, it was read at a bad moment."""

    sha256: str = ""
    array: np.ndarray | None = None

    def __new__(cls, reason: str, sha256: str, array: np.ndarray | None = None) -> Changed:
        obj = super().__new__(cls, reason, False)
        obj.sha256 = sha256
        obj.array = array
        return obj

    def __reduce__(self) -> tuple[Any, ...]:  # across processes (Dask): the hash, not the pixels
        return (Changed, (str(self), self.sha256))


CHANGED = (
    "the file changed while it was read (its bytes are not the ones hashed a moment before); "
    "rerun when nothing writes it any more"
)


def _not_regular(mode: int) -> str:
    kind = next((name for test, name in _KINDS if test(mode)), "special file")
    return f"not a regular file ({kind})"


def _open_regular(path: str) -> int:
    """A read-only descriptor on `path`, or ImageError if it is not a readable regular file.

    The kind is checked before opening (opening a socket fails, a device may have effects) and
    again on the descriptor; O_NONBLOCK keeps open() from waiting for a FIFO's writer.
    """
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise ImageError(_not_regular(mode))
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageError("broken symbolic link") from None
        raise ImageError("cannot read file (No such file or directory)") from None
    except OSError as e:
        raise ImageError(f"cannot read file ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ImageError(_not_regular(mode))
    return fd


def content_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a regular file's content, or ImageError (FIFO, device, unreadable...)."""
    fd = _open_regular(os.fspath(path))
    try:
        with os.fdopen(fd, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise ImageError(f"cannot read file ({e.strerror or e})") from None


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
    fd = _open_regular(os.fspath(path))
    with os.fdopen(fd, "rb") as f:
        return _decode(f, size)


def load_image_hashed(path: str | os.PathLike[str], size: int) -> tuple[np.ndarray, str]:
    """`load_image`, and the SHA-256 of exactly the bytes decoded: they are read once, hashed
    and decoded from a private copy (in memory up to `SPOOL` bytes, beyond in an unnamed
    temporary file), so the hash names the pixels even if the file is rewritten meanwhile."""
    fd = _open_regular(os.fspath(path))
    h = hashlib.sha256()
    with tempfile.SpooledTemporaryFile(max_size=SPOOL) as copy:
        n = 0
        try:
            with os.fdopen(fd, "rb") as f:
                while block := f.read(CHUNK):
                    h.update(block)
                    copy.write(block)
                    n += len(block)
            copy.seek(0)
        except OSError as e:
            raise ImageError(f"cannot read file ({e.strerror or e})") from None
        sha = h.hexdigest()
        try:
            return _decode(copy, size, n), sha
        except Exception as e:
            e.sha256 = sha  # type: ignore[attr-defined]  # which bytes failed to decode
            raise


def _decode(f: IO[bytes], size: int, nbytes: int | None = None) -> np.ndarray:
    """`load_image` on an open regular file (or its bytes, `nbytes` long): any decoder failure
    becomes an ImageError."""
    if (os.fstat(f.fileno()).st_size if nbytes is None else nbytes) == 0:
        raise ImageError("empty file (0 bytes)", content=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f, formats=FORMATS) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageError(
                        f"image too large ({w}x{h} = {w * h:,} pixels > {MAX_PIXELS:,}); "
                        "rejected as a possible decompression bomb",
                        content=True,
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
        raise ImageError(
            f"not an image in a supported format ({', '.join(FORMATS)})", content=True
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"rejected as a possible decompression bomb ({e})", content=True) from None
    except OSError as e:
        if e.errno is not None:  # the disk or the network, not the bytes: retried next run
            raise ImageError(f"cannot read file ({e.strerror or e})") from None
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower():
            raise ImageError(
                "truncated image (file ends before the image data does)", content=True
            ) from None
        raise ImageError(f"corrupt image data ({msg})", content=True) from None
    except (SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or type(e).__name__
        raise ImageError(f"corrupt image data ({msg})", content=True) from None
    except MemoryError:
        raise ImageError("image too large to decode in memory") from None
    except Exception as e:  # a plugin's own bug on one file must not end the run
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise ImageError(f"could not decode ({detail})", content=True) from None
    if arr.shape != (size, size, 3):
        raise ImageError(f"unexpected decoded shape {arr.shape}", content=True)
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
