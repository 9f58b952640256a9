"""The store at scale: few files whatever the batches, a safe REBUILD, only content failures
remembered, views of every seed kept, a segment named as a cache (a kill at each step of the
segment log, both stores': `test_segment_log.py`)."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import SIZE, make_dataset, patch_loader

from pipeline import images, layout, store
from pipeline.backbone import BackboneSpec
from pipeline.errors import UserError
from pipeline.features import extract
from pipeline.store import damage, merging, writer
from pipeline.store.segments import Meta
from pipeline.store.writer import Row, Writer
from pipeline.train import train_head

STAMP = {"pillow": "test", "keras": "test"}
CLASSES = ["a", "b"]


def vec(ident: str, c: int = 8) -> np.ndarray:
    """A row's synthetic pooled vector, a function of its identity alone."""
    return np.random.default_rng(int(ident[:8], 16)).normal(size=c).astype(np.float32)


def rows(lo: int, hi: int) -> list[Row]:
    return [
        Row(f"img/{i}.png", f"{i:064x}", CLASSES[i % 2], "train", 0, (i, i, i))
        for i in range(lo, hi)
    ]


def stage(w: Writer, todo: list[Row], batch: int) -> None:
    for a in range(0, len(todo), batch):
        part = todo[a : a + batch]
        v = np.stack([vec(r.ident) for r in part])
        meta = Meta(
            [r.ident for r in part],
            [r.path for r in part],
            [r.label for r in part],
            [r.split for r in part],
            [r.view for r in part],
            [r.stat for r in part],
        )
        w.add_batch(meta, {"avg": v, "max": v + 1}, None, [])


def sync(
    path: Path, want: list[Row], batch: int = 1, classes: list[str] = CLASSES
) -> writer.Committed:
    """One `make features` run through the store's write path, on synthetic pooled vectors."""
    w = Writer(path, "k" * 64, STAMP, maps=False, dtype="float16", log=lambda s: None)
    stage(w, [r for r in want if not w.has(r.ident)], batch)
    attrs = {"cache_key": "k" * 64, "feature_shape": [1, 1, 8], "maps": False}
    return w.commit(want, classes, [], attrs, same_source=True)


def check(path: Path, want: list[Row]) -> None:
    """The cache holds exactly `want`, each row with its own vector."""
    idx = store.read_index(path)
    assert sorted(idx.paths) == sorted(r.path for r in want)
    X = store.read_column(path, "pooled/avg")
    for i, h in enumerate(idx.idents):
        np.testing.assert_array_equal(X[i], vec(h))
    labels = dict(zip(idx.paths, (CLASSES[v] for v in idx.labels), strict=True))
    assert labels == {r.path: r.label for r in want}


def test_the_index_holds_any_number_of_segments(tmp_path):
    """No metadata grows inside one HDF5 attribute or object header (the old limit: 4,096)."""
    from pipeline.store.manifest import Entry, read_entries, write_manifest

    entries = [
        Entry(f"g{i:016x}.h5", 32, "s" * 64, np.arange(i % 3, dtype=np.int64)) for i in range(6000)
    ]
    path = tmp_path / "c.h5"
    write_manifest(path, entries, CLASSES, [], {"cache_key": "k" * 64, "maps": False})
    with h5py.File(path) as f:
        back = read_entries(f)
        assert all(len(str(v)) < 4096 for v in f.attrs.values())
    assert [e.name for e in back] == [e.name for e in entries]
    assert all((a.dead == b.dead).all() for a, b in zip(back, entries, strict=True))


def test_thousands_of_batches_keep_few_files(tmp_path):
    path = tmp_path / "c.h5"
    want = rows(0, 700)
    sync(path, want, batch=1)  # 700 batches of one image
    check(path, want)
    files = list(store.shards_dir(path).glob("g*.h5"))
    assert len(files) <= (merging.FANOUT - 1) * 4  # at most 7 per tier, log8(700) tiers
    more = rows(700, 800)
    for k in range(10):  # ten incremental runs, each one batch
        sync(path, want + more[: (k + 1) * 10], batch=10)
    check(path, want + more)
    assert len(list(store.shards_dir(path).glob("g*.h5"))) <= (merging.FANOUT - 1) * 4


