"""Every number belongs to the images, settings and head it names (issue: results you can trust).

Views take their labels from the current cache; identical files are said and share a fold;
runs know their cache and are current or stale; predict recomputes the whole cache key; runs
are written whole and loaded only when their files match the hashes they recorded.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import SIZE, make_dataset, patch_loader, write_image

from pipeline import cli, evaluate, features, heads, images, layout, runs, store, train
from pipeline.backbone import BackboneSpec
from pipeline.cache_identity import cache_settings
from pipeline.errors import UserError
from pipeline.features import extract
from pipeline.prediction import classify
from pipeline.reporting import build_report
from pipeline.train import train_head


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dst)


# --- augmented views -------------------------------------------------------------------------


def test_views_take_their_label_from_the_current_cache(tmp_path, spec, quiet):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=4)
    art = tmp_path / "art"
    extract(data, art, spec, augment=2, log=log)
    # a class that sorts first shifts every label index; a moved file changes class
    _move(data / "train/class_0/img_000.png", data / "train/aaa/img_000.png")
    _move(data / "train/class_1/img_001.png", data / "train/aaa/img_001.png")
    _move(data / "train/class_2/img_000.png", data / "train/class_1/was_2.png")
    extract(data, art, spec, log=log)  # no AUGMENT: the views file is not touched
    cache = layout.current_cache(art)
    ts = train.load(cache, "avg", views=2).train
    label_of = {h: int(y) for h, y, o in zip(ts.sha256, ts.y, ts.original, strict=True) if o}
    views = ~ts.original
    assert views.sum() == 2 * ts.original.sum()
    assert all(int(y) == label_of[h] for h, y, v in zip(ts.sha256, ts.y, views, strict=True) if v)
    # the stale labels in the views file really differ: without the fix, training would use them
    aug = store.read_index(layout.augment_path(cache))
    stale = {h: int(y) for h, y in zip(aug.sha256, aug.labels, strict=True)}
    assert any(stale[h] != label_of[h] for h in label_of)


def test_missing_views_are_refused_with_the_fix(tmp_path, spec, quiet):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=4)
    art = tmp_path / "art"
    extract(data, art, spec, augment=2, log=log)
    write_image(data / "train/class_0/new.png", 0, 999)
    extract(data, art, spec, log=log)
    with pytest.raises(UserError, match=r"1 training image\(s\) have fewer than 2 .*AUGMENT=2"):
        train_head(art, "logreg", folds=2, views=2, log=log)
    extract(data, art, spec, augment=2, log=log)
    assert train_head(art, "logreg", folds=2, views=2, log=log)["n_train_rows"] == 13 * 3


# --- identical files ---------------------------------------------------------------------------


@pytest.fixture
def with_twins(tmp_path, spec, quiet):
    log, lines = quiet
    data = make_dataset(tmp_path / "data", per_class=8, validation=2)
    shutil.copy(data / "train/class_0/img_000.png", data / "train/class_1/twin.png")
    shutil.copy(data / "train/class_2/img_003.png", data / "validation/class_2/leak.png")
    for i in range(4):  # same-class copies: they must share a fold
        shutil.copy(data / f"train/class_1/img_00{i}.png", data / f"train/class_1/copy{i}.png")
    art = tmp_path / "art"
    extract(data, art, spec, log=log)
    return data, art, lines


def test_identical_files_are_said_everywhere(with_twins, quiet):
    data, art, lines = with_twins
    log, _ = quiet
    said = "\n".join(lines)
    assert "appear under two or more classes" in said and "twin.png" in said
    assert "both in train and in validation" in said and "leak.png" in said
    r = train_head(art, "logreg", folds=3, log=log)
    assert len(r["duplicates"]["cross_class"]) == 1
    assert len(r["duplicates"]["train_validation"]) == 1
    rep = build_report(art, log=log)
    page = (art / "report/report.html").read_text()
    assert "same content under two or more classes (1)" in page and "twin.png" in page
    assert "same content in train and in validation (1)" in page and "leak.png" in page
    assert "leak.png" in (art / "report/report.md").read_text()
    assert rep["duplicates"]["train_validation"][0]["files"][0]["path"].endswith(".png")


def test_identical_files_fall_in_the_same_fold(with_twins):
    _, art, _ = with_twins
    ts = train.load(layout.current_cache(art), "avg").train
    for k in (2, 3, 4):
        for _, te in evaluate.splits(ts, k, seed=0)[0]:
            inside = {ts.sha256[i] for i in te}
            outside = {ts.sha256[i] for i in range(len(ts.y)) if i not in set(te)}
            assert not inside & outside


# --- unreadable data -------------------------------------------------------------------------


def test_no_readable_file_is_one_line(tmp_path, capsys):
    for c in ("a", "b"):
        d = tmp_path / "data" / c
        d.mkdir(parents=True)
        (d / "x.txt").write_text("not an image")
    code = cli.main(
        ["features", "--data", str(tmp_path / "data"), "--weights", "none", "--size", "32",
         "--artifacts", str(tmp_path / "art")]
    )  # fmt: skip
    err = capsys.readouterr().err
    errors = [s for s in err.splitlines() if s.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "none of the 2 files" in errors[0] and "could be read as an image" in errors[0]


def test_a_decoder_crash_skips_the_file(tmp_path, spec, quiet, monkeypatch):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=3)
    real = images.load_image

    def flaky(path, size):
        if Path(path).name == "img_001.png":
            raise IndexError("plugin bug")
        return real(path, size)

    patch_loader(monkeypatch, flaky)
    s = extract(data, tmp_path / "art", spec, log=log)
    assert s.new == 6 and s.skipped == 3
    assert all("IndexError" in r["reason"] for r in s.skipped_rows)


# --- cross-validation scores the saved estimator -----------------------------------------------


def test_svm_cv_scores_the_calibrated_estimator_that_is_saved():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(90, 6))
    y = rng.integers(0, 3, 90)
    X[:, 0] += y * 0.8  # some signal, much overlap: one-vs-one and calibrated argmax disagree
    sha = [f"{i:064x}" for i in range(90)]
    ts = evaluate.TrainSet(X, y, np.arange(90), np.ones(90, bool), sha)
    info = heads.get("svm")
    cv = evaluate.cross_validate(heads.make(info, {}, 0), ts, ["a", "b", "c"], 3, 0, log=print)
    oof = dict(zip(cv["oof_sha256"], cv["oof_pred"], strict=True))
    disagree = 0
    for tr, te in evaluate.splits(ts, 3, 0)[0]:
        saved_kind = heads.fit(heads.make(info, {}, 0), X[tr], y[tr], ts.groups[tr])
        want = saved_kind.classes_[saved_kind.predict_proba(X[te]).argmax(axis=1)]
        assert [oof[sha[i]] for i in te] == want.tolist()
        ovo = saved_kind.calibrated_.calibrated_classifiers_[0].estimator.predict(X[te])
        disagree += int((ovo != want).sum())
    assert disagree > 0  # the two models really differ here, so the check above can fail


# --- runs: current or stale, written whole, verified -----------------------------------------


@pytest.fixture
def trained(tmp_path, spec, quiet):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=6, validation=2)
    art = tmp_path / "art"
    extract(data, art, spec, log=log)
    r = train_head(art, "logreg", folds=3, log=log)
    return data, art, r


def test_runs_on_changed_data_are_stale(trained, spec, quiet, tmp_path):
    data, art, old = trained
    log, _ = quiet
    assert runs.pick(art)["run"] == old["run"]
    write_image(data / "train/class_2/added.png", 2, 4242)
    extract(data, art, spec, log=log)
    listed = {r["run"]: r for r in runs.list_runs(art)}
    assert not listed[old["run"]]["current"]
    assert "other images" in listed[old["run"]]["stale_reason"]
    with pytest.raises(UserError, match="every trained head .* is stale"):
        runs.pick(art)
    rep = build_report(art, log=log)
    assert rep["results"] == [] and [e["run"] for e in rep["stale"]] == [old["run"]]
    new = train_head(art, "logreg", folds=3, log=log)
    assert new["run"] != old["run"]  # another cache content: never the same folder
    assert runs.pick(art)["run"] == new["run"]
    # another DATA in the same ARTIFACTS makes both stale
    other = make_dataset(tmp_path / "other", per_class=5)
    extract(other, art, spec, log=log)
    assert not any(r["current"] for r in runs.list_runs(art))


def test_report_ranks_current_runs_by_cv_and_keeps_stale_apart(trained, quiet):
    _, art, r = trained
    log, _ = quiet
    for i, acc in enumerate((0.7, 0.9, 0.8)):
        fake = {k: v for k, v in r.items() if k not in ("run", "files")}
        fake["cv"] = {**r["cv"], "accuracy_mean": acc}
        runs.write_run(art, f"fake{i}--x", fake, lambda d: [])
    stale = {k: v for k, v in r.items() if k not in ("run", "files")}
    stale["cv"] = {**r["cv"], "accuracy_mean": 2.0}
    stale["features"] = {**r["features"], "data_id": "another"}
    runs.write_run(art, "stale--x", stale, lambda d: [])
    rep = build_report(art, log=log)
    accs = [e["cv_accuracy_mean"] for e in rep["results"]]
    assert accs == sorted(accs, reverse=True)
    assert [e["run"] for e in rep["results"] if e["run"].startswith("fake")] == [
        "fake1--x",
        "fake2--x",
        "fake0--x",
    ]
    assert [e["run"] for e in rep["stale"]] == ["stale--x"]
    page = (art / "report/report.html").read_text()
    assert "corrected resampled t test" in page and "tied with the best" in page
    assert "optimistic" in page and "validation split" in page
    assert page.index("Stale runs") > page.index("fake0--x")


def test_a_run_is_written_whole_or_not_at_all(trained):
    _, art, r = trained
    before = sorted(p.name for p in layout.heads_dir(art).iterdir())

    def dies(folder: Path) -> list[Path]:
        (folder / "head.joblib").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runs.write_run(art, r["run"], {"cv": r["cv"]}, dies)
    assert sorted(p.name for p in layout.heads_dir(art).iterdir()) == before
    again = json.loads((layout.heads_dir(art) / r["run"] / "result.json").read_text())
    assert again == r
    runs.load_estimator(art, again)  # the old run is intact and still loads


def test_tampered_head_is_refused(trained, tmp_path):
    data, art, r = trained
    path = layout.heads_dir(art) / r["run"] / "head.joblib"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(UserError, match="SHA-256 differs or missing.*refusing to load"):
        classify(art, data / "validation", out=tmp_path / "p.csv", log=print)


def test_train_head_reads_one_version_of_the_cache(trained, monkeypatch, quiet):
    _, art, _ = trained
    log, _ = quiet
    opened: list[Path] = []
    real = store.open_cache

    def counting(path):
        opened.append(Path(path))
        return real(path)

    monkeypatch.setattr(store, "open_cache", counting)
    train_head(art, "logreg", folds=2, log=log)
    assert opened == [layout.current_cache(art)]


# --- the cache key and predict --------------------------------------------------------------


def test_weights_enter_the_key_by_content_not_path_or_spelling(tmp_path):
    import keras

    m = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    a = tmp_path / "a.weights.h5"
    m.save_weights(a)
    b = tmp_path / "copy" / "b.weights.h5"
    b.parent.mkdir()
    b.write_bytes(a.read_bytes())

    def key(w: str) -> str:
        return store.cache_key(cache_settings(BackboneSpec(w, input_size=SIZE), "float16"))

    assert key(str(a)) == key(str(b))
    assert key("imagenet") == key("ImageNet")
    assert key("none") != key(str(a))


def test_predict_refuses_features_made_differently(trained, tmp_path, monkeypatch):
    data, art, _ = trained
    v = images.LOADER_VERSION
    monkeypatch.setattr(images, "LOADER_VERSION", v + 1)
    with pytest.raises(UserError, match=rf"no longer makes \(loader_version {v} -> {v + 1}\)"):
        classify(art, data / "validation", out=tmp_path / "p.csv", log=print)


def test_decoder_versions_are_recorded_per_row_and_never_mixed(tmp_path, spec, quiet, monkeypatch):
    log, lines = quiet
    data = make_dataset(tmp_path / "data", per_class=3)
    art = tmp_path / "art"
    s = extract(data, art, spec, log=log)
    assert store.read_index(s.cache).embedded_with == [0] * 9
    with h5py.File(s.cache) as f:
        assert json.loads(f.attrs["embedders"])[0]["pillow"]
    real = features.embedder()
    monkeypatch.setattr(features, "embedder", lambda: {**real, "pillow": "99.0"})
    extract(data, art, spec, log=log)  # nothing to embed: nothing mixed, the cache stays
    write_image(data / "train/class_0/new.png", 0, 77)
    with pytest.raises(UserError, match=r"pillow .* -> 99.0.*would mix.*REBUILD=1"):
        extract(data, art, spec, log=log)
    s = extract(data, art, spec, log=log, rebuild=True)
    assert s.new == 10
    with h5py.File(s.cache) as f:
        assert [e["pillow"] for e in json.loads(f.attrs["embedders"])] == ["99.0"]


def test_predict_says_when_decoders_differ(trained, tmp_path, monkeypatch, quiet):
    data, art, _ = trained
    log, lines = quiet
    from pipeline import prediction as predict_mod

    real = predict_mod.embedder()
    monkeypatch.setattr(predict_mod, "embedder", lambda: {**real, "tensorflow": "9.9"})
    out = classify(art, data / "validation", out=tmp_path / "p.csv", log=log)[1]
    assert len(list(csv.DictReader(open(out)))) == 6
    assert any("tensorflow" in s and "-> 9.9" in s for s in lines)


# --- where things live ---------------------------------------------------------------------------


def test_only_layout_knows_the_artifacts_folders():
    root = Path(__file__).parents[1] / "pipeline"
    for p in root.glob("*.py"):
        if p.name in ("layout.py", "bench.py", "demo.py"):
            continue
        text = p.read_text()
        for name in (
            '"heads"',
            '"features"',
            '"sweep"',
            '"report"',
            '"predictions.csv"',
            '"export"',
        ):
            assert f"/ {name}" not in text, f"{p.name} builds an ARTIFACTS path: {name}"


# --- security ---------------------------------------------------------------------------------


def test_names_are_escaped_in_the_html_report(tmp_path, spec, quiet):
    log, _ = quiet
    evil = "<img src=x onerror=alert(1)>"
    data = make_dataset(tmp_path / "data", per_class=4)
    (data / "train/class_1").rename(data / "train" / evil)
    write_image(data / "train/class_0" / f"{evil}.png", 0, 5)
    shutil.copy(data / "train/class_0/img_000.png", data / "train" / evil / "same.png")
    art = tmp_path / "art"
    extract(data, art, spec, log=log)
    train_head(art, "logreg", folds=2, log=log)
    build_report(art, log=log)
    page = (art / "report/report.html").read_text()
    assert evil not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_dense_early_stopping_split_keeps_groups(monkeypatch):
    """The dense head's inner validation split gets the groups through the Pipeline."""
    from pipeline.keras_heads import KerasClassifier

    rng = np.random.default_rng(0)
    n, k = 40, 3
    groups = np.repeat(np.arange(n), k)
    X = rng.normal(size=(n * k, 4))
    X[:, 0] = groups  # each row says its group, even after scaling (a monotonic map)
    y = np.repeat(rng.integers(0, 2, n), k)
    seen: list[tuple[set, set]] = []
    real = KerasClassifier._split

    def recording(self, X, yi, groups=None):
        assert groups is not None, "the early-stopping split got no groups"
        fX, fy, val = real(self, X, yi, groups)
        seen.append((set(np.round(fX[:, 0], 5)), set(np.round(val[0][:, 0], 5))))
        return fX, fy, val

    monkeypatch.setattr(KerasClassifier, "_split", recording)
    ts = evaluate.TrainSet(X, y, groups, np.tile([True, False, False], n), [str(g) for g in groups])
    est = heads.make(heads.get("dense"), {"epochs": 1, "hidden": 4}, 0)
    evaluate.cross_validate(est, ts, ["a", "b"], 2, 0, log=print)
    assert len(seen) == 2
    assert all(a and b and not a & b for a, b in seen)


