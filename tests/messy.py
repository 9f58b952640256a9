"""A messy image folder: awkward-but-valid images, broken files and scan traps.

`build(root)` writes it and returns {relative path: None for a valid image, or a substring of
the reason it must be skipped with}. Paths in the scan-trap part are not in the dict.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from conftest import pattern
from PIL import Image


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels and has one tiny IDAT: a decompression-bomb header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def build(root: Path, cls: str = "messy") -> dict[str, str | None]:
    d = root / "train" / cls
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(pattern(0, rng, 48))
    expect: dict[str, str | None] = {}

    def save(name: str, img: Image.Image, **kw) -> None:
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p, **kw)
        expect[f"train/{cls}/{name}"] = None

    save("cmyk.jpg", rgb.convert("CMYK"), format="JPEG")
    g16 = Image.fromarray((np.linspace(0, 65535, 48 * 48).reshape(48, 48)).astype(np.uint16))
    save("gray16.png", g16, format="PNG")
    save("gray8.png", rgb.convert("L"), format="PNG")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    save("palette_transparent.png", pal, format="PNG", transparency=0)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray((np.arange(48 * 48) % 256).reshape(48, 48).astype(np.uint8)))
    save("rgba.png", rgba, format="PNG")
    save("la.png", rgb.convert("LA"), format="PNG")
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    p = d / "animated.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    expect[f"train/{cls}/animated.gif"] = None
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif_rotated.jpg", rgb.resize((60, 30)), format="JPEG", exif=exif)
    save("one_pixel.png", Image.new("RGB", (1, 1), (10, 200, 30)), format="PNG")
    save("wide_2000x10.png", Image.new("RGB", (2000, 10), (90, 90, 90)), format="PNG")
    big = Image.fromarray(np.tile(pattern(1, rng, 64), (48, 64, 1)))  # 4096 x 3072 photo
    save("large_photo.jpg", big, format="JPEG", quality=80)
    save("image.webp", rgb, format="WEBP")
    save("image.bmp", rgb, format="BMP")
    save("image.tiff", rgb, format="TIFF")
    save("really_a_jpeg.png", rgb, format="JPEG")
    save("UPPER.JPG", rgb, format="JPEG")
    save("name with spaces 'and' \"quotes\".png", rgb, format="PNG")
    save("naïve café ünïcödé 猫.png", rgb, format="PNG")
    save("nested/deeper/inner.png", rgb, format="PNG")
    os.symlink("image.bmp", d / "link_to_image.bmp")
    expect[f"train/{cls}/link_to_image.bmp"] = None

    def bad(name: str, data: bytes, reason: str) -> None:
        (d / name).write_bytes(data)
        expect[f"train/{cls}/{name}"] = reason

    bad("zero.jpg", b"", "empty file")
    buf = io.BytesIO()
    big.save(buf, format="JPEG")
    bad("truncated.jpg", buf.getvalue()[: len(buf.getvalue()) // 3], "truncated")
    bad("random.png", rng.bytes(4096), "not an image")
    bad("text.jpg", b"hello, I am text\n" * 20, "not an image")
    bad("bomb.png", _png_header_only(40000, 40000), "decompression bomb")
    bad("bomb.png.gz", gzip.compress(b"\0" * 100), "not an image")
    os.symlink("does-not-exist.png", d / "broken_link.png")
    expect[f"train/{cls}/broken_link.png"] = "broken symbolic link"

    # scan traps: ignored, or walked once
    (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (d / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (d / ".hidden.png").write_bytes(b"x")
    (d / ".hidden_dir").mkdir()
    rgb.save(d / ".hidden_dir" / "x.png")
    os.symlink("..", d / "nested" / "loop")  # a directory symlink loop
    (root / "train" / "empty_class").mkdir(parents=True)
    return expect