def test_removed_rows_are_reclaimed_by_merging(tmp_path, monkeypatch):
    path = tmp_path / "c.h5"
    want = rows(0, 512)
    sync(path, want, batch=64)
    before = sum(p.stat().st_size for p in store.shards_dir(path).glob("g*.h5"))
    keep = want[::4]  # three quarters removed: their segments are rewritten, not re-embedded
    sync(path, keep)
    check(path, keep)
    after = sum(p.stat().st_size for p in store.shards_dir(path).glob("g*.h5"))
    assert after < before / 2
    idx = store.read_index(path)
    assert sum(len(e.dead) for e in idx.entries) <= merging.DEAD_FRACTION * len(want)


def test_a_change_rewrites_what_changed_not_the_collection(tmp_path):
    path = tmp_path / "c.h5"
    want = rows(0, 3000)
    sync(path, want, batch=3000)
    folder = store.shards_dir(path)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    index_bytes = path.stat().st_size
    moved = [
        Row(
            "moved/0.png",
            *[getattr(want[0], k) for k in ("ident", "label", "split", "view", "stat")],
        )
    ]
    done = sync(path, moved + want[1:])
    assert done.copied == 1  # the moved file's row is copied under its new path, not embedded
    after = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert all(after[n] == t for n, t in before.items())  # the big segment is never rewritten
    assert path.stat().st_size < index_bytes + 4096  # the index grew by a row mark, not by rows
    check(path, moved + want[1:])
    unchanged = sync(path, moved + want[1:])
    assert not unchanged.rewrote


def test_an_interrupted_rebuild_keeps_the_old_cache_and_resumes(tmp_path, spec, quiet):
    log, lines = quiet
    data = make_dataset(tmp_path / "data", per_class=6, n_classes=2)
    art = tmp_path / "art"
    first = extract(data, art, spec, batch_size=2, log=log)
    before = store.read_column(first.cache, "features")
    old_segments = {e.name for e in store.read_index(first.cache).entries}
    folder = store.shards_dir(first.cache)
    from pipeline import backbone

    model = backbone.build(spec)

    class Interrupted(BaseException):
        pass

    class Dies:
        calls = 0

        def predict_on_batch(self, x):
            Dies.calls += 1
            if Dies.calls == 3:
                raise Interrupted()
            return model.predict_on_batch(x)

    with pytest.raises(Interrupted):
        extract(data, art, spec, batch_size=2, log=log, rebuild=True, model=Dies())
    # the old cache is whole and readable all along; heads train on it
    np.testing.assert_array_equal(store.read_column(first.cache, "features"), before)
    assert {e.name for e in store.read_index(first.cache).entries} == old_segments
    assert all((folder / n).is_file() for n in old_segments)
    assert train_head(art, "logreg", folds=2, log=log)["cv"]["folds"] == 2
    # the rerun (REBUILD=1 or not) finishes the rebuild from where it stopped
    again = extract(data, art, spec, batch_size=2, log=log, model=model)
    assert any("resuming an interrupted REBUILD=1" in x for x in lines)
    assert (again.resumed, again.new) == (4, 8)
    assert not writer.rebuild_marker(again.cache).exists()
    now = {e.name for e in store.read_index(again.cache).entries}
    assert not now & old_segments  # every row was embedded again, into new segments
    assert not any((folder / n).exists() for n in old_segments)  # the old ones went after
    np.testing.assert_allclose(
        np.sort(store.read_column(again.cache, "features"), axis=0), np.sort(before, axis=0)
    )
    assert extract(data, art, spec, batch_size=2, log=log).new == 0