@pytest.mark.parametrize("head", ["svm", "svm-linear", "dense"])
def test_small_classes_and_copies_never_crash_a_head(tmp_path, spec, quiet, head):
    """A class of 2 images, and a class made mostly of copies: every head still runs."""
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=9)
    for p in sorted((data / "train/class_2").iterdir())[2:]:
        p.unlink()  # class_2: two images
    for i in range(5):  # class_1: five more copies of two images
        shutil.copy(data / f"train/class_1/img_00{i % 2}.png", data / f"train/class_1/c{i}.png")
    art = tmp_path / "art"
    extract(data, art, spec, log=log)
    params = {"epochs": "3", "hidden": "8"} if head == "dense" else {}
    r = train_head(art, head, folds=3, params=params, log=log)
    assert r["cv"]["folds"] == 2  # class_2's two distinct images allow two folds
    assert len(r["cv"]["oof_pred"]) == 9 + 14 + 2


def test_folds_do_not_depend_on_row_order():
    rng = np.random.default_rng(0)
    n = 40
    sha = [f"{rng.integers(1 << 60):064x}" for _ in range(n)]
    y = rng.integers(0, 3, n)
    X = rng.normal(size=(n, 3))
    perm = rng.permutation(n)

    def ts(idx):
        return evaluate.TrainSet(
            X[idx], y[idx], evaluate.groups_of([sha[i] for i in idx]), np.ones(n, bool),
            [sha[i] for i in idx],
        )  # fmt: skip

    a = evaluate.splits(ts(np.arange(n)), 4, 0)
    b = evaluate.splits(ts(perm), 4, 0)
    assert a[1] == b[1]  # the same folds_id: paired across caches with other row orders
    fold_a = {sha[i]: f for f, (_, te) in enumerate(a[0]) for i in te}
    fold_b = {sha[perm[i]]: f for f, (_, te) in enumerate(b[0]) for i in te}
    assert fold_a == fold_b


