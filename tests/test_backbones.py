"""Backbones: each builds, caches the shape its model gives, and is fed its own preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_dataset

from pipeline import store
from pipeline.backbone import FAMILIES, BackboneSpec, build, family, preprocess
from pipeline.cache_identity import cache_settings
from pipeline.errors import UserError
from pipeline.features import extract
from pipeline.settings import ExtractSettings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("bb") / "data", per_class=2, n_classes=2)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_backbone_caches_the_shape_its_model_gives(name, tiny, tmp_path, quiet):
    log, _ = quiet
    fam = family(name)
    size = fam.min_size
    for layer in (fam.layers[0], fam.finetune_from):
        spec = BackboneSpec("none", name=name, input_size=size, layer=layer)
        model = build(spec)
        s = extract(tiny, tmp_path / "art", spec, log=log, model=model)
        shape = tuple(model.output.shape[1:])
        assert store.read_column(s.cache, "features").shape == (4,) + shape
        attrs = store.read_attrs(s.cache)
        assert attrs["name"] == name and attrs["layer"] == layer
        assert store.read_column(s.cache, "pooled/avg").shape == (4, shape[-1])
    assert BackboneSpec("none", name=name).input_size == fam.default_size


def test_inception_default_size_is_299_and_size_overrides():
    assert BackboneSpec("none", name="inceptionv3").input_size == 299
    assert BackboneSpec("none", name="inceptionv3", input_size=160).input_size == 160
    with pytest.raises(UserError, match="SIZE must be an integer of at least 75 for BACKBONE"):
        BackboneSpec("none", name="inceptionv3", input_size=64)
    with pytest.raises(UserError, match="BACKBONE must be one of vgg16, vgg19, resnet50"):
        BackboneSpec("none", name="alexnet")
    with pytest.raises(UserError, match="LAYER must be one of conv5_block3_out, conv4_block6_out"):
        BackboneSpec("none", name="resnet50", layer="block5_pool")


# one known pixel, exact values: white and black, through each family's own preprocessing
WHITE, BLACK = np.full((1, 1, 1, 3), 255, np.uint8), np.zeros((1, 1, 1, 3), np.uint8)
RED = np.array([[[[255, 0, 0]]]], np.uint8)


@pytest.mark.parametrize("name", ["vgg16", "vgg19", "resnet50"])
def test_caffe_preprocessing(name):
    np.testing.assert_allclose(preprocess(WHITE, name)[0, 0, 0], [151.061, 138.221, 131.32])
    # RGB -> BGR: red lands in the last channel
    np.testing.assert_allclose(preprocess(RED, name)[0, 0, 0], [-103.939, -116.779, 131.32])


@pytest.mark.parametrize("name", ["resnet50v2", "inceptionv3"])
def test_minus_one_to_one_preprocessing(name):
    np.testing.assert_allclose(preprocess(WHITE, name)[0, 0, 0], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(preprocess(BLACK, name)[0, 0, 0], [-1.0, -1.0, -1.0])
    np.testing.assert_allclose(preprocess(RED, name)[0, 0, 0], [1.0, -1.0, -1.0])  # RGB kept


@pytest.mark.parametrize("name", ["efficientnetv2b0", "convnext_tiny", "mobilenetv3large"])
def test_built_in_preprocessing_leaves_pixels_to_the_model(name):
    np.testing.assert_array_equal(preprocess(RED, name)[0, 0, 0], [255.0, 0.0, 0.0])
    model = build(BackboneSpec("none", name=name, input_size=32))
    kinds = {type(layer).__name__ for layer in model.layers[:6]}
    assert kinds & {"Rescaling", "Normalization"}, kinds  # the model scales its input itself


def test_every_family_states_its_preprocessing_in_the_cache_key():
    keys = {
        name: store.cache_key(cache_settings(BackboneSpec("none", name=name), "float16"))
        for name in FAMILIES
    }
    assert len(set(keys.values())) == len(FAMILIES)
    s = cache_settings(BackboneSpec("none", name="resnet50v2"), "float16")
    assert "[-1, 1]" in s["preprocessing"] and s["name"] == "resnet50v2"


def test_caches_of_two_backbones_live_side_by_side(tiny, tmp_path, quiet):
    log, _ = quiet
    a = extract(tiny, tmp_path / "art", BackboneSpec("none", input_size=32), log=log)
    b = extract(
        tiny, tmp_path / "art", BackboneSpec("none", name="resnet50", input_size=32), log=log
    )
    assert a.cache != b.cache and b.new == 4
    again = extract(tiny, tmp_path / "art", BackboneSpec("none", input_size=32), log=log)
    assert again.cache == a.cache and again.new == 0


def test_a_weights_file_loads_into_its_backbone_and_is_refused_by_another(tmp_path):
    import keras

    m = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(32, 32, 3))
    path = tmp_path / "r.weights.h5"
    m.save_weights(path)
    got = build(BackboneSpec(str(path), name="resnet50", input_size=32))
    np.testing.assert_array_equal(
        got.get_layer("conv1_conv").get_weights()[0], m.get_layer("conv1_conv").get_weights()[0]
    )
    with pytest.raises(UserError, match=r"holds resnet50 weights, and BACKBONE=vgg16"):
        build(BackboneSpec(str(path), name="vgg16", input_size=32))


def test_offline_imagenet_names_the_backbones_file(monkeypatch):
    import keras

    real = keras.applications.ResNet50

    def offline(*a, weights=None, **k):
        if weights == "imagenet":
            raise Exception("URL fetch failure on https://example.invalid/x.h5: None")
        return real(*a, weights=weights, **k)

    monkeypatch.setattr(keras.applications, "ResNet50", offline)
    with pytest.raises(
        UserError,
        match=r"ImageNet ResNet50 weights \(offline\?\).*"
        r"resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 .*WEIGHTS=",
    ):
        build(BackboneSpec("imagenet", name="resnet50", input_size=32))


def test_cross_validation_and_epochs_say_where_they_are(tmp_path, spec, quiet, capsys):
    from pipeline.train import train_head

    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=6)
    extract(data, tmp_path / "art", spec, log=log)
    capsys.readouterr()
    train_head(tmp_path / "art", "dense", folds=3, params={"epochs": "4", "hidden": "8"}, log=log)
    err = capsys.readouterr().err
    import re

    assert re.search(r"cross-validation \(3 folds\) 3/3 \(100\.0%\) [\d.]+ folds/s ETA", err), err
    assert re.search(r"DenseHead epochs \d+/4 \([\d.]+%\) [\d.]+ epochs/s ETA", err), err


def test_framework_chatter_stays_out_of_the_output(capfd, caplog):
    """TensorFlow's retracing notices (one per new batch shape) say nothing to a user."""
    import logging

    caplog.set_level(logging.DEBUG)
    for size in (32, 40, 48, 56, 64, 72, 80):
        model = build(BackboneSpec("none", input_size=size))
        for n in (1, 2, 3):
            model.predict_on_batch(np.zeros((n, size, size, 3), np.float32))
    err = capfd.readouterr().err
    said = err + "\n".join(r.getMessage() for r in caplog.records)
    assert "retracing" not in said, said[-2000:]


