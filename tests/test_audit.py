"""Know your data: label errors, near-duplicates, outliers and calibration on known answers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from pipeline import diagnose as audit


def clustered(n: int = 600, k: int = 4, d: int = 16, seed: int = 0, sep: float = 3.0):
    """Classes as Gaussian clusters, well separated but not trivially (smaller `sep`: overlap)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, sep, (k, d))
    y = np.repeat(np.arange(k), n // k)
    return centres[y] + rng.normal(0, 1.5, (len(y), d)), y


def oof(X, y, seed=0):
    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    return cross_val_predict(LogisticRegression(max_iter=1000), X, y, cv=cv, method="predict_proba")


@pytest.mark.parametrize("seed", [0, 1])
def test_flipped_labels_are_found_and_ranked_first(seed):
    X, y = clustered(seed=seed)
    rng = np.random.default_rng(seed + 10)
    flip = rng.choice(len(y), size=len(y) * 5 // 100, replace=False)  # 5 % of labels wrong
    noisy = y.copy()
    noisy[flip] = (y[flip] + rng.integers(1, 4, len(flip))) % 4
    probs = oof(X, noisy)
    found = audit.label_issues(noisy, probs)
    truth = np.zeros(len(y), bool)
    truth[flip] = True
    precision = (found & truth).sum() / max(1, found.sum())
    recall = (found & truth).sum() / truth.sum()
    assert precision >= 0.8 and recall >= 0.7, (precision, recall)
    auroc = roc_auc_score(truth, -audit.normalized_margin(noisy, probs))
    assert auroc >= 0.95
    clean = audit.label_issues(y, oof(X, y))
    assert clean.mean() <= 0.02  # a clean set flags few
    v = audit.vote(noisy, [probs, oof(X, noisy, seed=5)])
    assert (v["flagged"] & truth).sum() >= 0.7 * truth.sum()
    assert (v["suggested"][flip] == y[flip]).mean() >= 0.8  # the suggestion is the true class
    pairs = audit.swapped_pairs(noisy, v["suggested"], v["flagged"], 4)
    assert pairs.sum() == v["flagged"].sum() and np.trace(pairs) == 0


def test_the_confident_joint_sums_to_the_counts():
    X, y = clustered()
    j = audit.confident_joint(y, oof(X, y))
    np.testing.assert_allclose(j.sum(axis=1), np.bincount(y), rtol=1e-6)
    assert np.trace(j) > 0.9 * len(y)


def test_near_copies_are_one_set_and_other_images_are_not():
    rng = np.random.default_rng(0)
    X = np.abs(rng.normal(size=(300, 64))).astype(np.float32)
    copies = X[:20] * 1.02 + rng.normal(0, 0.01, (20, 64)).astype(np.float32)
    Y = np.vstack([X, copies])
    dist, idx = audit.neighbours(Y, 5)
    sets, threshold = audit.near_duplicates(dist, idx)
    assert threshold > 0
    for i in range(20):  # each original with its near copy, alone together
        assert sets[i] >= 0 and sets[i] == sets[300 + i]
        assert (sets == sets[i]).sum() == 2
    assert (sets[20:300] == -1).all()


def test_images_of_another_kind_are_the_outliers():
    rng = np.random.default_rng(0)
    X = np.abs(rng.normal(size=(400, 32)))
    X[:, :4] += 3  # every image shares some structure
    odd = np.abs(rng.normal(size=(8, 32)))
    odd[:, -4:] += 6  # another kind of image
    score = audit.outlier_scores(audit.neighbours(np.vstack([X, odd]), 10)[0])
    assert set(np.argsort(-score)[:8]) == set(range(400, 408))


def test_an_over_confident_head_gets_a_temperature_above_one_and_a_lower_ece():
    X, y = clustered(n=800, seed=3, sep=0.6)  # classes overlap: a head makes mistakes
    probs = audit.scaled(oof(X, y), 0.25)  # sharpened: over-confident
    half = np.arange(len(y)) % 2 == 0
    t = audit.fit_temperature(y[half], probs[half])  # fitted on one half, measured on the other
    assert t > 1.5
    before = audit.calibration(y[~half], probs[~half])
    after = audit.calibration(y[~half], audit.scaled(probs[~half], t))
    assert after["ece"] < before["ece"] * 0.6 and after["brier"] < before["brier"]
    assert sum(b["count"] for b in before["reliability"]) == (~half).sum()
    under = audit.fit_temperature(y, audit.scaled(oof(X, y), 3.0))  # under-confident
    assert under < 1


def test_a_runs_calibration_is_cross_fitted_and_applied_only_where_it_helps():
    """`calibrate` (what train-head records and predict applies): an over-confident head's
    temperature is above 1, measured on folds it was not fitted on, and applied; a
    calibrated head's is not applied."""
    X, y = clustered(n=800, seed=3, sep=0.6)
    folds = np.zeros(len(y), np.int64)
    for i, (_, te) in enumerate(StratifiedKFold(5, shuffle=True, random_state=0).split(X, y)):
        folds[te] = i
    raw = oof(X, y)
    sharp = audit.calibrate(y, [audit.scaled(raw, 0.25)], [folds])
    assert sharp["applied"] and sharp["temperature"] > 1.5 and sharp["confidence"] == "over"
    assert sharp["ece_scaled"] < 0.6 * sharp["ece"] and len(sharp["fold_temperatures"]) == 5
    # cross-fitted: each fold's temperature comes from the other folds' probabilities
    other = folds != 2
    t2 = audit.fit_temperature(y[other], audit.scaled(raw, 0.25)[other])
    assert sharp["fold_temperatures"][2] == pytest.approx(t2)
    # labels drawn from the probabilities themselves: calibrated by construction
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (4000, 4))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    drawn = np.array([rng.choice(4, p=row) for row in p])
    fine = audit.calibrate(drawn, [p], [np.arange(4000) % 5])
    assert not fine["applied"] and fine["temperature"] == 1.0
    assert abs(np.log(fine["temperature_fitted"])) < 0.05


def test_the_approximate_search_finds_the_exact_neighbours_and_never_the_row_itself():
    """Blocks of exact search (the audit above 50,000 rows): recall@10 against exact search on
    clustered rows, each row's own index never among its neighbours, distances ascending."""
    from pipeline import neighbours

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (40, 32))
    X = neighbours.space(centres[rng.integers(0, 40, 4000)] + rng.normal(0, 1, (4000, 32)))
    dist, idx = neighbours.approximate(X, 10, seed=0)
    _, exact = neighbours.neighbours(X, 10)
    assert neighbours.recall_at(idx, exact) >= 0.95
    assert not (idx == np.arange(len(X))[:, None]).any()
    assert (np.diff(dist, axis=1) >= 0).all()
    # searched as the audit does above its exact limit, the same answer
    d2, i2 = neighbours.search(X, 10, exact_up_to=1000)
    np.testing.assert_array_equal(i2, idx)
    q = X[:50] + 0.01
    _, iq = neighbours.approximate(X, 5, q)
    _, eq = neighbours.neighbours(X, 5, q)
    assert neighbours.recall_at(iq, eq) >= 0.95


