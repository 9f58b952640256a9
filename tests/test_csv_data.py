"""DATA as a CSV of path,label[,split]: the same scan, cache and checks as class folders; every
problem row listed with its line, never dropped."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import make_dataset, write_image

from pipeline import cli, dataset, layout, store
from pipeline.errors import UserError
from pipeline.features import extract
from pipeline.reporting import build_report
from pipeline.train import train_head


def write_csv(path: Path, rows: list[list[str]], header: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header or ["path", "label", "split"])
        w.writerows(rows)
    return path


def rows_of(data: Path, prefix: str = "") -> list[list[str]]:
    """One CSV row per image of a classic-layout dataset, labelled by its class folder."""
    return [
        [prefix + p.relative_to(data).as_posix(), p.parent.name, p.parts[-3]]
        for p in sorted(data.rglob("*.png"))
    ]


def test_a_csv_of_the_same_images_makes_the_same_cache_and_folds(tmp_path, spec, quiet):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=6, validation=2)
    rows = rows_of(data)
    random.Random(0).shuffle(rows)  # the rows' order changes nothing
    labels = write_csv(data / "labels.csv", rows)
    a = extract(data, tmp_path / "a", spec, log=log)
    b = extract(labels, tmp_path / "b", spec, log=log)
    ia, ib = store.read_index(a.cache), store.read_index(b.cache)
    assert ia.attrs["data_id"] == ib.attrs["data_id"]
    assert ia.attrs["cache_key"] == ib.attrs["cache_key"]
    assert ib.attrs["layout"] == "csv" and ib.attrs["data"] == str(labels.resolve())
    assert ib.paths == ia.paths and ib.classes == ia.classes == ["class_0", "class_1", "class_2"]
    fa = store.load_features(a.cache, "avg", "validation")
    fb = store.load_features(b.cache, "avg", "validation")
    assert np.array_equal(fa.X, fb.X) and fa.paths == fb.paths and len(fb.paths) == 6
    ra = train_head(tmp_path / "a", "logreg", folds=3, log=log)
    rb = train_head(tmp_path / "b", "logreg", folds=3, log=log)
    assert ra["cv"]["fold_accuracies"] == rb["cv"]["fold_accuracies"]
    assert ra["cv"]["folds_id"] == rb["cv"]["folds_id"]
    assert ra["validation"] == rb["validation"]
    # rewritten in another order: nothing to do
    random.Random(1).shuffle(rows)
    write_csv(labels, rows)
    again = extract(labels, tmp_path / "b", spec, log=log)
    assert again.new == 0 and not again.rewrote


def test_problem_rows_are_listed_with_their_line_never_dropped(tmp_path, spec, quiet):
    log, lines = quiet
    imgs = tmp_path / "photos"
    for c in range(2):
        for i in range(9):
            write_image(imgs / f"c{c}_{i}.png", c, seed=10 * c + i)
    good = [[f"../photos/c{c}_{i}.png", f"cat{c}", ""] for c in range(2) for i in range(8)]
    rows = [
        *good,
        good[0],  # the same row again: kept once, said
        ["../photos/c0_8.png", ""],  # empty label
        ["../photos/gone.png", "cat0"],  # no such file
        ["", "cat1"],  # empty path
        ["../photos/c1_8.png", "cat1", "test"],  # unknown split
        ["../photos/c1_7.png", "cat0"],  # c1_7 is also listed as cat1 above
        [str((imgs / "c0_0.png").resolve()), "cat0"],  # absolute: taken as it is
    ]
    labels = write_csv(tmp_path / "meta/labels.csv", rows)
    s = extract(labels, tmp_path / "art", spec, log=log)
    idx = store.read_index(s.cache)
    assert idx.classes == ["cat0", "cat1"]
    reasons = {sk["path"]: sk["reason"] for sk in idx.skipped}
    assert reasons == {
        "../photos/c0_8.png": "empty label on line 19 of labels.csv",
        "../photos/gone.png": "listed on line 20 of labels.csv but does not exist",
        "labels.csv:21": "empty path on line 21 of labels.csv",
        "../photos/c1_8.png": (
            "split 'test' on line 22 of labels.csv is neither train nor validation"
        ),
        "../photos/c1_7.png": (
            "listed as cat0 (train) and cat1 (train) on lines 17, 23 of labels.csv; keep one row"
        ),
    }
    kept = sorted(idx.paths)
    assert len(kept) == 16 and "../photos/c1_7.png" not in kept
    assert str((imgs / "c0_0.png").resolve()) in kept  # the absolute row (same file, other path)
    # every listed path is a cached row or a skipped one
    listed = {r[0] or "labels.csv:21" for r in rows}
    assert listed == set(kept) | set(reasons)
    assert any(
        "'../photos/c0_0.png' is listed 2 times (labels.csv lines 2, 18)" in x for x in lines
    )
    assert any(x.startswith("skipped ../photos/gone.png: listed on line 20") for x in lines)
    train_head(tmp_path / "art", "logreg", folds=2, log=log)
    rep = build_report(tmp_path / "art", log=log)
    assert {sk["path"] for sk in rep["skipped"]} == set(reasons)
    page = (layout.report_dir(tmp_path / "art") / "report.html").read_text()
    assert "labels.csv" in page and "empty label on line 19" in page


def test_validation_rows_and_a_file_that_appears_later(tmp_path, spec, quiet):
    log, _ = quiet
    data = make_dataset(tmp_path / "d", per_class=4, n_classes=2, validation=2)
    rows = rows_of(data)
    rows.append(["train/class_0/late.png", "class_0", "train"])
    labels = write_csv(tmp_path / "d/labels.csv", rows)
    s = extract(labels, tmp_path / "art", spec, log=log)
    assert [sk["path"] for sk in s.skipped_rows] == ["train/class_0/late.png"]
    r = train_head(tmp_path / "art", "logreg", folds=2, log=log)
    assert r["n_train"] == 8 and r["n_validation"] == 4
    write_image(data / "train/class_0/late.png", 0, seed=77)
    s = extract(labels, tmp_path / "art", spec, log=log)
    assert s.new == 1 and s.skipped == 0


@pytest.mark.parametrize(
    "text, match",
    [
        ("file,class\na.png,x\n", "must start with a header row path,label"),
        ("path,label\na.png,x\nb.png,x\n", "has 1 label \\('x'\\).*at least two labels"),
        ("path,label\n", "lists no image"),
        (
            "path,label,split\na.png,x,train\nb.png,y,train\nc.png,z,validation\n",
            r"validation labels \['z'\] in .* \(line 4\) have no usable training row",
        ),
    ],
)
def test_csv_user_errors(tmp_path, text, match):
    f = tmp_path / "labels.csv"
    f.write_text(text)
    with pytest.raises(UserError, match=match):
        dataset.scan(f)


def test_csv_that_is_not_utf8_or_missing_or_not_csv(tmp_path, capsys):
    f = tmp_path / "labels.csv"
    f.write_bytes(b"path,label\n\xff\xfe.png,x\n")
    with pytest.raises(UserError, match="is not UTF-8 text; save it as UTF-8"):
        dataset.scan(f)
    with pytest.raises(UserError, match="DATA CSV file .* does not exist"):
        dataset.scan(tmp_path / "other.csv")
    (tmp_path / "labels.txt").write_text("path,label\n")
    with pytest.raises(UserError, match="is a file; set DATA to an image folder or to a"):
        dataset.scan(tmp_path / "labels.txt")
    f.write_text("path\na.png\n")
    code = cli.main(["features", "--data", str(f), "--artifacts", str(tmp_path / "art")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "header row path,label" in err


def test_the_label_column_may_come_first_and_extra_columns_are_ignored(tmp_path):
    f = tmp_path / "labels.csv"
    write_image(tmp_path / "one.png", 0, 1)
    write_image(tmp_path / "two.png", 1, 2)
    f.write_text('\ufeffLabel,notes,PATH\r\nb,"hello, world",one.png\r\na,,two.png\r\na,,3.png\r\n')
    s = dataset.scan(f)
    assert s.classes == ["a", "b"] and s.layout == "csv" and s.source == f
    assert [(it.path, s.classes[it.label], it.problem) for it in s.items] == [
        ("3.png", "a", "listed on line 4 of labels.csv but does not exist"),
        ("two.png", "a", ""),
        ("one.png", "b", ""),
    ]


def test_labels_spelled_two_ways_are_refused(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("path,label\na.png,Cat\nb.png,dog\nc.png,cat\nd.png,cat\n")
    with pytest.raises(
        UserError, match=r"spells one label 2 ways: 'Cat' \(line 2\), 'cat' \(lines 4, 5\)"
    ):
        dataset.scan(f)


def test_windows_separators_and_a_label_with_no_image(tmp_path, spec, quiet):
    """`sub\\a.png` is found; a label whose files are all missing stays a class (said), and
    predict gives it probability 0 in its own column."""
    log, lines = quiet
    for c in range(2):
        for i in range(6):
            write_image(tmp_path / f"imgs/c{c}/{i}.png", c, seed=30 * c + i)
    rows = [[f"imgs\\c{c}\\{i}.png", f"k{c}", ""] for c in range(2) for i in range(6)]
    rows.append(["imgs/fox.png", "fox", ""])
    labels = write_csv(tmp_path / "labels.csv", rows)
    s = extract(labels, tmp_path / "art", spec, log=log)
    idx = store.read_index(s.cache)
    assert idx.classes == ["fox", "k0", "k1"] and len(idx.paths) == 12
    assert idx.paths[0].startswith("imgs/c0/")
    assert any(
        "label 'fox' has no existing training image (labels.csv line 14)" in x for x in lines
    )
    assert any("do not exist under" in x and str(tmp_path.resolve()) in x for x in lines)
    train_head(tmp_path / "art", "logreg", folds=2, log=log)
    from pipeline.prediction import classify

    got, out = classify(tmp_path / "art", tmp_path / "imgs/c1", out=tmp_path / "p.csv", log=log)
    header = next(csv.reader(open(out)))
    assert header[3:] == [
        "p_fox",
        "p_k0",
        "p_k1",
        "backbone_ran",
        "distance_to_training",
        "unlike_training",
    ]
    for r in got:
        assert r["probabilities"]["fox"] == 0.0
        assert sum(r["probabilities"].values()) == pytest.approx(1.0)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)


def test_an_edited_csv_is_said_until_features_runs_again(tmp_path, spec, quiet):
    log, lines = quiet
    data = make_dataset(tmp_path / "d", per_class=4, n_classes=2)
    rows = rows_of(data)
    labels = write_csv(data / "labels.csv", rows)
    extract(data, tmp_path / "art", spec, log=log)  # the folders first, then the CSV of them
    s = extract(labels, tmp_path / "art", spec, log=log)
    assert s.rewrote and store.read_index(s.cache).attrs["layout"] == "csv"
    r1 = train_head(tmp_path / "art", "logreg", folds=2, log=log)
    assert not any("changed since" in x for x in lines)
    rows[0][1] = "class_1"  # relabel one image
    write_csv(labels, rows)
    lines.clear()
    train_head(tmp_path / "art", "logreg", folds=2, seed=1, log=log)
    assert any("labels.csv' changed since `make features` read it" in x for x in lines)
    rep = build_report(tmp_path / "art", log=log)
    assert "changed since" in rep["header"]["labels_changed"]
    s = extract(labels, tmp_path / "art", spec, log=log)
    assert s.rewrote and s.new == 0  # same images: nothing embedded, labels updated
    rep = build_report(tmp_path / "art", log=log)
    assert rep["header"].get("labels_changed") is None
    assert r1["run"] in {x["run"] for x in rep["stale"]}  # trained on the old labels


def test_paths_that_exist_nowhere_are_one_clear_error(tmp_path):
    f = tmp_path / "meta/labels.csv"
    f.parent.mkdir()
    f.write_text("path,label\nimgs/a.png,x\nimgs/b.png,y\n")
    with pytest.raises(UserError, match=r"only 0 of the 2 labels .* exists under .*meta'; paths"):
        dataset.scan(f)


def test_labels_changed_reads_the_csv_only_when_touched(tmp_path, monkeypatch):
    """Untouched: not read again; touched but saying the same: not changed; edited: said."""
    for i in range(2):
        write_image(tmp_path / f"{i}.png", i, i)
    f = tmp_path / "labels.csv"
    f.write_text("path,label\n0.png,a\n1.png,b\n")
    attrs = dataset.source_attrs(dataset.scan(f))
    reads = []
    real = dataset._read_csv
    monkeypatch.setattr(dataset, "_read_csv", lambda p: reads.append(p) or real(p))
    assert dataset.source_changed(attrs) == "" and reads == []
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    f.write_text("path,label\n1.png,b\n0.png,a\n")  # the same rows, reordered
    assert dataset.source_changed(attrs) == "" and len(reads) == 1
    f.write_text("path,label\n0.png,b\n1.png,b\n")
    assert "changed since `make features` read it" in dataset.source_changed(attrs)