def test_sweep_over_backbones_ranks_them_together_on_paired_folds(tmp_path, quiet):
    from pipeline.reporting import build_report
    from pipeline.sweeping import run_sweep

    log, lines = quiet
    data = make_dataset(tmp_path / "data", per_class=6)
    art = tmp_path / "art"
    extraction = ExtractSettings(data=data, artifacts=art, weights="none", size=32)
    out = run_sweep(
        art, "logreg", "avg,max", "0", folds=2, curve_points=2, log=log,
        backbones="vgg16,resnet50", extraction=extraction,
    )  # fmt: skip
    assert {r["backbone"] for r in out["ranking"]} == {"vgg16", "resnet50"}
    assert len(out["ranking"]) == 4
    rep = build_report(art, log=log)
    assert {e["backbone"] for e in rep["results"]} == {"vgg16", "resnet50"}
    assert len({e["cv_folds_id"] for e in rep["results"]}) == 1  # paired across backbones
    assert "<td>resnet50</td>" in (art / "report/report.html").read_text()
    lines.clear()
    run_sweep(
        art, "logreg", "avg", "0", folds=2, curve_points=2, log=log,
        backbones="vgg16,resnet50", extraction=extraction,
    )  # fmt: skip
    assert sum("embedded 0 new, 18 cached" in x for x in lines) == 2  # each extracted once
