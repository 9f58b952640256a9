"""Heads at scale: a head that streams the cache, an evaluation sized to the data, no matrix
held (sgd) or sent (cluster), and a head in memory that says when it would not fit."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from pipeline import evaluate, heads, layout, reporting, stats, store
from pipeline.bench import store as bench_store
from pipeline.errors import UserError
from pipeline.store import reader, rows
from pipeline.train import load, train_head


def synthetic(tmp_path, n: int, channels: int = 48, signal: float = 0.6):
    """A cache of `n` rows of backbone-like pooled vectors (non-negative, skewed, class signal
    spread over every channel, not separable), written by the store's own writer."""
    path = layout.features_dir(tmp_path / "art") / "synthetic.h5"
    path.parent.mkdir(parents=True)
    bench_store.sync(path, bench_store._rows(0, n), batch=97, channels=channels, signal=signal)
    layout.set_current(tmp_path / "art", path)  # the ARTIFACTS folder's cache
    return path


@pytest.fixture
def big(tmp_path):
    return synthetic(tmp_path, 3000)


def test_sgd_streams_block_by_block_and_matches_logistic_regression(big, tmp_path, monkeypatch):
    """sgd reaches logreg's accuracy on the same folds, reading at most one small block of rows
    at a time and never the whole cache (a spy on the reader)."""
    art = tmp_path / "art"
    logreg = train_head(art, "logreg", features=big, folds=3, repeats=1, log=lambda s: 0)
    monkeypatch.setattr(rows, "BUFFER_BYTES", 512 * 48 * 4)  # 512 rows per block
    # 10 passes over a fold's 2,000 rows instead of the default's 50 (MIN_UPDATES 100,000):
    # still every row read block by block several times over, and logreg's accuracy reached
    monkeypatch.setattr(heads.streaming, "MIN_UPDATES", 20_000)
    monkeypatch.setattr(heads.streaming.passes, "__defaults__", (20_000,))
    reads: list[int] = []
    real_read = rows.Rows._read

    def spy(self, pos):
        reads.append(len(pos))
        return real_read(self, pos)

    def never(*a, **k):
        if not k.get("lazy"):
            raise AssertionError("the streaming head read the whole split into memory")
        return real_features_of(*a, **k)

    real_features_of = reader.features_of
    monkeypatch.setattr(rows.Rows, "_read", spy)
    monkeypatch.setattr(store, "features_of", never)
    sgd = train_head(art, "sgd", features=big, folds=3, repeats=1, n_jobs=1, log=lambda s: 0)
    assert sgd["cv"]["folds_id"] == logreg["cv"]["folds_id"]  # paired: the same folds
    for k in ("oof_sha256", "oof_paths", "oof_true"):  # texts read when asked, the same
        assert sgd["cv"][k] == logreg["cv"][k]
    assert 0.6 < logreg["cv"]["accuracy_mean"] < 0.99  # a problem with mistakes to make
    assert sgd["cv"]["accuracy_mean"] >= logreg["cv"]["accuracy_mean"] - 0.03, (sgd, logreg)
    assert reads and max(reads) <= 512 < 2000  # a block, never a fold's 2,000 training rows
    # scaler pass + epochs over every training row, per fold and for the saved head
    assert sum(reads) >= 3000 * 5
    assert sgd["final_params"]["alpha"] in heads.streaming.alphas_for(3000)
    assert sgd["cv"]["tuning"] == {"rows": 3000, "sample": 3000, "alpha": "inner folds"}


def test_sgd_tunes_on_a_bounded_sample_of_whole_groups_and_says_so(tmp_path):
    y = np.repeat(np.arange(3), 400)
    groups = np.arange(1200) // 2  # pairs of identical copies
    pick = heads.streaming.tuning_sample(y, groups, 300, seed=0)
    assert 200 < len(pick) < 420 and np.all(np.diff(pick) > 0)
    chosen = set(groups[pick].tolist())
    assert all(
        (groups == g).sum() == np.isin(pick, np.flatnonzero(groups == g)).sum() for g in chosen
    )
    assert set(y[pick].tolist()) == {0, 1, 2}
    # the whole set below the limit
    assert len(heads.streaming.tuning_sample(y, groups, 5000, seed=0)) == 1200
    path = synthetic(tmp_path, 900)
    r = train_head(tmp_path / "art", "sgd", features=path, folds=2, repeats=1,
                   params={"tune_rows": "200"}, log=lambda s: 0)  # fmt: skip
    assert r["cv"]["tuning"]["sample"] < r["cv"]["tuning"]["rows"] == 900
    text = reporting._protocol(reporting._entry({**r, "current": True, "stale_reason": None}))
    assert "sample of" in text and "900 training rows" in text


