"""The bench's instruments: generated images, a stand-in backbone, peak memory of a process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.backbone import BackboneSpec
from pipeline.features import extract


def say(msg: str) -> None:
    print(msg, flush=True)


def make_images(folder: Path, n: int, kind: str, seed: int = 0) -> Path:
    """Two classes of generated images: 96-px PNGs, or ~2-megapixel (1632x1224) JPEGs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h, fmt = (96, 96, "PNG") if kind == "png" else (1632, 1224, "JPEG")
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        c = i % 2
        stripes = ((xx if c else yy) // (8 + i % 5)) % 2
        base = stripes * 150 + 40
        noise = rng.integers(0, 60, (h, w), dtype=np.uint8)
        img = np.stack([base + noise, base * 0.7 + noise, base * 0.4 + noise], -1)
        p = folder / f"class_{c}" / f"{kind}_{seed}_{i:05d}.{fmt.lower()}"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, format=fmt, quality=90)
    return folder


# Peak resident memory of the current process in KiB. VmHWM, not ru_maxrss: on Linux a child
# started by a large parent reports the parent's ru_maxrss (kept across exec), not its own.
PEAK_EXPR = (
    "(int(next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')).split()[1]) "
    "if __import__('os').path.exists('/proc/self/status') else "
    "__import__('resource').getrusage(__import__('resource').RUSAGE_SELF).ru_maxrss)"
)


def cli_peak(args: list[str]) -> tuple[float, int]:
    """Run `python -m pipeline ARGS` in a fresh process: (seconds, its own peak memory in KiB)."""
    code = (
        "import resource, sys; from pipeline.cli import main; rc = main(sys.argv[1:]); "
        f"print('PEAK', {PEAK_EXPR}); sys.exit(rc)"
    )
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    kib = int([ln for ln in p.stdout.splitlines() if ln.startswith("PEAK")][0].split()[1])
    return time.perf_counter() - t, kib


class RandomMaps:
    """A stand-in backbone for the store's figures: random relu-like maps, no network."""

    def __init__(self, shape: tuple[int, int, int], classes: int = 10, seed: int = 0) -> None:
        self.shape, self.rng = shape, np.random.default_rng(seed)
        self.centers = self.rng.gamma(1.0, 1.0, (classes,) + shape).astype(np.float32)

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        # the class is written in the image's first pixel (see `tiny_images`)
        cls = (np.asarray(x)[:, 0, 0, 0] > 0).astype(int) % len(self.centers)
        noise = self.rng.gamma(1.0, 1.0, (len(x),) + self.shape).astype(np.float32)
        return 0.35 * self.centers[cls] + noise


def tiny_images(folder: Path, start: int, n: int, classes: int = 10) -> None:
    """n 8x8 PNGs in `classes` class folders (flat layout); cheap to write and to decode."""
    from PIL import Image

    for i in range(start, start + n):
        c = i % classes
        d = folder / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        arr = np.full((8, 8, 3), (i * 7) % 256, np.uint8)
        arr[0, 0] = (255 if c % 2 else 0, i % 256, (i // 256) % 256)
        Image.fromarray(arr).save(d / f"{i:08d}.png")


def synthetic_cache(path: Path, n: int, shape: tuple[int, int, int], classes: int = 10) -> Path:
    """A real cache of n rows of synthetic maps, written through the store (no backbone)."""
    data = path.parent / f"{path.stem}-data"
    if not data.is_dir():
        tiny_images(data, 0, n, classes)
    art = path.parent / f"{path.stem}-art"
    spec = BackboneSpec("none", input_size=32 * shape[0])
    s = extract(data, art, spec, batch_size=256, log=lambda m: None, model=RandomMaps(shape))
    return s.cache
