"""The backbone runs once per image, for prediction too: the features of predicted images are
kept by content, images of the training cache are never embedded again, a changed file is, and
CLUSTER embeds the new images on Dask workers with the same CSV."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import make_dataset, rewrite_after, write_image

from pipeline import backbone, diagnose, layout, runs, store
from pipeline.features import extract
from pipeline.prediction import classify
from pipeline.store.content import ContentStore, Lookup
from pipeline.train import train_head

ROOT = Path(__file__).resolve().parent.parent


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A cache with views (AUGMENT=2) and two runs on it (avg and max pooling): made once."""
    tmp = tmp_path_factory.mktemp("predict-cache")
    from pipeline.backbone import BackboneSpec

    spec = BackboneSpec(weights="none", input_size=32, seed=0)
    data = make_dataset(tmp / "data", per_class=6, validation=1)
    art = tmp / "art"
    quiet = lambda s: None  # noqa: E731
    extract(data, art, spec, augment=2, log=quiet)
    avg = train_head(art, "logreg", folds=3, log=quiet)["run"]
    mx = train_head(art, "logreg", pooling="max", folds=3, log=quiet)["run"]
    new = tmp / "new"
    for i in range(5):
        write_image(new / f"n{i}.png", i % 3, seed=800 + i)
    return {"data": data, "art": art, "new": new, "runs": (avg, mx)}


@pytest.fixture
def art(base, tmp_path):
    """The trained artifacts, copied: no predict has kept anything in them yet."""
    return Path(shutil.copytree(base["art"], tmp_path / "art"))


@pytest.fixture
def no_backbone():
    """`no_backbone()`: from then on, building the backbone or loading Keras for it
    (preprocessing, output shapes) fails; `no_backbone.undo()` allows it again."""
    mp = pytest.MonkeyPatch()

    def refuse(*a, **k):
        raise AssertionError("the backbone was built or Keras loaded for it")

    def arm():
        mp.setattr(backbone, "build", refuse)
        mp.setattr(backbone, "_keras", refuse)

    arm.undo = mp.undo
    yield arm
    mp.undo()


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _probabilities(rows: list[dict[str, str]]) -> np.ndarray:
    return np.array([[float(v) for k, v in r.items() if k.startswith("p_")] for r in rows])


