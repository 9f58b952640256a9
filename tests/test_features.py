"""The feature cache: layout readable with plain h5py, incremental reruns, settings never mixed."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import SIZE, make_dataset, write_image

from pipeline import store
from pipeline.backbone import BackboneSpec, preprocess
from pipeline.cache_identity import cache_settings
from pipeline.features import extract
from pipeline.layout import current_cache


def readme_reader():
    """The README's plain-h5py reader, run as the README prints it."""
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    code = text.split("<!-- reader -->", 1)[1].split("<!-- /reader -->", 1)[0]
    code = code.split("```python", 1)[1].rsplit("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    return scope["read_cache"]


def test_cache_layout_is_plain_h5py(dataset, tmp_path, spec, quiet):
    log, _ = quiet
    s = extract(dataset, tmp_path / "art", spec, log=log)
    assert s.new == 3 * 8 + 3 * 3 and s.cached == 0 and s.skipped == 0
    X, labels, paths, split, classes = readme_reader()(s.cache)
    idx = store.read_index(s.cache)
    assert paths == idx.paths and paths[0] == "train/class_0/img_000.png"
    assert classes == ["class_0", "class_1", "class_2"] and list(labels[:3]) == [0, 0, 0]
    assert (labels == idx.labels).all() and set(split) == {"train", "validation"}
    ref = store.load_features(s.cache, "avg", "train")
    np.testing.assert_array_equal(X[np.array(split) == "train"], ref.X)
    # the maps, as stored (float16), pool to the stored vectors
    with h5py.File(s.cache, "r") as f:
        seg = store.shards_dir(s.cache) / f["segments/name"].asstr()[0]
        for k in ("cache_key", "layer", "input_size", "weights_id", "preprocessing", "resize"):
            assert k in f.attrs, k
        assert f.attrs["layer"] == "block5_pool" and f.attrs["input_size"] == SIZE
        assert "caffe" in f.attrs["preprocessing"]
        assert json.loads(f.attrs["settings"])["weights_id"].startswith("random:seed=0")
        assert f.attrs["random_weights"]
    with h5py.File(seg, "r") as g:
        assert g["features"].dtype == np.float16 and g["features"].shape[1:] == (1, 1, 512)
        assert len(g["ident"][0]) == 64
    assert current_cache(tmp_path / "art") == s.cache


def test_rerun_embeds_nothing(dataset, tmp_path, spec, quiet):
    log, lines = quiet
    first = extract(dataset, tmp_path / "art", spec, log=log)
    before = store.read_column(first.cache, "features")
    again = extract(dataset, tmp_path / "art", spec, log=log)
    assert (again.new, again.cached, again.removed, again.skipped) == (0, 33, 0, 0)
    assert not again.rewrote
    assert "embedded 0 new, 33 cached, 0 removed, 0 skipped" in lines
    np.testing.assert_array_equal(store.read_column(again.cache, "features"), before)


def test_add_change_delete_recompute_exactly_one(dataset, tmp_path, spec, quiet):
    log, _ = quiet
    art = tmp_path / "art"
    first = extract(dataset, art, spec, log=log)
    old = store.read_index(first.cache)
    maps = store.read_column(first.cache, "features")
    old_feats = {p: maps[i] for i, p in enumerate(old.paths)}

    write_image(dataset / "train/class_1/new.png", 1, seed=999)
    s = extract(dataset, art, spec, log=log)
    assert (s.new, s.cached, s.removed) == (1, 33, 0)

    write_image(dataset / "train/class_2/img_000.png", 0, seed=1234)  # same path, new content
    s = extract(dataset, art, spec, log=log)
    assert (s.new, s.cached, s.removed) == (1, 33, 0)

    (dataset / "train/class_0/img_001.png").unlink()
    s = extract(dataset, art, spec, log=log)
    assert (s.new, s.cached, s.removed) == (0, 33, 1)

    idx = store.read_index(s.cache)
    assert "train/class_0/img_001.png" not in idx.paths
    maps = store.read_column(s.cache, "features")
    for i, p in enumerate(idx.paths):
        if p not in ("train/class_1/new.png", "train/class_2/img_000.png"):
            np.testing.assert_array_equal(maps[i], old_feats[p])
    changed = maps[idx.paths.index("train/class_2/img_000.png")]
    assert not np.array_equal(changed, old_feats["train/class_2/img_000.png"])


def test_moved_file_is_not_recomputed(dataset, tmp_path, spec, quiet):
    """A renamed file keeps its row, under its new path, with the very same features; the old
    path is gone (not an extra row), and nothing is embedded again."""
    log, _ = quiet
    first = extract(dataset, tmp_path / "art", spec, log=log)
    old, new = "train/class_0/img_002.png", "train/class_0/renamed.png"
    idx = store.read_index(first.cache)
    before = store.read_column(first.cache, "features")[idx.paths.index(old)]
    (dataset / old).rename(dataset / new)
    s = extract(dataset, tmp_path / "art", spec, log=log)
    assert (s.new, s.removed) == (0, 1)
    idx = store.read_index(s.cache)
    assert new in idx.paths and old not in idx.paths and len(idx.paths) == 33
    row = idx.paths.index(new)
    assert idx.split[row] == "train" and idx.labels_by_name[row] == "class_0"
    np.testing.assert_array_equal(store.read_column(s.cache, "features")[row], before)


def test_other_settings_never_mix(dataset, tmp_path, spec, quiet):
    log, _ = quiet
    a = extract(dataset, tmp_path / "art", spec, log=log)
    b = extract(dataset, tmp_path / "art", BackboneSpec("none", input_size=64), log=log)
    c = extract(dataset, tmp_path / "art", BackboneSpec("none", input_size=SIZE, seed=1), log=log)
    assert len({a.cache, b.cache, c.cache}) == 3
    assert b.new == 33 and c.new == 33
    assert store.read_column(b.cache, "features").shape[1:] == (2, 2, 512)
    back = extract(dataset, tmp_path / "art", spec, log=log)
    assert back.cache == a.cache and back.new == 0


def test_cache_key_covers_every_setting(spec):
    base = store.cache_key(cache_settings(spec, "float16"))
    variants = [
        cache_settings(BackboneSpec("none", input_size=64), "float16"),
        cache_settings(BackboneSpec("none", input_size=SIZE, layer="block4_pool"), "float16"),
        cache_settings(BackboneSpec("none", input_size=SIZE, seed=3), "float16"),
        cache_settings(spec, "float32"),
        cache_settings(BackboneSpec("none", input_size=SIZE, precision="mixed_float16"), "float16"),
    ]
    assert len({base} | {store.cache_key(v) for v in variants}) == 6


def test_flat_layout_and_nested_folders(tmp_path, spec, quiet):
    log, _ = quiet
    data = make_dataset(tmp_path / "flat", per_class=4, flat=True)
    write_image(data / "class_1/deeper/nested/x.png", 1, 77)
    s = extract(data, tmp_path / "art", spec, log=log)
    idx = store.read_index(s.cache)
    assert s.new == 13 and set(idx.split) == {"train"}
    assert idx.labels[idx.paths.index("class_1/deeper/nested/x.png")] == 1


def test_unreadable_files_are_skipped_with_reason(dataset, tmp_path, spec, quiet):
    log, lines = quiet
    (dataset / "train/class_0/notes.txt").write_text("not an image")
    (dataset / "train/class_1/empty.jpg").write_bytes(b"")
    s = extract(dataset, tmp_path / "art", spec, log=log)
    assert s.skipped == 2 and s.new == 33
    reasons = {x["path"]: x["reason"] for x in store.read_index(s.cache).skipped}
    assert "not an image" in reasons["train/class_0/notes.txt"]
    assert "empty file" in reasons["train/class_1/empty.jpg"]
    again = extract(dataset, tmp_path / "art", spec, log=log)
    assert (again.new, again.skipped) == (0, 2)


def test_preprocessing_is_caffe_not_unit_scaling():
    white = np.full((1, 1, 1, 3), 255, np.uint8)
    red = np.zeros((1, 1, 1, 3), np.uint8)
    red[..., 0] = 255
    np.testing.assert_allclose(preprocess(white)[0, 0, 0], [151.061, 138.221, 131.32], atol=1e-3)
    # RGB -> BGR: red lands in the last channel
    np.testing.assert_allclose(preprocess(red)[0, 0, 0], [-103.939, -116.779, 131.32], atol=1e-3)


def test_float16_costs_no_accuracy(tmp_path, quiet):
    """On 2x2x512 maps (2,048 values an image, flattened), float16 storage changes no prediction.

    The maps are large enough for rounding to add up, and the two caches' features differ, so
    identical out-of-fold predictions are a real check. Two images per class are mislabelled:
    the head gets 30 % of them wrong, so predictions are not all correct by construction (the
    old data scored 1.0 in every fold: any features good enough gave identical predictions).
    """
    from pipeline.train import train_head

    log, _ = quiet
    data = make_dataset(tmp_path / "d", per_class=10)
    for c in range(3):
        for i in (0, 1):
            moved = data / f"train/class_{(c + 1) % 3}/moved_{c}_{i}.png"
            (data / f"train/class_{c}/img_{i:03d}.png").rename(moved)
    acc, X = {}, {}
    for dt in ("float16", "float32"):
        art = tmp_path / dt
        s = extract(data, art, BackboneSpec("none", input_size=64), dtype=dt, log=log)
        X[dt] = store.load_features(s.cache, "flatten", "train").X
        acc[dt] = train_head(art, "logreg", "flatten", folds=3, params={"C": "0.1"}, log=log)
    assert X["float32"].shape == (30, 2 * 2 * 512)
    assert not np.array_equal(X["float16"], X["float32"])  # rounding really happened
    np.testing.assert_allclose(X["float16"], X["float32"], rtol=1e-2, atol=1e-2)
    cv16, cv32 = acc["float16"]["cv"], acc["float32"]["cv"]
    assert 0.5 < cv32["accuracy_mean"] < 0.9  # learned something, and makes mistakes
    assert cv16["oof_pred"] == cv32["oof_pred"] and cv16["oof_sha256"] == cv32["oof_sha256"]
    p16, p32 = np.array(cv16["oof_probability"]), np.array(cv32["oof_probability"])
    assert 0 < np.abs(p16 - p32).max() < 5e-3  # rounding reached the head, and barely moved it


def test_pooling_shapes():
    block = np.arange(2 * 2 * 2 * 3, dtype=np.float16).reshape(2, 2, 2, 3)
    assert store.pool(block, "avg").shape == (2, 3)
    np.testing.assert_array_equal(store.pool(block, "max")[0], [9, 10, 11])
    assert store.pool(block, "flatten").shape == (2, 12)
    with pytest.raises(store.UserError, match="POOL must be one of avg, max, flatten"):
        store.pool(block, "median")


def test_weights_file_identity_is_its_content(tmp_path):
    import keras

    model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    p = tmp_path / "w.weights.h5"
    model.save_weights(p)
    moved = tmp_path / "moved.weights.h5"
    moved.write_bytes(p.read_bytes())
    a = BackboneSpec(str(p), input_size=SIZE)
    assert a.weights_id() == BackboneSpec(str(moved), input_size=SIZE).weights_id()
    assert a.weights_id().startswith("file:sha256=")
    from pipeline.backbone import build

    built = build(a)
    np.testing.assert_array_equal(
        built.get_layer("block1_conv1").get_weights()[0],
        model.get_layer("block1_conv1").get_weights()[0],
    )


def test_features_stream_to_segments_then_one_index(dataset, tmp_path, spec, quiet, monkeypatch):
    """Each batch is on disk, whole, when the next starts (a kill loses one batch at most);
    the index names them all at the end, and no temporary file is left."""
    from pipeline.store.writer import Writer

    log, _ = quiet
    on_disk: list[int] = []
    real = Writer.add_batch

    def counting(self, meta, *a, **k):
        real(self, meta, *a, **k)
        rows = set()
        for seg in self.folder.glob("g*.h5"):
            with h5py.File(seg, "r") as g:
                rows |= set(g["ident"].asstr()[()])
        on_disk.append(len(rows))

    monkeypatch.setattr(Writer, "add_batch", counting)
    s = extract(dataset, tmp_path / "art", spec, batch_size=4, log=log)
    assert on_disk == [min(4 * (i + 1), 33) for i in range(9)]  # 33 images, 4 a batch
    assert s.new == 33 and len(store.read_index(s.cache)) == 33
    left = [p.name for p in s.cache.parent.rglob("*") if ".tmp" in p.name]
    assert left == []
