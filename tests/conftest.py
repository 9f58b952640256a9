"""Shared fixtures: tiny generated image datasets with a few pixels' worth of real structure."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# one CV partition unless a test asks for REPEATS: the automatic choice (up to 10 for small
# collections) would multiply every test's fits; the tests of repeats pass it explicitly
os.environ.setdefault("PIPELINE_MAX_REPEATS", "1")

from pipeline.backbone import BackboneSpec  # noqa: E402

SIZE = 32  # VGG16's smallest input: block5_pool is 1x1x512, fast on 2 cores


def pattern(cls: int, rng: np.random.Generator, px: int = 24) -> np.ndarray:
    """Class 0: horizontal stripes, 1: vertical stripes, 2: a bright disc; with noise and phase."""
    y, x = np.mgrid[0:px, 0:px]
    phase = rng.integers(0, 4)
    if cls == 0:
        base = ((y + phase) // 3) % 2
    elif cls == 1:
        base = ((x + phase) // 3) % 2
    else:
        c = px / 2 + rng.normal(0, 2, 2)
        base = ((y - c[0]) ** 2 + (x - c[1]) ** 2 < (px / 3) ** 2).astype(int)
    img = base * 200 + rng.normal(0, 25, (px, px)) + 25
    rgb = np.stack([img, img * 0.8, img * 0.6], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def write_image(path: Path, cls: int, seed: int, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pattern(cls, np.random.default_rng(seed))).save(path, format=fmt)
    return path


def make_dataset(
    root: Path, per_class: int = 8, n_classes: int = 3, validation: int = 0, flat: bool = False
) -> Path:
    """Write a class-per-folder dataset; classic layout unless `flat`."""
    seed = 0
    for split, n in (("train", per_class), ("validation", validation)):
        if n == 0 or (flat and split == "validation"):
            continue
        for c in range(n_classes):
            for i in range(n):
                folder = root / f"class_{c}" if flat else root / split / f"class_{c}"
                write_image(folder / f"img_{i:03d}.png", c, seed)
                seed += 1
    return root


@pytest.fixture(scope="session", autouse=True)
def one_backbone_per_setting():
    """Each random-weights backbone is built once per test session and reused by every test
    (a build is a fraction of a second, made a few hundred times; the model is frozen, so a
    reused one embeds the same). Weights files are built each time: a test may rewrite one."""
    from pipeline import backbone

    real = backbone.build
    built: dict[BackboneSpec, object] = {}

    def build(spec: BackboneSpec):
        if spec.weights != "none":
            return real(spec)
        if spec not in built:
            built[spec] = real(spec)
        return built[spec]

    backbone.build = build
    yield
    backbone.build = real


@pytest.fixture(scope="session")
def dask_scheduler(tmp_path_factory):
    """A Dask scheduler and two worker processes, started as a user starts them (`dask
    scheduler`, `dask worker`), once for the session; the tests reach it by its address, as
    CLUSTER=tcp://host:port does. None of it runs in the test process (no thread of it here:
    the tests that measure this process's memory measure only their own)."""
    pytest.importorskip("distributed")
    import json
    import subprocess
    import sys
    import time

    folder = tmp_path_factory.mktemp("dask")
    info = folder / "scheduler.json"
    here = Path(__file__).parent  # the workers import the test modules' functions they run
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent)])}
    cli = [sys.executable, "-m"]
    scheduler = subprocess.Popen(
        [*cli, "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
         "--no-dashboard", "--scheduler-file", str(info)],
        cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    workers = None
    try:
        deadline = time.time() + 120
        while not info.is_file() or not info.read_text().strip():
            assert scheduler.poll() is None and time.time() < deadline, "no Dask scheduler"
            time.sleep(0.05)
        address = json.loads(info.read_text())["address"]
        workers = subprocess.Popen(
            [*cli, "distributed.cli.dask_worker", "--scheduler-file", str(info), "--nworkers",
             "2", "--nthreads", "1", "--no-dashboard", "--local-directory", str(folder)],
            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert address.startswith("tcp://127.0.0.1:")
        yield address
    finally:
        for proc in (workers, scheduler):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture
def two_workers(dask_scheduler):
    """A client of the session's cluster, connected as `CLUSTER=tcp://...` connects, for one
    test (closed after it: no client thread outlives the test)."""
    from pipeline import cluster

    with cluster.client(dask_scheduler) as c:
        c.wait_for_workers(2, timeout=120)
        yield c


@pytest.fixture
def spec() -> BackboneSpec:
    return BackboneSpec(weights="none", input_size=SIZE, seed=0)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data", per_class=8, validation=3)


@pytest.fixture
def quiet():
    lines: list[str] = []
    return lines.append, lines


@pytest.fixture
def decoded(monkeypatch):
    """The paths the loader decodes, in order."""
    from pipeline import batches

    seen: list[str] = []
    real = batches.decode

    def spy(src, *a, **k):
        seen.append(src.abspath.name)
        return real(src, *a, **k)

    monkeypatch.setattr(batches, "decode", spy)
    return seen


def patch_loader(monkeypatch, fn):
    """Decode every image through `fn(path, size)` (which may raise, or spy), whichever of the
    loader's entry points the pipeline uses: by path, or hashing the bytes it decodes."""
    from pipeline import images

    real_hashed = getattr(images.load_image_hashed, "real", images.load_image_hashed)

    def hashed(path, size):
        fn(path, size)  # its failure or its record, then the real bytes and their hash
        return real_hashed(path, size)

    hashed.real = real_hashed  # patched twice: the second wraps the loader, not the first

    monkeypatch.setattr(images, "load_image", fn)
    monkeypatch.setattr(images, "load_image_hashed", hashed)


def rewrite_after(monkeypatch, owner, name: str, is_target, rewrite) -> None:
    """The first time `owner.name(arg)` (a hashing step) returns for an `arg` that
    `is_target(arg)`, `rewrite(arg)` runs right after: the file changes between its hash and
    its decoding."""
    real = getattr(owner, name)
    done: list[int] = []

    def hooked(arg):
        out = real(arg)
        if is_target(arg) and not done:
            done.append(1)
            rewrite(arg)
        return out

    monkeypatch.setattr(owner, name, hooked)
