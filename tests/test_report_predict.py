"""Report schema, predict's single code path, and the command line's one-line user errors."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from conftest import SIZE, make_dataset, write_image

from pipeline import cli, store
from pipeline.backbone import BackboneSpec, build
from pipeline.errors import UserError
from pipeline.features import extract
from pipeline.prediction import classify
from pipeline.reporting import build_report
from pipeline.train import train_head


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """Features, logreg and svm on one small dataset: made once for the module."""
    tmp = tmp_path_factory.mktemp("trained")
    quiet = lambda s: None  # noqa: E731
    data = make_dataset(tmp / "data", per_class=8, validation=3)
    (data / "train/class_0/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    art = tmp / "art"
    extract(data, art, BackboneSpec(weights="none", input_size=SIZE, seed=0), log=quiet)
    train_head(art, "logreg", folds=3, log=quiet)
    train_head(art, "svm", folds=3, log=quiet)
    return data, art


@pytest.fixture
def trained(trained_once, tmp_path):
    """A copy of `trained_once`'s DATA and ARTIFACTS folders of this test's own (a test may
    write a report, a prediction or a cache there)."""
    data, art = trained_once
    shutil.copytree(data, tmp_path / "data", copy_function=shutil.copy2)
    shutil.copytree(art, tmp_path / "art", copy_function=shutil.copy2)
    return tmp_path / "data", tmp_path / "art"


def _validation_accuracy(art, run: str) -> float:
    """The run's saved head on the cached validation features, counted here."""
    from pipeline import layout, runs

    r = runs.pick(art, run)
    cache = layout.cache_by_name(art, r["features"]["file"])
    va = store.load_features(cache, r["pooling"], "validation")
    return float(np.mean(runs.load_estimator(art, r).predict(va.X) == va.y))