def test_a_missing_shard_is_refused_then_embedded_again(tmp_path, spec, quiet):
    log, lines = quiet
    data = make_dataset(tmp_path / "data", per_class=6)
    art = tmp_path / "art"
    s = extract(data, art, spec, batch_size=8, log=log)
    first = store.read_index(s.cache).entries[0]
    (store.shards_dir(s.cache) / first.name).unlink()
    with pytest.raises(UserError, match="missing segment file.*rerun `make features`"):
        train_head(art, "logreg", folds=2, log=log)
    lines.clear()
    again = extract(data, art, spec, batch_size=8, log=log)
    said = [x for x in lines if first.name in x]  # the file and its images, once
    assert again.new == first.live and len(said) == 1 and "is missing" in said[0]
    assert f"its {first.live} image(s) are embedded again" in said[0]
    assert train_head(art, "logreg", folds=2, log=log)["cv"]["folds"] == 2
    lines.clear()
    assert extract(data, art, spec, batch_size=8, log=log).new == 0
    assert not [x for x in lines if first.name in x]  # said once, not on every run


def test_predict_works_on_a_pooled_only_cache(tmp_path, spec, quiet):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=6, validation=2)
    art = tmp_path / "art"
    extract(data, art, spec, log=log, maps=False)
    train_head(art, "logreg", folds=2, log=log)
    out = classify(art, data / "validation", out=tmp_path / "p.csv", log=log)[1]
    assert len(list(csv.DictReader(open(out)))) == 6