def test_a_second_predict_runs_no_backbone_and_gives_the_same_probabilities(
    base, art, tmp_path, no_backbone, decoded
):
    avg, mx = base["runs"]
    fresh = Path(shutil.copytree(art, tmp_path / "fresh"))  # nothing kept: every image embedded
    first = classify(art, base["new"], run=avg, out=tmp_path / "1.csv", batch_size=2, log=_quiet)[0]
    assert all(r["backbone_ran"] for r in first) and len(decoded) == 5
    # the max-pooling run's reference, on artifacts where nothing was kept
    ref = classify(fresh, base["new"], run=mx, out=tmp_path / "ref.csv", log=_quiet)[0]
    assert all(r["backbone_ran"] for r in ref)
    kept = layout.predicted_path(layout.current_cache(art))
    assert kept.is_file() and len(store.read_index(kept)) == 5

    no_backbone()
    decoded.clear()
    again = classify(art, base["new"], run=avg, out=tmp_path / "2.csv", batch_size=2, log=_quiet)[0]
    other = classify(art, base["new"], run=mx, out=tmp_path / "3.csv", log=_quiet)[0]
    assert decoded == []
    for rows, want in ((again, first), (other, ref)):
        assert [r["path"] for r in rows] == [r["path"] for r in want]
        assert not any(r["backbone_ran"] for r in rows)
        for got, exp in zip(rows, want, strict=True):
            assert got["label"] == exp["label"]
            assert got["probabilities"] == pytest.approx(exp["probabilities"], abs=1e-6)
    # the CSV says it, and differs in nothing else
    one, two = _csv(tmp_path / "1.csv"), _csv(tmp_path / "2.csv")
    assert [r.pop("backbone_ran") for r in one] == ["yes"] * 5
    assert [r.pop("backbone_ran") for r in two] == ["no"] * 5
    assert one == two
    assert list(_csv(tmp_path / "3.csv")[0])[-3:] == [
        "backbone_ran",
        "distance_to_training",
        "unlike_training",
    ]
    # a fresh process predicting cached images never imports TensorFlow or Keras
    code = (
        "import sys; from pipeline import api; "
        f"rows = api.predict({str(base['new'])!r}, {str(art)!r}, run={mx!r}, "
        f"out={str(tmp_path / '4.csv')!r}, log=None); "
        "print([m for m in ('tensorflow', 'keras') if m in sys.modules], "
        "sum(r['backbone_ran'] for r in rows))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["[]", "0"], done.stdout + done.stderr


def test_images_of_the_training_cache_are_never_embedded(base, art, tmp_path, no_backbone, decoded):
    data = base["data"]
    avg, _ = base["runs"]
    no_backbone()
    rows = classify(art, data / "validation", run=avg, out=tmp_path / "v.csv", log=_quiet)[0]
    assert len(rows) == 3 and not any(r["backbone_ran"] for r in rows) and decoded == []
    assert {r["backbone_ran"] for r in _csv(tmp_path / "v.csv")} == {"no"}
    # the head on the cached features, row for row (scaled by the run's temperature where
    # its calibration applies one)
    r = runs.pick(art, avg)
    est = runs.load_estimator(art, r)
    t = r["calibration"]["temperature"] if r["calibration"]["applied"] else 1.0
    va = store.load_features(layout.current_cache(art), "avg", "validation")
    for row in rows:
        i = va.paths.index(f"validation/{row['path']}")
        p = diagnose.scaled(est.predict_proba(va.X[i : i + 1]), t)[0]
        assert list(row["probabilities"].values()) == pytest.approx(p.tolist(), abs=1e-6)
    # TTA's views too: the training images' views are in the cache's views (AUGMENT=2)
    rows = classify(
        art, data / "train/class_1", run=avg, out=tmp_path / "t.csv", tta=2, log=_quiet
    )[0]
    assert len(rows) == 6 and not any(r["backbone_ran"] for r in rows) and decoded == []
    assert not (layout.predicted_path(layout.current_cache(art))).exists()  # nothing new kept

    # a mix: only the new image is embedded, and its row alone says the backbone ran
    mixed = tmp_path / "mixed"
    shutil.copytree(data / "train/class_2", mixed)
    write_image(mixed / "zz_new.png", 2, seed=4242)
    no_backbone.undo()  # the backbone may run now
    looked: list[int] = []
    real_find = Lookup.find

    def spy(self, idents):
        looked.append(len(idents))
        return real_find(self, idents)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Lookup, "find", spy)
        rows = classify(art, mixed, run=avg, out=tmp_path / "m.csv", batch_size=4, log=_quiet)[0]
    assert decoded == ["zz_new.png"]
    assert [r["backbone_ran"] for r in rows] == [False] * 6 + [True]
    # the 7 images are looked up at once in each cache (not per batch of 4): every segment's
    # key table is opened once for them all
    assert looked and max(looked) == 7 and len(looked) <= 3, looked


def test_a_changed_file_is_embedded_again_and_a_touched_one_is_not(base, art, tmp_path, decoded):
    avg, _ = base["runs"]
    images = tmp_path / "images"
    shutil.copytree(base["new"], images)
    fresh = Path(shutil.copytree(art, tmp_path / "fresh"))
    before = classify(art, images, run=avg, out=tmp_path / "a.csv", log=_quiet)[0]
    write_image(images / "n0.png", 2, seed=4321)  # same path, new content
    (images / "n1.png").touch()  # same content, new mtime
    decoded.clear()
    after = classify(art, images, run=avg, out=tmp_path / "b.csv", log=_quiet)[0]
    assert decoded == ["n0.png"]
    assert [r["backbone_ran"] for r in after] == [True] + [False] * 4
    assert after[0]["probabilities"] != pytest.approx(before[0]["probabilities"], abs=1e-6)
    # the new content's prediction is that of a predict that kept nothing
    ref = classify(fresh, images / "n0.png", run=avg, out=tmp_path / "c.csv", log=_quiet)[0]
    assert after[0]["probabilities"] == pytest.approx(ref[0]["probabilities"], abs=1e-6)


def test_views_of_predicted_images_are_kept_per_content_and_view(
    base, art, tmp_path, no_backbone, decoded
):
    avg, _ = base["runs"]
    one = classify(art, base["new"], run=avg, out=tmp_path / "1.csv", tta=2, log=_quiet)[0]
    assert all(r["backbone_ran"] for r in one) and len(decoded) == 5
    cache = layout.current_cache(art)
    views = layout.augment_path(layout.predicted_path(cache), 0)
    assert len(store.read_index(views)) == 10  # 5 images x views 1 and 2
    no_backbone()
    decoded.clear()
    two = classify(art, base["new"], run=avg, out=tmp_path / "2.csv", tta=2, log=_quiet)[0]
    assert decoded == [] and not any(r["backbone_ran"] for r in two)
    for a, b in zip(one, two, strict=True):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)


