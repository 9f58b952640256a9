"""Faults of the disk under a cache cost what they touch (issue 25): a flipped bit is found
(checksums) and never served, a lost segment costs its own rows only and is set aside once,
and a full disk (or the file-size limit) is one line with the cache as it was."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from conftest import SIZE, make_dataset, write_image

from pipeline import store
from pipeline.backbone import BackboneSpec
from pipeline.errors import UserError
from pipeline.features import extract
from pipeline.prediction import classify
from pipeline.store import format as fmt
from pipeline.train import train_head

BATCH = 8  # 33 images: segments of 8, 8, 8, 8 and 1 rows (too few to merge)
DAMAGED = 1  # the segment the tests damage: its 8 rows are a batch of their own


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A cache of 33 images in 5 segments, built once; tests damage copies of it."""
    root = tmp_path_factory.mktemp("clean")
    data = make_dataset(root / "data", per_class=8, validation=3)
    spec = BackboneSpec(weights="none", input_size=SIZE, seed=0)
    s = extract(data, root / "art", spec, batch_size=BATCH, log=lambda s: None)
    idx = store.read_index(s.cache)
    assert [e.rows for e in idx.entries] == [8, 8, 8, 8, 1]
    return SimpleNamespace(
        root=root, spec=spec, rel=s.cache.relative_to(root), cols=columns(s.cache)
    )


def columns(cache: Path) -> dict[str, dict[str, bytes]]:
    """Every row's stored features and pooled vectors by path, as bytes (bit for bit)."""
    idx = store.read_index(cache)
    out: dict[str, dict[str, bytes]] = {}
    for name in ("features", "pooled/avg", "pooled/max"):
        X = store.read_column(cache, name)
        out[name] = {p: X[i].tobytes() for i, p in enumerate(idx.paths)}
    out["label"] = {p: idx.labels_by_name[i].encode() for i, p in enumerate(idx.paths)}
    return out


@pytest.fixture
def copy(clean, tmp_path):
    """A copy of the clean cache and its images, with what the tests use of it."""
    root = tmp_path / "c"
    shutil.copytree(clean.root, root, symlinks=True)
    cache = root / clean.rel
    idx = store.read_index(cache)
    lines: list[str] = []
    return SimpleNamespace(
        root=root,
        data=root / "data",
        art=root / "art",
        cache=cache,
        seg=store.shards_dir(cache) / idx.entries[DAMAGED].name,
        spec=clean.spec,
        cols=clean.cols,
        lines=lines,
        log=lines.append,
    )


def run(c, **kw):
    return extract(c.data, c.art, c.spec, batch_size=BATCH, log=c.log, **kw)


def where(path: Path, dataset: str) -> tuple[int, int]:
    """The byte offset and size of a dataset's (first chunk of) data in its file."""
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        if ds.chunks:
            info = ds.id.get_chunk_info(0)
            return int(info.byte_offset), int(info.size)
        return int(ds.id.get_offset()), int(ds.id.get_storage_size())


