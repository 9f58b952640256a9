"""Nothing half-written: outputs renamed into place whole, runs written by one writer at a time,
TTA's views drawn with the seed of the cache's views."""

from __future__ import annotations

import contextlib
import csv
import json
import threading

import numpy as np
import pytest
from conftest import SIZE, make_dataset

from pipeline import images, journal, layout, outputs, prediction, runs
from pipeline.backbone import BackboneSpec
from pipeline.features import extract
from pipeline.prediction import classify
from pipeline.train import train_head


def _quiet(line: str) -> None:
    pass


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or p.name.startswith(".old"))


def test_an_output_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "out" / "sweep.json"
    outputs.write_text(path, '{"old": 1}')
    with pytest.raises(RuntimeError), outputs.written(path) as tmp:
        tmp.write_text('{"half": ')
        assert path.read_text() == '{"old": 1}'  # readers still see the old file meanwhile
        raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"old": 1} and _leftovers(path.parent) == []
    outputs.write_text(path, '{"new": 2}')
    assert json.loads(path.read_text()) == {"new": 2} and _leftovers(path.parent) == []


def _synced_and_renamed(monkeypatch) -> list[tuple[str, str]]:
    """os.fsync and os.replace recorded in order: ("fsync", file) and ("replace", source)."""
    import os

    seen: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def synced(fd):
        seen.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return fsync(fd)

    def renamed(src, dst, **kw):
        seen.append(("replace", os.path.basename(src)))
        return replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", renamed)
    return seen


@pytest.mark.parametrize("together", [False, True])
def test_an_output_is_on_disk_before_it_takes_its_name(tmp_path, monkeypatch, together):
    # a rename before the fsync: a crash could leave an empty file under the output's name
    seen = _synced_and_renamed(monkeypatch)
    with outputs.together() if together else contextlib.nullcontext():
        outputs.write_text(tmp_path / "a.json", "{}")
        with outputs.written(tmp_path / "b.png") as tmp:
            tmp.write_bytes(b"png")
    renamed = [name for what, name in seen if what == "replace"]
    assert len(renamed) == 2 and all(n.startswith((".a.json.tmp-", ".b.png.tmp-")) for n in renamed)
    for name in renamed:
        assert ("fsync", name) in seen[: seen.index(("replace", name))], seen
    assert (tmp_path / "a.json").read_text() == "{}" and (tmp_path / "b.png").read_bytes() == b"png"


@pytest.mark.parametrize("together", [False, True])
def test_an_output_made_again_from_nothing_is_renamed_whole_without_fsync(
    tmp_path, monkeypatch, together
):
    """durable=False (the demo's thousands of images): still a temporary file renamed onto the
    name, never half a file, but no fsync; inside `together` too."""
    seen = _synced_and_renamed(monkeypatch)
    with outputs.together() if together else contextlib.nullcontext():
        with outputs.written(tmp_path / "d.png", durable=False) as tmp:
            tmp.write_bytes(b"png")
        assert (tmp_path / "d.png").exists() != together  # in a block: renamed at its end
    # the file is never synced (a `together` block syncs its folder once, for all its files)
    assert [n for w, n in seen if w == "fsync" and n.startswith(".d.png")] == []
    assert [n[:10] for w, n in seen if w == "replace"] == [".d.png.tmp"]
    assert (tmp_path / "d.png").read_bytes() == b"png" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("fails", ["fsync", "replace"])
def test_an_output_whose_sync_or_rename_fails_leaves_the_old_file(tmp_path, monkeypatch, fails):
    import errno
    import os

    path = tmp_path / "report.md"
    outputs.write_text(path, "old")

    def broken(*a, **k):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, fails, broken)
    with pytest.raises(OSError):
        outputs.write_text(path, "new, half")
    monkeypatch.undo()
    assert path.read_text() == "old" and _leftovers(tmp_path) == []


def test_a_temporary_name_keeps_the_suffix_asked_for(tmp_path):
    with outputs.written(tmp_path / "model.keras", suffix=".keras") as tmp:
        assert tmp.name.startswith(".model.keras.tmp-") and tmp.suffix == ".keras"
        tmp.write_bytes(b"zip")
    assert (tmp_path / "model.keras").read_bytes() == b"zip" and _leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outputs")
    data = make_dataset(tmp / "data", per_class=5, validation=2)
    art = tmp / "art"
    extract(data, art, BackboneSpec("none", input_size=SIZE, seed=0), log=_quiet)
    train_head(art, "logreg", folds=2, log=_quiet, n_jobs=1)
    return data, art