def test_predict_on_a_cluster_gives_the_same_csv(base, art, tmp_path, no_backbone, dask_scheduler):
    """CLUSTER=tcp://... (the session's scheduler): the workers embed, the CSV is the same."""
    import pipeline

    avg, _ = base["runs"]
    images = tmp_path / "images"
    shutil.copytree(base["new"], images)
    shutil.copy(base["data"] / "train/class_0/img_000.png", images / "from_train.png")
    (images / "junk.png").write_text("not an image")
    there = Path(shutil.copytree(art, tmp_path / "there"))
    here = pipeline.predict(images, art, run=avg, out=tmp_path / "here.csv", batch=2, log=None)
    no_backbone()  # from now on, only the workers may embed
    rows = pipeline.predict(
        images,
        there,
        run=avg,
        out=tmp_path / "there.csv",
        batch=2,
        cluster=dask_scheduler,
        log=None,
    )
    assert [r["path"] for r in rows] == [r["path"] for r in here]  # in order
    assert [r["error"] != "" for r in rows] == [r["error"] != "" for r in here]
    a, b = _csv(tmp_path / "here.csv"), _csv(tmp_path / "there.csv")
    assert [(r["path"], r["label"], r["backbone_ran"]) for r in a] == [
        (r["path"], r["label"], r["backbone_ran"]) for r in b
    ]
    assert [r["backbone_ran"] for r in b] == ["no"] + ["yes"] * 5  # from_train: cached
    np.testing.assert_allclose(_probabilities(a), _probabilities(b), atol=2e-6)
    # and what the workers embedded is kept like the rest
    kept = layout.predicted_path(layout.current_cache(there))
    assert len(store.read_index(kept)) == 5


