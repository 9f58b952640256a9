"""Heads and evaluation: one CV path for all heads, scaling and tuning inside the folds."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_dataset
from sklearn.base import clone
from sklearn.preprocessing import StandardScaler

from pipeline import evaluate, heads, layout, runs, store
from pipeline.errors import UserError
from pipeline.features import extract
from pipeline.train import train_head

FAST_DENSE = {"epochs": "30", "hidden": "32", "learning_rate": "1e-3"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The images and their feature cache, made once for the module."""
    from conftest import SIZE

    from pipeline.backbone import BackboneSpec

    root = tmp_path_factory.mktemp("heads")
    data = make_dataset(root / "data", per_class=10, validation=4)
    extract(data, root / "art", BackboneSpec("none", input_size=SIZE), log=lambda s: None)
    return root


@pytest.fixture
def cached(built, tmp_path):
    """Each test its own copy of the module's cache (its runs are its own)."""
    shutil.copytree(built, tmp_path / "copy", symlinks=True)
    return tmp_path / "copy" / "art"


@pytest.mark.parametrize("head", ["logreg", "svm", "sgd", "knn", "dense"])
def test_each_head_learns_and_is_saved(cached, head, quiet):
    log, _ = quiet
    params = FAST_DENSE if head == "dense" else {}
    r = train_head(cached, head, folds=3, params=params, log=log)
    assert r["cv"]["folds"] == 3 and len(r["cv"]["fold_accuracies"]) == 3
    assert r["cv"]["accuracy_mean"] >= 0.8, r["cv"]
    assert r["validation"]["accuracy"] >= 0.75
    assert r["n_train"] == 30 and r["n_validation"] == 12
    assert len(r["cv"]["oof_pred"]) == 30
    assert np.array(r["cv"]["confusion"]).sum() == 30
    folder = cached / "heads" / r["run"]
    saved = json.loads((folder / "result.json").read_text())
    assert saved["cv"]["accuracy_mean"] == r["cv"]["accuracy_mean"]
    assert saved["environment"]["packages"]["scikit-learn"]
    assert (folder / "head.joblib").is_file()
    assert (folder / "model.keras").is_file() == (head == "dense")
    est = runs.load_estimator(cached, saved)
    va = store.load_features(
        layout.current_cache(cached), r["pooling"], "validation", canonical=True
    )
    proba = est.predict_proba(va.X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    # the saved head predicts what validation reported, and its label is its most probable class
    np.testing.assert_array_equal(est.predict(va.X), est.classes_[proba.argmax(axis=1)])
    reported = [p["pred"] for p in saved["validation"]["predictions"]]
    assert reported == [r["classes"][int(c)] for c in est.predict(va.X)]


def test_results_are_repeatable_with_a_seed(cached, quiet):
    """The same seed: the same probabilities, bit for bit (out of fold, and the saved head's
    on the validation images); another seed: other probabilities (the seed is used)."""
    log, _ = quiet
    short = {"epochs": "3", "hidden": "16", "learning_rate": "1e-3"}  # learning is not the point
    va = store.load_features(layout.current_cache(cached), "avg", "validation", canonical=True)

    def run(seed: int) -> tuple[dict, np.ndarray]:
        r = train_head(cached, "dense", folds=2, params=short, seed=seed, log=log)
        saved = json.loads((cached / "heads" / r["run"] / "result.json").read_text())
        return r, runs.load_estimator(cached, saved).predict_proba(va.X)

    (a, pa), (b, pb), (c, pc) = run(3), run(3), run(4)
    assert a["cv"]["oof_probability"] == b["cv"]["oof_probability"]
    assert a["cv"]["fold_accuracies"] == b["cv"]["fold_accuracies"]
    assert pa.tobytes() == pb.tobytes()  # bit for bit
    assert a["run"] != c["run"]
    assert a["cv"]["oof_probability"] != c["cv"]["oof_probability"]
    assert not np.allclose(pa, pc, rtol=0, atol=1e-6)


def test_sklearn_heads_never_import_tensorflow(cached):
    code = (
        "import sys; from pathlib import Path; from pipeline.train import train_head; "
        f"from pipeline.reporting import build_report; art = Path({str(cached)!r}); "
        "[train_head(art, h, folds=2, log=lambda s: None) for h in ('logreg', 'svm')]; "
        "build_report(art, log=lambda s: None); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr


class RecordingScaler(StandardScaler):
    fitted_rows: list[int] = []

    def fit(self, X, y=None, sample_weight=None):
        RecordingScaler.fitted_rows.append(len(X))
        return super().fit(X, y, sample_weight)


def test_scaling_and_tuning_happen_inside_the_folds(monkeypatch):
    monkeypatch.setattr(heads, "StandardScaler", RecordingScaler)
    RecordingScaler.fitted_rows = []
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 5))
    y = np.repeat([0, 1, 2], 20)
    info = heads.get("logreg")
    ts = evaluate.TrainSet(X, y, np.arange(60), np.ones(60, bool), [str(i) for i in range(60)])
    cv = evaluate.cross_validate(heads.make(info, {}, 0), ts, ["a", "b", "c"], 5, 0, log=print)
    assert cv["folds"] == 5
    assert RecordingScaler.fitted_rows, "the scaler was never fitted"
    assert max(RecordingScaler.fitted_rows) == 48  # an outer training fold, never all 60 rows
    assert min(RecordingScaler.fitted_rows) == 32  # inner folds of the grid search
    assert all(len(p) == 1 and "C" in p for p in cv["fold_params"])  # tuned per fold