def _field(seed: int, px: int = 64) -> np.ndarray:
    """A smooth random colour field: an image of its own content."""
    from scipy.ndimage import gaussian_filter

    r = np.random.default_rng(seed)
    f = np.stack([gaussian_filter(r.normal(size=(px, px)), r.uniform(1.5, 5)) for _ in range(3)])
    return ((f - f.min()) / np.ptp(f) * 255).transpose(1, 2, 0).astype(np.uint8)


def test_a_mirrored_image_has_the_same_signature_and_other_images_do_not():
    import io

    from PIL import Image

    from pipeline import signature

    images = [_field(s) for s in range(30)]
    S = signature.of_arrays(images).astype(np.float32)
    assert S.dtype == np.float32 and np.allclose(np.linalg.norm(S, axis=1), 1, atol=1e-2)
    d = np.linalg.norm(S[:, None] - S[None], axis=2) + np.eye(len(S)) * 9
    apart = d.min()  # the nearest two different images
    for a in images[:5]:
        im = Image.fromarray(a)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=60)
        copies = [
            im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
            im.resize((40, 40)),
            Image.open(buf),
        ]
        own = signature.of_array(a)
        for c in copies:
            gap = np.linalg.norm(signature.of_array(np.asarray(c.convert("RGB"))) - own)
            assert gap < 0.2 * apart, (gap, apart)
    mirror = np.asarray(Image.fromarray(images[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    np.testing.assert_allclose(signature.of_array(mirror), signature.of_array(images[0]), atol=1e-5)
    assert np.abs(signature.of_array(np.zeros((8, 8, 3), np.uint8))).sum() == 0  # flat: none


def test_signature_pairs_skip_rows_without_one():
    from pipeline import diagnose

    rng = np.random.default_rng(0)
    S = rng.normal(size=(40, 8)).astype(np.float32)
    S /= np.linalg.norm(S, axis=1, keepdims=True)
    S[1] = S[0]  # a copy
    S[10:14] = 0  # four rows without a signature: near each other (0 apart), never paired
    from pipeline import neighbours

    dist, idx = neighbours.neighbours(S, 5)
    r, c, _ = diagnose.near_pairs(dist, idx, diagnose.SIGNATURE_RATIO, valid=S.any(axis=1))
    assert {(int(a), int(b)) for a, b in zip(r, c, strict=True)} == {(0, 1), (1, 0)}


def test_no_near_duplicate_sets_make_an_empty_list():
    from pipeline import auditing

    sets = np.full(5, -1)
    assert auditing._near_sets(sets, np.zeros(5, bool), np.zeros(5, int), None, ["a"]) == []


def test_a_pass_over_a_caches_rows_opens_each_segment_about_once(tmp_path, monkeypatch):
    """The space, the signatures and a run's hashes are read in the order the files hold the
    rows: blocks in position (content) order would open every segment for every block."""
    from pipeline import layout, near, neighbours, oof
    from pipeline.bench import store as bench_store
    from pipeline.store import rows as rows_mod
    from pipeline.store.segments import Meta
    from pipeline.store.writer import Writer
    from pipeline.train import load

    path = layout.features_dir(tmp_path) / "c.h5"
    path.parent.mkdir(parents=True)
    rows = bench_store._rows(0, 240)
    key = bench_store._key()
    w = Writer(path, key, bench_store.STAMP, maps=False, dtype="float16", log=lambda s: None)
    for a in range(0, 240, 40):  # six batches: six segments, rows spread by content
        part = rows[a : a + 40]
        meta = Meta.of_rows(part)
        v = bench_store._vectors([r.ident for r in part], 16)
        w.add_batch(meta, {"avg": v, "max": v}, None, [])
    w.commit(rows, bench_store.CLASSES, [], bench_store._attrs(key, 16), same_source=True)
    ts = load(path, "avg", lazy=True).train
    segments = len(set(ts.X.seg.tolist()))
    assert segments >= 3
    opened = [0]
    real = rows_mod.open_segment

    def counting(p):
        opened[0] += 1
        return real(p)

    monkeypatch.setattr(rows_mod, "open_segment", counting)
    monkeypatch.setattr(rows_mod, "BUFFER_BYTES", 16 * 4 * 20)  # blocks of 20 rows: 12 blocks
    X = neighbours.space_of([ts.X], tmp_path)
    assert opened[0] <= 12 + segments  # each block within about one segment
    np.testing.assert_array_equal(X, neighbours.space(ts.X.load()))  # every row in its place
    opened[0] = 0
    near.signature_edges([ts.X], tmp_path)
    assert opened[0] <= 240 // 65_536 + 1 + segments
    every = oof.OOF.of(np.ones(len(ts.y), bool), ts.y, 10)
    every.start()
    every.put(np.arange(len(ts.y)), np.full((len(ts.y), 10), 0.1, np.float32), 0)
    opened[0] = 0
    every.save(tmp_path, ts.sha256, block=20)
    assert opened[0] <= 12 + segments
    assert list(oof.load(tmp_path).sha256) == [h.encode() for h in ts.sha256.take(np.arange(240))]


def test_copied_rows_keep_their_signatures_and_older_rows_have_none(tmp_path):
    """A merge of a segment written before signatures were kept with one written after: each
    row keeps its own (NaN: none), in its place, on both of `copy_rows`' paths."""
    import h5py

    from pipeline.store.format import SIGNATURE
    from pipeline.store.segment_writer import copy_rows, write_segment
    from pipeline.store.segments import Meta, open_segment

    def meta(lo: int, n: int) -> Meta:
        return Meta(
            [f"{i:064x}#0" for i in range(lo, lo + n)], [f"p{i}.png" for i in range(lo, lo + n)],
            ["a"] * n, ["train"] * n, [0] * n, [(i, i, i) for i in range(lo, lo + n)],
        )  # fmt: skip

    rng = np.random.default_rng(0)
    v = rng.random((10, 4)).astype(np.float32)
    sig = rng.random((6, 64)).astype(np.float16)
    old = write_segment(tmp_path, "k", meta(0, 4), {"avg": v[:4], "max": v[:4]}, None, [], {}, "s")
    with h5py.File(tmp_path / old, "a") as f:
        del f[SIGNATURE]  # as written before signatures were kept
    new = write_segment(
        tmp_path, "k", meta(4, 6), {"avg": v[4:], "max": v[4:], SIGNATURE: sig}, None, [], {}, "s"
    )
    sources = [(new, np.array([5, 1, 3]), None), (old, np.array([2, 0]), None)]
    for limit in (100, 2):  # gathered in memory and written once; streamed into segments
        out = copy_rows(tmp_path, "k", sources, {}, "s", "", limit)
        got, avg = [], []
        for name, _ in out:
            with open_segment(tmp_path / name) as f:
                got.append(f[SIGNATURE][...])
                avg.append(f["pooled/avg"][...])
        got, avg = np.concatenate(got), np.concatenate(avg)
        assert len(got) == 5
        # each source's rows come out in their stored order: the signature beside its vector
        np.testing.assert_array_equal(avg[:3], v[4 + np.array([1, 3, 5])])
        np.testing.assert_array_equal(got[:3], sig[[1, 3, 5]])
        np.testing.assert_array_equal(avg[3:], v[[0, 2]])
        assert np.isnan(got[3:]).all()


def test_a_space_with_rows_of_zeros_is_searched_without_a_copy(tmp_path):
    from pipeline import neighbours

    X = np.lib.format.open_memmap(tmp_path / "s.npy", "w+", np.float32, (100, 8))
    X[:] = neighbours.normalize(np.random.default_rng(0).normal(size=(100, 8)))
    X[10:20] = 0  # rows without a signature
    assert np.shares_memory(neighbours.normalize(X), X)


def test_the_signature_search_is_the_same_however_the_cache_is_laid_out(tmp_path, monkeypatch):
    """The same rows written in two orders (other segments, other rows in each): the searched
    signatures are the same matrix, row for row, and so are the pairs (rows without one, or a
    flat one, left out in both)."""
    from pipeline import layout, near, neighbours
    from pipeline.bench import store as bench_store
    from pipeline.store.format import SIGNATURE
    from pipeline.store.segments import Meta
    from pipeline.store.writer import Writer
    from pipeline.train import load

    rows = bench_store._rows(0, 120)
    rng = np.random.default_rng(0)
    sig = rng.normal(size=(120, 64)).astype(np.float32)
    sig /= np.linalg.norm(sig, axis=1, keepdims=True)
    sig[7] = sig[3]  # a copy
    sig[20:30] = np.nan  # embedded before signatures were kept
    sig[40] = 0  # a flat image
    sig = sig.astype(np.float16)

    def build(name: str, order: np.ndarray):
        path = layout.features_dir(tmp_path / name) / "c.h5"
        path.parent.mkdir(parents=True)
        key = bench_store._key()
        w = Writer(path, key, bench_store.STAMP, maps=False, dtype="float16", log=lambda s: None)
        for a in range(0, 120, 25):
            ix = order[a : a + 25]
            part = [rows[i] for i in ix]
            meta = Meta.of_rows(part)
            v = bench_store._vectors([r.ident for r in part], 8)
            w.add_batch(meta, {"avg": v, "max": v, SIGNATURE: sig[ix]}, None, [])
        w.commit(rows, bench_store.CLASSES, [], bench_store._attrs(key, 8), same_source=True)
        return load(path, "avg", lazy=True).train.X

    searched: list[np.ndarray] = []
    real = neighbours.search

    def spy(X, *a, **k):
        searched.append(np.array(X))
        return real(X, *a, **k)

    monkeypatch.setattr(neighbours, "search", spy)
    monkeypatch.setattr(neighbours, "EXACT_UP_TO", 10)  # the approximate search: order-bound
    one = near.signature_edges([build("a", np.arange(120))], tmp_path)
    two = near.signature_edges([build("b", rng.permutation(120))], tmp_path)
    assert len(searched[0]) == 120 - 10 - 1
    np.testing.assert_array_equal(searched[0], searched[1])
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])
    assert one[2] == two[2] == 10 and len(one[0]) >= 2