def test_io_errors_are_retried_and_corrupt_images_remembered(tmp_path, spec, quiet, monkeypatch):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=3, n_classes=2)
    (data / "train/class_0/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    flaky = data / "train/class_1/flaky.png"
    shutil.copy(data / "train/class_1/img_000.png", flaky)
    os.utime(flaky, ns=(1, 1))
    with open(flaky, "ab") as fh:  # other bytes than img_000: its own content hash
        fh.write(b"more")
    real = images.load_image
    decoded: list[str] = []

    def io_error(path, size):
        decoded.append(Path(path).name)
        if Path(path).name == "flaky.png":
            raise images.ImageError("cannot read file (Input/output error)")
        return real(path, size)

    patch_loader(monkeypatch, io_error)
    s = extract(data, tmp_path / "art", spec, log=log)
    reasons = {x["path"]: x["reason"] for x in s.skipped_rows}
    assert set(reasons) == {"train/class_0/corrupt.png", "train/class_1/flaky.png"}
    decoded.clear()
    patch_loader(monkeypatch, lambda p, n: (decoded.append(Path(p).name), real(p, n))[1])
    again = extract(data, tmp_path / "art", spec, log=log)
    # the I/O failure is tried again and embedded; the corrupt bytes are not decoded again
    assert again.new == 1 and decoded == ["flaky.png"]
    assert [x["path"] for x in again.skipped_rows] == ["train/class_0/corrupt.png"]
    decoded.clear()
    verified = extract(data, tmp_path / "art", spec, log=log, verify=True)
    assert "corrupt.png" in decoded and verified.skipped == 1  # VERIFY tries it again


def test_views_of_every_seed_are_kept(tmp_path, quiet):
    import keras

    log, lines = quiet
    model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    w = tmp_path / "w.weights.h5"
    model.save_weights(w)
    data = make_dataset(tmp_path / "data", per_class=6, n_classes=2)
    art = tmp_path / "art"
    made = []
    for seed in (0, 1, 0):
        spec = BackboneSpec(str(w), input_size=SIZE, seed=seed)
        made.append(extract(data, art, spec, augment=2, log=log))
    assert made[0].cache == made[1].cache  # the seed does not change real weights' features
    assert [m.augmented.new for m in made] == [24, 24, 0]
    assert layout.augment_path(made[0].cache, 0).is_file()
    assert layout.augment_path(made[0].cache, 1).is_file()
    assert not list((art / "features").glob("*damaged*"))
    assert train_head(art, "logreg", folds=2, views=2, seed=1, log=log)["cv"]["folds"] == 2


def test_a_segment_given_as_the_cache_names_its_cache(tmp_path, spec, quiet):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=3, n_classes=2)
    s = extract(data, tmp_path / "art", spec, log=log)
    seg = next(store.shards_dir(s.cache).glob("g*.h5"))
    with pytest.raises(
        UserError, match=rf"one segment of the feature cache '{s.cache.name}'.*pass"
    ):
        store.load_features(seg, "avg", "train")


def test_a_low_open_file_limit_trains_the_same_numbers(tmp_path, spec, quiet, monkeypatch):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=40, n_classes=2)
    one, many = tmp_path / "one", tmp_path / "many"
    extract(data, one, spec, batch_size=80, log=log)
    monkeypatch.setattr(merging, "FANOUT", 10**6)  # no merging: one segment per batch
    s = extract(data, many, spec, batch_size=1, log=log)  # 80 batches, 80 segments
    monkeypatch.undo()
    assert len(store.read_index(s.cache).entries) == 80
    ref = train_head(one, "logreg", folds=3, log=log)
    code = (  # 48 open files: fewer than the 80 segments, if they were all held open
        "import json, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48));"
        "from pipeline.train import train_head;"
        f"r = train_head({str(many)!r}, 'logreg', folds=3, log=lambda s: None);"
        "print(json.dumps(r['cv']['fold_accuracies']))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == str(ref["cv"]["fold_accuracies"]).replace("'", '"')
    # and the next run merges them: few files, the same rows
    merged = extract(data, many, spec, batch_size=1, log=log)
    assert merged.new == 0 and len(list(store.shards_dir(s.cache).glob("g*.h5"))) <= 8


def test_the_open_file_limit_is_named_with_its_fix(tmp_path, spec, quiet):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=3, n_classes=2)
    s = extract(data, tmp_path / "art", spec, log=log)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        os.close(held.pop())  # one left: the index opens, its segment cannot
        with pytest.raises(UserError, match=r"too many open files.*may open 256.*ulimit -n \d+"):
            store.load_features(s.cache, "avg", "train")
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_failed_batches_never_drop_the_maps_of_merged_rows(tmp_path):
    from pipeline.store.segments import Failure

    w = Writer(tmp_path / "c.h5", "k" * 64, STAMP, maps=True, dtype="float16", log=lambda s: None)
    shape, want = (2, 2, 4), []
    for i in range(23):  # eight good batches, eight that fail whole, seven good: merges mix them
        if 8 <= i < 16:
            e = np.zeros((0, 4), np.float32)
            fail = [Failure(f"{1000 + i:064x}", "corrupt", True)]
            w.add_batch(Meta(), {"avg": e, "max": e}, np.zeros((0,) + shape, np.float16), fail)
            continue
        r = Row(f"a/{i}.png", f"{i:064x}", "a", "train", 0, (i, i, i))
        want.append(r)
        m = np.full((1,) + shape, i, np.float16)
        p = m.astype(np.float32).mean(axis=(1, 2))
        meta = Meta([r.ident], [r.path], ["a"], ["train"], [0], [r.stat])
        w.add_batch(meta, {"avg": p, "max": p}, m, [])
    attrs = {"cache_key": "k" * 64, "feature_shape": list(shape), "maps": True}
    w.commit(want, ["a"], [], attrs, True)
    idx = store.read_index(tmp_path / "c.h5")
    maps = store.read_column(tmp_path / "c.h5", "features")
    assert maps.shape == (15,) + shape
    assert [int(m[0, 0, 0]) for m in maps] == [int(p.split("/")[1][:-4]) for p in idx.paths]


