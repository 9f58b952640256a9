"""What the report says and draws: the header's facts, the mistakes gallery out of fold, the
confusion counts for any number of classes, the pictures' contents, and the artifacts/ layout."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from conftest import SIZE, make_dataset, write_image

from pipeline import layout, pictures, runs, store
from pipeline.features import extract
from pipeline.reporting import build_report
from pipeline.train import train_head

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def reported(tmp_path_factory, request):
    """A classic dataset (an unreadable file) and a flat one with mislabelled images, reported."""
    from pipeline.backbone import BackboneSpec

    spec = BackboneSpec(weights="none", input_size=SIZE, seed=0)
    tmp = tmp_path_factory.mktemp("rep")
    quiet = lambda s: None  # noqa: E731
    data = make_dataset(tmp / "data", per_class=6, validation=2)
    (data / "train/class_0/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    # two validation images of another class's pattern: the counts have mistakes to show
    write_image(data / "validation/class_0/img_000.png", 1, 800)
    write_image(data / "validation/class_2/img_001.png", 0, 801)
    art = tmp / "art"
    extract(data, art, spec, log=quiet)
    train_head(art, "logreg", folds=3, log=quiet)
    train_head(art, "svm", folds=3, log=quiet)
    rep = build_report(art, log=quiet)
    flat = make_dataset(tmp / "flat", per_class=8, flat=True)
    for i in range(3):  # class-1 pictures filed under class_0: out-of-fold mistakes
        write_image(flat / f"class_0/wrong{i}.png", 1, 700 + i)
    art2 = tmp / "art2"
    extract(flat, art2, spec, log=quiet)
    r2 = train_head(art2, "logreg", folds=3, log=quiet)
    rep2 = build_report(art2, log=quiet)
    return {"data": data, "art": art, "rep": rep, "art2": art2, "rep2": rep2, "r2": r2}


def test_the_header_says_what_was_evaluated(reported):
    h, art = reported["rep"]["header"], reported["art"]
    assert h["layout"] == "classic" and h["data"] == str(reported["data"].resolve())
    assert h["classes"] == [{"class": f"class_{c}", "train": 6, "validation": 2} for c in range(3)]
    assert h["images"] == {"train": 18, "validation": 6} and h["skipped"] == 1
    assert (h["backbone"], h["input_size"], h["layer"], h["dtype"]) == (
        "vgg16",
        SIZE,
        "block5_pool",
        "float16",
    )
    assert h["weights"] == "none" and h["random_weights"] is True and h["seeds"] == [0]
    assert h["preprocessing"] and h["weights_id"] and h["precision"] == "float32"
    datetime.fromisoformat(h["date"].replace("Z", "+00:00"))
    assert "numpy" in h["versions"] and "scikit-learn" in h["versions"]
    page = html.unescape((layout.report_dir(art) / "report.html").read_text())
    for shown in (
        h["data"],
        "block5_pool",
        "float16",
        "18 train, 6 validation",
        "compute precision",
        "package versions",
        h["versions"]["numpy"],
        h["date"],
    ):
        assert shown in page, shown


def _counted(art: Path, run: str) -> tuple[np.ndarray, list[tuple[float, float, float, int]]]:
    """The run's validation confusion and per-class figures, computed here from its saved
    head's own predictions on the cached features (not from the report's JSON)."""
    r = runs.pick(art, run)
    cache = layout.cache_by_name(art, r["features"]["file"])
    va = store.load_features(cache, r["pooling"], "validation")
    pred = runs.load_estimator(art, r).predict(va.X)
    k = len(r["classes"])
    cm = np.zeros((k, k), dtype=int)
    for t, p in zip(va.y, pred, strict=True):
        cm[int(t), int(p)] += 1
    rows = []
    for c in range(k):
        tp, col, row = cm[c, c], cm[:, c].sum(), cm[c, :].sum()
        prec, rec = (tp / col if col else 0.0), (tp / row if row else 0.0)
        rows.append((prec, rec, 2 * prec * rec / (prec + rec) if prec + rec else 0.0, int(row)))
    return cm, rows


def test_per_class_and_confusion_counts_for_every_run(reported):
    rep, art = reported["rep"], reported["art"]
    page = (layout.report_dir(art) / "report.html").read_text()
    runs_part = page[page.index("<section id='runs'>") :]
    counts = re.findall(r"<details class='counts'>(.*?)</details>", runs_part, flags=re.S)
    per_class = re.findall(r"<th>precision</th>.*?</table>", runs_part, flags=re.S)
    assert len(counts) == len(per_class) == len(rep["results"]) == 2
    mistakes = 0
    for e, t, pc in zip(rep["results"], counts, per_class, strict=True):
        cm, rows = _counted(art, e["run"])
        mistakes += int(cm.sum() - np.trace(cm))
        assert [int(v) for v in re.findall(r"<td>(\d+)</td>", t)] == cm.ravel().tolist()
        shown = re.findall(
            r"<tr><td>(class_\d)</td><td>([\d.]+)</td><td>([\d.]+)</td><td>([\d.]+)</td>"
            r"<td>(\d+)</td></tr>",
            pc,
        )
        assert shown == [
            (f"class_{c}", f"{p:.3f}", f"{r:.3f}", f"{f:.3f}", str(n))
            for c, (p, r, f, n) in enumerate(rows)
        ]
    assert mistakes >= 2  # off the diagonal: a swapped row or column would show


def test_the_gallery_shows_out_of_fold_mistakes_most_confident_first(reported):
    rep, r, art = reported["rep2"], reported["r2"], reported["art2"]
    g = rep["galleries"][0]
    assert g["source"] == "out-of-fold" and g["run"] == r["run"]
    wrong = sum(p != t for p, t in zip(r["cv"]["oof_pred"], r["cv"]["oof_true"], strict=True))
    assert g["mistakes"] == wrong >= 3
    probs = [it["probability"] for it in g["items"]]
    assert probs == sorted(probs, reverse=True) and all(0 < p <= 1 for p in probs)
    paths = {it["path"] for it in g["items"]}
    assert {f"class_0/wrong{i}.png" for i in range(3)} & paths  # the mislabelled ones show
    raw = (layout.report_dir(art) / "report.html").read_text()
    shown = raw[raw.index("<section class='mistakes'>") :].split("</section>")[0]
    assert len(re.findall(r"<figure><img alt='[^']*' src='data:image/png;base64,", shown)) == len(
        g["items"]
    )  # every mistake with its thumbnail
    page = html.unescape(raw)
    for it in g["items"]:
        assert it["path"] in page and f"({it['probability']:.0%})" in page
        assert f"{it['true']}" in page and f"{it['pred']}" in page


def test_the_html_template_escapes_every_name_where_it_shows(tmp_path):
    # the page comes from pipeline/templates/report.html.j2: without autoescape (or with a
    # `| safe` on a name) a class, file, run, reason or package name would be markup; a single
    # quote would end the alt='...' attribute of a thumbnail
    from pipeline import reporting

    bad = ["<script>a()</script>", "x' onerror='b()", '"><i>c</i>', "R&D <3"]
    (tmp_path / "c.png").write_bytes(b"\x89PNG")
    cls = ["ok", *bad]
    e = {
        "run": bad[0], "head": bad[1], "backbone": bad[2], "pooling": bad[3], "views": 0,
        "cv_accuracy_mean": 0.5, "cv_low": 0.4, "cv_high": 0.6, "cv_folds": 3, "cv_repeats": 1,
        "cv_fold_accuracies": [0.5, 0.5, 0.5], "final_params": {"k": bad[0]},
        "validation_accuracy": None, "validation_low": None, "validation_high": None,
        "n_train": 9, "n_validation": 0, "confusion_png": "c.png", "classes": cls,
        "cv_confusion": np.eye(len(cls), dtype=int).tolist(), "validation_confusion": None,
        "per_class_source": bad[1], "stale_reason": bad[2],
        "per_class": [dict(zip(("class", "precision", "recall", "f1", "support"),
                               (c, 1, 1, 1, 1), strict=True)) for c in cls],
    }  # fmt: skip
    item = {"path": bad[1], "true": bad[0], "pred": bad[2], "probability": 0.9, "thumbnail": b"P"}
    files = [{"path": b, "class": c, "split": "train"} for b, c in zip(bad, bad[1:], strict=False)]
    rep = {
        "banner": bad[0], "explain": {"x": bad[1]}, "ties": bad[2], "comparison_png": "c.png",
        "header": {"date": bad[3], "versions": {bad[0]: bad[1]}, "data": bad[2],
                   "classes": [{"class": c, "train": 1, "validation": 0} for c in cls]},
        "results": [e], "stale": [e],
        "galleries": [{"run": bad[0], "source": bad[1], "mistakes": 2, "items": [item]}],
        "learning_curve": {"png": "c.png", "advice": bad[3]},
        "duplicates": {"cross_class": [{"files": files}], "train_validation": []},
        "skipped": [{"path": b, "reason": b} for b in bad],
    }  # fmt: skip
    page = reporting._html(rep, tmp_path)
    assert "<script" not in page and "<i>" not in page and "onerror='" not in page
    for b in bad:
        assert b not in page, b
        assert html.unescape(page).count(b) >= 5, b  # shown: escaped, not dropped
    assert page.count("<img alt=") == 4 and "data:image/png;base64,UA==" in page
    assert page.startswith("<!doctype html>") and page.endswith("</ul></section></body></html>")


def test_the_report_template_ships_with_the_package():
    # pyproject's package-data must name the template, or an installed (non-editable) pipeline
    # has no report.html to render
    import fnmatch
    import importlib.resources
    import tomllib

    shipped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = shipped["package-data"]["pipeline"]
    tpl = importlib.resources.files("pipeline") / "templates" / "report.html.j2"
    assert tpl.is_file() and any(fnmatch.fnmatch("templates/report.html.j2", g) for g in globs)


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the pictures module draws (kept instead of closed)."""
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    yield kept
    monkeypatch.undo()
    plt.close("all")


