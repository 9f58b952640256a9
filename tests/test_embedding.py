"""One embedding stage (`pipeline.embedding`): features, predict, finetune's block-4 cache and the
sweep's per-backbone extraction all go through it; its local and Dask engines give the same rows
bit for bit; its decoder check and retry policy say the same for features and predict."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_dataset, write_image

import pipeline
from pipeline import embedding, images, layout, prediction, store
from pipeline.features import extract
from pipeline.train import train_head

ROOT = Path(__file__).resolve().parent.parent


class _Stop(Exception):
    """Raised by the spy once it has seen a call: the rest of the command is not needed."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A cache and a logreg run on it, and new images to predict: made once."""
    from pipeline.backbone import BackboneSpec

    tmp = tmp_path_factory.mktemp("embedding")
    spec = BackboneSpec(weights="none", input_size=32, seed=0)
    data = make_dataset(tmp / "data", per_class=4, n_classes=2)
    art = tmp / "art"
    extract(data, art, spec, log=lambda s: None)
    run = train_head(art, "logreg", folds=2, log=lambda s: None)["run"]
    new = tmp / "new"
    for i in range(3):
        write_image(new / f"n{i}.png", i % 2, seed=900 + i)
    return {"data": data, "art": art, "run": run, "new": new}


def _spy(monkeypatch) -> tuple[list[tuple[str, str]], list[bool]]:
    """Every call of the stage's entry: (the calling module, the backbone layer embedded); once
    `stop` holds True, a call raises `_Stop` after it is counted."""
    real = embedding.embed
    calls: list[tuple[str, str]] = []
    stop: list[bool] = []

    def spy(batches, spec, *a, **k):
        calls.append((sys._getframe(1).f_globals["__name__"], spec.layer))
        if stop:
            raise _Stop
        return real(batches, spec, *a, **k)

    monkeypatch.setattr(embedding, "embed", spy)
    return calls, stop


def _fresh(trained, tmp_path: Path) -> Path:
    """The trained artifacts, copied: nothing kept there by another test's predict."""
    import shutil

    return Path(shutil.copytree(trained["art"], tmp_path / "trained"))


def test_features_predict_finetune_and_the_sweep_embed_through_the_one_stage(
    trained, tmp_path, monkeypatch
):
    data = trained["data"]
    calls, stop = _spy(monkeypatch)
    s = pipeline.extract(data, tmp_path / "art", weights="none", size=32, log=None)
    assert s.new == 8 and calls == [("pipeline.features", "block5_pool")]
    calls.clear()
    art = _fresh(trained, tmp_path)
    rows = pipeline.predict(
        trained["new"], art, run=trained["run"], out=tmp_path / "p.csv", log=None
    )
    assert len(rows) == 3 and all(r["backbone_ran"] for r in rows)
    assert calls == [("pipeline.prediction", "block5_pool")]
    calls.clear()
    stop.append(True)  # the rest of each command (training) is not needed
    with pytest.raises(_Stop):  # its block-4 cache first
        pipeline.finetune(data, tmp_path / "ft", weights="none", size=32, log=None)
    assert calls == [("pipeline.features", "block4_pool")]
    calls.clear()
    with pytest.raises(_Stop):  # SWEEP_BACKBONES: each backbone extracted from DATA first
        pipeline.sweep(
            tmp_path / "sw", heads="logreg", pools="avg", backbones="vgg16",
            data=data, weights="none", size=32, log=None,
        )  # fmt: skip
    assert calls == [("pipeline.features", "block5_pool")]


def test_no_other_module_runs_the_backbone_on_images():
    """The copies are gone: the backbone's forward pass on decoded images is the stage's alone."""
    runs = sorted(
        p.name
        for p in (ROOT / "pipeline").glob("*.py")
        if "predict_on_batch(" in p.read_text(encoding="utf-8")
    )
    assert runs == ["embedding.py"]


def _jobs(data: Path) -> list[embedding.Job]:
    """Every image, with views 1 and 2 of the first two, and a file that is no image."""
    bad = data / "bad.png"
    bad.write_bytes(b"not an image at all")
    files = sorted(f for f in data.rglob("*.png") if f != bad) + [bad]
    out = []
    for n, f in enumerate(files):
        sha = images.content_sha256(f)
        for v in range(3 if n < 2 else 1):
            out.append(embedding.Job(f.name, f, sha, view=v))
    return out


def test_a_local_and_a_dask_engine_give_the_same_rows_bit_for_bit(tmp_path, spec, two_workers):
    data = make_dataset(tmp_path / "data", per_class=3, n_classes=2)
    jobs = _jobs(data)

    def rows(engine):
        out = list(embedding.embed(embedding.batched(jobs, 4), spec, engine, augment_seed=3))
        assert [len(b.jobs) for b in out] == [4, 4, 3]  # a result per batch, in order
        done = [j for b in out for j in b.done]
        maps = np.concatenate([b.maps for b in out if b.maps is not None])
        return done, maps, [(j.ident, str(r), r.content) for b in out for j, r in b.failed]

    here, there = rows(embedding.Local()), rows(embedding.Dask(two_workers))
    assert here[0] == there[0] and len(here[0]) == len(jobs) - 1
    assert here[1].dtype == there[1].dtype and np.array_equal(here[1], there[1])
    assert here[2] == there[2] and len(here[2]) == 1 and here[2][0][2]  # the bad file, content
    assert not np.array_equal(here[1][0], here[1][1])  # a view is not the image


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _keeps_changing(monkeypatch, target: Path) -> list[str]:
    """Every decoding of the file `target` finds it rewritten (another image each time): the
    hashes of the bytes read, in order."""
    real = images.load_image_hashed
    shas: list[str] = []

    def rewritten_then_read(path, size):
        if Path(path) == target:
            write_image(Path(path), 1, seed=7000 + len(shas))
            shas.append(_sha(Path(path)))
        return real(path, size)

    monkeypatch.setattr(images, "load_image_hashed", rewritten_then_read)
    return shas


def test_a_file_that_keeps_changing_is_skipped_with_the_same_reason_by_features_and_predict(
    trained, tmp_path, spec, monkeypatch
):
    """The one decoder check and the one retry policy: features gives up at once (a rerun embeds
    it), predict looks it up and embeds it again under the new bytes' hash `REDO` times; both
    then skip it with the stage's reason, naming the command to rerun."""
    import shutil

    data = Path(shutil.copytree(trained["data"], tmp_path / "data"))
    target = sorted(data.rglob("*.png"))[0]
    shas = _keeps_changing(monkeypatch, target)
    s = extract(data, tmp_path / "art", spec, log=lambda s: None)
    [sk] = s.skipped_rows
    assert sk["path"] == target.relative_to(data).as_posix() and len(shas) == 1
    assert sk["reason"] == embedding.changed_reason("make features") and s.changed == 1

    new = Path(shutil.copytree(trained["new"], tmp_path / "new"))
    art = _fresh(trained, tmp_path)
    shas = _keeps_changing(monkeypatch, new / "n0.png")
    rows = prediction.classify(
        art, new, run=trained["run"], out=tmp_path / "p.csv", log=lambda s: None
    )[0]
    assert len(shas) == 1 + prediction.REDO
    assert rows[0]["error"] == embedding.changed_reason("make predict")
    assert sk["reason"].replace("features", "predict") == rows[0]["error"]
    assert all(r["error"] == "" for r in rows[1:])
    kept = store.read_index(layout.predicted_path(layout.current_cache(art))).idents
    assert not set(shas) & set(kept)  # none of its contents was kept
