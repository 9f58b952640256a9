"""What a scan and the image loader refuse: folder links that walk images twice, files that are
not regular files, decoder crashes, formats outside the README's list; and one Python minimum."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from pipeline import backbone, dataset, images, runs

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fail instead of hanging: a regression that blocks on a FIFO or reads /dev/zero forever."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- 1. one scan enters each folder once ------------------------------------------------------


def _data(root: Path, flat: bool = False) -> Path:
    """cat/ and dog/ with two files each, named uniquely (a scan reads names only)."""
    for split in [""] if flat else ["train", "validation"]:
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                (d / f"{cls}-{split or 'flat'}{i}.png").write_bytes(b"x")
    return root


def _assert_each_file_once_with_its_own_class(scan: dataset.Scan, n_files: int) -> None:
    seen = [Path(it.path).name for it in scan.items]
    assert len(seen) == len(set(seen)) == n_files, seen
    for it in scan.items:
        assert Path(it.path).name.startswith(scan.classes[it.label]), it


# old code: a walk per class folder, each with its own seen set, so every one of these links
# walked the cat images again as dog (or the validation images as train): duplicates, wrong labels
@pytest.mark.parametrize(
    "flat, link, target",
    [
        (False, "train/dog/up", "../.."),  # DATA itself
        (False, "train/dog/up", ".."),  # the split folder
        (False, "train/dog/cats", "../cat"),  # another class's folder
        (False, "train/dog/deep/val", "../../../validation"),  # the other split, from a subfolder
        (False, "train/dog/top", "../../.."),  # DATA's parent
        (True, "dog/up", ".."),  # flat layout: DATA is the split folder
        (True, "dog/cats", "../cat"),
    ],
)
def test_folder_link_never_walks_an_image_twice(tmp_path, flat, link, target):
    data = _data(tmp_path / "data", flat)
    (data / link).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, data / link)
    scan = dataset.scan(data)
    _assert_each_file_once_with_its_own_class(scan, 4 if flat else 8)
    about = [w for w in scan.warnings if link in w]
    assert len(about) == 1 and ("not entered" in about[0] or "walked once" in about[0]), about


def test_class_folder_linked_from_validation_is_walked_once(tmp_path):
    # old code: the same 2 files listed as train and as validation
    data = _data(tmp_path / "data")
    shutil.rmtree(data / "validation/dog")
    os.symlink("../train/dog", data / "validation/dog")
    scan = dataset.scan(data)
    assert sorted((it.path, it.split) for it in scan.items if "dog" in it.path) == [
        ("train/dog/dog-train0.png", "train"),
        ("train/dog/dog-train1.png", "train"),
    ]
    assert any("validation/dog' is reached again through a link" in w for w in scan.warnings)


def test_loop_inside_a_class_folder_is_one_warning(tmp_path):
    # old code: the loop was cut silently, without a warning
    data = _data(tmp_path / "data")
    (data / "train/cat/sub").mkdir()
    (data / "train/cat/sub/cat-sub.png").write_bytes(b"x")
    os.symlink("..", data / "train/cat/sub/loop")  # back to train/cat
    scan = dataset.scan(data)
    _assert_each_file_once_with_its_own_class(scan, 9)
    assert [w for w in scan.warnings if "loop" in w] == [
        f"folder '{data}/train/cat/sub/loop' is reached again through a link; walked once"
    ]


def test_walk_files_alone_stays_inside_its_folder(tmp_path):
    # predict's IMAGES folder; old code followed a link to its parent and listed its neighbours
    (tmp_path / "images").mkdir()
    (tmp_path / "images/a.png").write_bytes(b"x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other/b.png").write_bytes(b"x")
    os.symlink("..", tmp_path / "images/up")
    warnings: list[str] = []
    assert dataset.walk_files(tmp_path / "images", warnings) == [tmp_path / "images/a.png"]
    assert len(warnings) == 1 and "images/up" in warnings[0]
    assert dataset.walk_files(tmp_path / "images") == [tmp_path / "images/a.png"]


# --- 2. only regular files are read -----------------------------------------------------------


def _fifo(d: Path) -> Path:
    os.mkfifo(d / "pipe.png")
    return d / "pipe.png"


def _socket(d: Path) -> Path:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d / "sock.png"))
    s.close()  # the socket file stays
    return d / "sock.png"


def _dev_zero(d: Path) -> Path:
    os.symlink("/dev/zero", d / "zero.png")
    return d / "zero.png"


def _broken(d: Path) -> Path:
    os.symlink("missing.png", d / "broken.png")
    return d / "broken.png"


def _folder(d: Path) -> Path:
    (d / "dir.png").mkdir()
    return d / "dir.png"


SPECIAL = [
    (_fifo, "not a regular file (FIFO)"),
    (_socket, "not a regular file (socket)"),
    (_dev_zero, "not a regular file (character device)"),
    (_broken, "broken symbolic link"),
    (_folder, "not a regular file (folder)"),
]


# old code: no content_sha256 (conftest's stand-in, backbone.file_sha256, blocks on the FIFO,
# reads /dev/zero forever, raises OSError on the socket); load_image called all three "empty file"
@pytest.mark.parametrize("make, reason", SPECIAL)
def test_content_sha256_refuses_what_is_not_a_regular_file(tmp_path, make, reason):
    path = make(tmp_path)
    with within(5), pytest.raises(images.ImageError) as e:
        images.content_sha256(path)
    assert str(e.value) == reason


@pytest.mark.parametrize("make, reason", SPECIAL)
def test_load_image_refuses_what_is_not_a_regular_file(tmp_path, make, reason):
    path = make(tmp_path)
    with within(5), pytest.raises(images.ImageError) as e:
        images.load_image(path, 8)
    assert str(e.value) == reason


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    # os.open is made to fail as it does for a file without read permission (tests may run as
    # root, who reads any file); old code had no content_sha256
    p = tmp_path / "locked.png"
    p.write_bytes(b"x")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(images.os, "open", denied)
    with pytest.raises(images.ImageError) as e:
        images.content_sha256(p)
    monkeypatch.undo()
    assert str(e.value) == "cannot read file (Permission denied)"


def test_the_file_hashes_are_of_the_whole_content(tmp_path):
    # hashlib.file_digest (Python 3.11+, as pyproject claims) reads in blocks: a hash of the
    # first block only, or of a block twice, differs
    data = np.random.default_rng(0).bytes((1 << 21) + 123)  # over many read blocks
    (tmp_path / "w.h5").write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert images.content_sha256(tmp_path / "w.h5") == want
    assert backbone.file_sha256(tmp_path / "w.h5") == want
    assert runs.file_sha256(tmp_path / "w.h5") == want


# --- 3. any decoder failure is a reason, not a crash ------------------------------------------


# old code: only OSError/SyntaxError/ValueError/EOFError were caught; these ended the run
@pytest.mark.parametrize(
    "exc, reason",
    [
        (IndexError("list index out of range"), "could not decode (IndexError: list index"),
        (TypeError("bad operand"), "could not decode (TypeError: bad operand)"),
        (struct.error("unpack requires"), "could not decode (error: unpack requires)"),
        (ZeroDivisionError(), "could not decode (ZeroDivisionError)"),
        (RuntimeError("plugin bug"), "could not decode (RuntimeError: plugin bug)"),
        (MemoryError(), "image too large to decode in memory"),
    ],
)
def test_any_decoder_exception_is_an_image_error(tmp_path, monkeypatch, exc, reason):
    p = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(p)

    def explode(*args, **kwargs):
        raise exc

    monkeypatch.setattr(images.Image, "open", explode)
    with pytest.raises(images.ImageError) as e:
        images.load_image(p, 8)
    assert str(e.value).startswith(reason)


def test_exception_while_normalising_is_an_image_error(tmp_path, monkeypatch):
    p = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(p)

    def explode(im):
        raise KeyError("Orientation")

    monkeypatch.setattr(images.ImageOps, "exif_transpose", explode)
    with pytest.raises(images.ImageError, match=r"could not decode \(KeyError: 'Orientation'\)"):
        images.load_image(p, 8)


# --- 4. only the README's formats are opened --------------------------------------------------

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n"
README_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
REFUSED = f"not an image in a supported format ({', '.join(README_FORMATS)})"


def test_eps_plugin_and_ghostscript_are_never_entered(tmp_path, monkeypatch):
    # old code: Image.open tried every plugin, so EPS's _open ran (and Ghostscript on load)
    entered: list[str] = []

    def trap(name):
        def f(*args, **kwargs):
            entered.append(name)
            raise AssertionError(f"{name} entered")

        return f

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", trap("EpsImageFile._open"))
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", trap("Ghostscript"))
    (tmp_path / "photo.jpg").write_bytes(EPS)
    with pytest.raises(images.ImageError) as e:
        images.load_image(tmp_path / "photo.jpg", 8)
    assert str(e.value) == REFUSED and entered == []
    assert images.FORMATS == README_FORMATS


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "PCX", "TGA"])
def test_other_pillow_formats_are_refused(tmp_path, fmt):
    # old code decoded these (every plugin enabled)
    p = tmp_path / "x.img"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(p, format=fmt)
    with pytest.raises(images.ImageError) as e:
        images.load_image(p, 8)
    assert str(e.value) == REFUSED


@pytest.mark.parametrize(
    "fmt, kw",
    [
        ("JPEG", {"quality": 95}),
        ("PNG", {}),
        ("GIF", {}),
        ("WEBP", {"lossless": True}),
        ("BMP", {}),
        ("TIFF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
        ("TIFF", {"compression": "tiff_adobe_deflate"}),
    ],
)
def test_every_readme_format_still_decodes(tmp_path, fmt, kw):
    p = tmp_path / "x.bin"  # by content, not by name
    Image.new("RGB", (16, 16), (200, 40, 40)).save(p, format=fmt, **kw)
    arr = images.load_image(p, 8)
    assert arr.shape == (8, 8, 3)
    assert np.abs(arr.astype(int) - [200, 40, 40]).max() <= 12


# --- 5. one Python minimum: pyproject, ruff, Makefile, the interpreter running the tests -------


def _minimum() -> tuple[int, int]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    m = re.fullmatch(r">=\s*(\d+)\.(\d+)", meta["project"]["requires-python"])
    assert m, "requires-python must be '>=X.Y'"
    return int(m[1]), int(m[2])


def test_python_minimum_agrees_everywhere():
    # old code: requires-python >=3.10 and ruff py310 while hashlib.file_digest needed 3.11; the
    # Makefile created a venv with any interpreter
    major, minor = _minimum()
    assert (major, minor) >= (3, 11)  # tomllib, the code's own floor
    assert sys.version_info >= (major, minor)
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["tool"]["ruff"]["target-version"] == f"py{major}{minor}"
    make = (REPO / "Makefile").read_text()
    assert re.findall(r"sys\.version_info < \((\d+), (\d+)\)", make) == [(str(major), str(minor))]
    assert f"PYTHON=python{major}.{minor}" in make


def _fake_python(folder: Path, version: tuple[int, int, int]) -> str:
    """`python3.X` on PATH: an interpreter of `version` as the Makefile sees it (`--version`,
    `-c CODE` run with that sys.version_info, `-m venv DIR` making a VENV whose python does
    nothing and succeeds), run by the real interpreter. Returns its name."""
    name = f"python{version[0]}.{version[1]}"
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    script.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        f"v = {tuple(version) + ('final', 0)!r}\n"
        "args = sys.argv[1:]\n"
        "if args == ['--version']:\n"
        "    print('Python %d.%d.%d' % v[:3])\n"
        "elif args[:1] == ['-c']:\n"
        "    sys.version_info, sys.argv = v, ['-c', *args[2:]]\n"
        "    exec(compile(args[1], '<string>', 'exec'), {'__name__': '__main__'})\n"
        "elif args[:2] == ['-m', 'venv']:\n"
        "    py = os.path.join(args[2], 'bin', 'python')\n"
        "    os.makedirs(os.path.dirname(py))\n"
        "    with open(py, 'w') as f:\n"
        "        f.write('#!/bin/sh\\nexit 0\\n')\n"
        "    os.chmod(py, 0o755)\n"
        "else:\n"
        "    sys.exit('fake python: not simulated: %r' % (args,))\n"
    )
    script.chmod(0o755)
    return name


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_refuses_an_older_python_in_one_line(tmp_path):
    # old code: make went on to `python3.10 -m venv` and pip install
    major, minor = _minimum()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    bin_dir = tmp_path / "bin"
    old = _fake_python(bin_dir, (major, minor - 1, 13))
    ok = _fake_python(bin_dir, (major, minor, 0))
    said = subprocess.run([old, "--version"], env={"PATH": str(bin_dir)}, capture_output=True)
    assert said.stdout.decode().strip() == f"Python {major}.{minor - 1}.13"

    def install(python: str, venv: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["make", "-s", "install", f"PYTHON={python}", f"VENV={venv}"],
            cwd=tmp_path,
            env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
            capture_output=True,
            text=True,
            timeout=60,
        )

    r = install(old, tmp_path / "old-venv")
    assert r.returncode == 2 and not (tmp_path / "old-venv").exists()
    ours = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(ours) == 1 and f"PYTHON=python{major}.{minor}" in ours[0], r.stderr
    assert f"PYTHON={old} is older or missing" in ours[0]
    # the minimum itself passes the check: the VENV is made and installed into
    r = install(ok, tmp_path / "venv")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "venv/.installed-stamp").is_file() and "error:" not in r.stderr
