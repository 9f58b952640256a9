"""`make sweep`: a ranked table from the cache alone, a learning curve, no backbone rerun."""

from __future__ import annotations

import json

from conftest import make_dataset

from pipeline import backbone
from pipeline.features import extract
from pipeline.reporting import build_report
from pipeline.sweeping import advice, run_sweep


def test_sweep_ranks_and_draws_a_learning_curve(tmp_path, spec, quiet, monkeypatch):
    log, lines = quiet
    data = make_dataset(tmp_path / "data", per_class=10)
    # label noise, so that heads and poolings score differently and the order means something
    for src, dst, n in (("class_0", "class_1", 3), ("class_2", "class_0", 2)):
        for i in range(n):
            (data / "train" / src / f"img_{i:03d}.png").rename(data / "train" / dst / f"m{i}.png")
    art = tmp_path / "art"
    extract(data, art, spec, augment=1, log=log)

    def no_backbone(*a, **k):
        raise AssertionError("the sweep ran the backbone")

    monkeypatch.setattr(backbone, "build", no_backbone)
    out = run_sweep(art, "logreg,svm", "avg,max", "0,1", folds=3, curve_points=3, log=log)
    ranking = out["ranking"]
    assert len(ranking) == 8
    means = [r["cv_accuracy_mean"] for r in ranking]
    assert len(set(means)) >= 3, means  # the order below is a real ordering, not a tie
    on_disk = {
        p.parent.name: json.loads(p.read_text())["cv"]["accuracy_mean"]
        for p in (art / "heads").glob("*/result.json")
    }
    assert [r["run"] for r in ranking] == sorted(on_disk, key=lambda n: (-on_disk[n], n))
    assert {r["views"] for r in ranking} == {0, 1}
    curve = out["learning_curve"]
    assert [p["per_class"] for p in curve["points"]] == sorted(
        p["per_class"] for p in curve["points"]
    )
    assert curve["points"][-1]["per_class"] <= 6 and len(curve["points"]) >= 2
    assert json.loads((art / "sweep/sweep.json").read_text())["ranking"] == ranking
    rep = build_report(art, log=log)
    assert len(rep["results"]) == 8
    assert [e["run"] for e in rep["results"]] == [r["run"] for r in ranking]
    # every run of the sweep was scored on the same outer folds, so all are paired
    assert len({e["cv_folds_id"] for e in rep["results"]}) == 1
    assert all(e["vs_best"] is not None for e in rep["results"][1:])
    assert rep["learning_curve"]["png"] == "learning-curve.png"
    assert (art / "report/learning-curve.png").is_file()
    assert "Learning curve" in (art / "report/report.html").read_text()


def test_learning_curve_advice():
    rising = [
        {"per_class": 10, "accuracy_mean": 0.6, "accuracy_std": 0.02},
        {"per_class": 20, "accuracy_mean": 0.7, "accuracy_std": 0.02},
    ]
    flat = [
        {"per_class": 10, "accuracy_mean": 0.80, "accuracy_std": 0.02},
        {"per_class": 20, "accuracy_mean": 0.801, "accuracy_std": 0.02},
    ]
    assert "more images would likely help" in advice(rising)
    assert "help little" in advice(flat)
