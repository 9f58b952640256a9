"""`make predict` at scale: rows streamed to a partial file, a killed run resumed, lists of paths
as IMAGES, and no readable image as one line with exit status 2."""

from __future__ import annotations

import csv
import gc
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
from conftest import make_dataset, write_image

from pipeline import batches, cli, prediction
from pipeline.features import extract
from pipeline.prediction import classify
from pipeline.train import train_head

ROOT = Path(__file__).resolve().parent.parent
N_NEW = 7  # with batch 2: four batches, the last one short


@pytest.fixture
def trained(tmp_path, spec, quiet):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=6)
    art = tmp_path / "art"
    extract(data, art, spec, log=log)
    train_head(art, "logreg", folds=3, log=log)
    new = tmp_path / "new"
    for i in range(N_NEW):
        write_image(new / f"n{i}.png", i % 3, seed=700 + i)
    return art, new


def _batches_then(monkeypatch, at_each):
    """Wrap the embedding stage's reader: `at_each(k)` runs as batch k is handed over."""
    real = batches.decoded_batches

    def wrapped(*a, **k):
        for i, b in enumerate(real(*a, **k)):
            at_each(i)
            yield b

    monkeypatch.setattr(batches, "decoded_batches", wrapped)


class Killed(Exception):
    pass


def _forget_predicted(art: Path) -> None:
    """Drop the features kept by earlier predicts, so that what is decoded is what is predicted."""
    shutil.rmtree(art / "features" / "predicted")


def _without_backbone_ran(text: str) -> list[list[str]]:
    """The CSV without `backbone_ran` (the one column that says where features came from)."""
    rows = list(csv.reader(text.splitlines()))
    at = rows[0].index("backbone_ran")
    return [row[:at] + row[at + 1 :] for row in rows]


def test_a_killed_predict_resumes_and_equals_an_uninterrupted_one(
    trained, tmp_path, monkeypatch, decoded, quiet
):
    art, new = trained
    log, lines = quiet
    whole = classify(art, new, out=tmp_path / "whole.csv", batch_size=2, log=log)[0]
    assert len(decoded) == N_NEW
    _forget_predicted(art)

    def kill_at_third(k):
        if k == 2:
            raise Killed

    out = tmp_path / "p.csv"
    partial, side = tmp_path / "p.csv.partial", tmp_path / "p.csv.partial.jsonl"
    with monkeypatch.context() as m:
        _batches_then(m, kill_at_third)
        with pytest.raises(Killed):
            classify(art, new, out=out, batch_size=2, log=log)
    assert not out.exists() and side.exists()
    assert len(partial.read_text().splitlines()) == 1 + 4  # header + two batches, flushed

    decoded.clear()
    rows = classify(art, new, out=out, batch_size=2, log=log)[0]
    assert decoded == [f"n{i}.png" for i in range(4, N_NEW)]  # only what was left
    assert out.read_bytes() == (tmp_path / "whole.csv").read_bytes()
    assert not partial.exists() and not side.exists()
    assert any("resuming" in s and "4 images already predicted" in s for s in lines)
    assert [r["path"] for r in rows] == [r["path"] for r in whole]
    for got, want in zip(rows, whole, strict=True):
        assert got["label"] == want["label"]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)

    # killed again, then rerun with another TOPK: it starts over, said in one line
    with monkeypatch.context() as m:
        _batches_then(m, kill_at_third)
        with pytest.raises(Killed):
            classify(art, new, out=out, batch_size=2, log=log)
    decoded.clear()
    lines.clear()
    _forget_predicted(art)
    classify(art, new, out=out, batch_size=2, topk=2, log=log)
    assert len(decoded) == N_NEW
    assert sum("starting over" in s for s in lines) == 1
    assert out.read_text().splitlines()[0].startswith("path,label,probability,label_2,")


def test_a_list_of_paths_or_a_csv_as_images_gives_the_folders_rows(trained, tmp_path, quiet):
    art, new = trained
    log, _ = quiet
    classify(art, new, out=tmp_path / "folder.csv", log=log)
    names = [f"n{i}.png" for i in range(N_NEW)]
    (new / "list.txt").write_text(
        "# new images\n\n" + "\n".join(names[:3]) + "\n  \n" + "\n".join(names[3:]) + "\n"
    )
    (new / "list.csv").write_text(
        "note,path\n" + "".join(f"x{i},{n}\n" for i, n in enumerate(names))
    )
    folder = (tmp_path / "folder.csv").read_text()
    for lst in ("list.txt", "list.csv"):
        rows, out = classify(art, new / lst, out=tmp_path / f"{lst}.csv", log=log)
        # the same rows, but from the features the folder's predict kept: no backbone ran
        assert _without_backbone_ran(out.read_text()) == _without_backbone_ran(folder), lst
        assert [r["path"] for r in rows] == names and not any(r["error"] for r in rows)
        assert not any(r["backbone_ran"] for r in rows)


def test_no_readable_image_exits_2_with_one_line(trained, tmp_path):
    art, _ = trained
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_text("not an image")
    (junk / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "none.csv"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["predict", "--images", str(junk), "--artifacts", str(art), "--out", str(out)]
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=env
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = [ln for ln in r.stderr.splitlines() if not ln.startswith("predicting ")]  # progress
    assert len(err) == 1 and err[0].startswith("error: none of the 2 images"), r.stderr
    assert "a.png: not an image" in err[0]
    assert not out.exists() and not any(tmp_path.glob("none.csv.partial*"))


def test_the_command_line_writes_rows_as_it_goes_and_keeps_none(
    trained, tmp_path, monkeypatch, capsys
):
    """At the last batch, the earlier batches' rows are on disk and no longer in memory."""
    art, new = trained
    out = tmp_path / "cli.csv"
    partial = tmp_path / "cli.csv.partial"
    alive: list[weakref.ref] = []
    at_batch: list[tuple[int, int]] = []  # (rows on disk, rows still alive) per batch
    real_row = prediction._row

    class Row(dict):  # a dict that a weak reference can follow
        pass

    def row(*a, **k):
        r = Row(real_row(*a, **k))
        alive.append(weakref.ref(r))
        return r

    def look(k):
        gc.collect()
        on_disk = len(partial.read_text().splitlines()) - 1 if partial.exists() else None
        at_batch.append((on_disk, sum(r() is not None for r in alive)))

    monkeypatch.setattr(prediction, "_row", row)
    _batches_then(monkeypatch, look)
    args = ["predict", "--images", str(new), "--artifacts", str(art), "--out", str(out)]
    assert cli.main([*args, "--batch", "2"]) == 0
    assert [d for d, _ in at_batch] == [0, 2, 4, 6]  # each batch written before the next
    assert at_batch[-1][1] <= 2  # at most the previous batch's rows are still referenced
    assert len(out.read_text().splitlines()) == 1 + N_NEW and not partial.exists()
    capsys.readouterr()
