"""Costs that follow the change: immutable shards, an index, pooled vectors, no needless reads."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import make_dataset, write_image

from pipeline import store
from pipeline.errors import UserError
from pipeline.features import extract
from pipeline.train import train_head


def _files(folder: Path) -> dict[str, tuple[int, int, int, bytes]]:
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size, p.read_bytes())
        for p in folder.iterdir()
        if p.is_file()
    }


def test_adding_an_image_writes_one_shard_and_the_index(tmp_path, spec, quiet):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=10)
    art = tmp_path / "art"
    first = extract(data, art, spec, batch_size=8, log=log)
    sdir = store.shards_dir(first.cache)
    before = _files(sdir)
    assert len(before) == 4  # 30 images in batches of 8
    index_bytes = first.cache.stat().st_size
    write_image(data / "train/class_0/new.png", 0, 31337)
    s = extract(data, art, spec, batch_size=8, log=log)
    after = _files(sdir)
    assert all(after[n] == before[n] for n in before)  # existing rows' bytes never rewritten
    new = set(after) - set(before)
    assert len(new) == 1 and s.new == 1
    per_row = max(v[2] for v in before.values())  # a shard of 8 rows, an upper bound per row
    written = sum(after[n][2] for n in new) + s.cache.stat().st_size
    assert written < per_row + 2 * index_bytes  # bounded: one small shard and the index
    maps = store.read_column(s.cache, "features")
    assert maps.shape == (31, 1, 1, 512)
    np.testing.assert_allclose(
        store.read_column(s.cache, "pooled/avg"), maps.astype(np.float32).mean(axis=(1, 2))
    )


def test_removing_images_rewrites_no_shard(tmp_path, spec, quiet):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=10)
    art = tmp_path / "art"
    first = extract(data, art, spec, batch_size=8, log=log)
    before = _files(store.shards_dir(first.cache))
    for p in list((data / "train/class_1").iterdir())[:3]:
        p.unlink()
    s = extract(data, art, spec, batch_size=8, log=log)
    assert s.removed == 3 and _files(store.shards_dir(s.cache)) == before
    assert len(store.read_index(s.cache).paths) == 27


def test_unchanged_rerun_opens_no_image_file(tmp_path, spec, quiet, monkeypatch):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=5)
    art = tmp_path / "art"
    extract(data, art, spec, log=log)
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy(path, *a, **k):
        if str(data) in str(path):
            opened.append(str(path))
        return real_open(path, *a, **k)

    def os_spy(path, *a, **k):
        if str(data) in str(path):
            opened.append(str(path))
        return real_os_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(os, "open", os_spy)
    s = extract(data, art, spec, log=log)
    assert (s.new, s.cached, opened) == (0, 15, [])
    # a changed file (new mtime and size) is read again; VERIFY reads every file
    write_image(data / "train/class_2/img_000.png", 1, 777)
    s = extract(data, art, spec, log=log)
    assert s.new == 1 and len(opened) >= 1
    opened.clear()
    s = extract(data, art, spec, log=log, verify=True)
    assert s.new == 0 and len({p for p in opened}) == 15


def test_pooled_heads_never_read_the_maps(tmp_path, spec, quiet, monkeypatch):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=6, validation=2)
    art = tmp_path / "art"
    extract(data, art, spec, log=log)
    read: list[str] = []
    real = h5py.Dataset.__getitem__

    def spy(self, key):
        read.append(self.name)
        return real(self, key)

    real_direct = h5py.Dataset.read_direct

    def spy_direct(self, *a, **k):
        read.append(self.name)
        return real_direct(self, *a, **k)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    monkeypatch.setattr(h5py.Dataset, "read_direct", spy_direct)
    train_head(art, "logreg", "avg", folds=2, log=log)
    assert "/pooled/avg" in read and "/features" not in read
    read.clear()
    train_head(art, "logreg", "flatten", folds=2, log=log)
    assert "/features" in read


def test_pooled_vectors_only(tmp_path, spec, quiet):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=6)
    art = tmp_path / "art"
    full = extract(data, art, spec, log=log)
    small = extract(data, art, spec, log=log, maps=False)
    assert small.cache != full.cache  # another cache: never mixed
    assert store.read_column(small.cache, "pooled/max").shape == (18, 512)
    with pytest.raises(KeyError):
        store.read_column(small.cache, "features")
    assert train_head(art, "logreg", "max", folds=2, log=log)["cv"]["accuracy_mean"] > 0.5
    with pytest.raises(UserError, match="needs the feature maps.*MAPS=0"):
        train_head(art, "dense", log=log)
    assert sum(p.stat().st_size for p in store.shards_dir(small.cache).iterdir()) < sum(
        p.stat().st_size for p in store.shards_dir(full.cache).iterdir()
    )


def test_the_svm_size_guard_speaks_and_names_what_scales(tmp_path, spec, quiet, monkeypatch):
    import dataclasses

    from pipeline import heads

    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=10)
    art = tmp_path / "art"
    extract(data, art, spec, log=log)
    monkeypatch.setitem(heads.HEADS, "svm", dataclasses.replace(heads.HEADS["svm"], max_rows=20))
    with pytest.raises(UserError, match=r"on 30 training rows .*HEAD=svm-nystroem.*max_rows=30"):
        train_head(art, "svm", folds=3, log=log)
    forced = train_head(art, "svm", folds=3, params={"max_rows": "30"}, log=log)
    assert forced["cv"]["folds"] == 3
    for name in ("svm-linear", "svm-nystroem"):
        r = train_head(art, name, folds=3, params={"n_components": "20"} if "nys" in name else {})
        assert r["cv"]["accuracy_mean"] > 0.8 and r["final_params"]["C"] > 0


def test_an_unchanged_rerun_holds_a_few_bytes_per_file(tmp_path, spec, monkeypatch):
    """make features on a collection it already holds: what it keeps per file (tracemalloc,
    the difference between two sizes, so fixed costs cancel) is a few columns, not objects.

    The old code held each file's listing, hash, job and row as Python objects: about 2,460
    bytes a file here. The columns (paths in one blob, stats, raw hashes, labels, splits) and
    the compare's sorted keys come to about 170. Each rerun is run once untraced first (its
    imports), and the versions stamp (`embedder`, whose importlib.metadata scan peaks at about
    400 KB whatever the collection) is read once before tracing: else that fixed peak hides the
    per-file one at these sizes."""
    import gc
    import tracemalloc

    from PIL import Image

    from pipeline import features

    rng = np.random.default_rng(0)
    stamp = features.embedder()
    monkeypatch.setattr(features, "embedder", lambda: stamp)
    peak = {}
    for n in (300, 1200):
        data = tmp_path / f"d{n}"
        for i in range(n):
            d = data / "train" / f"c{i % 3}"
            d.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 255, (8, 8, 3), np.uint8)
            Image.fromarray(pixels).save(d / f"img_{i:07d}.png")
        art = tmp_path / f"a{n}"
        extract(data, art, spec, batch_size=256, log=lambda s: None, maps=False)
        extract(data, art, spec, batch_size=256, log=lambda s: None, maps=False)  # its imports
        gc.collect()
        tracemalloc.start()
        again = extract(data, art, spec, batch_size=256, log=lambda s: None, maps=False)
        peak[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert again.new == 0 and not again.rewrote
    per_file = (peak[1200] - peak[300]) / 900
    print(f"make features, unchanged rerun: {per_file:.0f} bytes a file at peak")
    assert 0 < per_file < 250, per_file