def test_cv_is_honest_on_random_labels():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(90, 40))
    y = rng.integers(0, 3, 90)
    ts = evaluate.TrainSet(X, y, np.arange(90), np.ones(90, bool), [str(i) for i in range(90)])
    cv = evaluate.cross_validate(
        heads.make(heads.get("logreg"), {}, 0), ts, ["a", "b", "c"], 5, 0, log=print
    )
    assert cv["accuracy_mean"] < 0.55  # chance is 1/3; leakage would inflate this


def test_fewer_folds_when_a_class_is_small(quiet):
    log, lines = quiet
    y = np.array([0] * 10 + [1] * 3)
    assert evaluate.choose_folds(y, ["a", "b"], 5, log) == 3
    assert any("class 'b' has only 3 training images; using 3 folds" in s for s in lines)


def test_class_with_one_image_is_an_error():
    with pytest.raises(UserError, match="class 'b' has 1 readable training image"):
        evaluate.choose_folds(np.array([0, 0, 0, 1]), ["a", "b"], 5, print)


def test_folds_below_two_is_an_error():
    with pytest.raises(UserError, match="FOLDS must be at least 2; got 1"):
        evaluate.choose_folds(np.array([0, 0, 1, 1]), ["a", "b"], 1, print)


def test_unknown_head_lists_valid_ones():
    with pytest.raises(
        UserError,
        match="HEAD must be one of logreg, svm, svm-linear, svm-nystroem, sgd, knn, dense, "
        "finetune; got .forest.",
    ):
        heads.get("forest")


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"gamma": "1"}, "'gamma' is not a setting of head 'logreg'; valid: C, max_iter"),
        ({"C": "big"}, "The 'C' parameter of head 'logreg' must be of type float. Got 'big'"),
        ({"C": "-1"}, "The 'C' parameter of head 'logreg' must be positive"),
    ],
)
def test_bad_head_settings_name_the_fix(raw, match):
    with pytest.raises(UserError, match=match):
        heads.parse_params(heads.get("logreg"), raw)


def test_fixed_setting_is_not_tuned(cached, quiet):
    log, _ = quiet
    r = train_head(cached, "logreg", folds=2, params={"C": "0.5"}, log=log)
    assert r["run"].startswith("logreg-avg-C=0.5--")
    assert r["cv"]["fold_params"] == [{}, {}]


def test_dense_head_follows_the_estimator_contract():
    X = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    est = heads.DenseHead(hidden=8, epochs=5, random_state=1)
    assert clone(est).get_params() == est.get_params()
    assert est.fit(X, y) is est
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_allclose(again.predict_proba(X), est.predict_proba(X), rtol=1e-6)
    assert set(est.predict(X)) <= {0, 1}
    model = est.model_
    assert [type(layer).__name__ for layer in model.layers] == [
        "Flatten",
        "Dense",
        "Dropout",
        "Dense",
    ]


def test_train_head_before_features_is_an_error(tmp_path):
    with pytest.raises(UserError, match="run `make features` first"):
        train_head(tmp_path / "nothing", "logreg", log=print)


def test_damaged_cache_is_detected(cached, quiet):
    log, _ = quiet
    path = next(Path(cached, "features").glob("*.h5"))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match="is damaged.*rerun `make features`"):
        train_head(cached, "logreg", log=log)


def test_knn_tunes_k_inside_the_folds_and_shares_the_audits_neighbours():
    """HEAD=knn: k and the weighting are chosen on inner folds (k above an inner split's rows
    is cut, never an error), and its neighbours are the audit's on the same features."""
    from sklearn.pipeline import Pipeline

    from pipeline import diagnose as audit

    rng = np.random.default_rng(0)
    X = np.abs(rng.normal(size=(40, 16))) + np.repeat(np.eye(4, 16) * 4, 10, axis=0)
    y = np.repeat(np.arange(4), 10)
    est = heads.make(heads.HEADS["knn"], {}, seed=0)
    est.fit(X, y, groups=np.arange(40))
    chosen = heads.chosen_params(est)
    assert chosen["n_neighbors"] in (1, 3, 5, 10, 20) and chosen["weights"] in (
        "uniform",
        "distance",
    )
    assert (est.predict(X) == y).mean() >= 0.9
    tiny = heads.make(heads.HEADS["knn"], {"n_neighbors": 50}, seed=0).fit(X[:8], y[:8] % 2)
    assert tiny.predict(X[:8]).shape == (8,)  # k cut to the 8 rows it has
    pipe = heads.make(heads.HEADS["knn"], {"n_neighbors": 3, "weights": "uniform"}, seed=0)
    assert isinstance(pipe, Pipeline)
    pipe.fit(X, y)
    Z = pipe.named_steps["scale"].transform(X)
    _, idx = pipe.named_steps["clf"].knn_.kneighbors(audit.normalize(Z[:5]), 4)
    _, mine = audit.neighbours(Z, 3)
    np.testing.assert_array_equal(idx[:, 1:], mine[:5])  # the same search, itself first
    with pytest.raises(UserError, match="weights=median: use uniform or distance"):
        heads.make(heads.HEADS["knn"], {"weights": "median"}, seed=0)