def test_the_evaluation_is_sized_to_the_data_unless_folds_are_asked(tmp_path, monkeypatch):
    path = synthetic(tmp_path, 600)
    art = tmp_path / "art"
    small = train_head(art, "logreg", features=path, repeats=1, log=lambda s: 0)
    assert small["cv"]["protocol"] == "k-fold" and small["cv"]["folds"] == 5
    monkeypatch.setenv("PIPELINE_HOLDOUT_ABOVE", "500")
    said: list[str] = []
    held = train_head(art, "logreg", features=path, repeats=3, log=said.append)
    cv = held["cv"]
    assert held["repeats"] == cv["repeats"] == 1 and any("REPEATS=3 ignored" in s for s in said)
    assert cv["protocol"] == "holdout" and cv["folds"] == 1 and len(cv["fold_accuracies"]) == 1
    assert any("held-out split" in s and "600 training images" in s for s in said)
    # the held-out images are the k-fold run's first test fold, scored by one fit
    assert 110 <= cv["holdout_images"] <= 130  # 1/5 of 600, by content group and class
    right = stats.unpack_bits(cv["holdout_right"], cv["holdout_images"])
    w = stats.wilson(int(right.sum()), len(right))
    assert cv["accuracy_mean"] == pytest.approx(right.mean())
    assert (cv["accuracy_low"], cv["accuracy_high"]) == (w["low"], w["high"])
    assert held["run"] != small["run"]
    # FOLDS asked: k-fold at any size
    asked = train_head(art, "logreg", features=path, folds=3, repeats=1, log=lambda s: 0)
    assert asked["cv"]["protocol"] == "k-fold" and asked["cv"]["folds"] == 3
    assert "FOLDS=3 asked" in asked["cv"]["protocol_reason"]
    # the report says which protocol made each number, and why
    rep = reporting.build_report(art, log=lambda s: 0)
    md = (art / "report" / "report.md").read_text()
    html = (art / "report" / "report.html").read_text()
    assert "one held-out split" in md and "FOLDS=3 asked" in md
    assert "one held-out split" in html and "held-out split (" in html
    assert rep["results"]


def test_held_out_runs_are_paired_image_by_image(tmp_path, monkeypatch):
    path = synthetic(tmp_path, 600)
    monkeypatch.setenv("PIPELINE_HOLDOUT_ABOVE", "100")
    art = tmp_path / "art"
    a = train_head(art, "logreg", features=path, log=lambda s: 0)
    # SGD itself (not the exact optimum a small set gets): two heads that differ on some images
    b = train_head(art, "sgd", features=path, params={"solver": "sgd"}, log=lambda s: 0)
    assert a["cv"]["folds_id"] == b["cv"]["folds_id"]
    ea, eb = (reporting._entry({**r, "current": True, "stale_reason": None}) for r in (a, b))
    p = reporting.paired(ea, eb)
    n = a["cv"]["holdout_images"]
    ra = stats.unpack_bits(a["cv"]["holdout_right"], n)
    rb = stats.unpack_bits(b["cv"]["holdout_right"], n)
    assert p["mean_difference"] == pytest.approx(ra.mean() - rb.mean())
    assert p["low"] < p["mean_difference"] < p["high"]  # an interval, not one fold's figure
    hand = _paired_by_hand(ra, rb)
    assert hand["discordant"] >= 5  # the two heads disagree on some images: a real interval
    assert (p["low"], p["high"]) == pytest.approx((hand["low"], hand["high"]), abs=1e-12)
    assert p["p_value"] == pytest.approx(hand["p"], rel=1e-9)
    assert p["tied"] is hand["tied"]
    # identical runs: difference 0, tied
    same = reporting.paired(ea, ea)
    assert same["mean_difference"] == 0 and same["tied"]