def test_a_passing_read_error_changes_nothing(tmp_path, spec, quiet, monkeypatch):
    import errno

    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=3, n_classes=2)
    s = extract(data, tmp_path / "art", spec, log=log)
    before = s.cache.read_bytes()
    seg = store.shards_dir(s.cache) / store.read_index(s.cache).entries[0].name
    real = h5py.File

    def eio(path, *a, **k):
        if Path(path) == seg:
            raise OSError(errno.EIO, "Input/output error")
        return real(path, *a, **k)

    monkeypatch.setattr(h5py, "File", eio)
    with pytest.raises(UserError, match=r"cannot be read .*nothing was changed.*rerun"):
        extract(data, tmp_path / "art", spec, log=log)
    monkeypatch.undo()
    assert s.cache.read_bytes() == before and seg.is_file()
    assert not list(s.cache.parent.glob("*damaged*"))
    assert extract(data, tmp_path / "art", spec, log=log).new == 0


def test_a_damaged_segment_is_repaired_by_features_or_a_rebuild(tmp_path, spec, quiet):
    """The message names a command that repairs it: `make features` embeds that segment's rows
    again (only those), setting the file aside; a REBUILD does too."""
    log, lines = quiet
    data = make_dataset(tmp_path / "data", per_class=3, n_classes=2)
    art = tmp_path / "art"
    s = extract(data, art, spec, log=log)
    for rebuild in (False, True):
        seg = store.shards_dir(s.cache) / store.read_index(s.cache).entries[0].name
        seg.write_bytes(b"not hdf5" * 64)
        fix = r"damaged \(not an HDF5 file.*\); run `make features`: it sets the file aside"
        with pytest.raises(UserError, match=fix):
            store.load_features(s.cache, "avg", "train")
        again = extract(data, art, spec, log=log, rebuild=rebuild)
        assert again.new == 6 and (seg.parent / "damaged" / seg.name).is_file()
        assert any(seg.name in x and "set aside" in x for x in lines)
        assert len(store.load_features(s.cache, "avg", "train").paths) == 6


def test_a_rebuild_killed_after_its_index_embeds_nothing_again(tmp_path, spec, quiet):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=3, n_classes=2)
    art = tmp_path / "art"
    extract(data, art, spec, log=log)
    s = extract(data, art, spec, log=log, rebuild=True)
    # killed between the new index and removing the marker: the marker names that rebuild
    rid = store.read_attrs(s.cache)["rebuild_id"]
    writer.rebuild_marker(s.cache).write_text(rid + "\n")
    again = extract(data, art, spec, log=log)
    assert again.new == 0 and not writer.rebuild_marker(s.cache).exists()


def test_touched_files_rewrite_no_segment_and_are_not_hashed_again(
    tmp_path, spec, quiet, monkeypatch
):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=4, n_classes=2)
    s = extract(data, tmp_path / "art", spec, log=log)
    folder = store.shards_dir(s.cache)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    for p in data.rglob("*.png"):  # `touch` (or a copy to another disk): new stat, same bytes
        os.utime(p, ns=(10**18, 10**18))
    again = extract(data, tmp_path / "art", spec, log=log)
    assert again.new == 0 and again.rewrote
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    hashed: list[str] = []
    real = images.content_sha256
    monkeypatch.setattr(images, "content_sha256", lambda p: (hashed.append(p), real(p))[1])
    third = extract(data, tmp_path / "art", spec, log=log)
    assert hashed == [] and not third.rewrote  # the new stats were recorded