def overwrite(path: Path, dataset: str, nbytes: int = 800) -> None:
    """Change up to `nbytes` in the middle of a dataset's data (never its checksum): float32
    data becomes 1e6 (the report's), any other data has a bit of each byte flipped."""
    at, size = where(path, dataset)
    with h5py.File(path, "r") as f:
        floats = f[dataset].dtype == np.float32
        if f[dataset].fletcher32:
            size -= 4  # a chunk ends with its checksum
    n = min(nbytes, size) // 4 * 4
    start = at + (size - n) // 8 * 4
    with open(path, "r+b") as fh:
        fh.seek(start)
        raw = fh.read(n)
        new = np.full(n // 4, 1e6, np.float32).tobytes() if floats else bytes(b ^ 0x10 for b in raw)
        fh.seek(start)
        fh.write(new)


def blind(path: Path, dataset: str, pattern: str) -> None:
    """Change the first chunk of a dataset as Fletcher-32 cannot see (it sums 16-bit words
    modulo 65535): "zeros" overwrites the chunk's data and its stored checksum with zeros,
    "ffff" turns the data's 16-bit words 0x0000 into 0xFFFF. A plain h5py read passes (asserted
    here) and serves the changed values: only the segment's digests can tell."""
    at, size = where(path, dataset)
    with h5py.File(path, "r") as f:
        before = f[dataset][()]
    with open(path, "r+b") as fh:
        fh.seek(at)
        raw = fh.read(size)
        if pattern == "zeros":
            new = bytes(size)
        else:
            even = (size - 4) // 2 * 2  # the data's whole words (its checksum is the last 4)
            words = np.frombuffer(raw[:even], "<u2").copy()
            assert (words == 0).sum() >= 2, "no 0x0000 words to turn"
            words[words == 0] = 0xFFFF
            new = words.tobytes() + raw[even:]
        fh.seek(at)
        fh.write(new)
    with h5py.File(path, "r") as f:
        after = f[dataset][()]  # Fletcher-32 passes: the blind spot is real
    assert after.tobytes() != before.tobytes()


def said(lines: list[str], name: str) -> list[str]:
    return [x for x in lines if name in x]


def assert_clean(c) -> None:
    """The cache holds the clean cache's rows, each with its very bytes."""
    assert columns(c.cache) == c.cols


@pytest.mark.parametrize(
    "dataset",
    ["pooled/avg", "pooled/max", "features", "path", "ident", "label", "keys/prefix", "keys/row"],
)
def test_a_flipped_bit_is_found_by_verify_and_only_its_segment_embedded_again(copy, dataset):
    c = copy
    overwrite(c.seg, dataset)
    found_by_verify(c)


@pytest.mark.parametrize(
    "dataset,pattern",
    [
        ("pooled/avg", "zeros"),
        ("pooled/max", "ffff"),
        ("features", "zeros"),
        ("features", "ffff"),
        ("ident", "zeros"),
        ("ident", "ffff"),
        ("path", "zeros"),
        ("keys/prefix", "zeros"),
    ],
)
def test_what_fletcher_cannot_see_is_found_by_verify_and_only_its_segment_embedded_again(
    copy, dataset, pattern
):
    """The review: a chunk zeroed with its checksum, or words 0x0000 turned 0xFFFF, pass
    Fletcher-32; `make features VERIFY=1` said "0 new, 33 cached". The digests find them."""
    c = copy
    blind(c.seg, dataset, pattern)
    found_by_verify(c)


def found_by_verify(c) -> None:
    """VERIFY=1 sets the damaged segment aside once, in one line, embeds its 8 rows again
    (only those), and the cache is the clean one bit for bit."""
    s = run(c, verify=True)
    told = said(c.lines, c.seg.name)
    assert s.new == 8 and s.cached == 25, (s.line(), told)
    assert len(told) == 1 and "damaged" in told[0] and "checksum" in told[0], told
    assert "8 image(s) are embedded again" in told[0] and "REBUILD" not in told[0]
    assert not c.seg.exists() and (c.seg.parent / "damaged" / c.seg.name).is_file()
    assert_clean(c)  # training reads the clean values, bit for bit
    c.lines.clear()
    again = run(c)
    assert again.new == 0 and not said(c.lines, c.seg.name)  # set aside once


@pytest.mark.parametrize("dataset", ["ident", "label", "path", "stat"])
def test_a_flipped_bit_in_a_column_every_run_reads_is_found_without_verify(copy, dataset):
    """The columns a plain run reads anyway (identities, labels, then paths and stats to reuse
    hashes): a checksum that does not match sets that segment aside there too."""
    c = copy
    overwrite(c.seg, dataset)
    s = run(c)
    told = said(c.lines, c.seg.name)
    assert s.new == 8 and len(told) == 1 and "checksum" in told[0], (s.line(), told)
    assert_clean(c)


def test_a_flipped_bit_in_the_index_rebuilds_it_from_the_segments(copy):
    c = copy
    overwrite(c.cache, "segments/name", 40)
    s = run(c, verify=True)
    assert s.new == 0, s.line()
    assert any("is damaged" in x and "moved aside" in x for x in c.lines), c.lines
    assert_clean(c)


def test_a_damaged_index_says_its_checksum_failed_in_one_line(copy):
    """Old: the line quoted HDF5 ("filter returned failure during read")."""
    c = copy
    overwrite(c.cache, "segments/name", 40)
    with pytest.raises(UserError) as e:
        store.load_features(c.cache, "avg", "train")
    msg = str(e.value)
    assert str(c.cache) in msg and "index" in msg and "checksum does not match" in msg, msg
    assert "filter" not in msg and "\n" not in msg and "rebuilds the index" in msg, msg
    s = run(c)
    told = [x for x in c.lines if c.cache.name in x and "moved aside" in x]
    assert s.new == 0 and len(told) == 1 and "checksum does not match" in told[0], c.lines
    assert "filter" not in told[0]
    assert_clean(c)


def test_a_rebuilt_index_never_takes_up_a_segment_a_reader_found_damaged(copy):
    """Old: with the index damaged too, the rebuild took the zeroed segment up unread."""
    c = copy
    blind(c.seg, "pooled/avg", "zeros")
    with pytest.raises(UserError, match="checksum"):  # a head finds it, and notes it
        store.load_features(c.cache, "avg", "train")
    overwrite(c.cache, "segments/name", 40)
    s = run(c)
    told = said(c.lines, c.seg.name)
    assert s.new == 8 and len(told) == 1 and "checksum" in told[0], (s.line(), c.lines)
    assert_clean(c)


def test_segments_written_before_digests_are_read_as_they_were(copy):
    c = copy
    for seg in store.shards_dir(c.cache).glob("g*.h5"):
        with h5py.File(seg, "r+") as f:
            del f["crc32"]
    s = run(c, verify=True)
    assert (s.new, s.cached) == (0, 33) and not [x for x in c.lines if "damaged" in x], c.lines
    assert_clean(c)


@pytest.mark.parametrize("pattern", ["zeros", "ffff"])
def test_training_refuses_what_fletcher_cannot_see_and_features_repairs_it(copy, pattern):
    """Old: `make train-head` trained on the zeroed chunk's rows."""
    c = copy
    blind(c.seg, "pooled/avg" if pattern == "zeros" else "pooled/max", pattern)
    pooling = "avg" if pattern == "zeros" else "max"
    with pytest.raises(UserError) as e:
        train_head(c.art, "logreg", pooling=pooling, folds=2, log=c.log)
    msg = str(e.value)
    assert c.seg.name in msg and "`make features`" in msg and "checksum" in msg, msg
    assert "\n" not in msg
    s = run(c)  # no VERIFY: the segment the reader found damaged is read whole, set aside
    assert s.new == 8 and len(said(c.lines, c.seg.name)) == 1, (s.line(), c.lines)
    assert_clean(c)


def test_predict_names_a_damaged_segment_of_the_cache_once(copy, tmp_path):
    """Old: predict said only "the backbone ran for 8, 25 cached", naming nothing."""
    c = copy
    train_head(c.art, "logreg", folds=2, log=c.log)
    blind(c.seg, "pooled/avg", "zeros")
    c.lines.clear()
    rows, _ = classify(c.art, c.data, out=tmp_path / "p.csv", batch_size=BATCH, log=c.log)
    told = said(c.lines, c.seg.name)
    assert len(told) == 1 and "damaged" in told[0] and "checksum" in told[0], c.lines
    assert "feature cache" in told[0] and "embedded again" in told[0], told
    assert "`make features`" in told[0], told
    assert len(rows) == 33 and sum(r["backbone_ran"] for r in rows) == 8
    c.lines.clear()
    s = run(c)  # the segment predict found damaged: set aside, its rows embedded again
    assert s.new == 8 and len(said(c.lines, c.seg.name)) == 1, (s.line(), c.lines)
    assert_clean(c)


def test_predict_on_a_full_disk_names_its_own_store_and_goes_on(copy, tmp_path, monkeypatch):
    """Old: "... the feature cache '...' is intact: free some space and rerun `make features`"."""
    c = copy
    train_head(c.art, "logreg", folds=2, log=c.log)
    new = tmp_path / "new"
    for i in range(3):
        write_image(new / f"n{i}.png", i % 3, 700 + i)
    real = fmt.check_room

    def full(folder, path, needed, **told):  # no room in the predicted-images store's folder
        if "predicted" in Path(path).parts:
            err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise fmt.disk_error(err, Path(path), needed=needed, **told)
        return real(folder, path, needed, **told)

    monkeypatch.setattr(fmt, "check_room", full)
    c.lines.clear()
    rows, out = classify(c.art, new, out=tmp_path / "p.csv", log=c.log)
    assert len(rows) == 3 and out.is_file()
    told = [x for x in c.lines if "disk full" in x]
    assert len(told) == 1 and "predicted-images store" in told[0], c.lines
    assert "predictions are still written" in told[0] and "`make predict`" in told[0], told
    assert "make features" not in told[0] and "feature cache" not in told[0], told


def test_training_never_sees_a_changed_value_and_features_repairs_it(copy):
    """The report: 800 bytes of a segment's pooled/avg overwritten with 1e6."""
    c = copy
    overwrite(c.seg, "pooled/avg")
    with pytest.raises(UserError) as e:
        train_head(c.art, "logreg", folds=2, log=c.log)
    msg = str(e.value)
    assert c.seg.name in msg and "`make features`" in msg and "checksum" in msg, msg
    assert "\n" not in msg and "REBUILD" not in msg
    s = run(c)  # no VERIFY: the segment the reader found damaged is read whole, set aside
    assert s.new == 8, s.line()
    assert_clean(c)
    assert train_head(c.art, "logreg", folds=2, log=c.log)["cv"]["folds"] == 2


def _truncate(seg: Path, monkeypatch) -> str:
    seg.write_bytes(seg.read_bytes()[: seg.stat().st_size // 2])
    return "truncated"


def _deny(seg: Path, monkeypatch) -> str:
    if os.geteuid() != 0:
        seg.chmod(0)
    else:  # root reads a chmod 000 file: the open fails as it would for anyone else
        real = h5py.File

        def denied(path, *a, **k):
            if Path(path) == seg:
                raise PermissionError(
                    errno.EACCES,
                    f"Unable to synchronously open file "
                    f"(unable to open file: name = '{seg}', errno = 13, "
                    "error message = 'Permission denied', flags = 0)",
                )
            return real(path, *a, **k)

        monkeypatch.setattr(h5py, "File", denied)
    return "Permission denied"


def _delete(seg: Path, monkeypatch) -> str:
    seg.unlink()
    return "missing"


@pytest.mark.parametrize("lose", [_truncate, _deny, _delete], ids=["truncated", "denied", "gone"])
def test_a_lost_segment_costs_its_rows_only_and_is_set_aside_once(copy, monkeypatch, lose):
    c = copy
    cause = lose(c.seg, monkeypatch)
    with pytest.raises(UserError) as e:  # train-head: one line naming it and the fix
        store.load_features(c.cache, "avg", "train")
    msg = str(e.value)
    assert c.seg.name in msg and "`make features`" in msg and "REBUILD" not in msg, msg
    assert cause in msg or cause == "missing"
    s = run(c)
    told = said(c.lines, c.seg.name)
    assert s.new == 8 and s.cached == 25, (s.line(), told)
    assert len(told) == 1 and cause in told[0] and "8 image(s)" in told[0], told
    assert not any("REBUILD" in x for x in c.lines), c.lines
    assert not c.seg.exists()
    assert (c.seg.parent / "damaged" / c.seg.name).exists() == (cause != "missing")
    assert_clean(c)
    c.lines.clear()
    again = run(c)
    assert again.new == 0 and not said(c.lines, c.seg.name), c.lines


def _features_under_limit(c, limit: int) -> subprocess.CompletedProcess:
    """`python -m pipeline features` (a batch a segment) with files limited to `limit` bytes."""

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    cmd = [
        sys.executable, "-m", "pipeline", "features", "--data", str(c.data),
        "--artifacts", str(c.art), "--weights", "none", "--size", str(SIZE), "--batch", "1",
        "--precision", c.spec.precision,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, preexec_fn=limited, env=env
    )
    for bad in ("Traceback", "Exception ignored", "Segmentation fault"):
        assert bad not in p.stderr, p.stderr[-3000:]
    assert p.returncode not in (-11, 139, -25, 153), p.stderr[-3000:]  # SIGSEGV, SIGXFSZ
    return p


def test_a_full_disk_is_one_line_and_the_cache_stays_as_it_was(copy):
    c = copy
    for i in range(7):  # 7 one-row segments: with the cache's 1-row one, 8 merge
        write_image(c.data / f"train/class_{i % 3}/new_{i}.png", i % 3, 900 + i)
    index = c.cache.read_bytes()
    segs = sorted(p.name for p in c.cache.with_suffix(".shards").glob("g*.h5"))
    # 10 KiB (`ulimit -f 10`): the first new segment cannot be written
    p = _features_under_limit(c, 10 << 10)
    assert p.returncode == 1, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: file too large while writing") and "ulimit -f" in last, last
    assert "intact" in last and "10.2 KB" in last, last
    assert c.cache.read_bytes() == index
    assert sorted(p.name for p in c.cache.with_suffix(".shards").glob("g*.h5")) == segs
    assert not list(c.cache.parent.rglob("*.tmp-*")) and not list(c.art.rglob(".tmp-*"))
    assert_clean(c)
    # 32 KiB: the new segments and the index are written, the merge of the eight is not
    p = _features_under_limit(c, 32 << 10)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "warning: merging segments stopped (file too large" in p.stdout + p.stderr
    assert "embedded 7 new, 33 cached" in p.stdout, p.stdout
    idx = store.read_index(c.cache)
    assert len(idx) == 40 and len(idx.entries) == 12
    # with room again, the next run merges them; nothing is embedded again
    s = run(c)
    assert (s.new, s.cached) == (0, 40) and len(store.read_index(c.cache).entries) == 5
    cols = columns(c.cache)
    assert all(cols[k][p] == v for k, d in c.cols.items() for p, v in d.items())


WRITES = """
import resource, sys
import numpy as np
from pathlib import Path
from pipeline.errors import DiskFull
from pipeline.store import format as fmt, manifest, segment_writer
from pipeline.store.manifest import Entry
from pipeline.store.segments import Meta

fmt.check_room = lambda *a, **k: None  # past the refusal up front: HDF5 itself hits the limit
folder = Path(sys.argv[1])
n = 64
meta = Meta(
    [f"{i:064x}" for i in range(n)], [f"img/{i}.png" for i in range(n)], ["a"] * n,
    ["train"] * n, [0] * n, [(i, i, i) for i in range(n)],
)
vec = np.random.default_rng(0).normal(size=(n, 512)).astype(np.float32)
maps = vec.reshape(n, 1, 1, 512).astype(np.float16)
dead = np.arange(0, 6000, 2, dtype=np.int64)
entries = [Entry(f"g{i:016x}.h5", 6000, "s" * 64, dead) for i in range(10)]
skipped = [{"path": f"bad/{i}.png", "reason": "x" * 200} for i in range(200)]


def write(what):
    if what == "segment":
        segment_writer.write_segment(
            folder, "k" * 64, meta, {"avg": vec, "max": vec}, maps, [], {}, "s" * 64
        )
    elif what == "writer":
        w = segment_writer.SegmentWriter(
            folder, "k" * 64, n, 512, (1, 1, 512), "float16", {}, "s" * 64
        )
        for a in range(0, n, 16):
            part = list(range(a, a + 16))
            w.write(meta.take(part), {"avg": vec[a:a + 16], "max": vec[a:a + 16]}, maps[a:a + 16])
        w.close()
    else:
        manifest.write_manifest(folder / "c.h5", entries, ["a"], skipped, {"cache_key": "k"})


for limit in (2_000, 20_000, 60_000, 346_000, 363_000, 452_000, 10**9):
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    for what in ("segment", "writer", "index"):
        try:
            write(what)
            print(limit, what, "ok", flush=True)
        except DiskFull as e:
            print(limit, what, "full:", e, flush=True)
        left = [p.name for p in folder.iterdir() if ".tmp-" in p.name]
        assert not left, left
"""


def test_hdf5_writes_past_the_size_limit_fail_in_one_line_never_a_crash(tmp_path):
    """Segments (whole, or block by block) and the index, under file-size limits that HDF5
    meets part-way, in its data or only when the file is closed: each is one line (`DiskFull`),
    no 'Exception ignored', no crash, no temporary file left behind."""

    def limited() -> None:
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.run(
        [sys.executable, "-c", WRITES, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limited,
        env=env,
    )
    assert p.returncode == 0 and p.stderr == "", (p.returncode, p.stderr[-3000:])
    said = [line.split(" ", 3) for line in p.stdout.strip().splitlines()]
    assert len(said) == 7 * 3, p.stdout
    for limit, what, how, *why in said:
        if int(limit) == 10**9:
            assert how == "ok", (limit, what, why)
        elif int(limit) <= 60_000 or what == "index":
            assert how == "full:", (limit, what)
        if how == "full:":
            assert why[0].startswith("file too large while writing '") and "ulimit -f" in why[0]