def _paired_by_hand(a: np.ndarray, b: np.ndarray) -> dict[str, float | bool]:
    """a - b on the same images from their right/wrong bits, computed here: the Wald interval
    of a difference of paired proportions (cut to [-1, 1]) and McNemar's exact two-sided p
    on the discordant images; tied when the interval holds 0 or p >= 0.05."""
    from math import comb, sqrt

    n = len(a)
    p10 = sum(1 for x, y in zip(a, b, strict=True) if x and not y) / n  # only a right
    p01 = sum(1 for x, y in zip(a, b, strict=True) if y and not x) / n  # only b right
    d = p10 - p01
    half = 1.959963984540054 * sqrt((p10 + p01 - d * d) / n)
    low, high = max(-1.0, d - half), min(1.0, d + half)
    m, lo = round((p10 + p01) * n), round(min(p10, p01) * n)
    p = min(1.0, 2 * sum(comb(m, i) for i in range(lo + 1)) / 2**m) if m else 1.0
    return {"d": d, "low": low, "high": high, "p": p, "discordant": m,
            "tied": bool(low <= 0 <= high or p >= 0.05)}  # fmt: skip


def test_available_memory_is_what_the_machine_can_give_now(monkeypatch):
    # psutil's `available` (Linux's MemAvailable), not its free pages or its total
    import collections

    import psutil

    real = heads.available_memory()
    assert 0 < real <= psutil.virtual_memory().total
    vm = collections.namedtuple("vm", "total available free used")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: vm(8 << 30, 3 << 30, 1 << 30, 5 << 30))
    assert heads.available_memory() == 3 << 30


def test_a_head_in_memory_says_when_the_features_would_not_fit(big, tmp_path, monkeypatch):
    monkeypatch.setattr(heads, "available_memory", lambda: 1 << 20)  # 1 MiB free
    with pytest.raises(UserError, match=r"HEAD=logreg holds the features in memory.*HEAD=sgd"):
        train_head(tmp_path / "art", "logreg", features=big, folds=2, log=lambda s: 0)
    monkeypatch.setattr(heads, "available_memory", lambda: 1 << 40)  # here: plenty

    class Workers:  # a cluster whose smallest worker has 1 MiB free: it decides
        def run(self, fn):
            return {"tcp://big:1": 1 << 40, "tcp://small:2": 1 << 20}

    with pytest.raises(UserError, match=r"available on the cluster's worker tcp://small:2.*sgd"):
        train_head(tmp_path / "art", "logreg", features=big, folds=2, client=Workers())
    r = train_head(tmp_path / "art", "sgd", features=big, folds=2, repeats=1, log=lambda s: 0)
    assert r["cv"]["accuracy_mean"] > 0.5


def test_a_run_keeps_a_bounded_record_of_out_of_fold_predictions(tmp_path, monkeypatch):
    path = synthetic(tmp_path, 600, signal=0.3)
    monkeypatch.setattr(evaluate, "OOF_ROWS_KEPT", 100)
    monkeypatch.setattr(evaluate, "OOF_MISTAKES_KEPT", 10)
    r = train_head(tmp_path / "art", "logreg", features=path, folds=3, repeats=1, log=lambda s: 0)
    cv = r["cv"]
    wrong = cv["oof_mistakes"]
    assert cv["oof_scored"] == 600 and wrong > 10
    assert len(cv["oof_pred"]) == 10 and all(
        p != t for p, t in zip(cv["oof_pred"], cv["oof_true"], strict=True)
    )
    assert np.array(cv["confusion"]).sum() == 600  # the figures cover every image
    assert round(np.trace(np.array(cv["confusion"])) / 600, 6) == round(1 - wrong / 600, 6)
    g = reporting.gallery({**r, "validation": None}, None, limit=5)
    assert g["mistakes"] == wrong and len(g["items"]) == 5
    probs = [it["probability"] for it in g["items"]]
    assert probs == sorted(probs, reverse=True)


