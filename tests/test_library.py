"""The product as a Python library: the same files and numbers as the commands; predict's
per-class columns and TOPK; `make export`; `load_features` for any scikit-learn estimator."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SIZE, make_dataset, write_image

import pipeline
from pipeline import layout, runs, store
from pipeline.errors import UserError

ROOT = Path(__file__).parents[1]


def test_import_pipeline_loads_no_framework():
    """`import pipeline` is instant: the functions import TensorFlow etc. only when they run."""
    code = (
        "import sys, pipeline\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'sklearn', 'h5py', 'jax', 'dask', 'PIL')"
        " if m in sys.modules]\n"
        "print(heavy)\n"
        "print(sorted(n for n in pipeline.__all__ if callable(getattr(pipeline, n))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "[]"
    names = eval(out[1])  # noqa: S307 (our own printed list)
    for name in ("extract", "train_head", "report", "predict", "export", "load_features"):
        assert name in names
        assert getattr(pipeline, name).__doc__, f"{name} has no docstring"


def test_functions_are_callable_after_their_modules_are_imported():
    """No submodule shadows a command: `pipeline.predict` stays the function."""
    import pipeline.prediction  # noqa: F401
    import pipeline.reporting  # noqa: F401

    assert pipeline.predict.__module__ == "pipeline.api"
    assert pipeline.report.__module__ == "pipeline.api"


def make(*args: str) -> None:
    """One `make` target, as a user runs it; its folds one after another in the command's own
    process (JOBLIB_MULTIPROCESSING=0: no pool of worker processes started for each command,
    seconds apiece; the same numbers, which the library's, fitted in parallel, must equal)."""
    env = {**os.environ, "JOBLIB_MULTIPROCESSING": "0"}
    subprocess.run(
        ["make", "-s", *args], cwd=ROOT, check=True, capture_output=True, text=True, env=env
    )


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The same job run twice: by `make` (the commands), and by the library functions."""
    tmp = tmp_path_factory.mktemp("lib")
    data = make_dataset(tmp / "data", per_class=8, validation=3)
    new = tmp / "new"
    for i, c in enumerate((0, 1, 2, 1)):
        write_image(new / f"n{i}.png", c, seed=900 + i)
    a, b = tmp / "cmd", tmp / "lib"
    art = f"ARTIFACTS={a}"
    make("features", f"DATA={data}", art, "WEIGHTS=none", f"SIZE={SIZE}")
    make("train-head", art, "HEAD=logreg", "FOLDS=3")
    make("train-head", art, "HEAD=svm", "FOLDS=3", "PARAMS=C=1")
    make("report", art)
    make("predict", f"IMAGES={new}", art, "TOPK=2")
    make("export", art, "FORMAT=npz")
    make("export", art, "FORMAT=csv", "POOL=max")
    log: list[str] = []
    s = pipeline.extract(data, b, weights="none", size=SIZE, log=log.append)
    r1 = pipeline.train_head(b, head="logreg", folds=3, log=log.append)
    r2 = pipeline.train_head(b, head="svm", folds=3, params={"C": 1}, log=log.append)
    rep = pipeline.report(b, log=log.append)
    rows = pipeline.predict(new, b, topk=2, log=log.append)
    npz = pipeline.export(b, format="npz", log=log.append)
    csv_out = pipeline.export(b, format="csv", pool="max", log=log.append)
    return {
        "data": data,
        "new": new,
        "cmd": a,
        "lib": b,
        "summary": s,
        "results": [r1, r2],
        "report": rep,
        "rows": rows,
        "npz": npz,
        "csv": csv_out,
    }


def _files(art: Path) -> list[str]:
    return sorted(
        p.relative_to(art).as_posix()
        for p in art.rglob("*")
        if p.is_file()
        and ".lock" not in p.name
        and not any(x.endswith(".shards") for x in p.parts)  # segment names are random
    )


def test_library_writes_the_same_files_and_numbers_as_the_commands(both):
    a, b = both["cmd"], both["lib"]
    assert _files(a) == _files(b)
    assert both["summary"].cache == layout.current_cache(b)
    for r in both["results"]:
        same = json.loads((layout.heads_dir(a) / r["run"] / "result.json").read_text())
        assert same["cv"]["fold_accuracies"] == r["cv"]["fold_accuracies"]
        assert same["cv"]["oof_pred"] == r["cv"]["oof_pred"]
        assert same["validation"] == r["validation"]
        assert same["features"]["cache_key"] == r["features"]["cache_key"]
    ra = json.loads((layout.report_dir(a) / "report.json").read_text())["results"]
    rb = json.loads((layout.report_dir(b) / "report.json").read_text())["results"]
    rl = json.loads(json.dumps(both["report"]["results"]))
    timeless = [[{k: v for k, v in r.items() if k != "seconds"} for r in x] for x in (ra, rb, rl)]
    assert timeless[0] == timeless[1] == timeless[2] and len(ra) == 2
    pa = list(csv.reader(open(layout.predictions_file(a))))
    pb = list(csv.reader(open(layout.predictions_file(b))))
    assert pa == pb and len(pa) == 1 + len(both["rows"])
    cache = layout.current_cache(a)
    assert cache.name == layout.current_cache(b).name
    xa, xb = np.load(layout.export_file(a, cache, "avg", "npz")), np.load(both["npz"])
    for k in ("X", "y", "labels", "paths", "split", "sha256", "classes"):
        assert np.array_equal(xa[k], xb[k]), k
    assert (
        layout.export_file(a, cache, "max", "csv").read_bytes()
        == layout.export_file(b, cache, "max", "csv").read_bytes()
    )


def test_predict_rows_and_csv_name_every_class_and_sum_to_one(both):
    b, rows = both["lib"], both["rows"]
    best = runs.pick(b, None)
    classes = best["classes"]
    with open(layout.predictions_file(b), newline="") as fh:
        header, *body = list(csv.reader(fh))
    assert header[:3] == ["path", "label", "probability"]
    assert header[3:5] == ["label_2", "probability_2"]
    assert header[5:-3] == [f"p_{c}" for c in classes]
    assert header[-3:] == ["backbone_ran", "distance_to_training", "unlike_training"]
    assert len(body) == len(rows) == 4
    for line, row in zip(body, rows, strict=True):
        assert line[-3] == "yes" and row["backbone_ran"]  # new images: embedded
        assert float(line[-2]) == pytest.approx(row["distance_to_training"], abs=1e-6)
        assert line[-1] == ("yes" if row["unlike_training"] else "no")
        p = np.array([float(v) for v in line[5:-3]])
        assert p.sum() == pytest.approx(1.0, abs=1e-5)
        assert line[1] == classes[int(np.argmax(p))] == row["label"]
        assert float(line[2]) == pytest.approx(p.max(), abs=1e-6)
        assert line[3] != line[1] and float(line[4]) <= float(line[2])
        assert float(line[4]) == pytest.approx(np.sort(p)[-2], abs=1e-6)
        assert list(row["probabilities"]) == classes
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert [lab for lab, _ in row["top"]] == [line[1], line[3]]
        assert line[0] == row["path"]


def test_predict_probabilities_are_the_heads_on_the_features(both):
    """p_<class> is the saved head's predict_proba on the image's features, class by class,
    scaled by the run's temperature where its calibration applies one (and only there)."""
    from pipeline.diagnose import scaled

    b = both["lib"]
    r = runs.pick(b, None)
    est = runs.load_estimator(b, r)
    img = both["data"] / "train/class_2/img_001.png"
    (row,) = pipeline.predict(img, b, out=b / "one.csv", log=None)
    X, _, paths, classes = pipeline.load_features(b, r["pooling"], "train")
    p = est.predict_proba(X[paths.index("train/class_2/img_001.png")][None])[0]
    calib = r.get("calibration") or {}
    want = scaled(p[None], calib["temperature"])[0] if calib.get("applied") else p
    got = np.array([row["probabilities"][c] for c in classes])
    assert np.allclose(got, want, atol=1e-5)
    if calib.get("applied") and not np.allclose(want, p, atol=1e-3):
        assert not np.allclose(got, p, atol=1e-3)  # the head's own are not what predict says


def test_topk_beyond_the_classes_and_negative(both, tmp_path):
    b = both["lib"]
    log: list[str] = []
    rows = pipeline.predict(both["new"], b, out=tmp_path / "k.csv", topk=10, log=log.append)
    header = next(csv.reader(open(tmp_path / "k.csv")))
    n = len(runs.pick(b, None)["classes"])
    assert (
        header.count("label_2") == 1 and f"label_{n}" in header and f"label_{n + 1}" not in header
    )
    assert all(len(r["top"]) == n for r in rows)
    assert any("more than the 3 classes" in s for s in log)
    with pytest.raises(UserError, match="TOPK must be 0 or a positive"):
        pipeline.predict(both["new"], b, out=tmp_path / "k.csv", topk=-1, log=None)


def test_load_features_for_any_estimator(both):
    from sklearn.linear_model import LogisticRegression

    b = both["lib"]
    X, y, paths, classes = pipeline.load_features(b, pooling="avg", split="train")
    assert X.dtype == np.float32 and X.shape == (24, 512) and y.shape == (24,)
    assert classes == ["class_0", "class_1", "class_2"]
    assert paths[0].startswith("train/") and len(set(paths)) == 24
    assert [classes[v] for v in y] == [p.split("/")[1] for p in paths]
    # the cache file itself names the same features
    same = pipeline.load_features(layout.current_cache(b), "avg", "train")
    assert np.array_equal(same.X, X) and same.paths == paths
    Xv, yv, pv, _ = pipeline.load_features(b, "max", "validation")
    assert Xv.shape == (9, 512) and all(p.startswith("validation/") for p in pv)
    clf = LogisticRegression(max_iter=2000).fit(X, y)
    Xa, ya, pa, _ = pipeline.load_features(b, "avg", "validation")
    assert pa == pv and np.array_equal(ya, yv)  # the same images in the same order
    # a plain estimator learns from them: the 9 validation images' labels, read from their
    # folder names here, are predicted right (3 classes: chance would get 3 of 9)
    assert clf.score(Xa, np.array([classes.index(q.split("/")[1]) for q in pa])) >= 8 / 9
    with pytest.raises(UserError, match="split must be one of train, validation"):
        pipeline.load_features(b, "avg", "test")
    with pytest.raises(UserError, match="neither a feature cache"):
        pipeline.load_features(b / "nothing.h5", "avg", "train")


def test_export_npz_and_csv_hold_the_cached_features(both):
    b = both["lib"]
    z = np.load(both["npz"])  # plain arrays: no pickle needed
    X, y, paths, classes = pipeline.load_features(b, "avg", "train")
    Xv, yv, pv, _ = pipeline.load_features(b, "avg", "validation")
    assert np.array_equal(z["X"], np.concatenate([X, Xv]))
    assert z["paths"].tolist() == paths + pv
    assert z["split"].tolist() == ["train"] * len(paths) + ["validation"] * len(pv)
    assert z["labels"].tolist() == [classes[v] for v in np.concatenate([y, yv])]
    assert z["classes"].tolist() == classes
    with open(both["csv"], newline="") as fh:
        header, *body = list(csv.reader(fh))
    assert header[:4] == ["path", "label", "split", "sha256"] and len(header) == 4 + 512
    Xm, ym, pm, _ = pipeline.load_features(b, "max", "train")
    back = np.array([[float(v) for v in line[4:]] for line in body], dtype=np.float32)
    assert np.array_equal(back[: len(pm)], Xm)  # 9 significant digits: float32 exactly
    assert [line[0] for line in body[: len(pm)]] == pm
    assert [line[1] for line in body[: len(pm)]] == [classes[v] for v in ym]
    assert len({line[3] for line in body}) == len(body)
    # what made them travels with them: inside the NPZ, beside the CSV
    cache = layout.current_cache(b)
    idx = store.read_index(cache)
    for meta in (
        json.loads(str(z["provenance"])),
        json.loads(Path(str(both["csv"]) + ".json").read_text()),
    ):
        assert meta["cache"] == cache.name and meta["cache_key"] == idx.attrs["cache_key"]
        assert meta["data_id"] == idx.attrs["data_id"] and meta["random_weights"] is True
        assert meta["settings"]["name"] == "vgg16" and meta["classes"] == classes
    assert json.loads(str(z["provenance"]))["pooling"] == "avg"
    assert both["npz"].name == f"{cache.stem}-avg.npz"  # another cache: another file
    with pytest.raises(UserError, match="FORMAT must be one of npz, csv"):
        pipeline.export(b, format="parquet", log=None)


def test_make_export_and_topk_are_wired(tmp_path):
    out = subprocess.run(
        ["make", "-n", "export", "predict", "FORMAT=csv", "POOL=max", "TOPK=3", "IMAGES=x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "pipeline export" in out and "--format csv" in out and "--pool max" in out
    assert "--topk 3" in out
    assert (
        "export"
        in subprocess.run(
            ["make", "help"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    )


def test_the_readme_example_calls_real_functions_with_real_settings():
    """Every `pipeline.<name>(...)` call in the README's Python example binds to its signature."""
    import ast
    import inspect

    text = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert blocks, "the README has no Python example"
    calls = [
        n
        for b in blocks
        for n in ast.walk(ast.parse(b))
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id == "pipeline"
    ]
    assert {c.func.attr for c in calls} >= {"extract", "train_head", "report", "predict"}
    for c in calls:
        sig = inspect.signature(getattr(pipeline, c.func.attr))
        sig.bind(*[None] * len(c.args), **{k.arg: None for k in c.keywords})


def _makefile_settings() -> dict[str, set[str]]:
    """target -> the Makefile settings (upper-case variables) its recipe passes on."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    helpers = dict(re.findall(r"^([a-z_]+)\s*=\s*(.*)$", text, flags=re.M))

    def names(s: str, depth: int = 0) -> set[str]:
        out = set()
        quoted = re.findall(r"\$\((?:call q,|value )([A-Z_]+)\)", s)  # path settings, quoted
        for v in re.findall(r"\$\(([A-Za-z_]+)\)", s) + quoted:
            if v in helpers and depth < 3:
                out |= names(helpers[v], depth + 1)
            elif v.isupper() and v not in ("PY", "MAKE", "STAMP", "VENV", "PYTHON"):
                out.add(v)
        return out

    recipes = re.findall(r"^([a-z-]+):[^\n]*\n((?:\t[^\n]*\n)+)", text, flags=re.M)
    return {t: names(body) for t, body in recipes}


@pytest.mark.parametrize(
    "target, function",
    [
        ("features", "extract"),
        ("train-head", "train_head"),
        ("finetune", "finetune"),
        ("sweep", "sweep"),
        ("report", "report"),
        ("predict", "predict"),
        ("export", "export"),
    ],
)
def test_every_makefile_setting_is_a_parameter_of_its_function(target, function):
    """Same names as the Makefile, in lower case (SWEEP_HEADS -> sweep(heads=...))."""
    import inspect

    settings = _makefile_settings()[target]
    assert settings, f"no settings found for {target}"
    params = set(inspect.signature(getattr(pipeline, function)).parameters)
    wanted = {s.lower().removeprefix("sweep_") for s in settings}
    assert wanted <= params, f"{function} lacks {sorted(wanted - params)}"


EVERYONES = {"PYTHON", "VENV", "VERBOSE"}


def _makefile_takes() -> dict[str, set[str]]:
    """target -> the settings its `takes.<target>` line says it uses (conditional ones too)."""
    text = (ROOT / "Makefile").read_text()
    lines = re.findall(r"^takes\.([a-z-]+)\s*:?=(.*)$", text, flags=re.M)
    return {t: set(re.findall(r"\b[A-Z][A-Z_]+\b", body)) for t, body in lines}


def test_every_target_lists_exactly_the_settings_its_recipe_uses():
    """The refusal's lists cannot drift from the recipes: a setting passed on is listed, and a
    listed one is passed on (train-all: train-head's, HEAD aside; help shows every default)."""
    takes, recipes = _makefile_takes(), _makefile_settings()
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    assert targets == set(takes), f"targets without a takes. line: {targets ^ set(takes)}"
    for target, used in recipes.items():
        if target == "help":
            continue
        if target == "train-all":
            used = recipes["train-head"] - {"HEAD"}
        assert used - EVERYONES == takes[target], f"{target}: {used ^ takes[target]}"


def _make_n(*args: str) -> subprocess.CompletedProcess:
    # a make of its own, as a user types it (not a sub-make of `make test`, which would say
    # which folder it enters and inherit the parent's flags)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, env=env)


def test_a_setting_the_target_does_not_use_stops_it_in_one_line(tmp_path):
    # old code: `make predict HEAD=logreg` ran the best run (an SVM) without a word
    art = f"ARTIFACTS={tmp_path}"
    r = _make_n("predict", "HEAD=logreg", "IMAGES=x", art)
    assert r.returncode == 2 and r.stdout == "", r.stdout
    (line,) = r.stderr.strip().splitlines()
    assert (
        "make predict does not use HEAD (it takes IMAGES, RUN, OUT, TTA, TOPK, WEIGHTS, "
        "BACKBONE, ARTIFACTS, CLUSTER); pick a run with RUN=<name> (make report lists them)" in line
    )
    for args, said in (
        (["train-head", "HEADS=svm"], "make train-head does not use HEADS (it takes HEAD, POOL"),
        (["sweep", "DATA=x"], "make sweep does not use DATA (it takes ARTIFACTS, FOLDS"),
        (["train-all", "HEAD=svm"], "make train-all does not use HEAD (it takes POOL,"),
        (["test", "SEED=1"], "make test does not use ARTIFACTS, SEED (it takes no setting)"),
        (["features", "report", "RUN=x"], "(features takes DATA, ARTIFACTS"),
    ):
        r = _make_n(*args, art)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert said in r.stderr, r.stderr


def test_settings_a_target_uses_still_reach_its_command(tmp_path):
    art = f"ARTIFACTS={tmp_path}"
    r = _make_n("predict", "RUN=logreg-avg", "IMAGES=x", "TOPK=2", "VERBOSE=1", art)
    assert r.returncode == 0 and "--run logreg-avg" in r.stdout and "--topk 2" in r.stdout
    r = _make_n("sweep", "SWEEP_BACKBONES=vgg16", "DATA=photos", art)  # DATA goes with it
    assert r.returncode == 0 and "--backbones vgg16 --data 'photos'" in r.stdout, r.stderr
    # train-all runs make again per head: its settings arrive there and are taken
    r = _make_n("train-all", "FOLDS=3", "POOL=max", art)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("--folds 3") == 3 and r.stdout.count("--pool max") == 3


def test_load_features_refuses_the_views_file_and_an_empty_folder(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=3, n_classes=2)
    s = pipeline.extract(data, tmp_path / "art", weights="none", size=SIZE, augment=1, log=None)
    views = layout.augment_path(s.cache)
    assert views.is_file()
    with pytest.raises(UserError, match="holds augmented views, not the images; pass the cache"):
        pipeline.load_features(views, "avg", "train")
    with pytest.raises(UserError, match="holds augmented views"):
        pipeline.export(tmp_path / "art", features=views, log=None)
    assert len(pipeline.load_features(s.cache, "avg", "train").paths) == 6
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="run `make features` first"):
        pipeline.load_features(tmp_path / "empty", "avg", "train")


def test_a_segment_given_as_the_cache_names_its_cache(tmp_path):
    """load_features, train_head and the command: one line naming the cache file to pass."""
    data = make_dataset(tmp_path / "d", per_class=3, n_classes=2)
    art = tmp_path / "art"
    s = pipeline.extract(data, art, weights="none", size=SIZE, log=None)
    seg = next(store.shards_dir(s.cache).glob("g*.h5"))
    want = (
        f"'{seg.name}' is one segment of the feature cache '{s.cache.name}', not a cache; "
        f"pass '{s.cache.resolve()}'"
    )
    with pytest.raises(UserError, match=re.escape(want)):
        pipeline.load_features(seg, "avg", "train")
    with pytest.raises(UserError, match=re.escape(want)):
        pipeline.train_head(art, features=seg, log=None)
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "train-head", "--artifacts", str(art)]
        + ["--features", str(seg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: ") and want in line


def test_no_message_tells_to_delete_or_move_part_of_a_cache():
    """Messages name a command that repairs (REBUILD=1, a rerun), never surgery on a cache."""
    pattern = re.compile(r"\b(delete|remove|move) (it|the file|the segment|the shard)\b", re.I)
    found = [
        f"{p.name}: {m.group(0)}"
        for p in (ROOT / "pipeline").rglob("*.py")
        for m in pattern.finditer(p.read_text())
    ]
    assert found == []


def test_params_as_a_mapping_read_like_the_makefiles():
    from pipeline.api import head_params

    assert head_params({"epochs": 50.0, "C": 0.1}) == {"epochs": "50", "C": "0.1"}
    assert head_params("C=0.1 epochs=5") == head_params(["C=0.1", "epochs=5"])
    with pytest.raises(UserError, match="must look like name=value"):
        head_params("C")


def test_predict_takes_a_list_and_returns_every_image_in_order(both, tmp_path):
    """A list of files, paths kept as given; an unreadable one is a row with its error, never
    silently missing (the CSV holds the readable ones, like the command's)."""
    b, new = both["lib"], both["new"]
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    asked = [new / "n2.png", junk, str(new / "n0.png"), tmp_path / "gone.png"]
    rows = pipeline.predict(asked, b, out=tmp_path / "l.csv", log=None)
    assert [r["path"] for r in rows] == [str(p) for p in asked]
    assert [bool(r["error"]) for r in rows] == [False, True, False, True]
    assert rows[1]["label"] is None and rows[1]["probabilities"] is None
    assert "No such file" in rows[3]["error"]
    by_folder = {r["path"]: r for r in both["rows"]}
    for got, name in ((rows[0], "n2.png"), (rows[2], "n0.png")):
        assert got["label"] == by_folder[name]["label"]
        assert got["probabilities"] == pytest.approx(by_folder[name]["probabilities"], abs=1e-6)
    with open(tmp_path / "l.csv", newline="") as fh:
        body = list(csv.DictReader(fh))
    assert [r["path"] for r in body] == [str(asked[0]), str(asked[2])]
    with pytest.raises(UserError, match="IMAGES is an empty list"):
        pipeline.predict([], b, log=None)


def test_every_command_line_option_is_a_parameter_of_its_function():
    """cli.run passes the parsed options as keywords: each must be a parameter, by name."""
    import argparse
    import inspect

    from pipeline import cli
    from pipeline.demo import run_demo

    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(cli.COMMANDS) | {"demo"}
    for name, p in sub.choices.items():
        fn = run_demo if name == "demo" else getattr(pipeline, cli.COMMANDS[name])
        options = {a.dest for a in p._actions if a.dest != "help"}
        params = set(inspect.signature(fn).parameters)
        assert options <= params, f"{name}: {sorted(options - params)}"


def test_predict_rows_gives_every_row_in_order_one_at_a_time(both, tmp_path):
    """`pipeline.api.predict_rows`: a generator of `predict`'s rows, in the order asked, each
    with every class's probability summing to 1, an unreadable file named with its reason; the
    CSV written when the last row is taken."""
    import inspect

    from pipeline.api import predict_rows

    b, new = both["lib"], both["new"]
    bad = tmp_path / "not-an-image.png"
    bad.write_text("no pixels here")
    gone = tmp_path / "gone.png"
    asked = [new / "n2.png", bad, new / "n0.png", gone, new / "n3.png", new / "n1.png"]
    out = tmp_path / "rows.csv"
    rows = predict_rows(asked, b, out=out, log=None)
    assert inspect.isgenerator(rows)
    first = next(rows)
    assert first["path"] == str(asked[0]) and not out.exists()  # one row: nothing final yet
    got = [first, *rows]
    assert [r["path"] for r in got] == [str(p) for p in asked]
    classes = runs.pick(b, None)["classes"]
    for r in got:
        if r["path"] in (str(bad), str(gone)):
            assert r["label"] is None and r["probabilities"] is None and r["error"], r
            continue
        assert r["error"] == "" and r["label"] in classes
        assert list(r["probabilities"]) == classes
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert r["label"] == max(classes, key=lambda c: r["probabilities"][c])
    reasons = {r["path"]: r["error"] for r in got if r["error"]}
    assert "not an image" in reasons[str(bad)] and "no such file" in reasons[str(gone)].lower()
    # the same rows as `predict` and the batch run's own predictions of those images
    whole = {r["path"]: r for r in both["rows"]}
    for r in got:
        if not r["error"]:
            same = whole[Path(r["path"]).name]
            assert r["label"] == same["label"]
            for c in classes:
                assert r["probabilities"][c] == pytest.approx(same["probabilities"][c], abs=1e-6)
    with open(out, newline="") as fh:
        written = [line[0] for line in list(csv.reader(fh))[1:]]
    assert written == [str(p) for p in asked if p not in (bad, gone)]  # readable ones, in order


def test_a_lst_file_lists_images_relative_to_its_folder(both, tmp_path):
    """IMAGES=list.lst: one path a line, relative to the list's own folder (not the working
    directory), absolute ones as they are, blank lines and `#` comments ignored, in order."""
    b, new = both["lib"], both["new"]
    lists = tmp_path / "lists"
    lists.mkdir()
    shutil.copy(new / "n3.png", lists / "here.png")
    (lists / "images.lst").write_text(
        "# images to classify\n"
        "\n"
        f"{os.path.relpath(new / 'n1.png', lists)}\n"
        "   here.png   \n"
        "#here.png\n"
        f"{new / 'n0.png'}\n"
        "\n",
        encoding="utf-8",
    )
    rows = pipeline.predict(lists / "images.lst", b, out=tmp_path / "l.csv", log=None)
    rel = os.path.relpath(new / "n1.png", lists)
    assert [r["path"] for r in rows] == [rel, "here.png", str(new / "n0.png")]
    assert not any(r["error"] for r in rows)
    whole = {r["path"]: r for r in both["rows"]}
    for r, name in zip(rows, ("n1.png", "n3.png", "n0.png"), strict=True):
        assert r["probabilities"] == pytest.approx(whole[name]["probabilities"], abs=1e-6)
    (lists / "none.lst").write_text("# nothing\n\n   \n")
    with pytest.raises(UserError, match="names no image"):
        pipeline.predict(lists / "none.lst", b, out=tmp_path / "n.csv", log=None)