@pytest.mark.parametrize(
    "setting, constant, other",
    [
        ("resize", "RESIZE_POLICY", "pil-bicubic-crop"),
        ("background", "BACKGROUND", (0, 0, 0)),
        ("loader_version", "LOADER_VERSION", 99),
    ],
)
def test_predict_refuses_any_other_setting(
    trained, tmp_path, monkeypatch, setting, constant, other
):
    """The installation changes where the setting comes from (the loader's own constant), not
    cache_settings: a setting left out of the key would go unnoticed, and this test fails."""
    data, art, r = trained
    monkeypatch.setattr(images, constant, other)
    with pytest.raises(UserError, match=rf"no longer makes \(.*{setting}"):
        classify(art, data / "validation", out=tmp_path / "p.csv", log=print)


@pytest.mark.parametrize("setting, other", [("dtype", "float32"), ("maps", False)])
def test_the_recorded_storage_settings_are_in_the_key(trained, setting, other):
    """dtype and maps come from the run's record: one changed there no longer matches the
    recorded key (had the key left it out, the record would still pass)."""
    from pipeline.cache_identity import check_features

    _, _, r = trained
    check_features(r)  # as recorded: accepted
    tampered = json.loads(json.dumps(r))
    tampered["features"]["settings"][setting] = other
    with pytest.raises(UserError, match="no longer makes"):
        check_features(tampered)