def test_a_change_hashes_only_the_changed_rows_for_the_content_id(
    tmp_path, spec, quiet, monkeypatch
):
    from conftest import write_image

    from pipeline.store import format as fmt

    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=6, n_classes=2)
    s = extract(data, tmp_path / "art", spec, log=log)
    seen: list[str] = []
    real = fmt.row_term
    monkeypatch.setattr(fmt, "row_term", lambda *r: (seen.append(r[0]), real(*r))[1])
    write_image(data / "train/class_0/new.png", 0, 999)
    extract(data, tmp_path / "art", spec, log=log)
    assert [Path(p).name for p in seen] == ["new.png"]  # the one added row, not all 13
    assert store.read_attrs(s.cache)["data_id"] == full_id(s.cache)


def full_id(path: Path) -> str:
    """The cache's data_id computed from every row it holds (what a rebuild would say)."""
    idx = store.read_index(path)
    return store.data_id(idx.paths, idx.sha256, idx.labels.tolist(), idx.split, idx.classes)


def test_a_cache_grown_in_steps_has_the_data_id_of_one_written_at_once(tmp_path):
    """Rows added, removed, relabelled, re-split, moved, rewritten, a class added (merges in
    between): each step's data_id is its rows' id in full, differs from the step before, and
    the last is that of a cache written in one go with the same rows."""
    path = tmp_path / "grown.h5"
    ids, merges = [], 0

    def step(want: list[Row], classes: list[str] = CLASSES) -> None:
        nonlocal merges
        merges += sync(path, want, classes=classes).merges
        ids.append(store.read_attrs(path)["data_id"])
        assert ids[-1] == full_id(path)

    want = rows(0, 12)
    step(want)
    for k in range(12, 20):  # one row a run: small segments that merge
        want = want + rows(k, k + 1)
        step(want)
    want = want[6:]  # removed
    step(want)
    want[0] = replace(want[0], label="a" if want[0].label == "b" else "b")
    step(want)
    want[1] = replace(want[1], split="validation")
    step(want)
    want[2] = replace(want[2], path="moved/" + want[2].path)  # same content
    step(want)
    want[3] = replace(want[3], ident=f"{999:064x}")  # same path, new content
    step(want)
    more = [*CLASSES, "c"]
    want = [*want, Row("img/c.png", f"{1000:064x}", "c", "train", 0, (1, 1, 1))]
    step(want, more)
    assert merges and len(set(ids)) == len(ids)
    once = tmp_path / "once.h5"
    sync(once, want, batch=len(want), classes=more)
    assert store.read_attrs(once)["data_id"] == ids[-1]


def test_a_change_hashes_its_rows_only_and_an_older_cache_is_summed_once(tmp_path, monkeypatch):
    from pipeline.store import format as fmt

    path = tmp_path / "c.h5"
    want = rows(0, 20)
    sync(path, want)
    with h5py.File(path, "a") as f:  # an index written before the rows' sum was kept
        del f.attrs[fmt.DATA_SUM]
        f.attrs["data_id"] = "the id of an older version"
    hashed: list[str] = []
    real = fmt.row_term
    monkeypatch.setattr(fmt, "row_term", lambda *r: (hashed.append(r[0]), real(*r))[1])

    def run(new: list[Row]) -> int:
        hashed.clear()
        sync(path, new)
        n = len(hashed)
        assert store.read_attrs(path)["data_id"] == full_id(path)
        return n

    assert run(want) == 20  # nothing changed, but an older index: summed once, id made anew
    assert run(want + rows(20, 21)) == 1  # then the added row alone
    assert run(want + rows(20, 22)) == 1
    want = want + rows(20, 22)
    want[5] = replace(want[5], label="a" if want[5].label == "b" else "b")
    assert run(want) == 2  # a relabelled row: its old term off, its new one on
    assert run(want[1:]) == 1
    assert run(want[1:]) == 0  # nothing changed: nothing written