def _reads() -> int:
    from pipeline.store import rows as r

    return r.READ["rows"]


FIXED = {"sgd": {"alpha": "0.01"}, "logreg": {"C": "1"}}  # no grid: the folds are the point


@pytest.mark.parametrize("head", ["sgd", "logreg"])
def test_on_a_cluster_the_workers_read_the_rows_from_the_cache(tmp_path, head, two_workers):
    """Folds and the final fit run on the workers (the session's cluster, reached by its
    tcp:// address), each reading its rows from the cache on (here: local, shared) storage;
    the client reads none and sends no feature matrix."""
    synthetic(tmp_path, 600)
    art = tmp_path / "art"
    here = train_head(art, head, folds=3, repeats=1, params=FIXED[head], log=lambda s: 0)
    c = two_workers
    before, before_workers = _reads(), c.run(_reads)
    there = train_head(art, head, folds=3, repeats=1, client=c, log=lambda s: 0,
                       params=FIXED[head])  # fmt: skip
    on_workers = {w: n - before_workers.get(w, 0) for w, n in c.run(_reads).items()}
    assert _reads() == before  # the client read no feature row
    # every fold's training and test rows and the saved head's rows, read by the workers
    assert sum(on_workers.values()) >= 600 * 3
    assert there["cv"]["fold_accuracies"] == pytest.approx(here["cv"]["fold_accuracies"])


def test_a_writer_never_waits_for_a_long_reader(tmp_path):
    """A streaming head holds the cache for hours: `make features` meanwhile commits, keeps the
    files it replaced (the reader may need them), and the next run deletes them."""
    import threading

    path = synthetic(tmp_path, 200)
    import shutil

    stray = store.shards_dir(path) / "g0000replaced.h5"  # a segment no index names any more
    shutil.copy(next(store.shards_dir(path).glob("g*.h5")), stray)
    done: list[object] = []
    with store.reading(path.parent):  # a train-head reading
        t = threading.Thread(
            target=lambda: done.append(bench_store.sync(path, bench_store._rows(0, 210), 97, 48))
        )
        t.start()
        t.join(timeout=120)
        assert not t.is_alive() and done  # committed without waiting for the reader
        assert stray.exists()  # kept while read
        assert len(store.read_index(path)) == 210
    bench_store.sync(path, bench_store._rows(0, 210), 97, 48)  # no reader now
    assert not stray.exists()


def test_rows_named_twice_or_scattered_are_read_as_named(tmp_path):
    """A row named twice (two identical images' views) and scattered rows read exactly those
    rows, and a few scattered rows cost their bytes, not the blocks around them."""
    import h5py

    from pipeline.store.segments import read_rows

    folder = tmp_path / "c.shards"
    folder.mkdir()
    data = np.arange(300 * 4, dtype=np.float32).reshape(300, 4)
    with h5py.File(folder / "g1.h5", "w") as f:
        f.create_dataset("pooled/avg", data=data)
    part = rows.Part(str(folder), ("g1.h5",), "pooled/avg", "avg", 4)
    for want in ([5, 5, 7], [0, 299], [3, 4, 4, 6], list(range(10, 20))):
        r = rows.Rows((part,), np.zeros(len(want)), np.zeros(len(want)), np.array(want))
        np.testing.assert_array_equal(r.load(), data[want])
    big = np.zeros((400_000, 4), np.float32)  # rows more than 1 MB apart are read one by one
    with h5py.File(tmp_path / "big.h5", "w") as f:
        ds = f.create_dataset("x", data=big)
        calls: list[slice] = []

        class Spy:
            shape, dtype = ds.shape, ds.dtype

            def __getitem__(self, key):
                calls.append(key)
                return ds[key]

        read_rows(Spy(), np.array([1, 200_000, 399_999]))
    assert sum(k.stop - k.start for k in calls) == 3