def test_rebuild_with_other_versions_makes_runs_and_views_stale(tmp_path, spec, quiet, monkeypatch):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=4)
    art = tmp_path / "art"
    extract(data, art, spec, augment=1, log=log)
    old = train_head(art, "logreg", folds=2, log=log)
    real = features.embedder()
    monkeypatch.setattr(features, "embedder", lambda: {**real, "tensorflow": "99.0"})
    extract(data, art, spec, log=log, rebuild=True)  # originals again; the views file untouched
    status = {r["run"]: r for r in runs.list_runs(art)}[old["run"]]
    assert not status["current"] and "embedded again" in status["stale_reason"]
    with pytest.raises(UserError, match=r"views .* other decoder/framework versions.*REBUILD=1"):
        train_head(art, "logreg", folds=2, views=1, log=log)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_run_moved_aside_by_a_killed_writer_comes_back(trained):
    """Killed between its two renames, a writer leaves the old run as `.old-<run>-<pid>`: the
    next writer puts it back whole (every file, byte for byte, its hashes passing), writes its
    own run complete, and leaves no `.old-`/`.tmp-` folder behind."""
    _, art, r = trained
    hdir = layout.heads_dir(art)
    before = _files(hdir / r["run"])
    assert runs.RESULT in before and len(before) >= 2  # the head's files and result.json
    os.rename(hdir / r["run"], hdir / f".old-{r['run']}-999999")  # the writer died in between
    (hdir / ".tmp-x-999999").mkdir()

    def save(d: Path) -> list[Path]:
        (d / "head.bin").write_bytes(b"the other head")
        return [d / "head.bin"]

    runs.write_run(art, "other--x", {k: v for k, v in r.items() if k != "run"}, save)
    assert _files(hdir / r["run"]) == before  # the old run whole
    back = runs.pick(art, r["run"])
    assert runs.verify(art, back) == hdir / r["run"]  # its recorded hashes pass
    assert runs.load_estimator(art, back) is not None
    other = json.loads((hdir / "other--x" / runs.RESULT).read_text())
    assert other["run"] == "other--x" and other["cv"] == r["cv"]  # the new run complete
    assert other["files"] == {"head.bin": runs.file_sha256(hdir / "other--x/head.bin")}
    assert set(_files(hdir / "other--x")) == {"head.bin", runs.RESULT}
    assert runs.verify(art, other) == hdir / "other--x"
    assert sorted(p.name for p in hdir.iterdir()) == sorted([r["run"], "other--x"])


def test_a_run_written_again_replaces_the_old_one_whole(trained):
    """Killed after both renames, a writer leaves its moved-aside old run next to the new one:
    the next writer of that run drops it, and the run in place is the last one written,
    complete (never a mix of the two)."""
    _, art, r = trained
    hdir = layout.heads_dir(art)
    shutil.copytree(hdir / r["run"], hdir / f".old-{r['run']}-999999")

    def save(d: Path) -> list[Path]:
        (d / "head.bin").write_bytes(b"written again")
        return [d / "head.bin"]

    runs.write_run(art, r["run"], {**r, "cv": {**r["cv"], "accuracy_mean": 0.5}}, save)
    now = _files(hdir / r["run"])
    assert set(now) == {"head.bin", runs.RESULT} and now["head.bin"] == b"written again"
    res = json.loads(now[runs.RESULT])
    assert res["cv"]["accuracy_mean"] == 0.5 and res["run"] == r["run"]
    assert runs.verify(art, res) == hdir / r["run"]
    assert [p.name for p in hdir.iterdir()] == [r["run"]]