def test_a_rebuilt_or_repaired_index_keeps_the_data_id(tmp_path):
    """A segment gone (its rows embedded again) or a damaged index (rebuilt from the segments)
    gives the id of the same rows, not one counting the lost rows twice."""
    path = tmp_path / "c.h5"
    want = rows(0, 35)
    for k in range(0, 35, 5):  # one segment a run: seven, fewer than a merge takes
        sync(path, want[: k + 5], batch=5)
    before = store.read_attrs(path)["data_id"]
    idx = store.read_index(path)
    assert len(idx.entries) > 1
    (store.shards_dir(path) / idx.entries[-1].name).unlink()
    sync(path, want)
    check(path, want)
    assert store.read_attrs(path)["data_id"] == before
    path.write_bytes(b"not an index")
    sync(path, want)
    assert store.read_attrs(path)["data_id"] == before


def test_a_one_row_change_holds_memory_in_proportion_to_the_change(tmp_path):
    """The old index is met segment by segment (`changes.compare`): what a one-row change
    holds per row of the collection is a few 64-bit keys (it was ~760 bytes of lists)."""
    import gc
    import tracemalloc

    from pipeline.bench import store as bench_store

    peak = {}
    for n in (2000, 8000):
        path = tmp_path / f"c{n}" / "c.h5"
        path.parent.mkdir()
        want = bench_store._rows(0, n)
        bench_store.sync(path, want, batch=997, channels=8)
        more = want + bench_store._rows(n, n + 1)
        gc.collect()
        tracemalloc.start()
        bench_store.sync(path, more, batch=997, channels=8)
        peak[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    per_row = (peak[8000] - peak[2000]) / 6000
    print(f"writer commit: {per_row:.1f} bytes a row at peak")
    assert per_row < 100, per_row  # the 64-bit keys and row numbers a merge needs, no texts


def test_a_new_identity_sharing_a_cached_ones_key_is_refused_never_given_its_features(
    tmp_path, monkeypatch
):
    """The writer knows the cached identities by 64-bit keys; two sharing one (forced here) make
    it believe a new image is cached: the commit finds no row of that identity and stops with
    one line, instead of copying another image's features."""
    from pipeline.store import changes

    path = tmp_path / "c.h5"
    want = rows(0, 4)
    sync(path, want)
    assert (
        changes.ident_key(want[0].ident)
        == changes.ident_keys(np.array([want[0].ident.encode()], "S80"))[0]
    )
    assert changes.ident_key(want[0].ident) != changes.ident_key(want[0].ident + "#1")
    monkeypatch.setattr(changes, "ident_key", lambda ident: 7)
    with pytest.raises(store.CacheError, match=r"share a 64-bit key.*REBUILD=1"):
        sync(path, want + rows(4, 5))
    check(path, want)  # nothing changed


@pytest.mark.parametrize("column", ["split", "stat", "path"])
def test_a_segment_with_a_damaged_column_is_set_aside_when_the_run_starts(tmp_path, column):
    """The writer reads only identities up front: a segment missing another column is still
    found before the commit, so that segment is set aside, its rows written again, and the run
    completes (not refused on every rerun; the index and the other segments stay)."""
    path = tmp_path / "c.h5"
    want = rows(0, 10)
    sync(path, want, batch=10)
    seg = store.shards_dir(path) / store.read_index(path).entries[0].name
    with h5py.File(seg, "a") as f:
        del f[column]
    sync(path, want, batch=10)
    check(path, want)
    assert (seg.parent / "damaged" / seg.name).is_file() and not seg.exists()
    assert not list(tmp_path.glob("c.h5.damaged-*"))
    assert not sync(path, want, batch=10).rewrote


def test_a_moved_file_is_copied_from_a_segment_whose_key_table_is_damaged(tmp_path):
    path = tmp_path / "c.h5"
    want = rows(0, 10)
    sync(path, want, batch=10)
    seg = store.shards_dir(path) / store.read_index(path).entries[0].name
    with h5py.File(seg, "a") as f:
        del f["keys/row"]
    want[0] = replace(want[0], path="moved/0.png")
    assert sync(path, want).copied == 1
    check(path, want)


def test_a_segment_unreadable_at_commit_is_named_not_taken_for_a_key_collision(
    tmp_path, monkeypatch
):
    from pipeline.store import content

    path = tmp_path / "c.h5"
    want = rows(0, 10)
    sync(path, want, batch=10)
    want[0] = replace(want[0], path="moved/0.png")

    def eio(p):
        raise damage.SegmentUnreadable(f"segment '{p}' cannot be read (EIO)", "EIO")

    monkeypatch.setattr(content, "open_segment", eio)  # passing, and only while finding rows
    with pytest.raises(store.CacheError, match=r"no segment readable now.*rerun `make features`"):
        sync(path, want)
    monkeypatch.undo()
    check(path, rows(0, 10))  # nothing changed
    sync(path, want)
    check(path, want)


def test_asking_many_identities_at_once_answers_as_one_by_one(tmp_path):
    path = tmp_path / "c.h5"
    sync(path, rows(0, 6))
    w = Writer(path, "k" * 64, STAMP, maps=False, dtype="float16", log=lambda s: None)
    stage(w, rows(6, 8), 2)  # staged by this run: known too
    ask = [r.ident for r in rows(0, 10)] + [rows(0, 1)[0].ident + "#1", "x" * 81, ""]
    many = w.has_many(ask).tolist()
    assert many == [w.has(h) for h in ask]
    assert many == [True] * 8 + [False] * 5


def test_a_lookup_follows_its_index_when_a_writer_merges_its_segments_away(tmp_path):
    """A reader's lookup (make predict's of the training cache) made before `make features`
    merged segments away finds the rows in the merged ones, rather than embedding them again."""
    from pipeline.store.content import Lookup

    path = tmp_path / "c.h5"
    want = rows(0, 8)
    for k in range(1, 9):
        sync(path, want[:k], batch=1)  # a segment a run: merged when a tier fills
    said: list[str] = []
    lookup = Lookup.of(path, "k" * 64, store.cache_key(STAMP), said.append)
    before = set(lookup.names)
    sync(path, want[::4])  # three quarters removed: their segment rewritten, the old deleted
    assert before - {e.name for e in store.read_index(path).entries}
    assert not (store.shards_dir(path) / sorted(before)[0]).exists()
    found = lookup.find([r.ident for r in want[::4]])
    assert all(w is not None for w in found) and not said
    assert set(lookup.names) == {e.name for e in store.read_index(path).entries}


def _predicted(tmp_path, said):
    from pipeline.store.content import ContentStore

    path = tmp_path / "predicted" / "c.h5"
    return path, ContentStore(path, "k" * 64, {"v": 1}, True, "float16", {}, log=said.append)


def _put(st, idents):
    n = len(idents)
    st.add(idents, ["x.png"] * n, [(1, 1, 1)] * n, np.ones((n, 1, 1, 4), np.float16))
    st.flush()


@pytest.mark.parametrize("damage", ["short fence", "no step", "row out of range"])
def test_a_damaged_key_table_never_hides_rows_nor_stops_a_predict(tmp_path, damage):
    """A table that would skip rows is rebuilt from the identities; one naming rows the
    segment lacks makes the segment unusable, said in one line (never an uncaught error), and
    nothing is held twice."""
    said: list[str] = []
    ids = [f"{i:064x}" for i in range(1000)]
    path, st = _predicted(tmp_path, said)
    _put(st, ids)
    st.close()
    seg = next(store.shards_dir(path).glob("g*.h5"))
    with h5py.File(seg, "r+") as g:
        if damage == "short fence":
            fence = g["keys/fence"][()]
            del g["keys/fence"]
            g["keys"].create_dataset("fence", data=fence[:2])
        elif damage == "no step":
            del g["keys"].attrs["step"]
        else:
            g["keys/row"][0] = 10**6
    path, st = _predicted(tmp_path, said)
    found = st.lookup.find(ids)
    if damage == "row out of range":
        assert found == [None] * len(ids) and "the key table names rows" in said[-1]
    else:
        assert None not in found and not said
        _put(st, ids)
        st.close()
        idents = store.read_index(path).idents
        assert len(idents) == len(set(idents)) == len(ids)


def test_a_lost_segment_is_said_even_when_its_index_changed_since(tmp_path):
    from pipeline.store.content import Lookup

    said: list[str] = []
    path, w = _predicted(tmp_path, [])
    _put(w, ["a" * 64])
    _put(w, ["b" * 64])
    reader = Lookup.of(path, "k" * 64, w.stamp_key, said.append)  # another predict's view
    (store.shards_dir(path) / w.entries[1].name).unlink()  # lost, and still named
    _put(w, ["c" * 64])  # the writer goes on: its index changes
    assert reader.find(["b" * 64]) == [None]
    assert len(said) == 1 and "is missing" in said[0]