def test_validation_predictions_are_bounded_and_runs_pair_on_every_image(tmp_path, monkeypatch):
    """Past OOF_ROWS_KEPT validation images a run keeps its most confident mistakes row by
    row, and every image's right/wrong as bits: two heads still pair on all the images."""
    rows_ = [
        dataclasses.replace(r, split="validation") if i % 2 else r
        for i, r in enumerate(bench_store._rows(0, 800))
    ]
    path = layout.features_dir(tmp_path / "art") / "val.h5"
    path.parent.mkdir(parents=True)
    bench_store.sync(path, rows_, batch=97, channels=48, signal=0.3)
    monkeypatch.setattr(evaluate, "OOF_ROWS_KEPT", 100)
    monkeypatch.setattr(evaluate, "OOF_MISTAKES_KEPT", 10)
    art = tmp_path / "art"
    a = train_head(art, "logreg", features=path, folds=3, repeats=1, log=lambda s: 0)
    b = train_head(art, "sgd", features=path, folds=3, repeats=1, log=lambda s: 0)
    for r in (a, b):
        v = r["validation"]
        assert r["n_validation"] == 400 and np.array(v["confusion"]).sum() == 400
        assert v["mistakes"] == round(400 * (1 - v["accuracy"])) > 10
        assert len(v["predictions"]) == 10 and all(p["true"] != p["pred"] for p in v["predictions"])
        assert stats.unpack_bits(v["right"], 400).sum() == 400 - v["mistakes"]
        assert all(p["path"].startswith("c") for p in v["predictions"])  # read from the cache
    assert a["validation"]["images_id"] == b["validation"]["images_id"]
    ea, eb = (reporting._entry({**r, "current": True, "stale_reason": None}) for r in (a, b))
    pv = reporting.paired(ea, eb)
    assert pv is not None and pv["validation_mcnemar"]["images"] == 400
    g = reporting.gallery(a, None, limit=5)
    assert g["mistakes"] == a["validation"]["mistakes"] and len(g["items"]) == 5


def test_a_streaming_head_holds_a_few_bytes_per_row_and_reads_texts_when_asked(tmp_path):
    """The lazy load reads no identities, paths or stats per row into memory (bytes a row
    measured between two sizes), and the texts it reads when asked are the cache's."""
    import gc
    import tracemalloc

    from pipeline.train import load

    held = {}
    for n in (1000, 5000):
        path = tmp_path / f"c{n}" / "c.h5"
        path.parent.mkdir()
        bench_store.sync(path, bench_store._rows(0, n), batch=997, channels=8)
        gc.collect()
        tracemalloc.start()
        with store.reading(path.parent):
            data = load(path, "avg", lazy=True)
            ts = data.train
            del data
            gc.collect()
            held[n] = tracemalloc.get_traced_memory()  # (held now, peak while loading)
            tracemalloc.stop()
            assert isinstance(ts.X, store.Rows) and isinstance(ts.sha256, reader.ColumnOf)
            full = store.load_features(path, "avg", "train")
            seen = store.load_features(path, "avg", "train", canonical=True)  # as heads see
            pick = np.array([n - 1, 3, 0, 3])
            assert ts.sha256.take(pick) == [seen.sha256[i] for i in pick]
            assert reader.texts(ts.paths, pick) == [seen.paths[i] for i in pick]
            assert ts.sha256[7] == seen.sha256[7]
        with store.open_cache(path) as f:
            lean = store.index_of(f, path, lean=True)
        assert lean.ident_col is None and lean.stat is None and lean.path_parts is None
        assert lean.paths_of(pick[[2, 0]]) == [full.paths[0], full.paths[n - 1]]
    kept, peak = ((held[5000][i] - held[1000][i]) / 4000 for i in (0, 1))
    assert kept < 48, kept  # y, groups, rows' names, 64-bit hash prefixes: no texts
    assert peak < 140, peak  # the index read lean: no identities, paths or stats


