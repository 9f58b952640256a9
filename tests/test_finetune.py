"""Fine-tuning block5 from the cached block4_pool maps: pretrained start, weights change."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from conftest import SIZE, make_dataset

from pipeline import cli, store
from pipeline.backbone import BackboneSpec
from pipeline.errors import UserError
from pipeline.features import extract
from pipeline.keras_heads import FineTuneHead
from pipeline.train import train_head

FAST = ["head_epochs=3", "finetune_epochs=2", "hidden=32"]


def _weighted(model):
    return {layer.name: layer.get_weights() for layer in model.layers if layer.get_weights()}


@pytest.mark.parametrize(
    "backbone, size", [("vgg16", SIZE), ("resnet50", SIZE)]
)  # VGG: block5 from block4_pool; ResNet: conv5 (with BatchNorm) from conv4_block6_out
def test_finetune_starts_pretrained_changes_the_stage_and_freezes_batchnorm(backbone, size):
    from pipeline.backbone import _load_base, cut, family

    fam = family(backbone)
    spec = BackboneSpec("none", name=backbone, input_size=size, seed=0)
    base = _load_base(spec)
    map_shape = tuple(int(v) for v in cut(base, fam.finetune_from).shape[1:])
    rng = np.random.default_rng(0)
    X = np.abs(rng.normal(size=(24, int(np.prod(map_shape))))).astype(np.float32)
    y = np.repeat([0, 1], 12)
    X[y == 1] *= 1.5
    est = FineTuneHead(
        backbone=backbone,
        weights="none",
        start_layer=fam.finetune_from,
        end_layer=fam.layers[0],
        input_size=size,
        map_shape=map_shape,
        head_epochs=5,
        finetune_epochs=3,
        hidden=16,
        finetune_lr=1e-3,
        backbone_seed=0,
    )
    pretrained = {name: base.get_layer(name).get_weights() for name in _weighted(est.stage())}
    start = _weighted(est.build(2).get_layer("stage"))
    assert start and all(
        np.array_equal(a, b) for n in start for a, b in zip(start[n], pretrained[n], strict=True)
    )
    est.fit(X, y)
    after = _weighted(est.model_.get_layer("stage"))
    bn = [n for n in after if "bn" in n]
    convs = [n for n in after if n not in bn]
    assert any(not np.allclose(after[n][0], pretrained[n][0]) for n in convs)  # trained
    for n in bn:  # gamma, beta, moving mean and variance: untouched (inference mode)
        for a, b in zip(after[n], pretrained[n], strict=True):
            np.testing.assert_array_equal(a, b)
    assert bool(bn) == (backbone == "resnet50")
    assert est.head_epochs_run_ >= 1 and est.finetune_epochs_run_ >= 1
    scale = est.model_.get_layer("scale").get_weights()  # standardised inside the fold
    np.testing.assert_allclose(scale[0], est.stage_mean_, rtol=1e-5)


def test_make_finetune_end_to_end(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", per_class=8, validation=2)
    art = tmp_path / "art"
    extract(data, art, BackboneSpec("none", input_size=SIZE), log=lambda s: None)
    train_head(art, "logreg", folds=2, log=lambda s: None)
    args = [
        "finetune",
        "--data",
        str(data),
        "--artifacts",
        str(art),
        "--weights",
        "none",
        "--size",
        str(SIZE),
        "--folds",
        "2",
    ] + [a for p in FAST for a in ("--param", p)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "finetune on flatten features 2048-d" in out  # block4_pool at 32 px: 2x2x512
    caches = sorted((art / "features").glob("*.h5"))
    assert any("block4_pool" in c.name for c in caches)
    # `make train-head` still defaults to the block5 cache
    assert "block5_pool" in (art / "features/current").read_text()
    r = next(p for p in (art / "heads").iterdir() if p.name.startswith("finetune"))
    assert (r / "model.keras").is_file()
    assert (
        cli.main(
            [
                "predict",
                "--images",
                str(data / "validation"),
                "--artifacts",
                str(art),
                "--run",
                r.name,
                "--out",
                str(tmp_path / "p.csv"),
            ]
        )
        == 0
    )
    import json

    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 6
    # every row: a class for its label, its probabilities summing to 1, the label their argmax,
    # and the figures the saved model gives on the same images' cached block4_pool maps
    result = json.loads((r / "result.json").read_text())
    classes = result["classes"]
    assert classes == ["class_0", "class_1", "class_2"]
    p = np.array([[float(row[f"p_{c}"]) for c in classes] for row in rows])
    assert {row["label"] for row in rows} <= set(classes)
    np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-5)
    assert [row["label"] for row in rows] == [classes[i] for i in p.argmax(axis=1)]
    assert [float(row["probability"]) for row in rows] == pytest.approx(p.max(axis=1), abs=1e-6)
    from pipeline import runs
    from pipeline.api import load_features
    from pipeline.diagnose import scaled

    model = runs.load_estimator(art, result)
    cache = next(c for c in caches if "block4_pool" in c.name)
    feats = load_features(cache, "flatten", "validation")
    at = {path: i for i, path in enumerate(feats.paths)}  # relative to DATA; a row's to IMAGES
    X = feats.X[[at[f"validation/{row['path']}"] for row in rows]]
    want = np.zeros((len(rows), len(classes)))
    want[:, np.asarray(model.classes_, int)] = model.predict_proba(X)
    calib = result.get("calibration") or {}
    if calib.get("applied"):
        want = scaled(want, float(calib["temperature"]))
    np.testing.assert_allclose(p, want, atol=2e-3)
    top2 = np.sort(want, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 4e-3  # a near-tie may fall either way within 2e-3
    assert clear.any()
    labels = [classes[i] for i in want.argmax(axis=1)]
    assert [r["label"] for r, c in zip(rows, clear, strict=True) if c] == [
        lab for lab, c in zip(labels, clear, strict=True) if c
    ]
    assert cli.main(["report", "--artifacts", str(art)]) == 0

    rep = json.loads((art / "report/report.json").read_text())
    assert {e["head"] for e in rep["results"]} == {"logreg", "finetune"}


def test_finetune_needs_block4_cache(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=4)
    art = tmp_path / "art"
    extract(data, art, BackboneSpec("none", input_size=SIZE), log=lambda s: None)
    with pytest.raises(UserError, match="HEAD=finetune needs the block4_pool cache.*make finetune"):
        train_head(art, "finetune", folds=2, log=lambda s: None)


def test_finetune_embeds_block4_once(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=4)
    spec = BackboneSpec("none", layer="block4_pool", input_size=SIZE)
    first = extract(data, tmp_path / "art", spec, set_current=False, log=lambda s: None)
    again = extract(data, tmp_path / "art", spec, set_current=False, log=lambda s: None)
    assert (first.new, again.new) == (12, 0)
    assert store.f_shape(store.read_index(first.cache)) == (2, 2, 512)