def test_predictions_csv_is_never_half_written(trained, tmp_path, monkeypatch):
    # old code: open(out, "w") truncated the previous CSV, then died after the first row
    data, art = trained
    out = tmp_path / "p.csv"
    classify(art, data / "validation", out=out, log=_quiet)
    before = out.read_text()
    assert len(list(csv.DictReader(before.splitlines()))) == 6
    real, n = journal.csv_row, []

    def dies_on_the_second_row(row):
        n.append(1)
        if len(n) == 2:
            raise KeyboardInterrupt
        return real(row)

    monkeypatch.setattr(journal, "csv_row", dies_on_the_second_row)
    with pytest.raises(KeyboardInterrupt):
        classify(art, data / "validation", out=out, topk=2, log=_quiet)
    assert out.read_text() == before and _leftovers(tmp_path) == []


def _together(monkeypatch, n: int) -> None:
    """Every `runs.write_run` waits, once its own temporary folder is made and before it
    writes a file there, until `n` writers are at that point: they overlap for sure (a
    barrier, not a sleep), then race for the renames that put the run in place."""
    here = threading.Barrier(n, timeout=120)
    real = runs.write_run

    def write_run(artifacts, name, result, save):
        def waiting(folder):
            here.wait()
            return save(folder)

        return real(artifacts, name, result, waiting)

    monkeypatch.setattr(runs, "write_run", write_run)


def _threads(fn, n: int) -> list[BaseException]:
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            fn(i)
        except BaseException as e:  # noqa: BLE001 - any failure fails the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_two_writers_of_one_run_never_fail(trained, monkeypatch):
    """Three threads (one process id: the old temporary folder was shared) write the same run,
    all three inside it at once; all finish and the run is whole."""
    _, art = trained
    r = runs.pick(art)
    hdir = layout.heads_dir(art)
    _together(monkeypatch, 3)

    def write(i: int) -> None:
        def save(folder):
            (folder / "head.joblib").write_bytes(b"head %d" % i)
            return [folder / "head.joblib"]

        runs.write_run(art, "same--run", {k: v for k, v in r.items() if k != "run"}, save)

    assert _threads(write, 3) == []
    done = json.loads((hdir / "same--run" / "result.json").read_text())
    assert (hdir / "same--run" / "head.joblib").read_bytes() in {b"head 0", b"head 1", b"head 2"}
    runs.verify(art, done)  # the files are the ones its result.json names, not a mix
    assert _leftovers(hdir) == []


def test_two_train_heads_of_one_run_at_once(trained, monkeypatch):
    """Two train-heads of one run, both writing it at once (a barrier in each one's write)."""
    _, art = trained
    results = []
    _together(monkeypatch, 2)
    errors = _threads(
        lambda i: results.append(train_head(art, "logreg", folds=2, log=_quiet, n_jobs=1)), 2
    )
    assert errors == [] and results[0]["run"] == results[1]["run"]
    runs.verify(art, runs.pick(art, results[0]["run"]))
    assert _leftovers(layout.heads_dir(art)) == []


def test_tta_views_are_drawn_with_the_seed_of_the_cache_views(tmp_path, monkeypatch):
    """A weights file: the cache's settings hold no seed (only random weights have one), so
    the old code drew TTA's views with seed 0, whatever SEED made the cached views."""
    import keras

    weights = tmp_path / "w.weights.h5"
    keras.applications.VGG16(
        weights=None, include_top=False, input_shape=(SIZE, SIZE, 3)
    ).save_weights(weights)
    data = make_dataset(tmp_path / "data", per_class=4, validation=1)
    art = tmp_path / "art"
    extract(data, art, BackboneSpec(str(weights), input_size=SIZE, seed=7), augment=1, log=_quiet)
    r = train_head(art, "logreg", folds=2, seed=7, views=1, log=_quiet, n_jobs=1)
    assert "seed" not in r["features"]["settings"]
    seeds: list[int] = []
    real = images.view_rng

    def spy(seed, sha, view):
        seeds.append(seed)
        return real(seed, sha, view)

    monkeypatch.setattr(images, "view_rng", spy)
    classify(art, data / "validation", run=r["run"], out=tmp_path / "p.csv", tta=2, log=_quiet)
    assert seeds and set(seeds) == {7}
    # and view 1 of a training image is the very one the cache holds (same seed, same draw)
    path = next((data / "train").rglob("*.png"))
    arr = images.load_image(path, SIZE)
    sha = images.content_sha256(path)
    a = images.augment(arr, real(7, sha, 1))
    b = images.augment(arr, real(prediction.tta_seed(r), sha, 1))
    np.testing.assert_array_equal(a, b)
