"""Augmented views: cached once like originals, never split across folds, scored on originals."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_dataset, write_image

from pipeline import evaluate, heads, images, runs, store, views
from pipeline.errors import UserError
from pipeline.features import extract
from pipeline.layout import augment_path
from pipeline.train import train_head


@pytest.fixture
def augmented(tmp_path, spec, quiet):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=6, validation=2)
    art = tmp_path / "art"
    s = extract(data, art, spec, augment=2, log=log)
    return data, art, s


def test_views_are_cached_once(augmented, spec, quiet):
    data, art, s = augmented
    log, _ = quiet
    assert s.augmented.new == 18 * 2
    a = store.read_index(augment_path(s.cache))
    assert sorted(set(a.view)) == [1, 2] and set(a.split) == {"train"}
    again = extract(data, art, spec, augment=2, log=log)
    assert again.new == 0 and again.augmented.new == 0
    more = extract(data, art, spec, augment=3, log=log)
    assert more.new == 0 and more.augmented.new == 18  # only view 3 is new
    write_image(data / "train/class_0/added.png", 0, 321)
    one = extract(data, art, spec, augment=3, log=log)
    assert (one.new, one.augmented.new) == (1, 3)


def test_views_are_seeded_per_image_and_view():
    arr = np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)
    a = images.augment(arr, images.view_rng(0, "ab" * 32, 1))
    b = images.augment(arr, images.view_rng(0, "ab" * 32, 1))
    c = images.augment(arr, images.view_rng(0, "ab" * 32, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and a.shape == arr.shape


def test_every_split_inside_a_fold_keeps_views_together(monkeypatch):
    """Outer folds, the grid search's inner folds and the calibration folds all respect groups.

    C is tuned (not fixed), so the inner splits really run; on random labels, a split that put
    one image's views on both sides would let the grid search and the score see through it.
    """
    rng = np.random.default_rng(0)
    n, k = 50, 5
    content = np.repeat(np.arange(n), k)
    y = np.repeat(rng.integers(0, 3, n), k)  # random labels
    X = np.repeat(rng.normal(size=(n, 20)), k, axis=0) + rng.normal(0, 0.01, (n * k, 20))
    sha = [f"{g:064x}" for g in content]
    original = np.tile([True] + [False] * (k - 1), n)
    groups = np.where(original, content, views.mark(content))  # as train._with_views marks them
    inner: list[tuple[np.ndarray, np.ndarray]] = []
    real_split = heads.InnerCV.split

    def recording(self, X, y=None, groups=None):
        for tr, te in real_split(self, X, y, groups):
            inner.append((np.asarray(groups)[tr], np.asarray(groups)[te]))
            yield tr, te

    weights: list[np.ndarray | None] = []

    class Calibrating(heads.CalibratedClassifierCV):
        def fit(self, X, y, sample_weight=None, **kw):
            weights.append(sample_weight)
            return super().fit(X, y, sample_weight=sample_weight, **kw)

    monkeypatch.setattr(heads.InnerCV, "split", recording)
    monkeypatch.setattr(heads, "CalibratedClassifierCV", Calibrating)
    for name in ("logreg", "svm"):
        inner.clear()
        ts = evaluate.TrainSet(X, y, groups, original, sha)
        cv = evaluate.cross_validate(
            heads.make(heads.get(name), {}, 0), ts, ["a", "b", "c"], 3, 0, log=lambda s: None
        )
        assert inner, f"{name}: no inner split ran"
        assert all(not set(views.content(a)) & set(views.content(b)) for a, b in inner), (
            f"{name}: an image (or one of its views) on both sides"
        )
        marked = [(a, b) for a, b in inner if (a < 0).any()]  # the grid search's splits
        assert marked, f"{name}: views left out of the inner training folds"
        assert all((b >= 0).all() for _, b in marked), f"{name}: an inner fold scored a view"
        if name == "svm":  # calibration: a partition (views in it), views weighing nothing
            assert weights and all(w is not None and 0 < w.sum() == len(w) / k for w in weights), (
                "the calibration was fitted on views"
            )
        assert all(len(p) == 1 and "C" in p for p in cv["fold_params"])  # tuned in every fold
        assert len(cv["oof_pred"]) == n  # scored on originals only
        assert cv["accuracy_mean"] < 0.6  # chance is 1/3; leaking views would give ~1.0
    for tr, te in evaluate.splits(ts, 3, 0)[0]:
        assert not set(content[tr]) & set(content[te]) and original[te].all()
        assert (~original[tr]).sum() == (k - 1) * original[tr].sum()  # every view trains


def test_train_with_views(augmented, quiet):
    _, art, _ = augmented
    log, _ = quiet
    r = train_head(art, "logreg", folds=3, views=2, log=log)
    assert r["views"] == 2 and r["n_train"] == 18 and r["n_train_rows"] == 54
    assert len(r["cv"]["oof_pred"]) == 18
    assert r["run"].startswith("logreg-avg-views=2--")
    with pytest.raises(UserError, match="run `make features AUGMENT=5 SEED=0`"):
        train_head(art, "logreg", folds=3, views=5, log=log)


def test_backbone_runs_once_per_image_and_view(tmp_path, spec, quiet):
    """Counted at the model: reruns, more heads and views never re-embed the same input."""
    from pipeline.backbone import build

    log, _ = quiet
    real = build(spec)
    seen: list[int] = []

    class Counting:
        def predict_on_batch(self, x):
            seen.append(len(x))
            return real.predict_on_batch(x)

    data = make_dataset(tmp_path / "data", per_class=4, validation=1)
    art = tmp_path / "art"
    for _ in range(2):
        extract(data, art, spec, augment=2, log=log, model=Counting())
    train_head(art, "logreg", folds=2, views=2, log=log)
    train_head(art, "svm", folds=2, views=1, log=log)
    extract(data, art, spec, augment=2, log=log, model=Counting())
    assert sum(seen) == 15 + 12 * 2  # 15 originals, 2 views of the 12 training images


def test_a_views_run_is_bound_to_its_views(augmented, spec, quiet, monkeypatch):
    """Recorded by key and content; stale once its views cache is embedded again or changes."""
    data, art, s = augmented
    log, _ = quiet
    vfile = augment_path(s.cache)
    with_views = train_head(art, "logreg", folds=3, views=2, log=log)
    plain = train_head(art, "logreg", folds=3, log=log)

    def state():
        return {r["run"]: (r["current"], r["stale_reason"]) for r in runs.list_runs(art)}

    rec, attrs = with_views["features"]["augmented"], store.read_attrs(vfile)
    assert (rec["file"], rec["cache_key"], rec["data_id"]) == (
        vfile.name,
        attrs["cache_key"],
        attrs["data_id"],
    )
    assert state()[with_views["run"]] == (True, "")
    # the views embedded again by another augmentation: same file, another key
    monkeypatch.setitem(images.AUGMENT_POLICY, "rotation_degrees", 30.0)
    extract(data, art, spec, augment=2, log=log)
    ok, why = state()[with_views["run"]]
    assert not ok and f"augmented views in '{vfile.name}' were embedded again" in why
    assert state()[plain["run"]] == (True, "")  # the originals did not change
    monkeypatch.undo()
    extract(data, art, spec, augment=2, log=log)  # the same views as trained on, again
    assert state()[with_views["run"]] == (True, "")
    extract(data, art, spec, augment=3, log=log)  # other content: a third view per image
    ok, why = state()[with_views["run"]]
    assert not ok and f"augmented views cache '{vfile.name}' holds other views" in why
    train_head(art, "logreg", folds=3, views=2, log=log)
    assert state()[with_views["run"]] == (True, "")  # the same name, trained again
    vfile.unlink()
    ok, why = state()[with_views["run"]]
    assert not ok and "gone or damaged" in why
    assert state()[plain["run"]] == (True, "")


def test_inner_selection_of_a_views_run_scores_originals_only(augmented, quiet, monkeypatch):
    """Through train_head: the grid search's inner test folds hold no view, its training some."""
    _, art, _ = augmented
    log, _ = quiet
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    real_split = heads.InnerCV.split

    def recording(self, X, y=None, groups=None):
        for tr, te in real_split(self, X, y, groups):
            seen.append((np.asarray(groups)[tr], np.asarray(groups)[te]))
            yield tr, te

    monkeypatch.setattr(heads.InnerCV, "split", recording)
    train_head(art, "logreg", folds=3, views=2, log=log, n_jobs=1)  # the spy sees every fold
    assert len(seen) >= 3 * 3  # inner folds of every outer fold (and the final fit)
    assert all((te >= 0).all() and (tr < 0).any() for tr, te in seen)
    assert all(not set(views.content(tr)) & set(views.content(te)) for tr, te in seen)


def test_early_stopping_holds_out_original_images_only():
    from pipeline.keras_heads import DenseHead

    n, k = 40, 3
    content = np.repeat(np.arange(n), k)
    original = np.tile([True] + [False] * (k - 1), n)
    groups = np.where(original, content, views.mark(content))
    yi = np.repeat(np.arange(n) % 2, k)
    X = np.arange(n * k, dtype=np.float32)[:, None]  # each row's number
    fX, _, val = DenseHead(validation_fraction=0.25)._split(X, yi, groups)
    held, kept = val[0][:, 0].astype(int), fX[:, 0].astype(int)
    assert len(held) == n // 4 and original[held].all()  # a quarter of the images, no view
    assert not set(content[held]) & set(content[kept])  # their views are not trained on either
    assert (~original[kept]).sum() == (k - 1) * original[kept].sum()