def test_a_sweep_sizes_its_evaluation_to_the_data_too(tmp_path, monkeypatch):
    """Above the threshold every run of a sweep is one held-out split, the runs are paired
    image by image (who is tied with the best, as computed here from their right/wrong bits),
    and the learning curve is on that split."""
    from pipeline.sweeping import run_sweep

    # a class of 3 images: the partition has 3 folds, so 1/3 is held out (not 1/5)
    rare = bench_store.CLASSES[9]
    kept = [r for i, r in enumerate(bench_store._rows(0, 600)) if r.label != rare or i < 30]
    path = layout.features_dir(tmp_path / "art") / "rare.h5"
    path.parent.mkdir(parents=True)
    bench_store.sync(path, kept, batch=97, channels=48, signal=0.6)
    layout.set_current(tmp_path / "art", path)
    monkeypatch.setenv("PIPELINE_HOLDOUT_ABOVE", "500")
    art = tmp_path / "art"
    out = run_sweep(art, "logreg,sgd,knn", "avg", "0", curve_points=2, log=lambda s: 0)
    runs = {r["run"]: r["cv"] for r in store_results(art)}
    assert len(runs) == 3 and all(c["protocol"] == "holdout" for c in runs.values())
    assert all(c["holdout_fraction"] == pytest.approx(1 / 3) for c in runs.values())
    # paired on the held-out images: each tie as computed here from the runs' bits
    best = runs[out["ranking"][0]["run"]]
    n = best["holdout_images"]
    right = stats.unpack_bits(best["holdout_right"], n)
    ties = []
    for row in out["ranking"][1:]:
        other = runs[row["run"]]
        hand = _paired_by_hand(right, stats.unpack_bits(other["holdout_right"], n))
        assert hand["d"] == pytest.approx(best["accuracy_mean"] - other["accuracy_mean"])
        assert row["tied_with_best"] is hand["tied"], (row["run"], hand)
        ties.append(hand["tied"])
    assert sorted(ties) == [False, True]  # knn is behind, sgd is not: both decisions made
    curve = out["learning_curve"]
    assert curve["protocol"] == "holdout" and curve["folds"] == 1
    # a training part holds 2 of the rare class's 3 images, the fewest a smaller point takes:
    # no smaller point, the ranked run's figure alone
    (last,) = curve["points"]
    assert last["the_ranked_run"] and last["same_folds"]
    assert last["accuracy_mean"] == best["accuracy_mean"]
    assert (last["low"], last["high"]) == (best["accuracy_low"], best["accuracy_high"])
    assert curve["advice"] == "too few images per class for a learning curve"


def test_a_held_out_learning_curve_is_scored_on_the_runs_held_out_images(tmp_path, monkeypatch):
    """The curve's last point is the held-out run's figure; its smaller point is fitted on part
    of that run's training images and scored on its held-out images, whose right/wrong bits the
    curve's estimator, refitted on the whole training part, gives back: a curve on another
    split (or with another head) next to the copied figure fails here."""
    from pipeline.sweeping import learning_curve

    path = synthetic(tmp_path, 600)
    monkeypatch.setenv("PIPELINE_HOLDOUT_ABOVE", "100")
    run = train_head(tmp_path / "art", "logreg", features=path, log=lambda s: 0)
    cv = run["cv"]
    assert cv["protocol"] == "holdout" and cv["holdout_fraction"] == pytest.approx(1 / 5)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # one job: its fit seen in this process
    seen: list[tuple] = []
    real = evaluate._fold

    def spy(est, X, y, groups, tr, te, *a):
        seen.append((est, tr, te))
        return real(est, X, y, groups, tr, te, *a)

    monkeypatch.setattr(evaluate, "_fold", spy)
    curve = learning_curve(path, "logreg", "avg", None, 0, points=2, run=run)
    assert curve["protocol"] == "holdout" and len(curve["points"]) == 2
    small, last = curve["points"]
    assert last["the_ranked_run"] and last["same_folds"] and small["fraction"] < 1
    assert last["accuracy_mean"] == cv["accuracy_mean"]
    ((est, sub, te),) = seen
    ts = load(path, "avg").train
    ((tr, held),), fid = evaluate.held_out(*evaluate.splits(ts, 5, 0))
    assert fid == cv["folds_id"]
    np.testing.assert_array_equal(te, held)
    assert len(te) == cv["holdout_images"] and set(sub.tolist()) < set(tr.tolist())
    w = stats.wilson(round(small["accuracy_mean"] * len(te)), len(te))
    assert (small["low"], small["high"]) == pytest.approx((w["low"], w["high"]), abs=1e-12)
    refit = real(est, ts.X, ts.y, ts.groups, tr, te)[0]
    assert stats.pack_bits(refit == ts.y[te]) == cv["holdout_right"]


