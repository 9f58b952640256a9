"""A sweep that races (issue 27): more partitions only where they decide something, and repeats
chosen by time. Synthetic pooled vectors through the store's own writer: `avg` carries a clear
class signal, `max` a faint one, so the `max` runs are clearly worse than the best."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from pipeline import evaluate, layout, oof, stats, sweeping
from pipeline.bench import store as bench_store
from pipeline.reporting import build_report
from pipeline.sweeping import learning_curve, run_sweep
from pipeline.train import train_head

FOLDS, REPEATS = 3, 3


def cache(art: Path, n: int = 200, channels: int = 32) -> Path:
    """`n` rows of 10 classes: `avg` with a clear class signal, `max` with a faint one."""
    from pipeline.store.segments import Meta
    from pipeline.store.writer import Writer

    path = layout.features_dir(art) / "race.h5"
    path.parent.mkdir(parents=True)
    rows = bench_store._rows(0, n)
    key = bench_store._key()
    w = Writer(path, key, bench_store.STAMP, maps=False, dtype="float16", log=lambda s: None)
    ids = [r.ident for r in rows]
    meta = Meta.of_rows(rows)
    strong = bench_store._vectors(ids, channels, signal=0.9)
    faint = bench_store._vectors(ids, channels, signal=0.1)
    w.add_batch(meta, {"avg": strong, "max": faint}, None, [])
    w.commit(rows, bench_store.CLASSES, [], bench_store._attrs(key, channels), same_source=True)
    layout.set_current(art, path)
    return path


@pytest.fixture
def fits(monkeypatch):
    """Every fold fitted (CV and learning curve), counted here: the folds run in this process."""
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # n_jobs=1: no worker process to count in
    count = [0]
    real = evaluate._fold

    def spy(*a, **k):
        count[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "_fold", spy)
    with threadpool_limits(1):  # one BLAS thread: small solves on a shared machine
        yield count


def test_the_racing_sweep_picks_the_same_best_and_ties_with_fewer_fits(tmp_path, fits, monkeypatch):
    waiting: list[Path] = []  # each run's first partition, on disk until its second stage
    real = sweeping.train_head

    def spy(*a, **kw):
        if kw.get("resume") is not None:
            held = kw["resume"]["cv"]["oof"]
            assert isinstance(held, oof.Spilled) and held.path.exists()  # not in memory
            waiting.append(held.path)
        return real(*a, **kw)

    monkeypatch.setattr(sweeping, "train_head", spy)
    lines: list[str] = []
    settings = dict(folds=FOLDS, repeats=REPEATS, curve_points=2, log=lines.append)
    heads, pools = "logreg,svm-linear", "avg,max"
    cache(tmp_path / "all")
    every = run_sweep(tmp_path / "all", heads, pools, race=False, **settings)
    every_fits, fits[0] = fits[0], 0
    cache(tmp_path / "race")
    raced = run_sweep(tmp_path / "race", heads, pools, **settings)
    race_fits = fits[0]

    a, b = every["ranking"], raced["ranking"]
    assert a[0]["run"] == b[0]["run"] and a[0]["pooling"] == "avg"
    tied = {r["run"] for r in a if r["tied_with_best"]}
    assert tied == {r["run"] for r in b if r["tied_with_best"]}
    assert race_fits < every_fits, (race_fits, every_fits)
    # the max runs are clearly worse: screened out after the first partition, and only they
    screened = [r for r in b if r["screened_out"]]
    assert {r["pooling"] for r in screened} == {"max"} and len(screened) == 2
    assert not any(r["screened_out"] for r in a) and all(r["repeats"] == REPEATS for r in a)
    assert all(r["repeats"] == 1 and r["folds"] == FOLDS for r in screened)
    assert all(r["repeats"] == REPEATS for r in b if not r["screened_out"])
    assert b[-len(screened) :] == screened  # ranked after the runs that raced
    # the runs that raced stand on the same figures as in the exhaustive sweep, and keep the
    # same out-of-fold probabilities, the first partition's read back from its file
    by_name = {r["run"]: r for r in a}
    for r in b:
        if not r["screened_out"]:
            assert r["cv_accuracy_mean"] == by_name[r["run"]]["cv_accuracy_mean"]
            raced_p = oof.load(tmp_path / "race/heads" / r["run"]).probabilities
            every_p = oof.load(tmp_path / "all/heads" / r["run"]).probabilities
            assert raced_p.shape[0] == REPEATS
            np.testing.assert_array_equal(raced_p, every_p)
    assert len(waiting) == 4 and not any(p.exists() for p in waiting)  # read back, removed
    assert not list(layout.sweep_file(tmp_path / "race").parent.glob(".race-*"))
    # counted: k folds for each screened run, r·k for each that raced, the same curve
    assert every_fits - race_fits == len(screened) * (REPEATS - 1) * FOLDS
    assert every["race"]["fold_fits"] - raced["race"]["fold_fits"] == every_fits - race_fits
    assert raced["race"]["screened_out"] == [r["run"] for r in screened]
    assert any("race after the first partition" in ln and "screened out: " in ln for ln in lines)
    said = [ln for ln in lines if ln.startswith("sweep: 4 runs; ")]  # each sweep's first line
    assert said[0] == "sweep: 4 runs; every run all its partitions; repeats: 3 (REPEATS=3 asked)"
    assert said[1].startswith("sweep: 4 runs; a race: each scored on the first partition")
    # recorded as such: result.json, sweep.json, the report
    for r in screened:
        res = json.loads((tmp_path / "race/heads" / r["run"] / "result.json").read_text())
        assert res["screened_out"] is True and res["repeats"] == 1
        assert res["cv"]["repeats"] == 1 and len(res["cv"]["fold_accuracies"]) == FOLDS
        assert res["cv"]["screened_out"] is True
    sweep = json.loads(layout.sweep_file(tmp_path / "race").read_text())
    assert [r["screened_out"] for r in sweep["ranking"]] == [r["screened_out"] for r in b]
    rep = build_report(tmp_path / "race", log=lines.append)
    assert [e["run"] for e in rep["results"]] == [r["run"] for r in b]
    assert [e["run"] for e in rep["results"] if e["screened_out"]] == [r["run"] for r in screened]
    md = (layout.report_dir(tmp_path / "race") / "report.md").read_text()
    assert md.count("screened out after the first partition") >= len(screened)
    # paired on the partition they share: a screened run is compared with the best on it
    assert all(e["vs_best"] is not None and e["vs_best"]["folds"] == FOLDS for e in
               rep["results"] if e["screened_out"])  # fmt: skip


@pytest.fixture
def one_thread():
    with threadpool_limits(1):
        yield


def test_repeats_follow_the_time_budget_unless_asked(tmp_path, monkeypatch, one_thread):
    assert stats.budget_repeats(41, 3, 10) == 4  # 180 s at 41 s a partition
    assert stats.budget_repeats(500, 3, 3) == 1  # one fine-tuning partition past the budget
    assert stats.budget_repeats(0.5, 3, 10) == 10  # cheap: the most that narrows the interval
    monkeypatch.setenv("PIPELINE_MAX_REPEATS", "3")
    art = tmp_path / "art"
    features = cache(art, n=200, channels=16)

    def run(**kw):
        lines: list[str] = []
        r = train_head(art, "logreg", features=features, folds=3, log=lines.append, **kw)
        said = [ln for ln in lines if ln.startswith("repeats: ") and "by time" not in ln]
        assert len(said) == 1, lines
        return r, said[0]

    short, line = run(budget=1e-5)  # less than the first partition took
    assert short["repeats"] == 1 and short["cv"]["repeats"] == 1
    assert line.startswith("repeats: 1 (first partition took ") and "budget 1e-05 min" in line
    assert short["repeats_reason"] in line and not short["screened_out"]
    long, line = run(budget=1000)
    assert long["repeats"] == 3 and len(long["cv"]["fold_accuracies"]) == 9
    assert line.startswith("repeats: 3 (first partition took ") and "at most 3" in line
    assert long["cv"]["fold_accuracies"][:3] == short["cv"]["fold_accuracies"]
    asked, line = run(repeats=2, budget=1e-5)
    assert asked["repeats"] == 2 and line == "repeats: 2 (REPEATS=2 asked)"
    monkeypatch.setenv("PIPELINE_BUDGET", "1000")
    by_env, line = run()
    assert by_env["repeats"] == 3 and "budget 1000 min" in line
    # the sweep's learning curve too: its smaller points take what the budget holds
    slow = {**long, "cv": {**long["cv"], "partition_seconds": [100.0]}}
    curve = learning_curve(features, "logreg", "avg", 3, 0, points=3, run=slow, budget=3)
    assert curve["repeats"] == 1 and curve["points"][-1]["same_folds"]  # 180 s < 2 x 100 s
    asked = learning_curve(features, "logreg", "avg", 3, 0, 3, run=slow, budget=3, fixed=True)
    assert asked["repeats"] == 3 and asked["points"][-1]["same_folds"]


def test_a_run_races_on_while_tied_or_within_the_margin():
    def cv(accs):
        return {"folds": 5, "partition_ids": ["p0"], "fold_accuracies": accs}

    best = cv([0.90, 0.91, 0.89, 0.90, 0.92])
    close = cv([0.895, 0.905, 0.885, 0.895, 0.915])  # 0.5 point behind on every fold
    far = cv([0.60, 0.62, 0.58, 0.61, 0.63])
    noisy = cv([0.95, 0.70, 0.99, 0.75, 0.90])
    goes, pv = stats.keeps_racing(best, close, margin=0.01)
    assert goes and not pv["tied"] and pv["diff_low"] > 0  # apart, but within the margin
    assert not stats.keeps_racing(best, close, margin=0.0)[0]
    assert not stats.keeps_racing(best, far)[0]
    assert stats.keeps_racing(best, noisy)[1]["tied"]  # the interval still includes 0
    assert stats.keeps_racing(best, {**far, "partition_ids": ["other"]}) == (True, None)


def test_the_default_repeats_follow_the_collection_size(tmp_path, monkeypatch, one_thread):
    """Without REPEATS (and without the suite's PIPELINE_MAX_REPEATS=1) the most partitions
    a run takes come from its number of training images: 10 up to 1,000, 5 up to 5,000, 3 up
    to 20,000, then 1, a third of that for a head that trains a network; time decides within."""
    from pipeline import heads
    from pipeline.train import _repeats_plan

    monkeypatch.delenv("PIPELINE_MAX_REPEATS", raising=False)
    monkeypatch.delenv("PIPELINE_BUDGET", raising=False)
    most_by_size = {50: 10, 1000: 10, 1001: 5, 5000: 5, 5001: 3, 20000: 3, 20001: 1, 10**6: 1}
    for n, most in most_by_size.items():
        assert stats.default_repeats(n) == most, n
        assert stats.default_repeats(n, slow=True) == max(1, most // 3), n
    logreg, dense = heads.get("logreg"), heads.get("dense")
    assert logreg.parallel_folds and not dense.parallel_folds  # dense: the slow kind
    kfold = {"holdout": False}
    for n, info, most in [
        (300, logreg, 10), (3000, logreg, 5), (12000, logreg, 3), (50000, logreg, 1),
        (300, dense, 3), (3000, dense, 1),
    ]:  # fmt: skip
        lines: list[str] = []
        plan, why = _repeats_plan(None, kfold, None, info, n, lines.append)
        if most == 1:
            assert plan == 1 and lines == [f"repeats: 1 (at most 1 for {n:,} training images)"]
            continue
        assert lines == [
            f"repeats: by time, up to {most} for {n:,} training images (budget 3 min a run, "
            "BUDGET=; REPEATS=r fixes it)"
        ]
        assert plan(0.01) == most  # a cheap first partition: the most
        assert plan(45.0) == min(most, 4)  # 180 s holds 4 partitions of 45 s
        assert plan(500.0) == 1  # past the budget: the first alone
        assert f"at most {most} for {n:,} training images" in why[0]
    assert _repeats_plan(7, kfold, None, logreg, 300, lambda s: None)[0] == 7  # asked
    assert _repeats_plan(None, {"holdout": True}, None, logreg, 300, lambda s: None)[0] == 1
    # a run chooses by its own size: 200 images, up to 10 (one partition fitted: no time)
    features = cache(tmp_path / "art", n=200, channels=16)
    r = train_head(tmp_path / "art", "logreg", features=features, folds=3, budget=1e-5,
                   log=lambda s: None)  # fmt: skip
    assert r["repeats"] == 1 and "at most 10 for 200 training images" in r["repeats_reason"]
    monkeypatch.setenv("PIPELINE_MAX_REPEATS", "4")  # the cap, as the suite sets it to 1
    assert stats.default_repeats(300) == 4 and stats.default_repeats(30000) == 1
