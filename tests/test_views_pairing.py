"""Augmented views paired with their images by content: by 64-bit hash prefix for a streaming
head (no dict of identities), every pair confirmed on the whole hash, so two contents sharing
a prefix are never confused; the same rows as the in-memory heads get."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import layout, store, views
from pipeline.bench import store as bench_store
from pipeline.cache_identity import augment_settings
from pipeline.errors import UserError
from pipeline.store.segments import Meta
from pipeline.store.writer import Row, Writer
from pipeline.train import load, train_head

PREFIX = "0123456789abcdef"  # 16 hex digits: the 64 bits two crafted contents share
A, B = PREFIX + "a" * 48, PREFIX + "b" * 48
COPY = bench_store._hash(1000)  # one content at two paths (identical files)


def _write(path, rows: list[Row], code: dict[str, float], settings: dict) -> None:
    """A cache of `rows` through the store's writer; a row's pooled vector is `code[ident]`
    everywhere, so a row read back names the content and view it was written for."""
    key = store.cache_key(settings)
    w = Writer(path, key, bench_store.STAMP, maps=False, dtype="float16", log=lambda s: None)
    todo = list({r.ident: r for r in rows}.values())
    meta = Meta(
        [r.ident for r in todo], [r.path for r in todo], [r.label for r in todo],
        [r.split for r in todo], [r.view for r in todo], [r.stat for r in todo],
    )  # fmt: skip
    v = np.repeat(np.array([[code[r.ident]] for r in todo], np.float32), 8, axis=1)
    for a in range(0, len(todo), 7):  # several segments: rows read from more than one file
        w.add_batch(
            meta.take(range(a, min(a + 7, len(todo)))),
            {"avg": v[a : a + 7], "max": v[a : a + 7]},
            None,
            [],
        )
    attrs = {**bench_store._attrs(key, 8), "settings": settings}
    w.commit(rows, bench_store.CLASSES, [], attrs, same_source=True)


def _caches(tmp_path, images: list[tuple[str, str, str]], view_rows: list[tuple[str, int]]):
    """The images' cache (path, content, class) and its views cache (content, view) in that
    row order; a content's code is its position, plus the view number / 10 for a view."""
    path = layout.features_dir(tmp_path / "art") / "c.h5"
    path.parent.mkdir(parents=True)
    order = list(dict.fromkeys(h for _, h, _ in images))
    code = {h: float(i) for i, h in enumerate(order)}
    rows = [Row(p, h, c, "train", 0, (i, i, i)) for i, (p, h, c) in enumerate(images)]
    settings = bench_store._settings()
    _write(path, rows, code, settings)
    paths = {h: p for p, h, _ in images}
    vrows, vcode = [], {}
    for i, (h, v) in enumerate(view_rows):
        ident = store.ident(h, v)
        vcode[ident] = code.get(h, 500.0) + v / 10
        vrows.append(Row(f"{paths.get(h, 'gone.png')}~{i}", ident, "c0", "train", v, (i, 0, 0)))
    _write(layout.augment_path(path), vrows, vcode, augment_settings(settings, 0))
    layout.set_current(tmp_path / "art", path)
    return path, code


@pytest.mark.parametrize("block", [1, 2, 3, views.BLOCK])  # images searched a block at a time
def test_pair_matches_by_key_confirms_every_candidate_and_takes_the_last_copy(block, monkeypatch):
    monkeypatch.setattr(views, "BLOCK", block)
    image = np.array([5, 7, 7, 9], np.uint64)  # images 1 and 2 share a key, not a content
    full = ["p", "q", "r", "s"]  # the whole identities
    vkey = np.array([7, 7, 5, 9, 5, 9, 7], np.uint64)
    vfull = ["r", "q", "p", "x", "p", "s", "q"]  # row 3: a stale view sharing image 3's key
    vno = np.array([1, 1, 1, 1, 1, 2, 1])

    def same(i, r):
        return np.array([full[a] == vfull[b] for a, b in zip(i, r, strict=True)])

    src, rows, missing = views.pair(image, vkey, vno, 1, same)
    assert src.tolist() == [0, 1, 2, 3]
    assert rows.tolist() == [4, 6, 0, -1]  # q's and r's rows crossed; p's and q's last copy
    assert missing.tolist() == [3]  # its only candidate is another content: refused
    src, rows, missing = views.pair(image, vkey, vno, 2, same)
    assert missing.tolist() == [0, 1, 2, 3]  # view 2 of s only: s lacks view 1
    assert rows.reshape(4, 2)[3].tolist() == [-1, 5]
    # whole hashes as keys: no confirmation needed, a copy's last row still taken
    keys = np.array(full)
    src, rows, missing = views.pair(keys, np.array(vfull), vno, 1)
    assert rows.tolist() == [4, 6, 0, -1] and missing.tolist() == [3]


@pytest.fixture
def crafted(tmp_path):
    """Two contents sharing a 64-bit prefix (their views written in the other order), an
    identical copy at two paths, and filler images so that folds can be drawn."""
    images = [(f"c{i % 3}/{i:03d}.jpg", bench_store._hash(i), f"c{i % 3}") for i in range(45)]
    images += [("c0/a.jpg", A, "c0"), ("c1/b.jpg", B, "c1")]
    images += [("c2/copy1.jpg", COPY, "c2"), ("c2/copy2.jpg", COPY, "c2")]
    contents = list(dict.fromkeys(h for _, h, _ in images))
    view_rows = [(B, 1), (B, 2), (A, 2), (A, 1)]  # B's before A's: a prefix alone would mix
    view_rows += [(h, v) for h in contents if h not in (A, B) for v in (1, 2)]
    view_rows += [(COPY, 1), (COPY, 2)]  # the copy's views written twice (two paths)
    return _caches(tmp_path, images, view_rows)


