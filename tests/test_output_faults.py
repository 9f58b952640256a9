"""Outputs owned by one command at a time, and a full disk in one line (issue 25).

Two predicts to one OUT: the second stops at once, the first's CSV holds its own rows once each;
two reports likewise. A full disk, a quota or the file-size limit while writing predict's CSV,
a run or the report: one line (exit 1 from the command line), the old output whole, and the
same command completing once there is room.
"""

from __future__ import annotations

import csv
import errno
import os
import pathlib
import resource
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import SIZE, make_dataset

from pipeline import cli, exporting, heads, journal, prediction, reporting, runs
from pipeline.backbone import BackboneSpec
from pipeline.errors import UserError
from pipeline.exporting import export
from pipeline.features import extract
from pipeline.prediction import classify
from pipeline.reporting import build_report
from pipeline.train import train_head

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"C": "1"}  # fixed: no grid search


def _quiet(line: str) -> None:
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    data = make_dataset(tmp / "data", per_class=5, validation=2)
    art = tmp / "art"
    extract(data, art, BackboneSpec("none", input_size=SIZE, seed=0), log=_quiet)
    train_head(art, "logreg", folds=2, params=PARAMS, log=_quiet, n_jobs=1)
    return data, art


def _paths(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _paused(monkeypatch, owner, name: str) -> tuple[threading.Event, threading.Event]:
    """The first call of `owner.name`, in whichever thread, sets `inside` and waits for `go`."""
    inside, go = threading.Event(), threading.Event()
    real, calls, lock = getattr(owner, name), [], threading.Lock()

    def hooked(*a, **k):
        with lock:
            first = not calls
            calls.append(1)
        if first:
            inside.set()
            assert go.wait(120)
        return real(*a, **k)

    monkeypatch.setattr(owner, name, hooked)
    return inside, go


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, box


def test_a_second_predict_to_the_same_out_stops_at_once(trained, tmp_path, monkeypatch):
    """Old code: the second predict deleted the first's partial file ('starting over') and
    wrote its own rows; the first then renamed them as its own, or died."""
    data, art = trained
    out = tmp_path / "p.csv"
    # the first predict stops inside its run (after it took OUT, wrote its partial file)
    inside, go = _paused(monkeypatch, prediction, "_classified")
    first, box = _in_thread(lambda: classify(art, data / "validation", out=out, log=_quiet))
    try:
        assert inside.wait(120)
        partial = out.with_name("p.csv.partial")
        assert partial.exists()
        held = partial.read_bytes()
        for images in (data / "train", data / "validation"):  # other images, the same images
            with pytest.raises(UserError, match=r"another make predict \(pid \d+.*OUT=") as e:
                classify(art, images, out=out, log=_quiet)
            assert str(out) in str(e.value) and "\n" not in str(e.value)
        assert partial.read_bytes() == held  # never written into, never deleted
        other = tmp_path / "other.csv"  # another OUT in the same ARTIFACTS: not blocked
        classify(art, data / "train", out=other, log=_quiet)
        assert sorted(r["path"] for r in _rows(other)) == _paths(data / "train")
    finally:
        go.set()
        first.join(120)
    assert "error" not in box, box.get("error")
    assert sorted(r["path"] for r in _rows(out)) == _paths(data / "validation")  # once each
    assert not out.with_name("p.csv.partial").exists()


def test_a_second_report_stops_at_once(trained, monkeypatch):
    """Old code: two reports wrote the same folder at once, each file from either of them."""
    _, art = trained
    inside, go = _paused(monkeypatch, reporting, "_markdown")
    first, box = _in_thread(lambda: build_report(art, log=_quiet))
    try:
        assert inside.wait(120)
        with pytest.raises(UserError, match=r"report' is being written by another make report"):
            build_report(art, log=_quiet)
    finally:
        go.set()
        first.join(120)
    assert "error" not in box, box.get("error")
    assert {"report.json", "report.md", "report.html"} <= set(_files(art / "report"))


def test_a_second_export_to_the_same_out_stops_at_once(trained, tmp_path, monkeypatch):
    """Two exports to one OUT: the second stops in one line naming the first and OUT=, and
    the first writes its file whole (without `outputs.owned` both wrote and renamed it)."""
    _, art = trained
    out = tmp_path / "x.npz"
    inside, go = _paused(monkeypatch, exporting, "_export")  # the first holds OUT, paused
    first, box = _in_thread(lambda: export(art, out=out, log=_quiet))
    try:
        assert inside.wait(120)
        with pytest.raises(UserError, match=r"another make export \(pid \d+.*OUT=") as e:
            export(art, out=out, log=_quiet)
        assert str(out) in str(e.value) and "\n" not in str(e.value)
        assert not out.exists()  # the second wrote nothing
        other = export(art, out=tmp_path / "other.npz", log=_quiet)  # another OUT: not blocked
    finally:
        go.set()
        first.join(120)
    assert "error" not in box, box.get("error")
    with np.load(out) as a, np.load(other) as b:
        assert a["X"].shape[0] == len(a["paths"]) > 0 and (a["X"] == b["X"]).all()


class _Full:
    """A file that takes `room` more characters, then fails as a full disk does."""

    def __init__(self, fh, code: int, room: int = 150) -> None:
        self.fh, self.code, self.room = fh, code, room

    def write(self, s):
        if len(s) > self.room:
            self.fh.write(s[: self.room])  # a torn row, as a full disk leaves it
            self.fh.flush()
            self.room = 0
            raise OSError(self.code, os.strerror(self.code))
        self.room -= len(s)
        return self.fh.write(s)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT])
