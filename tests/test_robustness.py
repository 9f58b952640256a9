"""Any folder, any interruption, any setting: nothing crashes, nothing is lost."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time

import h5py
import messy
import numpy as np
import pytest
from conftest import SIZE, make_dataset, write_image
from PIL import Image

from pipeline import dataset, images, store
from pipeline.backbone import BackboneSpec
from pipeline.errors import UserError
from pipeline.features import extract


@pytest.fixture
def messy_data(tmp_path):
    root = tmp_path / "data"
    make_dataset(root, per_class=3, n_classes=2)
    expect = messy.build(root)
    return root, expect


def test_messy_folder_embeds_every_valid_image(messy_data, tmp_path, spec, quiet):
    root, expect = messy_data
    log, lines = quiet
    s = extract(root, tmp_path / "art", spec, log=log)
    idx = store.read_index(s.cache)
    skipped = {x["path"]: x["reason"] for x in idx.skipped}
    for path, reason in expect.items():
        if reason is None:
            assert path in idx.paths, f"{path} not embedded: {skipped.get(path)}"
        else:
            assert path not in idx.paths
            assert reason in skipped[path], (path, skipped[path])
    assert len(idx.paths) == len(set(idx.paths))  # the symlink loop counts nothing twice
    assert not any(
        "loop" in p or "hidden" in p or "DS_Store" in p or "Thumbs" in p
        for p in idx.paths + list(skipped)
    )
    assert len(idx.paths) == 6 + sum(v is None for v in expect.values())
    assert len(skipped) == sum(v is not None for v in expect.values())
    assert any("empty_class" in s and "is empty" in s for s in lines)
    assert np.isfinite(store.read_column(s.cache, "features").astype(np.float32)).all()


def test_messy_folder_via_cli_exits_zero(messy_data, tmp_path):
    """The command on the messy folder: exit 0, every readable image in the cache once, each
    unreadable one named on its own line with its reason, and the counts in the summary."""
    root, expect = messy_data
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "features",
            "--data",
            str(root),
            "--artifacts",
            str(tmp_path / "art"),
            "--weights",
            "none",
            "--size",
            str(SIZE),
        ],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    readable = {path for path, why in expect.items() if why is None}
    readable |= {str(q.relative_to(root)) for q in root.glob("train/class_*/*.png")}
    assert len(readable) == 6 + 20
    unreadable = {path: why for path, why in expect.items() if why is not None}
    (cache,) = [
        ln.removeprefix("cache: ") for ln in p.stdout.splitlines() if ln.startswith("cache: ")
    ]
    idx = store.read_index(cache)
    assert sorted(idx.paths) == sorted(readable)  # each once, none of the unreadable
    said = {}
    for ln in p.stdout.splitlines():
        if ln.startswith("skipped "):
            path, _, why = ln.removeprefix("skipped ").partition(": ")
            assert path not in said, ln  # each named once
            said[path] = why
    assert set(said) == set(unreadable)
    for path, why in unreadable.items():
        assert why in said[path], (path, said[path])
    assert {x["path"]: x["reason"] for x in idx.skipped} == said  # recorded as said
    summary = [ln for ln in p.stdout.splitlines() if ln.startswith("embedded ")]
    assert summary == [f"embedded {len(readable)} new, 0 cached, 0 removed, {len(said)} skipped"]


def load(path):
    return images.load_image(path, 8).astype(int)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "g.png")
    assert abs(load(tmp_path / "g.png")[0, 0, 0] - 128) <= 1


def test_transparency_composites_on_white(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "t.png")
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "la.png")
    assert (load(tmp_path / "t.png") == 255).all()
    assert (load(tmp_path / "la.png") == 255).all()


def test_exif_rotation_is_applied(tmp_path):
    a = np.zeros((8, 16, 3), np.uint8)
    a[:, :8] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    Image.fromarray(a).save(tmp_path / "r.png", exif=exif)
    out = load(tmp_path / "r.png")
    assert out[0, :, 0].mean() > 200 and out[-1, :, 0].mean() < 50  # white on top when upright


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    px = load(tmp_path / "a.gif")[0, 0]
    assert px[0] > 200 and px[2] < 50


@pytest.mark.parametrize(
    "size, decoded",
    [
        ((4000, 3000), (500, 375)),  # 1/8: the smallest scale JPEG offers, still >= 224
        ((1200, 900), (300, 225)),  # 1/4: 1/8 (150x112) would be smaller than 224 and blur
        ((300, 200), (300, 200)),  # already small: decoded whole
    ],
)
def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path, monkeypatch, size, decoded):
    """The largest reduction that keeps both sides at least the input size: never more (the
    image would be upsampled from too few pixels), never less (4000 px decoded for nothing)."""
    Image.new("RGB", size, (120, 60, 30)).save(tmp_path / "big.jpg", quality=90)
    sizes = []
    real = Image.Image.load

    def spy(self):
        out = real(self)
        sizes.append(self.size)
        return out

    monkeypatch.setattr(Image.Image, "load", spy)
    arr = images.load_image(tmp_path / "big.jpg", 224)
    assert arr.shape == (224, 224, 3)
    assert sizes[0] == decoded, sizes
    np.testing.assert_allclose(arr.reshape(-1, 3).mean(axis=0), (120, 60, 30), atol=3)


def test_bomb_rejected_before_allocation(tmp_path):
    (tmp_path / "b.png").write_bytes(messy._png_header_only(100_000, 100_000))
    with pytest.raises(images.ImageError, match="decompression bomb"):
        images.load_image(tmp_path / "b.png", 32)


def _staged_idents(art) -> set[str]:
    """The rows (content identities) of every segment on disk, staged or merged."""
    out: set[str] = set()
    for seg in (art / "features").glob("*.shards/g*.h5"):
        try:
            with h5py.File(seg, "r") as g:
                out |= set(g["ident"][()].astype(str).tolist())
        except (OSError, KeyError):  # merged away meanwhile, or being written
            continue
    return out


def _wait_for_line(proc, start: str, seen) -> None:
    """Set `seen` when `proc` writes a line starting with `start` to its stderr; keep
    draining it (a full pipe would stall the process)."""
    for line in proc.stderr:
        if line.startswith(start):
            seen.set()


def test_kill_mid_run_resumes_to_the_clean_cache(tmp_path, spec, quiet):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=30, n_classes=2)
    clean = extract(data, tmp_path / "clean", spec, batch_size=2, log=log)
    art = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "features",
        "--data",
        str(data),
        "--artifacts",
        str(art),
        "--weights",
        "none",
        "--size",
        str(SIZE),
        "--batch",
        "2",
        "--precision",
        "float32",
    ]
    for _ in range(3):  # killed three times, each time after it embedded and staged a batch
        known = _staged_idents(art)  # the rows staged before this run
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        embedding = threading.Event()  # its first progress line: a batch embedded
        threading.Thread(target=_wait_for_line, args=(proc, "embedding ", embedding)).start()
        deadline = time.time() + 120
        staged: set[str] = set()
        while time.time() < deadline and proc.poll() is None:
            if embedding.wait(0.05) and (staged := _staged_idents(art) - known):
                break  # a batch of this run is on disk: killed after some work
        assert proc.poll() is None, "the run ended before it was killed"
        assert staged, "the run was killed before it staged a batch"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = _staged_idents(art)  # staged by the three killed runs
    assert 6 <= len(done) < 60
    h5s = list((art / "features").glob("*.h5"))
    for h in h5s:  # whatever is there opens with plain h5py
        h5py.File(h, "r").close()
    resumed = extract(data, art, spec, batch_size=2, log=log)
    assert resumed.resumed > 0 and resumed.new == 60 - len(done)  # nothing staged is redone
    a, b = store.read_index(clean.cache), store.read_index(resumed.cache)
    # the same rows (a resumed cache may hold them in another order: folds go by content)
    rows_a = sorted(zip(a.paths, a.sha256, a.labels.tolist(), a.split, strict=False))
    assert rows_a == sorted(zip(b.paths, b.sha256, b.labels.tolist(), b.split, strict=False))
    fa = store.read_column(clean.cache, "features")
    fb = store.read_column(resumed.cache, "features")
    oa, ob = np.argsort(a.paths), np.argsort(b.paths)
    np.testing.assert_allclose(
        fa[oa].astype(np.float32), fb[ob].astype(np.float32), rtol=2e-3, atol=1e-3
    )
    assert a.attrs["cache_key"] == b.attrs["cache_key"] and a.attrs["data_id"] == b.attrs["data_id"]


def test_a_torn_segment_is_never_trusted_nor_deleted(tmp_path, spec, quiet):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=4, n_classes=2)
    first = extract(data, tmp_path / "art", spec, log=log)
    torn = store.shards_dir(first.cache) / "g00000000000099.h5"
    torn.write_bytes(b"\x89HDF\r\n\x1a\n torn")
    write_image(data / "train/class_0/extra.png", 0, 4242)
    log, lines = quiet
    s = extract(data, tmp_path / "art", spec, log=log)
    # never trusted, never deleted: set aside (kept for a look) and said, once
    aside = torn.parent / "damaged" / torn.name
    assert s.new == 1 and not torn.exists() and aside.read_bytes().endswith(b" torn")
    assert any("is damaged (bad superblock" in x and torn.name in x for x in lines), lines
    assert torn.name not in [e.name for e in store.read_index(s.cache).entries]
    lines.clear()
    assert extract(data, tmp_path / "art", spec, log=log).new == 0
    assert not any(torn.name in x for x in lines)


def test_second_writer_stops_with_a_clear_message(tmp_path, spec):
    data = make_dataset(tmp_path / "data", per_class=2, n_classes=2)
    fdir = tmp_path / "art" / "features"
    fdir.mkdir(parents=True)
    with open(fdir / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another make features is already writing"):
            extract(data, tmp_path / "art", spec, log=lambda s: None)


@pytest.mark.parametrize(
    "code, match", [(errno.ENOSPC, "disk full while writing"), (errno.EROFS, "cannot write")]
)
def test_disk_full_or_read_only_keeps_the_cache(tmp_path, spec, quiet, monkeypatch, code, match):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=3, n_classes=2)
    first = extract(data, tmp_path / "art", spec, log=log)
    before = first.cache.read_bytes()
    write_image(data / "train/class_1/more.png", 1, 99)

    real_file = h5py.File

    def failing(only: str):
        def fail_write(path, mode="r", *a, **k):
            if mode == "w" and only in str(path):
                raise OSError(code, os.strerror(code))
            return real_file(path, mode, *a, **k)

        return fail_write

    monkeypatch.setattr(h5py, "File", failing(""))  # the new shard cannot be written
    with pytest.raises(UserError, match=match):
        extract(data, tmp_path / "art", spec, log=log)
    monkeypatch.undo()
    monkeypatch.setattr(h5py, "File", failing(".h5.tmp-"))  # the shard is, the index is not
    with pytest.raises(UserError, match=match):
        extract(data, tmp_path / "art", spec, log=log)
    monkeypatch.undo()
    assert first.cache.read_bytes() == before
    assert not list(first.cache.parent.glob("*.tmp-*"))
    assert not list(store.shards_dir(first.cache).glob(".tmp-*"))
    again = extract(data, tmp_path / "art", spec, log=log)
    assert (again.new, again.resumed, again.cached) == (0, 1, 7)  # the shard kept the batch


def test_unwritable_artifacts_is_a_clear_error(tmp_path, spec):
    data = make_dataset(tmp_path / "data", per_class=2, n_classes=2)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write to .* set ARTIFACTS"):
        extract(data, blocker / "art", spec, log=lambda s: None)


def test_damaged_cache_is_said_and_rebuilt(tmp_path, spec, quiet):
    log, lines = quiet
    data = make_dataset(tmp_path / "data", per_class=3, n_classes=2)
    first = extract(data, tmp_path / "art", spec, log=log)
    before = store.read_column(first.cache, "features")
    first.cache.write_bytes(first.cache.read_bytes()[:1000])
    s = extract(data, tmp_path / "art", spec, log=log)
    # the index is rebuilt from the immutable shards: nothing is embedded again
    assert (s.new, s.resumed, s.cached) == (0, 6, 6)
    assert any("is damaged" in x and "moved aside" in x for x in lines)
    np.testing.assert_array_equal(store.read_column(s.cache, "features"), before)


def test_cache_with_other_settings_is_never_used(tmp_path, spec, quiet):
    log, lines = quiet
    data = make_dataset(tmp_path / "data", per_class=3, n_classes=2)
    a = extract(data, tmp_path / "art", spec, log=log)
    b = extract(data, tmp_path / "art", BackboneSpec("none", input_size=64), log=log)
    os.replace(b.cache, a.cache)  # a file of other settings under this setting's name
    s = extract(data, tmp_path / "art", spec, log=log)
    assert any("made with other settings" in x for x in lines)
    # rebuilt from this setting's own shards, never from the other file's
    assert (s.new, s.resumed) == (0, 6)
    assert store.read_column(s.cache, "features").shape == (6, 1, 1, 512)


def test_unreadable_folder_is_a_warning_not_a_silent_drop(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", per_class=2, n_classes=2)
    real_walk = os.walk

    def walk(top, onerror=None, followlinks=False):
        if onerror is not None:
            onerror(PermissionError(errno.EACCES, "Permission denied", str(top) + "/locked"))
        yield from real_walk(top, followlinks=followlinks)

    monkeypatch.setattr(dataset.os, "walk", walk)
    scan = dataset.scan(data)
    assert any("cannot read folder" in w and "locked" in w for w in scan.warnings)


def test_undecodable_file_name_does_not_crash(tmp_path, spec, quiet):
    data = make_dataset(tmp_path / "data", per_class=2, n_classes=2)
    name = os.fsdecode(b"bad-\xff-name.png")
    write_image(data / "train/class_0" / name, 0, 5)
    s = extract(data, tmp_path / "art", spec, log=quiet[0])
    assert any("\\xff" in p for p in store.read_index(s.cache).paths)
    assert extract(data, tmp_path / "art", spec, log=quiet[0]).new == 0