def test_views_of_contents_sharing_a_prefix_pair_with_their_own_image(crafted):
    path, code = crafted
    with store.reading(path.parent):
        lazy = load(path, "avg", views=2, lazy=True).train
        assert isinstance(lazy.X, store.Rows) and isinstance(lazy.sha256, store.WithViews)
        X = lazy.X.load()
    mem = load(path, "avg", views=2).train
    n = int(mem.original.sum())
    assert n == 49 and len(mem.y) == 3 * n
    sha = store.texts(lazy.sha256, np.arange(len(lazy.y)))
    paths = store.texts(lazy.paths, np.arange(len(lazy.y)))
    for j in np.flatnonzero(~mem.original):  # each view: its own image's content and view
        v = round(10 * (X[j, 0] % 1))
        assert X[j, 0] == pytest.approx(code[sha[j]] + v / 10, abs=1e-3), (j, sha[j])
        assert v in (1, 2)
    for h, label in ((A, 0), (B, 1)):
        rows = [j for j in range(len(sha)) if sha[j] == h]
        assert len(rows) == 3 and all(lazy.y[j] == label for j in rows)
        assert sorted(round(float(X[j, 0] % 1), 1) for j in rows) == [0.0, 0.1, 0.2]
    # the in-memory heads get the very same rows, labels, groups and texts
    np.testing.assert_array_equal(X, mem.X)
    for k in ("y", "groups", "original"):
        np.testing.assert_array_equal(getattr(lazy, k), getattr(mem, k))
    assert sha == mem.sha256 and paths == mem.paths
    assert paths[n:] == [mem.paths[i] for i in np.repeat(np.arange(n), 2)]  # the image's path


def test_a_streaming_head_with_views_keeps_the_same_folds_and_mistakes(crafted, monkeypatch):
    from pipeline import evaluate, streaming

    real = streaming.passes  # a few passes over the small set: the folds are the point
    monkeypatch.setattr(streaming, "passes", lambda e, rows, u=0: real(e, rows, 1000))
    fits: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    real_fold = evaluate._fold

    def spy(est, X, y, groups, tr, te, *a):  # each fold as the head gets it (n_jobs=1: here)
        rows = X[tr]
        x = np.asarray(rows.load() if hasattr(rows, "load") else rows)[:, 0]
        fits.append((np.asarray(groups)[tr], np.asarray(groups)[te], x, y[tr]))
        return real_fold(est, X, y, groups, tr, te, *a)

    monkeypatch.setattr(evaluate, "_fold", spy)
    path, _ = crafted
    art = path.parent.parent
    kw = {"folds": 3, "repeats": 1, "n_jobs": 1, "log": lambda s: 0}
    plain = train_head(art, "logreg", params={"C": "1"}, **kw)
    kw["views"] = 2
    logreg = train_head(art, "logreg", params={"C": "1"}, **kw)
    sgd = train_head(art, "sgd", params={"alpha": "0.01"}, **kw)
    assert plain["n_train_rows"] == 49  # the images alone
    assert sgd["n_train_rows"] == logreg["n_train_rows"] == 3 * 49  # each with its 2 views
    assert sgd["cv"]["folds_id"] == logreg["cv"]["folds_id"] == plain["cv"]["folds_id"]
    for k in ("oof_sha256", "oof_paths", "oof_true"):
        assert sgd["cv"][k] == logreg["cv"][k] == plain["cv"][k]
    assert {A, B, COPY} <= set(sgd["cv"]["oof_sha256"])
    # every training fold: its images' views (their own features: view v reads code + v/10)
    # and never a view of a test-fold image; a test fold: images only
    assert len(fits) == 9
    for i, (g_tr, g_te, x, y_tr) in enumerate(fits):
        images, of_views = g_tr >= 0, g_tr < 0
        mine = set(views.content(g_tr[images]).tolist())
        assert (g_te >= 0).all() and not mine & set(g_te.tolist())
        frac = np.round(10 * (x % 1)).astype(int)
        if i < 3:  # the run without views: images alone
            assert not of_views.any() and (frac == 0).all()
            continue
        assert set(views.content(g_tr[of_views]).tolist()) == mine
        assert of_views.sum() == 2 * images.sum()
        assert (frac[images] == 0).all() and sorted(set(frac[of_views].tolist())) == [1, 2]
        for c in mine:  # each image's views: both of them, with its label
            rows = views.content(g_tr) == c
            assert sorted(frac[rows].tolist()) == sorted([0, 1, 2] * (rows.sum() // 3))
            assert len(set(y_tr[rows].tolist())) == 1


def test_a_stale_view_sharing_an_images_prefix_is_not_its_view(tmp_path):
    """Image A has no views; the views cache holds B's (B is no image now, its prefix is A's):
    A is refused as lacking its views, by either kind of head."""
    images = [(f"c{i % 3}/{i:03d}.jpg", bench_store._hash(i), f"c{i % 3}") for i in range(6)]
    path, _ = _caches(
        tmp_path,
        images + [("c0/a.jpg", A, "c0")],
        [(B, 1)] + [(bench_store._hash(i), 1) for i in range(6)],
    )
    for lazy in (True, False):
        with store.reading(path.parent), pytest.raises(UserError, match=r"^1 training image"):
            load(path, "avg", views=1, lazy=lazy)