def test_report_schema(trained, quiet):
    _, art = trained
    log, _ = quiet
    rep = build_report(art, log=log)
    on_disk = json.loads((art / "report/report.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(rep["results"]))
    assert len(on_disk["results"]) == 2
    for r in on_disk["results"]:
        for k in (
            "head",
            "pooling",
            "cv_accuracy_mean",
            "cv_accuracy_std",
            "cv_folds",
            "validation_accuracy",
            "n_train",
            "n_validation",
            "per_class",
        ):
            assert k in r, k
        assert r["n_train"] == 24 and r["n_validation"] == 9 and r["cv_folds"] == 3
        assert r["validation_accuracy"] == pytest.approx(_validation_accuracy(art, r["run"]))
    means = [r["cv_accuracy_mean"] for r in on_disk["results"]]
    assert means == sorted(means, reverse=True)
    assert on_disk["skipped"] == [
        {"path": "train/class_0/broken.jpg", "reason": on_disk["skipped"][0]["reason"]}
    ]
    assert (
        "corrupt" in on_disk["skipped"][0]["reason"]
        or "truncated" in on_disk["skipped"][0]["reason"]
    )
    assert on_disk["banner"] and "RANDOM WEIGHTS" in on_disk["banner"]
    page = (art / "report/report.html").read_text()
    thumbs = sum(len(g["items"]) for g in rep["galleries"])  # 2 confusion, 1 comparison
    assert page.count("data:image/png;base64,") == 3 + thumbs and "RANDOM WEIGHTS" in page
    assert "broken.jpg" in page
    # the markdown ranking: rank, run, ..., CV mean, ..., validation accuracy, counts
    md = (art / "report/report.md").read_text().splitlines()
    for i, r in enumerate(on_disk["results"], start=1):
        (line,) = [ln for ln in md if ln.startswith(f"| {i} | {r['run']} | vgg16 | {r['head']} |")]
        assert f" | {r['cv_accuracy_mean']:.4f} [" in line and line.endswith(" | 24 | 9 |")
        assert f" | {_validation_accuracy(art, r['run']):.4f} [" in line


def test_predict_uses_the_features_code_path(trained, tmp_path, quiet):
    data, art = trained
    log, lines = quiet
    new = tmp_path / "new"
    for i, c in enumerate((0, 1, 2, 2)):
        write_image(new / f"n{i}.png", c, seed=500 + i)
    (new / "junk.png").write_text("text")
    out = classify(art, new, out=tmp_path / "p.csv", log=log)[1]
    rows = list(csv.DictReader(open(out)))
    assert [r["path"] for r in rows] == ["n0.png", "n1.png", "n2.png", "n3.png"]
    assert all(r["label"] in ("class_0", "class_1", "class_2") for r in rows)
    for r in rows:  # the label is the most probable class, its probability that class's
        ps = [float(r[f"p_class_{c}"]) for c in range(3)]
        assert r["label"] == f"class_{int(np.argmax(ps))}" and float(r["probability"]) == max(ps)
        assert sum(ps) == pytest.approx(1, abs=1e-5)
    assert any("could not read junk.png" in s for s in lines)

    # a training image predicted through `predict` matches the head on its cached features
    one = classify(art, data / "train/class_1/img_000.png", out=tmp_path / "one.csv", log=log)[1]
    got = list(csv.DictReader(open(one)))[0]
    from pipeline import runs

    r = runs.pick(art, None)
    est = runs.load_estimator(art, r)
    feats = store.load_features(next((art / "features").glob("*.h5")), r["pooling"], "train")
    i = feats.paths.index("train/class_1/img_000.png")
    p = est.predict_proba(feats.X[i : i + 1])[0]
    assert got["label"] == r["classes"][int(np.argmax(p))]
    assert float(got["probability"]) == pytest.approx(float(p.max()), abs=1e-5)


def test_predict_refuses_other_weights(trained, tmp_path):
    _, art = trained
    import keras

    m = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    w = tmp_path / "other.weights.h5"
    m.save_weights(w)
    with pytest.raises(UserError, match="are not the weights the cache was made with"):
        classify(art, tmp_path, weights=str(w), log=print)


def test_offline_imagenet_is_one_clear_error(monkeypatch):
    import keras

    real = keras.applications.VGG16

    def offline(*a, weights=None, **k):
        if weights == "imagenet":
            raise Exception("URL fetch failure on https://example.invalid/notop.h5: None")
        return real(*a, weights=weights, **k)

    monkeypatch.setattr(keras.applications, "VGG16", offline)
    with pytest.raises(
        UserError,
        match=r"could not download the ImageNet VGG16 weights.*"
        r"pass WEIGHTS=/path/to/notop.h5",
    ):
        build(BackboneSpec("imagenet", input_size=SIZE))


def test_incompatible_weights_file(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(UserError, match="could not be loaded into VGG16 without its top"):
        build(BackboneSpec(str(bad), input_size=SIZE))


def run_cli(args, capsys):
    code = cli.main(args)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "setup, args, match",
    [
        (
            None,
            ["features", "--data", "{t}/missing", "--weights", "none"],
            "DATA folder '.*missing' does not exist; set DATA=",
        ),
        ("empty", ["features", "--data", "{t}/empty", "--weights", "none"], "has no class folders"),
        (
            "single",
            ["features", "--data", "{t}/single", "--weights", "none"],
            "has 1 class \\('only'\\); a classifier needs at least two class folders",
        ),
        (
            None,
            ["features", "--data", "{t}", "--weights", "{t}/nope.h5"],
            "WEIGHTS file '.*nope.h5' does not exist; pass WEIGHTS=/path/to/",
        ),
        (
            None,
            ["features", "--data", "{t}", "--weights", "none", "--size", "8"],
            "SIZE must be an integer of at least 32",
        ),
        (None, ["train-head", "--artifacts", "{t}/art"], "run `make features` first"),
        (
            None,
            ["train-head", "--head", "forest"],
            "HEAD must be one of logreg, svm, svm-linear, svm-nystroem, sgd, knn, dense, finetune",
        ),
        (None, ["train-head", "--param", "C"], "must look like name=value"),
        (None, ["report", "--artifacts", "{t}/art"], "run `make train-head` first"),
        (
            None,
            ["predict", "--images", "{t}/nothing", "--artifacts", "{t}/art"],
            "IMAGES '.*nothing' does not exist",
        ),
        (
            "img",
            ["predict", "--images", "{t}/x.png", "--artifacts", "{t}/art"],
            "no trained heads .* run `make train-head` first",
        ),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, capsys, setup, args, match):
    if setup == "empty":
        (tmp_path / "empty").mkdir()
    elif setup == "single":
        write_image(tmp_path / "single/only/a.png", 0, 0)
    elif setup == "img":
        write_image(tmp_path / "x.png", 0, 0)
    code, err = run_cli([a.replace("{t}", str(tmp_path)) for a in args], capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    import re

    assert re.search(match, err), err


def test_class_with_one_image_via_cli(tmp_path, capsys, quiet):
    data = make_dataset(tmp_path / "d", per_class=3)
    for p in list((data / "train/class_2").iterdir())[1:]:
        p.unlink()
    art = tmp_path / "art"
    extract(data, art, BackboneSpec("none", input_size=SIZE), log=quiet[0])
    code, err = run_cli(["train-head", "--artifacts", str(art)], capsys)
    assert code == 2 and "class 'class_2' has 1 readable training image" in err


def test_help_explains_every_command(capsys):
    """Every command and option says what it does; `make help` every target and setting."""
    import argparse
    import re
    import subprocess
    from pathlib import Path

    squash = lambda s: " ".join(s.split())  # noqa: E731  (help output is re-wrapped)
    ap = cli.parser()
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    top = squash(capsys.readouterr().out)
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert set(helps) == set(sub.choices)
    for name, p in sub.choices.items():
        assert helps[name] and squash(helps[name]) in top, f"command '{name}' has no help"
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help and a.help != argparse.SUPPRESS, f"{name} {a.option_strings} has no help"

    repo = Path(__file__).resolve().parents[1]
    makefile = (repo / "Makefile").read_text()
    out = subprocess.run(
        ["make", "-s", "help"], cwd=repo, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    targets = re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.M)
    assert "features" in targets
    for t in targets:
        assert re.search(rf"^\s+{t}\s+\S", out, flags=re.M), f"make help does not describe '{t}'"
    settings = set(re.findall(r"^([A-Z][A-Z_]*)\s*\?=", makefile, flags=re.M))
    defined = set(re.findall(r"^([A-Z][A-Z_]*)\s*:?=", makefile, flags=re.M))
    used = set(re.findall(r"\$\(([A-Z][A-Z_]*)\)", makefile))  # e.g. TTA, BENCH_SIZE
    builtin = {"MAKE", "MAKEFILE_LIST", "MAKECMDGOALS"}
    assert {"DATA", "WEIGHTS"} <= settings
    for name in (settings | used - defined - builtin) - {"PYTHON", "VENV"}:
        assert re.search(rf"(?<![A-Z_]){name}=", out), f"make help does not mention {name}="


def test_demo_dataset_is_classic_layout(tmp_path):
    from pipeline.demo import write_digits

    root = write_digits(tmp_path / "digits", per_class=5)
    assert sorted(p.name for p in (root / "train").iterdir()) == [str(d) for d in range(10)]
    assert len(list(root.glob("train/*/*.png"))) == 40
    assert len(list(root.glob("validation/*/*.png"))) == 10


def test_predict_with_test_time_augmentation(trained, tmp_path, quiet):
    data, art = trained
    log, _ = quiet
    plain = classify(art, data / "validation", out=tmp_path / "a.csv", log=log)[1]
    tta = classify(art, data / "validation", out=tmp_path / "b.csv", tta=3, log=log)[1]
    a, b = list(csv.DictReader(open(plain))), list(csv.DictReader(open(tta)))
    assert [r["path"] for r in a] == [r["path"] for r in b] and len(a) == 9
    # TTA is the mean of the head's probabilities over the image and its 3 seeded views,
    # computed here independently through the loader, the augmentation and the backbone
    from pipeline import backbone, images, runs

    r = runs.pick(art)
    est = runs.load_estimator(art, r)
    model = build(BackboneSpec("none", input_size=SIZE, seed=0))
    for row in b:
        path = data / "validation" / row["path"]
        arr = images.load_image(path, SIZE)
        sha = images.content_sha256(path)
        stack = [arr] + [images.augment(arr, images.view_rng(0, sha, v)) for v in (1, 2, 3)]
        maps = np.asarray(model.predict_on_batch(backbone.preprocess(np.stack(stack))))
        proba = est.predict_proba(store.pool(maps.astype("float16"), r["pooling"])).mean(axis=0)
        assert row["label"] == r["classes"][int(est.classes_[proba.argmax()])]
        assert float(row["probability"]) == pytest.approx(float(proba.max()), abs=1e-5)


def test_report_gallery_of_any_run(tmp_path, spec, quiet):
    """Every run's gallery holds exactly its validation mistakes, most confident first: checked
    against the saved heads' own probabilities (the old data had no mistake: empty galleries
    passed any ordering)."""
    from pipeline import layout, runs

    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=8, validation=3)
    for i, (c, other) in enumerate(((0, 1), (1, 2), (2, 0), (0, 2))):
        write_image(data / f"validation/class_{c}/img_{i % 3:03d}.png", other, 900 + i)
    art = tmp_path / "art"
    extract(data, art, spec, log=log)
    train_head(art, "logreg", folds=3, log=log)
    train_head(art, "svm", folds=3, log=log)
    rep = build_report(art, log=log, gallery_runs="all")
    assert [g["run"] for g in rep["galleries"]] == [e["run"] for e in rep["results"]]
    for g in rep["galleries"]:
        r = runs.pick(art, g["run"])
        cache = layout.cache_by_name(art, r["features"]["file"])
        va = store.load_features(cache, "avg", "validation")
        proba = runs.load_estimator(art, r).predict_proba(va.X)
        pred = proba.argmax(axis=1)
        wrong = sorted(
            (-float(proba[i].max()), va.paths[i]) for i in range(len(pred)) if pred[i] != va.y[i]
        )
        assert len(wrong) >= 2 and g["source"] == "validation" and g["mistakes"] == len(wrong)
        assert [it["path"] for it in g["items"]] == [p for _, p in wrong]
        assert [it["probability"] for it in g["items"]] == pytest.approx([-q for q, _ in wrong])
        assert all(it["true"] != it["pred"] for it in g["items"])
    with pytest.raises(UserError, match="GALLERY 'nope' is not a current run"):
        build_report(art, log=log, gallery_runs="nope")