def test_make_predict_takes_cluster():
    out = subprocess.run(
        ["make", "-n", "predict", "IMAGES=x", "CLUSTER=local:2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--cluster local:2" in out


# -- the content store itself: never two rows of one content, one key (kills: test_segment_log)


def _add(s: ContentStore, idents: list[str], value: float, paths=None, stat=(1, 1, 1)) -> None:
    """Rows of (1, 1, 4) maps of `value` under `idents`."""
    maps = np.full((len(idents), 1, 1, 4), value, np.float16)
    s.add(idents, paths or ["x.png"] * len(idents), [stat] * len(idents), maps)


def _store(path: Path, key: str = "k" * 64) -> ContentStore:
    return ContentStore(path, key, {"v": 1}, True, "float16", {}, log=lambda s: None)


def test_a_damaged_index_is_rebuilt_from_its_segments_and_another_key_is_never_used(tmp_path):
    path = tmp_path / "predicted" / "c.h5"
    s = _store(path)
    _add(s, ["a", "b"], 3.0)
    s.close()
    with pytest.raises(store.CacheError):
        Lookup.of(path, "x" * 64, s.stamp_key)
    path.write_bytes(b"garbage")
    s = _store(path)
    assert store.read_attrs(path)["feature_shape"] == [1, 1, 4]  # rebuilt at once, whole
    assert [w is not None for w in s.lookup.find(["a", "b"])] == [True, True]
    s.close()
    assert sorted(store.read_index(path).idents) == ["a", "b"]
    # a store of another key at that path is moved aside, its rows never found
    other = _store(path, key="o" * 64)
    assert other.lookup.find(["a", "b"]) == [None, None]
    other.close()
    # and rows of other decoder/framework versions are never found either
    again = ContentStore(path, "o" * 64, {"v": 2}, True, "float16", {}, log=lambda s: None)
    _add(again, ["a"], 5.0)
    again.close()
    assert Lookup.of(path, "o" * 64, other.stamp_key).find(["a"]) == [None]
    assert Lookup.of(path, "o" * 64, again.stamp_key).find(["a"]) != [None]


def _ids(a: int, b: int) -> list[str]:
    return [f"{i:064x}" for i in range(a, b)]


def _on_disk(path: Path) -> set[str]:
    return {p.name for p in store.shards_dir(path).glob("g*.h5")}


def test_a_long_run_merges_as_it_goes_and_finds_every_row_it_wrote(tmp_path):
    path = tmp_path / "predicted" / "c.h5"
    s = _store(path)
    counts = []
    for k in range(40):  # forty ten-row segments, written one by one
        _add(s, _ids(10 * k, 10 * k + 10), float(k))
        s.flush()
        names = [e.name for e in s.entries]
        counts.append(len(names))
        # the index on disk names what the writer holds, and no other file is left
        assert [e.name for e in store.read_index(path).entries] == names
        assert _on_disk(path) == set(names)
        # the lookup looks in those segments alone, and holds nothing of merged-away ones
        assert s.lookup.names == names and set(s.lookup.tables) <= set(names)
        found = s.lookup.find(_ids(0, 10 * k + 10))  # every row written so far, merged or not
        block, ok = s.lookup.read(found, "pooled/avg")  # type: ignore[arg-type]
        assert ok.all() and block[:, 0].tolist() == [float(i // 10) for i in range(10 * k + 10)]
    assert max(counts) <= 11 and counts[-1] == 5, counts  # never forty: 8 ten-row ones merge
    assert len(s.lookup) == 400
    _add(s, _ids(0, 400), 99.0)  # held already, merged or not: nothing is kept twice
    assert s.pending == []
    s.close()
    idx = store.read_index(path)
    assert sorted(idx.idents) == _ids(0, 400)


def test_a_kept_row_says_where_it_was_seen(tmp_path):
    path = tmp_path / "predicted" / "c.h5"
    s = _store(path)
    _add(s, ["a", "a#1"], 1.0, ["x/a.png"] * 2, (5, 6, 7))
    s.close()
    idx = store.read_index(path)
    assert idx.paths == ["x/a.png"] * 2 and idx.view == [0, 1]
    assert idx.split == ["predicted"] * 2 and idx.stat.tolist() == [[5, 6, 7]] * 2


# -- a file rewritten between its hash and its decoding: features never under the old hash --


def _rewritten_after_hashing(monkeypatch, name: str) -> None:
    """The first time predict hashes the file `name`, it is rewritten right after (another
    image: class 2, another seed), so the bytes decoded are not the bytes hashed."""
    from pipeline import prediction

    rewrite_after(
        monkeypatch, prediction, "_hashed", lambda item: item.abspath.name == name,
        lambda item: write_image(item.abspath, 2, seed=4321),
    )  # fmt: skip


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("where", ["here", "cluster"])
def test_a_file_rewritten_after_hashing_is_kept_under_the_bytes_decoded(
    base, art, tmp_path, monkeypatch, request, where
):
    """Here, and on the session's Dask workers (CLUSTER=tcp://...)."""
    import pipeline

    cluster = request.getfixturevalue("dask_scheduler") if where == "cluster" else ""

    avg, _ = base["runs"]
    images = tmp_path / "images"
    shutil.copytree(base["new"], images)
    old = tmp_path / "old" / "n0.png"  # the content hashed, kept aside
    old.parent.mkdir()
    shutil.copy(images / "n0.png", old)
    fresh = Path(shutil.copytree(art, tmp_path / "fresh"))  # references: nothing kept there
    _rewritten_after_hashing(monkeypatch, "n0.png")
    rows = pipeline.predict(
        images, art, run=avg, out=tmp_path / "a.csv", tta=1, cluster=cluster, log=None
    )
    monkeypatch.undo()
    new_sha, old_sha = _sha(images / "n0.png"), _sha(old)
    assert new_sha != old_sha
    # kept under the hash of the bytes decoded, never under the hash of the old bytes
    cache = layout.current_cache(art)
    kept = store.read_index(layout.predicted_path(cache)).idents
    views = store.read_index(layout.augment_path(layout.predicted_path(cache), 0)).idents
    assert new_sha in kept and old_sha not in kept
    assert f"{new_sha}#1" in views and f"{old_sha}#1" not in views
    # its row is that of the file as decoded (the new image), as a predict keeping nothing says
    want = pipeline.predict(
        images / "n0.png", fresh, run=avg, out=tmp_path / "r.csv", tta=1, log=None
    )
    assert rows[0]["backbone_ran"] and rows[0]["error"] == ""
    assert rows[0]["probabilities"] == pytest.approx(want[0]["probabilities"], abs=1e-6)
    # and the old content, predicted later, is embedded for itself, not given the new image's
    got = pipeline.predict(old, art, run=avg, out=tmp_path / "b.csv", tta=1, log=None)[0]
    ref = pipeline.predict(old, fresh, run=avg, out=tmp_path / "c.csv", tta=1, log=None)[0]
    assert got["backbone_ran"]
    assert got["probabilities"] == pytest.approx(ref["probabilities"], abs=1e-6)
    assert ref["probabilities"] != pytest.approx(want[0]["probabilities"], abs=1e-3)


def test_a_checked_decoding_says_when_the_bytes_are_not_those_hashed(tmp_path):
    import pickle

    from pipeline import batches, images
    from pipeline.embedding import Job

    def _ViewJob(path, sha, view):  # noqa: N802
        return Job(path.name, path, sha, view=view)

    p = write_image(tmp_path / "a.png", 0, seed=1)
    job = _ViewJob(p, _sha(p), 1)
    first = batches.decode(job, 32, 0, check=True)
    assert isinstance(first, np.ndarray) and first.shape == (32, 32, 3)
    write_image(p, 2, seed=2)
    d = batches.decode(job, 32, 0, check=True)
    assert isinstance(d, images.Changed) and d.sha256 == _sha(p) and not d.content
    assert d.array is not None and (d.array == images.load_image(p, 32)).all()
    back = pickle.loads(pickle.dumps(d))  # from a Dask worker: the hash, not the pixels
    assert isinstance(back, images.Changed) and back.sha256 == d.sha256 and back.array is None
    assert str(back) == str(d) and "changed while it was read" in str(d)
    assert isinstance(batches.decode(job, 32, 0), np.ndarray)  # unchecked: what is there
    # caught half-way through a rewrite: the bytes read do not decode, and are not those
    # hashed: the file changed (never remembered as bad content under the good hash)
    good = _sha(p)
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3])
    cut = batches.decode(_ViewJob(p, good, 0), 32, 0, check=True)
    assert isinstance(cut, images.Changed) and not cut.content and cut.sha256 == _sha(p)
    bad = batches.decode(_ViewJob(p, _sha(p), 0), 32, 0, check=True)  # truly bad bytes
    assert isinstance(bad, images.Unreadable) and not isinstance(bad, images.Changed)
    assert bad.content


class _HereClient:
    """A Dask client that runs each task in this process at once (its one 'worker')."""

    def scheduler_info(self):
        return {"workers": {"here": {}}}

    def scatter(self, x, broadcast=False):
        return x

    def submit(self, fn, *args, key=""):
        out = fn(*args)
        return SimpleNamespace(result=lambda: out, release=lambda: None)


def test_a_file_that_keeps_changing_on_the_workers_is_named_and_never_kept(
    base, art, tmp_path, monkeypatch
):
    from pipeline import images as loader

    avg, _ = base["runs"]
    folder = tmp_path / "images"
    shutil.copytree(base["new"], folder)
    real = loader.load_image_hashed
    shas = [_sha(folder / "n0.png")]

    def rewritten_then_read(path, size):  # every read of n0.png finds other bytes
        if Path(path).name == "n0.png":
            write_image(Path(path), 2, seed=5000 + len(shas))
            shas.append(_sha(Path(path)))
        return real(path, size)

    monkeypatch.setattr(loader, "load_image_hashed", rewritten_then_read)
    rows = classify(art, folder, run=avg, out=tmp_path / "a.csv", log=_quiet, client=_HereClient())[
        0
    ]
    assert len(shas) == 1 + 1 + 2  # read once, then again twice (REDO), then named
    assert "changed while it was read" in rows[0]["error"] and rows[0]["label"] is None
    assert all(r["error"] == "" and r["backbone_ran"] for r in rows[1:])
    kept = store.read_index(layout.predicted_path(layout.current_cache(art))).idents
    assert len(kept) == 4 and not set(shas) & set(kept)


def test_a_long_predict_holds_memory_flat_in_the_images_it_keeps(tmp_path):
    import tracemalloc

    held = {}
    for n in (500, 2500):
        s = _store(tmp_path / f"p{n}" / "c.h5")
        tracemalloc.start()
        for a in range(0, n, 100):
            _add(s, [f"{i:064x}" for i in range(a, a + 100)], 1.0)
            s.flush()
        held[n] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        s.close()
    assert (held[2500] - held[500]) / 2000 < 40, held