def store_results(art):
    import json

    return [json.loads(p.read_text()) for p in layout.heads_dir(art).glob("*/result.json")]


def test_a_streaming_head_with_views_holds_a_few_bytes_per_row(tmp_path, spec):
    """With VIEWS the rows stay NumPy columns: views matched by 64-bit hash prefix (no dict of
    identities), a view's hash and path read through its image's row when asked."""
    import gc
    import tracemalloc

    from conftest import make_dataset

    from pipeline.features import extract
    from pipeline.train import load

    held = {}
    for n in (4, 4, 40):  # the first: imports and caches warm up
        data = make_dataset(tmp_path / f"d{n}", per_class=n, validation=0)
        s = extract(data, tmp_path / f"a{n}", spec, augment=1, log=lambda m: None)
        gc.collect()
        tracemalloc.start()
        with store.reading(s.cache.parent):
            ts = load(s.cache, "avg", views=1, lazy=True).train
            gc.collect()
            held[n] = tracemalloc.get_traced_memory()[0], len(ts.y)
        tracemalloc.stop()
    rows = held[40][1] - held[4][1]
    assert (held[40][0] - held[4][0]) / rows < 60, (held, (held[40][0] - held[4][0]) / rows)


def test_a_set_of_one_block_is_read_once_for_every_pass_and_learnt_alike(tmp_path, monkeypatch):
    """Rows that fit in one block are read from the cache once, however many passes sgd makes
    over them (hundreds on a small set); a worker is sent their names, never those features.
    Small blocks are learnt in one thread: the same head as with threads."""
    import pickle

    from pipeline import streaming

    path = synthetic(tmp_path, 300, channels=16)
    idx = store.read_index(path)
    R = rows.Rows.of_index(idx, np.arange(len(idx)), "avg")
    fresh = rows.Rows.of_index(idx, np.arange(len(idx)), "avg").load()
    rows.READ.update(rows=0, blocks=0)
    for seed in (1, 2, None):
        for pos, block in R.blocks(shuffle=seed):
            np.testing.assert_array_equal(block, fresh[pos])
            block[:] = -1  # a caller's change to a block reaches no later pass
    assert rows.READ["rows"] == len(R)
    assert pickle.loads(pickle.dumps(R))._whole is None
    one = streaming.StreamingSGD(alpha=1e-3, epochs=2, solver="sgd").fit(R, idx.labels)
    assert one.clf_.n_jobs == 1 and one.passes_ > 100
    monkeypatch.setattr(streaming, "PARALLEL_ROWS", 1)
    threads = streaming.StreamingSGD(alpha=1e-3, epochs=2, solver="sgd").fit(R, idx.labels)
    assert threads.clf_.n_jobs > 1 or (os.cpu_count() or 1) == 1
    np.testing.assert_allclose(one.predict_proba(fresh), threads.predict_proba(fresh))


def test_sgd_on_a_small_set_reaches_logistic_regression_on_the_same_folds(tmp_path):
    """A few hundred rows: sgd's objective is solved to its optimum (one block, `ExactOvR`),
    with the penalty grid logreg's C grid means at this size, so the two heads are within
    0.02 on the same folds (a few hundred SGD passes with the fixed grid were 0.04 behind)."""
    synthetic(tmp_path, 300, channels=64, signal=0.6)
    art = tmp_path / "art"
    logreg = train_head(art, "logreg", folds=5, repeats=1, log=lambda s: 0)
    sgd = train_head(art, "sgd", folds=5, repeats=1, log=lambda s: 0)
    assert sgd["cv"]["folds_id"] == logreg["cv"]["folds_id"]
    assert 0.6 < logreg["cv"]["accuracy_mean"] < 0.95
    assert abs(sgd["cv"]["accuracy_mean"] - logreg["cv"]["accuracy_mean"]) <= 0.02, (
        sgd["cv"]["accuracy_mean"],
        logreg["cv"]["accuracy_mean"],
    )
    assert sgd["final_params"]["alpha"] in heads.streaming.alphas_for(300)
