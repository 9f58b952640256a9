"""A file rewritten between its hashing and its decoding: `make features` never caches the new
image's features under the old bytes' hash (here, on a Dask worker, for augmented views), and
the next run embeds the file as it is."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import make_dataset, rewrite_after, write_image

from pipeline import cluster, features, images, layout, store
from pipeline.features import extract

TARGET = "train/class_0/img_000.png"
SUMMARY = "(1 changed while they were read: rerun `make features`)"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rewritten_after_hashing(monkeypatch, target: Path) -> None:
    """The first time features hashes `target`, the file is rewritten right after (another
    image: class 1, another seed), so the bytes decoded are not the bytes hashed."""
    rewrite_after(
        monkeypatch, images, "content_sha256", lambda path: Path(path) == target,
        lambda path: write_image(target, 1, seed=4321),
    )  # fmt: skip


def _segment_idents(cache: Path) -> set[str]:
    """Every identity any segment file of the cache holds (referenced by the index or not:
    a staged segment would be resumed by a later run)."""
    out: set[str] = set()
    for seg in store.shards_dir(cache).glob("g*.h5"):
        with h5py.File(seg, "r") as g:
            out |= set(g["ident"][()].astype(str).tolist())
    return out


def _rows(cache: Path) -> dict[tuple[str, int], tuple[str, np.ndarray]]:
    """(path, view) -> (content hash, pooled vector) of every row of a cache."""
    idx = store.read_index(cache)
    avg = store.read_column(cache, "pooled/avg").astype(np.float32)
    return {
        (p, v): (h, avg[i])
        for i, (p, v, h) in enumerate(zip(idx.paths, idx.view, idx.sha256, strict=True))
    }


def _same_rows(a: Path, b: Path) -> None:
    ra, rb = _rows(a), _rows(b)
    assert sorted(ra) == sorted(rb)
    for k, (h, v) in ra.items():
        assert h == rb[k][0], k
        np.testing.assert_allclose(v, rb[k][1], rtol=1e-3, atol=1e-3, err_msg=str(k))


@pytest.mark.parametrize("where", ["here", "cluster"])
def test_a_file_rewritten_after_hashing_is_never_cached_under_the_old_hash(
    tmp_path, spec, quiet, decoded, monkeypatch, request, where
):
    """Here, and on the session's Dask workers (`two_workers`, reached by address)."""
    log, lines = quiet
    fn = cluster.embedder(request.getfixturevalue("two_workers")) if where != "here" else None
    data = make_dataset(tmp_path / "data", per_class=2, n_classes=2)
    target = data / TARGET
    old_sha = _sha(target)
    _rewritten_after_hashing(monkeypatch, target)
    s = extract(data, tmp_path / "art", spec, log=log, embedder_fn=fn)
    new_sha = _sha(target)
    assert new_sha != old_sha
    # nothing under the old hash, in any segment; the file is listed as not cached, and why
    assert not {h for h in _segment_idents(s.cache) if h.startswith(old_sha)}
    idx = store.read_index(s.cache)
    assert TARGET not in idx.paths and old_sha not in idx.sha256
    assert (s.new, s.skipped, s.changed) == (3, 1, 1)
    [sk] = idx.skipped
    assert sk["path"] == TARGET and sk["sha256"] == "" and not sk["content"]
    assert "changed while it was read" in sk["reason"] and "rerun `make features`" in sk["reason"]
    assert f"embedded 3 new, 0 cached, 0 removed, 1 skipped {SUMMARY}" in lines
    assert any(x.startswith(f"skipped {TARGET}: the file changed while") for x in lines)
    # the next run embeds the file as it is now, under its own hash; nothing else again
    decoded.clear()
    again = extract(data, tmp_path / "art", spec, log=log, embedder_fn=fn)
    assert (again.new, again.cached, again.skipped, again.changed) == (1, 3, 0, 0)
    if where == "here":
        assert decoded == ["img_000.png"]
    assert _rows(again.cache)[(TARGET, 0)][0] == new_sha
    ref = extract(data, tmp_path / "ref", spec, log=log)  # a fresh cache of the files as they are
    _same_rows(again.cache, ref.cache)


def test_a_copy_of_the_old_content_is_skipped_naming_the_file_that_changed(
    tmp_path, spec, quiet, monkeypatch
):
    log, lines = quiet
    data = make_dataset(tmp_path / "data", per_class=2, n_classes=2)
    target = data / TARGET
    old_sha = _sha(target)
    copy = "train/class_0/img_zzz.png"  # the same bytes, embedded from the first path only
    shutil.copy(target, data / copy)
    _rewritten_after_hashing(monkeypatch, target)
    s = extract(data, tmp_path / "art", spec, log=log)
    assert not {h for h in _segment_idents(s.cache) if h.startswith(old_sha)}
    reasons = {x["path"]: x for x in store.read_index(s.cache).skipped}
    assert sorted(reasons) == [TARGET, copy] and (s.skipped, s.changed) == (2, 1)
    assert f"to be embedded from '{TARGET}', which changed" in reasons[copy]["reason"]
    assert reasons[copy]["sha256"] == old_sha and reasons[TARGET]["sha256"] == ""
    assert s.line().endswith(f"2 skipped {SUMMARY}")
    # the next run: the copy under the old bytes' hash with their features, the file as it is
    again = extract(data, tmp_path / "art", spec, log=log)
    assert (again.new, again.skipped) == (2, 0)
    _same_rows(again.cache, extract(data, tmp_path / "ref", spec, log=log).cache)
    assert _rows(again.cache)[(copy, 0)][0] == old_sha


def test_augmented_views_of_a_file_rewritten_meanwhile_are_not_cached(
    tmp_path, spec, quiet, monkeypatch
):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=2, n_classes=2)
    target = data / TARGET
    old_sha = _sha(target)
    real = features._sync
    calls: list[int] = []

    def then_rewritten(*a, **k):  # the file changes once its row is cached, before its views
        out = real(*a, **k)
        if not calls:
            write_image(target, 1, seed=4321)
        calls.append(1)
        return out

    monkeypatch.setattr(features, "_sync", then_rewritten)
    s = extract(data, tmp_path / "art", spec, log=log, augment=1)
    apath = layout.augment_path(s.cache, spec.seed)
    assert f"{old_sha}#1" not in _segment_idents(apath)
    assert s.augmented is not None and (s.augmented.new, s.augmented.changed) == (3, 1)
    assert [x["path"] for x in store.read_index(apath).skipped] == [TARGET]
    # the row cached before the rewrite holds the old bytes' features, under their hash
    assert _rows(s.cache)[(TARGET, 0)][0] == old_sha
    again = extract(data, tmp_path / "art", spec, log=log, augment=1)
    assert (again.new, again.augmented.new, again.augmented.skipped) == (1, 1, 0)
    ref = extract(data, tmp_path / "ref", spec, log=log, augment=1)
    _same_rows(again.cache, ref.cache)
    _same_rows(apath, layout.augment_path(ref.cache, spec.seed))
