"""Numbers with their uncertainty: repeated CV, intervals that cover, ties said as ties."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_dataset
from scipy import stats as st
from sklearn.model_selection import StratifiedKFold

from pipeline import evaluate, stats
from pipeline.features import extract
from pipeline.reporting import build_report
from pipeline.sweeping import run_sweep
from pipeline.train import train_head


def test_the_wilson_interval_covers_about_95_percent():
    rng = np.random.default_rng(0)
    hits, wald = [], []
    for _ in range(4000):  # accuracies and validation sizes as users have them
        p, n = rng.uniform(0.5, 0.97), int(rng.integers(20, 200))
        k = int(rng.binomial(n, p))
        w = stats.wilson(k, n)
        hits.append(w["low"] <= p <= w["high"])
        h = 1.96 * np.sqrt(k / n * (1 - k / n) / n)
        wald.append(k / n - h <= p <= k / n + h)
    assert 0.93 <= np.mean(hits) <= 0.97
    assert np.mean(wald) < np.mean(hits) - 0.01  # the naive interval under-covers here


def test_the_corrected_cv_interval_covers_the_true_accuracy():
    """A known learner on a known distribution: its expected accuracy when trained on 4/5 of
    the data is computed on a large sample; ~95 % of the repeated-CV intervals contain it,
    where the uncorrected t interval (folds taken as independent) covers far less."""
    rng = np.random.default_rng(0)
    d, mu, n, k, r = 5, 0.35, 60, 5, 3

    def draw(m):
        y = rng.integers(0, 2, m)
        return rng.normal(size=(m, d)) + np.where(y[:, None] == 1, mu, -mu), y

    def fit_predict(Xtr, ytr, Xte):  # nearest centroid
        c0, c1 = Xtr[ytr == 0].mean(0), Xtr[ytr == 1].mean(0)
        return (((Xte - c1) ** 2).sum(1) < ((Xte - c0) ** 2).sum(1)).astype(int)

    Xb, yb = draw(20000)
    true = np.mean([np.mean(fit_predict(*draw(n * (k - 1) // k), Xb) == yb) for _ in range(600)])
    hit = naive = 0
    sims = 300
    for _ in range(sims):
        X, y = draw(n)
        accs = [
            np.mean(fit_predict(X[tr], y[tr], X[te]) == y[te])
            for rep in range(r)
            for tr, te in StratifiedKFold(k, shuffle=True, random_state=rep).split(X, y)
        ]
        ci = stats.corrected_t(accs, k)
        hit += ci["low"] <= true <= ci["high"]
        a = np.array(accs)
        h = st.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a))
        naive += a.mean() - h <= true <= a.mean() + h
    assert 0.90 <= hit / sims <= 0.99
    assert naive / sims < 0.85


def test_mcnemar_counts_the_images_the_runs_disagree_on():
    a = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], bool)
    b = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 1], bool)
    m = stats.mcnemar(a, b)
    assert (m["only_a_right"], m["only_b_right"]) == (6, 1)
    assert m["p_value"] == pytest.approx(2 * st.binom.cdf(1, 7, 0.5))
    assert stats.mcnemar(a, a)["p_value"] == 1.0


def test_wilson_and_mcnemar_agree_with_their_closed_forms():
    # scipy's binomtest against Wilson's formula (1927) and McNemar's exact binomial sum;
    # a wrong library call (Clopper-Pearson, Wald, a one-sided or mid-p test) differs here
    from fractions import Fraction
    from math import comb, sqrt

    z = 1.959963984540054  # the 97.5 % normal quantile
    for k, n in [(0, 1), (1, 1), (0, 7), (3, 7), (7, 7), (11, 12), (50, 100), (941, 1000)]:
        p = k / n
        centre, half = p + z * z / (2 * n), z * sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        w = stats.wilson(k, n)
        assert w["low"] == pytest.approx(max(0.0, (centre - half) / (1 + z * z / n)), abs=1e-12)
        assert w["high"] == pytest.approx(min(1.0, (centre + half) / (1 + z * z / n)), abs=1e-12)
        assert w["mean"] == p and w["n"] == n
    assert stats.wilson(0, 0) == {"mean": None, "low": None, "high": None, "n": 0}
    for only_a, only_b in [(6, 1), (1, 6), (0, 5), (3, 3), (4, 5), (40, 25), (0, 0)]:
        a = np.array([True] * only_a + [False] * only_b + [True, False, True])
        b = np.array([False] * only_a + [True] * only_b + [True, False, True])  # 3 agree
        m = stats.mcnemar(a, b)
        n, lo = only_a + only_b, min(only_a, only_b)
        tail = Fraction(sum(comb(n, i) for i in range(lo + 1)), 2**n)
        assert m["p_value"] == pytest.approx(float(min(Fraction(1), 2 * tail)), rel=1e-12)
        assert (m["only_a_right"], m["only_b_right"]) == (only_a, only_b)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from conftest import SIZE

    from pipeline.backbone import BackboneSpec

    tmp = tmp_path_factory.mktemp("unc")
    data = make_dataset(tmp / "data", per_class=30, validation=4)
    for c in range(3):  # label noise: a tenth of each class filed under the next one
        for i in range(3):
            src = data / f"train/class_{c}/img_{i:03d}.png"
            src.rename(data / f"train/class_{(c + 1) % 3}/noisy_{c}_{i}.png")
    art = tmp / "art"
    extract(data, art, BackboneSpec("none", input_size=SIZE), log=lambda s: None)
    return tmp


@pytest.fixture
def cached(built, tmp_path):
    """Each test its own copy of the module's cache: no test sees another's runs."""
    import shutil

    shutil.copytree(built, tmp_path / "copy", symlinks=True)
    return tmp_path / "copy" / "art"


def test_repeats_draw_other_partitions_and_keep_runs_paired(cached):
    q = lambda s: None  # noqa: E731
    a = train_head(cached, "logreg", folds=3, repeats=3, params={"C": "1"}, log=q)
    b = train_head(cached, "logreg", folds=3, repeats=3, params={"C": "0.5"}, log=q)
    one = train_head(cached, "logreg", folds=3, repeats=1, params={"C": "1"}, log=q)
    assert a["cv"]["repeats"] == 3 and len(a["cv"]["fold_accuracies"]) == 9
    assert a["cv"]["folds_id"] == b["cv"]["folds_id"] != one["cv"]["folds_id"]
    assert a["run"] != one["run"]  # another evaluation: another run
    # the first partition is REPEATS=1's, the others are different partitions
    assert a["cv"]["fold_accuracies"][:3] == one["cv"]["fold_accuracies"]
    from pipeline.train import load

    ts = load(next((cached / "features").glob("*.h5")), "avg").train
    folds, _ = evaluate.partitions(ts, 3, 0, 3)
    tests = [frozenset(te.tolist()) for _, te in folds]
    assert len(set(tests)) == 9
    lo, hi = a["cv"]["accuracy_low"], a["cv"]["accuracy_high"]
    assert lo < a["cv"]["accuracy_mean"] < hi
    ref = stats.corrected_t(a["cv"]["fold_accuracies"], 3)
    assert (lo, hi) == (ref["low"], ref["high"])
    v = a["validation"]
    w = stats.wilson(round(v["accuracy"] * 12), 12)
    assert (v["accuracy_low"], v["accuracy_high"]) == (w["low"], w["high"])


def test_the_report_says_which_runs_are_tied_with_the_best(cached):
    q = lambda s: None  # noqa: E731
    for c in ("1", "1.0001"):  # the same model twice: any difference is chance
        train_head(cached, "logreg", folds=5, repeats=2, params={"C": c}, log=q)
    # a crippled one, near chance: every training image a neighbour, each one vote (the
    # training fold's most frequent class, whatever the image)
    crippled = {"n_neighbors": "1000", "weights": "uniform"}
    train_head(cached, "knn", "avg", folds=5, repeats=2, params=crippled, log=q)
    rep = build_report(cached, log=q)
    res = {str(float(e["params"].get("C", 1e-7))): e for e in rep["results"]}
    best = rep["results"][0]
    assert best["is_best"] and best["tied_with_best"]
    twin = res["1.0"] if best is res["1.0001"] else res["1.0001"]
    assert twin["tied_with_best"] is True
    assert res["1e-07"]["tied_with_best"] is False
    v = res["1e-07"]["vs_best"]
    assert v["low"] > 0  # the best is better, all through the interval
    d = np.array(best["cv_fold_accuracies"]) - np.array(res["1e-07"]["cv_fold_accuracies"])
    assert v["mean_difference"] == pytest.approx(d.mean())
    ref = stats.corrected_t(d, 5)
    assert (v["low"], v["high"]) == pytest.approx((ref["low"], ref["high"]))
    assert v["validation_mcnemar"]["images"] == 12
    assert twin["run"] in rep["ties"] and res["1e-07"]["run"] not in rep["ties"]
    html = (cached / "report" / "report.html").read_text()
    assert "tied with the best" in html and "worse than the best" in html


def test_the_learning_curve_ends_at_the_ranked_figure(cached, monkeypatch):
    """The last point is the ranked run's own figure (no refit); it stands on the curve only
    because the smaller points are scored on the very folds of that run. Seen here as the
    curve fits them: its test folds are the run's (drawn independently), its training rows a
    subset of the run's training fold, and its estimator refitted on the whole training fold
    gives the run's first-partition fold accuracies: a curve on other folds, or with another
    head, next to a copied last point, fails here."""
    import json
    import os

    from pipeline import layout
    from pipeline.train import load

    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # one job: every fit seen in this process
    seen: list[tuple] = []
    real = evaluate._fold

    def spy(est, X, y, groups, tr, te, *a):
        got = real(est, X, y, groups, tr, te, *a)
        seen.append((est, tr, te, float(np.mean(got[0] == y[te]))))
        return got

    monkeypatch.setattr(evaluate, "_fold", spy)
    k, repeats = 3, 2
    out = run_sweep(
        cached, "logreg", "avg", "0", folds=k, seed=0, curve_points=3, repeats=repeats,
        log=lambda s: None,
    )  # fmt: skip
    top, curve = out["ranking"][0], out["learning_curve"]
    ranked = json.loads((layout.heads_dir(cached) / top["run"] / "result.json").read_text())
    cvr = ranked["cv"]
    last = curve["points"][-1]
    assert last["the_ranked_run"] and last["same_folds"]
    assert last["accuracy_mean"] == top["cv_accuracy_mean"] == np.mean(cvr["fold_accuracies"])
    assert (last["low"], last["high"]) == (top["cv_low"], top["cv_high"])
    smaller = curve["points"][:-1]
    assert smaller and all(p["low"] < p["high"] for p in smaller)
    assert all(p["fraction"] < 1 for p in smaller)
    # the run's folds, drawn here from the cache: the seed, k and repeats it was asked for
    ts = load(layout.cache_by_name(cached, top["cache"]), "avg").train
    ids: list[str] = []
    folds, fid = evaluate.partitions(ts, k, 0, repeats, ids)
    assert fid == cvr["folds_id"] and ids == cvr["partition_ids"]
    # the curve's fits: the last ones made, point by point, fold by fold
    assert curve["repeats"] == repeats and len(seen) == (1 + len(smaller)) * len(folds)
    fits = seen[len(folds) :]  # after the run's own CV
    sizes = []
    for j, (_, sub, te, _) in enumerate(fits):
        tr, te_run = folds[j % len(folds)]
        np.testing.assert_array_equal(te, te_run)  # the run's test fold, in its order
        assert set(sub.tolist()) < set(tr.tolist())  # fewer rows, never a test image
        sizes.append(len(sub))
    for p, point in enumerate(smaller):  # each point: the mean of its own fits
        mine = fits[p * len(folds) : (p + 1) * len(folds)]
        assert point["accuracy_mean"] == pytest.approx(np.mean([f[3] for f in mine]), abs=1e-12)
    assert sizes[: len(folds)] < sizes[-len(folds) :]  # the points grow
    # the curve's estimator on the run's whole training folds: the run's own fold figures
    est = fits[0][0]
    full = [float(np.mean(real(est, ts.X, ts.y, ts.groups, tr, te)[0] == ts.y[te]))
            for tr, te in folds[:k]]  # fmt: skip
    assert full == pytest.approx(cvr["fold_accuracies"][:k], abs=1e-12)


def test_runs_with_other_repeats_pair_on_their_common_partitions(cached):
    q = lambda s: None  # noqa: E731
    many = train_head(cached, "logreg", folds=3, repeats=3, params={"C": "1"}, log=q)
    one = train_head(cached, "logreg", folds=3, repeats=1, params={"C": "0.5"}, log=q)
    assert many["cv"]["partition_ids"][0] == one["cv"]["partition_ids"][0]
    rep = build_report(cached, log=q)
    other = rep["results"][1]
    v = other["vs_best"]
    assert v is not None and v["folds"] == 3  # the first partition, shared by both
    a, b = (many, one) if rep["results"][0]["run"] == many["run"] else (one, many)
    d = np.array(a["cv"]["fold_accuracies"][:3]) - np.array(b["cv"]["fold_accuracies"][:3])
    assert v["mean_difference"] == pytest.approx(d.mean())
    ref = stats.corrected_t(d, 3, bounds=(-1.0, 1.0))  # on the 3 shared folds, not all 9
    assert (v["low"], v["high"]) == pytest.approx((ref["low"], ref["high"]))
    assert other["tied_with_best"] is (ref["low"] <= 0 <= ref["high"])
    assert [e["run"] for e in rep["results"]] == [a["run"], b["run"]]  # only this test's runs


def test_intervals_stay_where_the_figure_can_lie_and_a_wide_one_says_why():
    """Five spread fold accuracies near 1: the t interval reaches past 1 (and a difference
    of two runs past -1/1); the figures are cut to their bounds and the line says why the
    interval is wide (few fold figures, few images a fold)."""
    accs = [1.0, 1.0, 0.6, 1.0, 0.9]
    raw = np.mean(accs) + st.t.ppf(0.975, 4) * np.std(accs, ddof=1) * np.sqrt(1 / 5 + 1 / 4)
    assert raw > 1  # without the bound the interval leaves [0, 1]
    ci = stats.corrected_t(accs, 5)
    assert 0 <= ci["low"] <= ci["mean"] <= ci["high"] == 1.0 and ci["clipped"]
    low = stats.corrected_t([0.0, 0.0, 0.4, 0.0, 0.1], 5)
    assert low["low"] == 0.0 and low["clipped"]
    d = stats.paired([1.0, 1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0, 0.0], 5)
    assert -1.0 <= d["diff_low"] and d["diff_high"] == 1.0
    cv = {
        "protocol": "k-fold",
        "folds": 5,
        "repeats": 1,
        "accuracy_mean": ci["mean"],
        "accuracy_low": ci["low"],
        "accuracy_high": ci["high"],
        "accuracy_std": float(np.std(accs)),
        "oof_scored": 40,
    }
    line = stats.cv_line(cv)
    assert "to 1.000" in line and "wide: only 5 fold figures" in line
    assert "about 8 images a fold" in line
    narrow = dict(cv, accuracy_low=0.88, accuracy_high=0.92, oof_scored=4000)
    assert "wide" not in stats.cv_line(narrow)
    many = dict(cv, repeats=10, oof_scored=4000)  # not few folds nor few images: the spread
    assert "fold accuracies spread widely" in stats.cv_line(many)


def test_a_held_out_difference_stays_in_its_bounds_and_few_pairs_stay_tied():
    """Nine of ten images one way: Wald's interval passes 1 (cut); two discordant images give
    Wald's [1, 1], but McNemar's p = 0.5 keeps them tied."""
    d = stats.paired_holdout(np.array([1] * 9 + [0], bool), np.array([0] * 9 + [1], bool))
    assert -1.0 <= d["diff_low"] <= d["diff_high"] == 1.0
    two = stats.paired_holdout(np.array([1, 1], bool), np.array([0, 0], bool))
    assert two["diff_low"] == two["diff_high"] == 1.0 and two["p_value"] == 0.5
    assert two["tied"]
    many = stats.paired_holdout(np.ones(400, bool), np.r_[np.ones(300), np.zeros(100)] > 0)
    assert not many["tied"] and many["p_value"] < 1e-6
