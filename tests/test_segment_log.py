"""The segment log both stores share (`store.log`): a kill at any step of any run leaves a store
that reads whole, old or new and never a mix, each row once; the next run ends where an
uninterrupted one does, with nothing left behind. Run once per store: the feature cache
(`writer.Writer`) and the predicted-images store (`content.ContentStore`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline import store
from pipeline.store import log, segment_writer
from pipeline.store.content import ContentStore
from pipeline.store.segments import Meta
from pipeline.store.writer import Row, Writer

KEY, STAMP = "k" * 64, {"pillow": "test", "keras": "test"}
BATCH = 32  # rows a run adds: seven runs make seven segments of one tier, the eighth merges


def _quiet(_: str) -> None:
    pass


def ident(i: int) -> str:
    return f"{i:064x}"


def value(h: str) -> float:
    """A row's features, a function of its identity alone (exact in float16)."""
    return float(int(h, 16) % 1000)


def cache_run(path: Path, want: list[str]) -> None:
    """One `make features`: the cache holds exactly `want`, new rows staged in one batch."""
    rows = [Row(f"img/{h}.png", h, "a", "train", 0, (1, 1, 1)) for h in want]
    w = Writer(path, KEY, STAMP, maps=False, dtype="float16", log=_quiet)
    todo = [r for r in rows if not w.has(r.ident)]
    for a in range(0, len(todo), BATCH):
        part = todo[a : a + BATCH]
        v = np.array([[value(r.ident)] * 4 for r in part], np.float32)
        meta = Meta([r.ident for r in part], [r.path for r in part], ["a"] * len(part),
                    ["train"] * len(part), [0] * len(part), [r.stat for r in part])  # fmt: skip
        w.add_batch(meta, {"avg": v, "max": v}, None, [])
    attrs = {"cache_key": KEY, "feature_shape": [1, 1, 4], "maps": False}
    w.commit(rows, ["a"], [], attrs, same_source=True)


def content_run(path: Path, want: list[str]) -> None:
    """One `make predict`: the store keeps the rows of `want` it does not hold yet."""
    s = ContentStore(path, KEY, STAMP, True, "float16", {}, log=_quiet)
    maps = np.array([np.full((1, 1, 4), value(h)) for h in want], np.float16)
    s.add(want, ["x.png"] * len(want), [(1, 1, 1)] * len(want), maps)
    s.close()


RUNS = {"cache": cache_run, "content": content_run}
STEPS = {  # every call of the log that writes or deletes a file
    "stage": (log, "write_segment"),  # a run's rows, as a new segment
    "segment": (segment_writer, "write_segment"),  # any whole segment: a merge's too
    "copy": (log, "copy_rows"),  # a merge's output
    "index": (log, "write_manifest"),  # the index, replaced whole
    "collect": (log.SegmentLog, "collect"),  # files no index names, deleted
}


def held(path: Path) -> list[str]:
    """The identities the index names, each row's features checked against its identity."""
    idents = store.read_index(path).idents
    x = store.read_column(path, "pooled/avg")
    assert [float(v) for v in x[:, 0]] == [value(h) for h in idents]
    return idents


class Killed(BaseException):
    """A kill: nothing of the store's own catches it."""


@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("kind", sorted(RUNS))
def test_a_run_killed_at_any_step_leaves_a_store_that_reads_whole_and_resumes(
    tmp_path, monkeypatch, kind, step
):
    run = RUNS[kind]
    base = tmp_path / "base"
    old = [ident(i) for i in range(7 * BATCH)]
    for k in range(1, 8):  # seven segments of one tier
        run(base / "c.h5", old[: k * BATCH])
    assert len(store.read_index(base / "c.h5").entries) == 7
    new = old + [ident(i) for i in range(7 * BATCH, 8 * BATCH)]  # the eighth makes them merge
    owner, name = STEPS[step]
    real = getattr(owner, name)
    killed = 0
    for at in range(1, 20):  # the at-th call of the step is killed, until a run ends first
        path = tmp_path / f"at{at}" / "c.h5"
        shutil.copytree(base, path.parent)
        calls = []

        def kill(*a, at=at, calls=calls, **k):
            calls.append(1)
            if len(calls) == at:
                raise Killed()
            return real(*a, **k)

        monkeypatch.setattr(owner, name, kill)
        try:
            run(path, new)
            finished = True
        except Killed:
            finished, killed = False, killed + 1
        monkeypatch.undo()
        # whatever it stopped at: the store reads whole, old or new, never a mix, each row once
        idents = held(path)
        assert len(set(idents)) == len(idents)
        assert sorted(idents) in (sorted(old), sorted(new))
        # and the next run ends where an uninterrupted one does, cleaning up after the kill
        run(path, new)
        assert sorted(held(path)) == sorted(new)
        folder = store.shards_dir(path)
        assert not list(folder.glob(".tmp-*")) and not list(path.parent.glob("c.h5.tmp-*"))
        on_disk = {p.name for p in folder.glob("g*.h5")}
        assert on_disk == {e.name for e in store.read_index(path).entries}
        if finished:
            break
    assert killed >= 1, f"no {step} in a run of the {kind}"