def test_confusion_picture_is_normalised_per_true_class_with_counts(tmp_path, figures):
    cm = [[3, 1, 0], [0, 4, 0], [2, 0, 2]]
    pictures.confusion(cm, ["a", "b", "c"], "t", tmp_path / "c.png")
    ax = figures[-1].axes[0]
    shown = np.asarray(ax.images[0].get_array())
    assert np.allclose(shown.sum(axis=1), 1) and shown[0, 0] == pytest.approx(0.75)
    texts = {t.get_text() for t in ax.texts}
    assert {"75%\n3", "25%\n1", "100%\n4", "50%\n2"} <= texts


def test_comparison_picture_draws_folds_pairs_spread_and_validation(tmp_path, figures):
    runs = [
        {"run": "a--1", "cv_fold_accuracies": [0.8, 0.9, 1.0], "cv_accuracy_mean": 0.9,
         "cv_accuracy_std": 0.08, "cv_folds_id": "F", "validation_accuracy": 0.85},
        {"run": "b--1", "cv_fold_accuracies": [0.7, 0.6, 0.8], "cv_accuracy_mean": 0.7,
         "cv_accuracy_std": 0.08, "cv_folds_id": "F", "validation_accuracy": None},
        {"run": "c--2", "cv_fold_accuracies": [0.5, 0.6], "cv_accuracy_mean": 0.55,
         "cv_accuracy_std": 0.05, "cv_folds_id": "G", "validation_accuracy": 0.5},
    ]  # fmt: skip
    pictures.comparison(runs, tmp_path / "c.png")
    from matplotlib.collections import PathCollection

    ax = figures[-1].axes[0]
    dots = [c for c in ax.collections if isinstance(c, PathCollection)]  # the scatters
    points = sorted((float(x), float(y)) for c in dots for x, y in c.get_offsets() if x % 1 == 0)
    folds = sorted((float(i), a) for i, r in enumerate(runs) for a in r["cv_fold_accuracies"])
    assert np.allclose(points, folds)
    pairs = [ln for ln in ax.lines if ln.get_color() == "0.8"]
    assert len(pairs) == 3  # a and b share folds F: one line per fold; c is alone
    assert [list(ln.get_ydata()) for ln in pairs] == [[0.8, 0.7], [0.9, 0.6], [1.0, 0.8]]
    val = sorted(float(y) for c in dots for x, y in c.get_offsets() if x % 1)
    assert val == [0.5, 0.85]  # beside the runs that have a validation split
    bars = ax.containers
    assert [round(float(b.lines[0].get_ydata()[0]), 3) for b in bars] == [0.9, 0.7, 0.55]


@pytest.mark.skipif(shutil.which("git") is None, reason="no git")
def test_artifacts_keeps_its_readme_and_ignores_generated_content():
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")

    def ignored(path: str) -> bool:
        p = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, capture_output=True)
        return p.returncode == 0

    assert not ignored("artifacts/README.md") and not ignored("artifacts/report-screenshot.png")
    for generated in ("artifacts/features/x.h5", "artifacts/heads/r/result.json",
                      "artifacts/report/report.html", "artifacts/predictions.csv",
                      "artifacts/export/x.npz", "artifacts/bench/bench.json"):  # fmt: skip
        assert ignored(generated), generated
    text = (ROOT / "artifacts/README.md").read_text()
    for folder in ("features/", "heads/", "report/", "predictions.csv", "export/", "bench/"):
        assert f"`{folder}" in text, folder
    shot = re.search(r"\]\((artifacts/report-screenshot\.png)\)", (ROOT / "README.md").read_text())
    assert shot and (ROOT / shot.group(1)).stat().st_size > 10_000
    json.dumps(text)  # plain text