def test_full_disk_while_predicting_is_one_line(trained, tmp_path, monkeypatch, capsys, code):
    data, art = trained
    out = tmp_path / "p.csv"
    classify(art, data / "validation", out=out, log=_quiet)  # the old predictions
    before = out.read_bytes()
    real_open = open

    def full_open(path, mode="r", *a, **k):
        fh = real_open(path, mode, *a, **k)
        return _Full(fh, code) if str(path).endswith(".partial") and "a" in mode else fh

    monkeypatch.setattr(journal, "open", full_open, raising=False)
    argv = ["predict", "--images", str(data / "train"), "--artifacts", str(art)]
    argv += ["--out", str(out), "--topk", "2"]
    capsys.readouterr()
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "file system" in err
    assert "p.csv.partial" in err and "Traceback" not in err
    assert out.read_bytes() == before
    monkeypatch.undo()  # room again: the same command completes (resuming)
    assert cli.main(argv) == 0
    assert sorted(r["path"] for r in _rows(out)) == _paths(data / "train")
    assert not out.with_name("p.csv.partial").exists()


def test_file_size_limit_in_a_real_predict(trained, tmp_path):
    """`ulimit -f` (RLIMIT_FSIZE): the kernel's SIGXFSZ is ignored and the write fails with
    EFBIG: one line, exit 1, the old CSV whole; without the limit the same command completes."""
    data, art = trained
    out = tmp_path / "p.csv"
    classify(art, data / "validation", out=out, log=_quiet)
    before = out.read_bytes()
    argv = ["predict", "--images", str(data), "--artifacts", str(art), "--out", str(out)]
    argv += ["--topk", "2"]
    limit = 1024  # the sidecar fits, the CSV of 21 rows does not

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    p = subprocess.run(
        [sys.executable, "-m", "pipeline", *argv],
        cwd=ROOT,
        env=env,
        preexec_fn=limited,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr
    said = [x for x in p.stderr.splitlines() if x.startswith("error: ")]
    assert len(said) == 1 and "file too large" in said[0] and "file system" in said[0]
    assert out.read_bytes() == before
    assert cli.main(argv) == 0
    assert sorted(r["path"] for r in _rows(out)) == _paths(data)


def test_full_disk_while_reporting_keeps_the_old_report(trained, monkeypatch):
    """report.json written, report.md cannot be: the old report stays, all of it."""
    _, art = trained
    build_report(art, log=_quiet)
    folder = art / "report"
    before = _files(folder)
    real = pathlib.Path.open

    def full(self, mode="r", *a, **k):
        fh = real(self, mode, *a, **k)
        return _Full(fh, errno.ENOSPC, 10) if ".report.md.tmp" in self.name else fh

    monkeypatch.setattr(pathlib.Path, "open", full)
    with pytest.raises(UserError, match=r"disk full while writing .*report\.md.*file system"):
        build_report(art, log=_quiet)
    monkeypatch.undo()
    assert _files(folder) == before  # no new file, no temporary one
    build_report(art, log=_quiet)


def test_full_disk_while_saving_a_run_keeps_the_old_run(trained, monkeypatch):
    _, art = trained
    folder = art / "heads" / runs.pick(art)["run"]
    before = _files(folder)

    def full(est, d):
        (d / "head.joblib").write_bytes(b"half a head")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(heads, "save_head", full)
    with pytest.raises(UserError, match=r"disk full while writing .*file system.*is intact"):
        train_head(art, "logreg", folds=2, params=PARAMS, log=_quiet, n_jobs=1)
    assert _files(folder) == before
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp")]


def test_full_disk_in_a_head_file_says_the_run_as_it_was_is_intact(trained, monkeypatch):
    # the head's files go through `outputs.written` inside the run's temporary folder: its
    # line says the run (not "nothing") is intact, and no temporary file or folder stays
    _, art = trained
    folder = art / "heads" / runs.pick(art)["run"]
    before = _files(folder)

    def full(est, path):
        pathlib.Path(path).write_bytes(b"half a head")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(heads.joblib, "dump", full)
    said = r"disk full while writing .*head\.joblib.*as it was is intact"
    with pytest.raises(UserError, match=said):
        train_head(art, "logreg", folds=2, params=PARAMS, log=_quiet, n_jobs=1)
    monkeypatch.undo()
    assert _files(folder) == before
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp")]


def test_taking_an_output_with_no_room_for_its_lock_note_is_no_error(tmp_path):
    """Under a file-size limit of 0 the note of who holds an output cannot be written: the
    command still takes its output (the note is best effort), and no error surfaces at close."""
    code = (
        "import resource, sys; from pathlib import Path; from pipeline import outputs\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))\n"
        f"with outputs.owned(Path({str(tmp_path / 'out.csv')!r}), 'make predict'):\n"
        "    print('held', flush=True)\n"
        "print('released')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["held", "released"] and "Traceback" not in r.stderr


def test_an_out_that_is_a_folder_is_one_line_before_any_work(trained, tmp_path):
    """OUT naming a folder: one line naming a file instead, before a single image is read
    (it used to end, after all the work, in IsADirectoryError's traceback)."""
    data, art = trained
    folder = tmp_path / "results"
    folder.mkdir()
    with pytest.raises(UserError, match=r"OUT='.*results' is a folder; name a file, e\.g\."):
        classify(art, data / "validation", out=folder, log=_quiet)
    with pytest.raises(UserError, match=r"is a folder; name a file, e\.g\. OUT=.*features\.npz"):
        export(art, out=folder, log=_quiet)
    assert list(folder.iterdir()) == []


def test_an_empty_images_is_one_line_and_a_tilde_is_home(capsys):
    """`make predict` without IMAGES passes --images '': one line naming IMAGES, exit 2 (an
    empty path is the current folder, which it used to classify whole); `~` in a path setting
    is the home folder (the Makefile's quotes keep the shell from expanding it)."""
    assert cli.main(["predict", "--images", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: IMAGES is empty")
    args = cli.parser().parse_args(["features", "--data", "~/photos", "--artifacts", "~/a"])
    assert args.data == Path.home() / "photos" and args.artifacts == Path.home() / "a"
