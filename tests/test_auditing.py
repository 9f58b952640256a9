"""`make audit` end to end, and images unlike the training set at predict time.

Generated photos-like images (smooth random fields, each of its own content), two classes told
apart by their colour cast, embedded by a seeded random-weights VGG16: a few labels flipped on
purpose, JPEG, resized, cropped and mirrored copies (one of them in validation: a leak), and
images of another kind. Nothing here runs the backbone after `extract` but predict's new images.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from pipeline import auditing, novelty, oof
from pipeline.backbone import BackboneSpec
from pipeline.errors import UserError
from pipeline.features import extract
from pipeline.prediction import classify
from pipeline.train import train_head

PX = 64


def photo(seed: int, cls: int) -> np.ndarray:
    """A smooth random field of its own (blob size, contrast), warm for class 0, cold for 1."""
    r = np.random.default_rng(seed)
    f = np.stack([gaussian_filter(r.normal(size=(PX, PX)), r.uniform(1.5, 5)) for _ in range(3)])
    f = (f - f.min()) / (np.ptp(f) + 1e-9) * r.uniform(90, 150)
    cast = np.array([100, 40, 0] if cls == 0 else [0, 40, 100])[:, None, None]
    return np.clip(f + cast, 0, 255).transpose(1, 2, 0).astype(np.uint8)


def other_kind(seed: int) -> np.ndarray:
    """A hard black-and-white checkerboard: nothing like the fields."""
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:PX, 0:PX]
    s = int(r.integers(3, 6))
    return np.repeat((((x // s) + (y // s)) % 2 * 255).astype(np.uint8)[..., None], 3, axis=2)


N = 24  # images per class
FLIPPED = [(0, 3), (1, 7)]  # (true class, index): saved in the other class's folder
COPIES = [
    (0, 5, "jpeg", "train"),
    (1, 9, "resize", "train"),
    (0, 11, "crop", "validation"),
    (1, 13, "mirror", "train"),
]


def save(a: np.ndarray, path: Path, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, format=fmt, **({"quality": 70} if fmt == "JPEG" else {}))


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    data = root / "data"
    for c in (0, 1):
        for i in range(N):
            given = 1 - c if (c, i) in FLIPPED else c
            save(photo(100 * c + i, c), data / "train" / f"class_{given}" / f"c{c}_{i:02d}.png")
        for i in range(4):
            save(photo(5000 + 10 * c + i, c), data / "validation" / f"class_{c}" / f"v{i}.png")
    for c, i, how, split in COPIES:
        im = Image.fromarray(photo(100 * c + i, c))
        folder = data / split / f"class_{c}"
        if how == "jpeg":
            save(np.asarray(im), folder / f"copy_c{c}_{i:02d}.jpg", "JPEG")
        elif how == "resize":
            save(np.asarray(im.resize((48, 48))), folder / f"copy_c{c}_{i:02d}.png")
        elif how == "mirror":
            flipped = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            save(np.asarray(flipped), folder / f"copy_c{c}_{i:02d}.png")
        else:
            save(np.asarray(im.crop((3, 3, PX - 3, PX - 3))), folder / f"copy_c{c}_{i:02d}.png")
    odd = data / "train" / "class_0" / "odd.png"
    save(other_kind(0), odd)
    art = root / "art"
    spec = BackboneSpec(weights="none", input_size=PX, seed=0)
    extract(data, art, spec, log=lambda s: None)
    r = train_head(art, "logreg", folds=4, repeats=2, params={"C": "1"}, log=lambda s: None)
    lines: list[str] = []
    summary = auditing.run_audit(art, seed=0, log=lines.append)
    return {"art": art, "data": data, "run": r, "summary": summary, "lines": lines, "root": root}


def test_a_run_keeps_every_partitions_out_of_fold_probabilities(audited):
    r = audited["run"]
    saved = oof.load(audited["art"] / "heads" / r["run"])
    assert saved is not None and "oof.h5" in r["files"]
    assert saved.probabilities.shape == (2, r["n_train"], len(r["classes"]))
    assert (saved.fold >= 0).all()  # k-fold: every image scored once per partition
    np.testing.assert_allclose(saved.probabilities.sum(axis=2), 1.0, atol=1e-5)
    # the first partition's stored mistakes are the same images as the run's own record
    first = saved.probabilities[0].argmax(axis=1) != saved.label
    assert int(first.sum()) == r["cv"]["oof_mistakes"]


def test_the_flipped_labels_are_the_likely_label_errors(audited):
    s = audited["summary"]["label_issues"]
    flagged = {row["path"] for row in s["top"]}
    flipped = {f"train/class_{1 - c}/c{c}_{i:02d}.png" for c, i in FLIPPED}
    assert flipped <= flagged  # recall: both
    assert len(flagged - flipped) <= 2  # precision: few others
    for row in s["top"]:
        if row["path"] in flipped:
            assert row["suggested"] != row["given"]
    assert s["partitions"] == 2
    assert sum(map(sum, s["swapped_pairs"])) == s["flagged"]
    on_disk = list(csv.DictReader((audited["art"] / "audit" / "label_issues.csv").open()))
    assert [row["path"] for row in on_disk] == [row["path"] for row in s["top"]]


def test_jpeg_resized_cropped_and_mirrored_copies_are_found_with_their_originals(audited):
    near = audited["summary"]["near_duplicates"]
    sets = [{m["path"] for m in s["members"]} for s in near["top"]]
    for c, i, how, split in COPIES:
        original = f"train/class_{c}/c{c}_{i:02d}.png"
        copy = f"{split}/class_{c}/copy_c{c}_{i:02d}.{'jpg' if how == 'jpeg' else 'png'}"
        assert any({original, copy} <= s for s in sets), (how, sets)
    assert all(len(s) <= 3 for s in sets)  # images of other content are not pulled in
    assert near["leaks"] >= 1  # the cropped copy in validation
    leak = next(s for s in near["top"] if s["leak"])
    assert {m["split"] for m in leak["members"]} == {"train", "validation"}


def test_an_image_of_another_kind_is_the_first_outlier(audited):
    out = audited["summary"]["outliers"]
    assert out["top"][0]["path"] == "train/class_0/odd.png" and out["top"][0]["outlier"]
    assert out["count"] <= 2


def test_the_audit_records_what_made_it_and_writes_every_file(audited):
    s, r = audited["summary"], audited["run"]
    assert s["made_by"]["run"] == r["run"]
    assert s["made_by"]["cache_key"] == r["features"]["cache_key"]
    folder = audited["art"] / "audit"
    for name in ("label_issues.csv", "near_duplicates.csv", "outliers.csv", "swapped_pairs.csv"):
        assert (folder / name).stat().st_size > 0
    assert json.loads((folder / "audit.json").read_text())["run"] == r["run"]
    assert "<svg" in (folder / "map.html").read_text()
    assert s["calibration"]["ece"] == r["calibration"]["ece"]


def test_a_run_from_before_the_audit_is_refused_in_one_line(audited, tmp_path):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(audited["art"], art)
    run_dir = art / "heads" / audited["run"]["run"]
    (run_dir / "oof.h5").unlink()
    with pytest.raises(UserError, match="not the file run .* saved"):
        auditing.run_audit(art, log=lambda s: None)  # its files are checked first


def test_predict_flags_images_unlike_the_training_set(audited, tmp_path):
    new = tmp_path / "new"
    for i in range(6):
        save(photo(9000 + i, i % 2), new / f"like_{i}.png")
    for i in range(3):
        save(other_kind(10 + i), new / f"unlike_{i}.png")
    lines: list[str] = []
    rows, out = classify(audited["art"], new, out=tmp_path / "p.csv", log=lines.append)
    by = {Path(r["path"]).stem: r for r in rows}
    assert all(by[f"unlike_{i}"]["unlike_training"] for i in range(3))
    assert sum(by[f"like_{i}"]["unlike_training"] for i in range(6)) <= 1
    far = min(by[f"unlike_{i}"]["distance_to_training"] for i in range(3))
    assert far > max(by[f"like_{i}"]["distance_to_training"] for i in range(6))
    header = next(csv.reader(out.open()))
    assert header[-2:] == ["distance_to_training", "unlike_training"]
    n_unlike = sum(r["unlike_training"] for r in rows)
    assert any(f"{n_unlike} unlike the training images" in ln for ln in lines)


def test_held_out_training_like_images_are_flagged_at_about_the_stated_rate():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (5, 32))
    train = centres[rng.integers(0, 5, 3000)] + rng.normal(0, 0.6, (3000, 32))
    held = centres[rng.integers(0, 5, 3000)] + rng.normal(0, 0.6, (3000, 32))
    nov = novelty.Novelty.fit(train)
    _, flag = nov.score(held)
    assert 0.002 <= flag.mean() <= 0.03  # about 1 %
    _, far = nov.score(rng.normal(0, 1, (50, 32)) * 3)
    assert far.all()


def test_groups_near_keeps_each_near_duplicate_set_in_one_fold(audited):
    """GROUPS=near: the copies in training share their original's fold in every partition,
    under a run name of its own; the content run stays as it was."""
    from pipeline import layout
    from pipeline.train import load

    lines: list[str] = []
    art = audited["art"]
    r = train_head(
        art, "logreg", folds=4, repeats=2, params={"C": "1"}, groups="near", log=lines.append
    )
    assert r["run"].split("--")[0].endswith("-near") and r["groups"] == "near"
    assert r["run"] != audited["run"]["run"]
    assert any(ln.startswith("GROUPS=near: ") for ln in lines)
    paths = list(load(layout.current_cache(art), "avg").train.paths)
    near = oof.load(art / "heads" / r["run"])
    plain = oof.load(art / "heads" / audited["run"]["run"])
    pairs = [
        (paths.index(f"train/class_{c}/c{c}_{i:02d}.png"), paths.index(copy))
        for c, i, how, split in COPIES
        if split == "train"
        for copy in [f"train/class_{c}/copy_c{c}_{i:02d}.{'jpg' if how == 'jpeg' else 'png'}"]
    ]
    for a, b in pairs:
        assert (near.fold[:, a] == near.fold[:, b]).all()
    # by content only, at least one copy lands in another fold than its original somewhere
    assert any((plain.fold[:, a] != plain.fold[:, b]).any() for a, b in pairs)


def test_predict_measures_distance_against_the_runs_own_training_sample(audited, tmp_path):
    """The reference is saved in the run when it is trained (`novelty.h5`, among its hashed
    files): a cache grown since (same settings, same file) changes nothing, predict reads no
    index for it, and a run saved without one says so once."""
    import shutil

    from pipeline import store

    art, data = tmp_path / "art", tmp_path / "data"
    shutil.copytree(audited["art"], art)
    shutil.copytree(audited["data"], data)
    run = audited["run"]["run"]
    assert novelty.FILE in audited["run"]["files"]
    with h5py.File(art / "heads" / run / novelty.FILE) as f:
        ref = f["reference"]
        assert ref.dtype == np.float16 and ref.shape[0] == audited["run"]["n_train"]
    new = tmp_path / "new"
    save(photo(9100, 1), new / "a.png")
    save(other_kind(3), new / "b.png")

    def predict(lines: list[str]) -> np.ndarray:
        rows, _ = classify(art, new, run=run, out=tmp_path / "p.csv", log=lines.append)
        return np.array([r["distance_to_training"] for r in rows])

    before = predict([])
    assert np.isfinite(before).all()
    save(photo(7777, 0), data / "train" / "class_0" / "grown.png")
    extract(data, art, BackboneSpec(weights="none", input_size=PX, seed=0), log=lambda s: None)
    opened: list[Path] = []
    real = store.index_of

    def spy(f, path, *a, **k):
        opened.append(Path(path))
        return real(f, path, *a, **k)

    store.index_of = spy
    try:
        novelty.of_run(art, json.loads((art / "heads" / run / "result.json").read_text()))
    finally:
        store.index_of = real
    assert opened == []  # the reference alone: no index, no segment
    np.testing.assert_array_equal(predict([]), before)  # the run's images, not the grown cache's
    # a run from before the reference was kept: neither the file nor its hash
    (art / "heads" / run / novelty.FILE).unlink()
    res = json.loads((art / "heads" / run / "result.json").read_text())
    del res["files"][novelty.FILE]
    (art / "heads" / run / "result.json").write_text(json.dumps(res))
    lines: list[str] = []
    assert np.isnan(predict(lines)).all()
    assert sum("distance to training: not measured" in ln for ln in lines) == 1


def test_the_audit_holds_no_collection_wide_list_and_gives_the_same_files(audited, tmp_path):
    """Sized for ten million: with the space forced into a file (`IN_MEMORY_UP_TO=0`) and
    blocks of 8 rows, the search runs on the memory-mapped file (removed after), no read of
    paths or hashes asks for more than a block, and every file is the same as in memory."""
    import shutil

    from pipeline import neighbours
    from pipeline.store import reader

    art = tmp_path / "art"
    shutil.copytree(audited["art"], art)
    searched: list[type] = []
    asked: list[int] = []
    real_search, real_take = neighbours.search, reader.ColumnOf.take

    def search(X, *a, **k):
        searched.append(type(X))
        return real_search(X, *a, **k)

    def take(self, positions):
        asked.append(len(positions))
        return real_take(self, positions)

    mp = pytest.MonkeyPatch()
    with mp.context() as m:
        m.setattr(neighbours, "IN_MEMORY_UP_TO", 0)
        m.setattr(neighbours, "search", search)
        m.setattr(oof, "BLOCK", 8)
        m.setattr(reader.ColumnOf, "take", take)
        auditing.run_audit(art, audited["run"]["run"], 0, map_sample=8, log=lambda s: None)
    assert searched == [np.memmap] * 2  # the features' space, then the signatures'
    assert asked and max(asked) <= 8  # paths read for the rows listed, never all of them
    assert not list(art.glob("**/.space-*"))  # the file is removed
    ref = audited["art"] / "audit"
    for name in ("label_issues.csv", "near_duplicates.csv", "outliers.csv"):
        assert (art / "audit" / name).read_bytes() == (ref / name).read_bytes(), name
    rows = list(csv.DictReader((art / "audit" / "outliers.csv").open()))
    assert len(rows) == audited["summary"]["outliers"]["count"] >= 1  # the outliers, ranked
    far = [float(r["distance"]) for r in rows]
    assert far == sorted(far, reverse=True) and rows[0]["path"].endswith("odd.png")


def test_a_cache_from_before_signatures_says_so_and_finds_the_other_copies(audited, tmp_path):
    """Segments written before image signatures were kept: mirrored copies are not searched
    among their rows (said once, with the fix), the other copies are found as before."""
    import shutil

    import h5py

    art = tmp_path / "art"
    shutil.copytree(audited["art"], art)
    for seg in art.glob("features/**/g*.h5"):
        with h5py.File(seg, "a") as f:
            del f["signature"]
    lines: list[str] = []
    s = auditing.run_audit(art, audited["run"]["run"], 0, log=lines.append)["near_duplicates"]
    n_all = audited["run"]["n_train"] + audited["run"]["n_validation"]
    said = [ln for ln in lines if ln.startswith("mirrored copies: not searched among ")]
    assert said == [
        f"mirrored copies: not searched among {n_all} image(s) embedded before image "
        "signatures were kept (`make features REBUILD=1` embeds them again with theirs)"
    ]
    assert s["without_signature"] == n_all
    sets = [{m["path"] for m in x["members"]} for x in s["top"]]
    for c, i, how, split in COPIES:
        copy = f"{split}/class_{c}/copy_c{c}_{i:02d}.{'jpg' if how == 'jpeg' else 'png'}"
        found = any({f"train/class_{c}/c{c}_{i:02d}.png", copy} <= x for x in sets)
        assert found is (how != "mirror"), (how, sets)  # random weights: mirrors are apart
    lines.clear()
    train_head(art, "logreg", folds=4, params={"C": "1"}, groups="near", log=lines.append)
    said = "GROUPS=near: mirrored copies not searched among "
    assert sum(ln.startswith(said) for ln in lines) == 1


@pytest.mark.parametrize("lazy", [True, False])
def test_a_run_whose_rows_are_not_the_caches_training_images_is_found(audited, lazy):
    """The run check: by the 64-bit prefixes held in memory (a lazy load) or the hashes
    themselves (a list): one changed hash, or one hash too many, is refused."""
    from pipeline import layout
    from pipeline.train import load

    ts = load(layout.current_cache(audited["art"]), "avg", lazy=lazy).train
    saved = oof.load(audited["art"] / "heads" / audited["run"]["run"])
    assert auditing._same_rows(ts, saved)
    hashes = np.array(saved.sha256[:])
    other = hashes.copy()
    other[5] = b"0" * 64
    assert not auditing._same_rows(
        ts, oof.Saved(saved.probabilities, saved.fold, saved.label, other)
    )
    longer = np.concatenate([hashes, hashes[:1]])
    assert not auditing._same_rows(
        ts, oof.Saved(saved.probabilities, saved.fold, saved.label, longer)
    )


def test_the_label_vote_takes_the_partitions_without_copying_them(audited, tmp_path, monkeypatch):
    """k-fold: every image scored in every partition, so the vote reads the saved arrays as
    they are (a copy of n x classes floats a partition was made before)."""
    import shutil

    from pipeline import diagnose

    art = tmp_path / "art"
    shutil.copytree(audited["art"], art)
    seen: list[tuple[np.ndarray, list[np.ndarray]]] = []
    real_vote, real_load = diagnose.vote, oof.load
    loaded: list[oof.Saved] = []

    def load(run_dir):
        loaded.append(real_load(run_dir))
        return loaded[-1]

    def vote(labels, partitions):
        seen.append((labels, partitions))
        return real_vote(labels, partitions)

    monkeypatch.setattr(oof, "load", load)
    monkeypatch.setattr(diagnose, "vote", vote)
    before = (audited["art"] / "audit" / "label_issues.csv").read_bytes()
    auditing.run_audit(art, audited["run"]["run"], 0, log=lambda s: None)
    (labels, parts), saved = seen[0], loaded[0]
    assert all(np.shares_memory(p, saved.probabilities) for p in parts)
    assert labels is saved.label
    assert (art / "audit" / "label_issues.csv").read_bytes() == before  # the same findings
