"""CLUSTER on Dask: the same cache as one process, complete after a worker dies, folds on it."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from conftest import make_dataset

from pipeline import cluster, embedding, store
from pipeline.errors import UserError
from pipeline.features import extract
from pipeline.train import train_head

distributed = pytest.importorskip("distributed")


def _same_cache(a, b) -> None:
    """The same rows and features (in any order: batches come back in completion order)."""
    ia, ib = store.read_index(a), store.read_index(b)
    assert sorted(zip(ia.paths, ia.sha256, ia.labels.tolist(), strict=False)) == sorted(
        zip(ib.paths, ib.sha256, ib.labels.tolist(), strict=False)
    )
    assert len(set(zip(ib.sha256, ib.view, strict=True))) == len(ib.paths)  # no row twice
    oa, ob = np.argsort(ia.paths), np.argsort(ib.paths)
    # the image signatures: the same bits from a worker as here (NumPy and Pillow only)
    np.testing.assert_array_equal(
        store.read_column(a, "signature")[oa], store.read_column(b, "signature")[ob]
    )
    for name in ("features", "pooled/avg"):
        np.testing.assert_allclose(
            store.read_column(a, name)[oa], store.read_column(b, name)[ob], rtol=1e-3, atol=1e-3
        )
    fa, ga = store.read_attrs(a), store.read_attrs(b)
    assert fa["cache_key"] == ga["cache_key"] and fa["data_id"] == ga["data_id"]


def _builds(c) -> dict[str, int]:
    return c.run(lambda: len(embedding._BUILDS))


def test_two_worker_processes_make_the_same_cache(tmp_path, quiet, two_workers):
    """On the session's two workers (`two_workers`: reached by its tcp:// address), with a
    backbone setting no other test uses, so that each worker's builds are this test's."""
    from pipeline.backbone import BackboneSpec

    log, _ = quiet
    spec = BackboneSpec(weights="none", input_size=32, seed=23)
    data = make_dataset(tmp_path / "data", per_class=8, validation=2)
    before = _builds(two_workers)
    one = extract(data, tmp_path / "one", spec, batch_size=4, log=log)
    seen: list[dict] = []
    fn = cluster.embedder(two_workers)

    def recording(*a):
        for chunk, reasons, maps, sigs in fn(*a):
            seen.append({"n": len(chunk)})
            assert sigs is not None and len(sigs) == len(maps)  # signatures from the workers
            yield chunk, reasons, maps, sigs

    two = extract(data, tmp_path / "two", spec, batch_size=4, log=log, embedder_fn=recording)
    assert two.new == one.new == 30 and len(seen) == 8
    _same_cache(one.cache, two.cache)
    # each worker process built the backbone once, however many batches it ran
    builds = {w: n - before[w] for w, n in _builds(two_workers).items()}
    assert set(builds.values()) <= {0, 1} and sum(builds.values()) >= 1
    # folds on the cluster give the same numbers as folds here
    here = train_head(tmp_path / "one", "logreg", folds=3, log=log)
    there = train_head(tmp_path / "two", "logreg", folds=3, log=log, client=two_workers)

    def by_path(art, r):  # out-of-fold predictions per image (the caches' row orders differ)
        return dict(zip(r["cv"]["oof_paths"], r["cv"]["oof_pred"], strict=True))

    assert by_path(tmp_path / "one", here) == by_path(tmp_path / "two", there)
    assert here["cv"]["fold_accuracies"] == there["cv"]["fold_accuracies"]


def test_a_worker_killed_mid_run_still_yields_the_complete_cache(tmp_path, spec, quiet):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=12)
    clean = extract(data, tmp_path / "clean", spec, batch_size=2, log=log)
    with cluster.client("local:2") as c:
        killed: list[str] = []
        lost: list[str] = []  # the batches (task keys) the killed worker held when it died
        fn = cluster.embedder(c, window=8)

        def kill_one_worker() -> None:
            deadline = time.time() + 60
            while time.time() < deadline:
                busy = [(w, t) for w, t in c.processing().items() if t]
                if busy:
                    # SIGKILL by process id, as an OOM killer would (old: `c.run(os._exit,
                    # wait=False)` failed with "Combination not supported": nothing died)
                    w, keys = busy[0]
                    pid = c.run(os.getpid, workers=[w])[w]
                    killed.append(w)
                    lost.extend(keys)
                    os.kill(pid, signal.SIGKILL)
                    return
                time.sleep(0.05)

        def slow(*a):
            started = False
            for out in fn(*a):
                if not started:
                    started = True
                    t = threading.Thread(target=kill_one_worker)
                    t.start()
                    t.join()
                yield out

        s = extract(data, tmp_path / "killed", spec, batch_size=2, log=log, embedder_fn=slow)
        deadline = time.time() + 30
        while killed and killed[0] in c.scheduler_info()["workers"] and time.time() < deadline:
            time.sleep(0.2)
        alive = set(c.scheduler_info()["workers"])
        # where each lost batch was sent: a second time on "processing" is a batch run again
        sent = c.run_on_scheduler(
            lambda keys, dask_scheduler=None: [
                t[0] for t in dask_scheduler.story(*keys) if t[2] == "processing"
            ],
            lost,
        )
    assert killed and lost, "no worker was killed while it held a batch"
    assert killed[0] not in alive, "the killed worker is still there: it never died"
    assert any(sent.count(k) >= 2 for k in lost), "no batch of the dead worker ran again"
    assert s.new == 36 and s.skipped == 0
    _same_cache(clean.cache, s.cache)


def _weight_sums(size: int, seed: int) -> list[float]:
    from pipeline.backbone import BackboneSpec, build

    model = build(BackboneSpec("none", input_size=size, seed=seed))
    return [float(w.sum()) for w in model.get_weights()]


def test_random_weights_are_the_same_in_every_process_and_build(two_workers, spec):
    """WEIGHTS=none is seeded: every build, here or in any worker's thread, is identical.

    With Keras' own seeded initialisers, a second build in a Dask worker came out different
    beyond the first layer, so two workers embedded with two different networks.
    """
    here = _weight_sums(spec.input_size, 0)
    fs = [two_workers.submit(_weight_sums, spec.input_size, 0, pure=False) for _ in range(4)]
    assert all(f.result() == here for f in fs)
    assert _weight_sums(spec.input_size, 1) != here


def test_cluster_setting_is_checked(monkeypatch):
    assert cluster.parse("local:3") == ("local", 3)
    assert cluster.parse("tcp://10.0.0.1:8786") == ("address", "tcp://10.0.0.1:8786")
    assert cluster.parse("") is None
    with pytest.raises(UserError, match="CLUSTER must be local:N .* got 'local:0'"):
        cluster.parse("local:0")
    # nothing listens there: tried for CONNECT_TIMEOUT (20 s; 2 s here), then one line
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", "2s")
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        with cluster.client("tcp://127.0.0.1:9"):
            pass
    assert time.perf_counter() - t0 < 15


def test_a_scheduler_address_is_reached_and_its_workers_do_the_work(
    dask_scheduler, two_workers, tmp_path
):
    """CLUSTER=tcp://host:port (the session's scheduler): the library reaches it, its workers
    embed (they build the backbone) and cross-validate, with the numbers of one process."""
    import pipeline

    assert cluster.parse(dask_scheduler) == ("address", dask_scheduler)
    data = make_dataset(tmp_path / "data", per_class=4, n_classes=2)
    q = lambda s: None  # noqa: E731
    kw = {"weights": "none", "size": 32, "seed": 29, "log": q}  # a setting only this test uses
    before = _builds(two_workers)
    there = pipeline.extract(data, tmp_path / "there", cluster=dask_scheduler, **kw)
    assert sum(_builds(two_workers).values()) > sum(before.values())  # embedded on a worker
    here = pipeline.extract(data, tmp_path / "here", **kw)
    assert there.new == here.new == 8
    _same_cache(here.cache, there.cache)
    a = pipeline.train_head(tmp_path / "here", "logreg", folds=2, params={"C": 1}, log=q)
    b = pipeline.train_head(
        tmp_path / "there", "logreg", folds=2, params={"C": 1}, cluster=dask_scheduler, log=q
    )
    assert a["cv"]["fold_accuracies"] == b["cv"]["fold_accuracies"]


def test_a_worker_with_other_weights_is_refused_by_name(tmp_path, quiet, two_workers, monkeypatch):
    import keras

    from pipeline.backbone import BackboneSpec

    log, _ = quiet
    model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    w = tmp_path / "w.weights.h5"
    model.save_weights(w)
    data = make_dataset(tmp_path / "data", per_class=2, n_classes=2)
    spec = BackboneSpec(str(w), input_size=32)
    # this machine's weights differ from the workers' file at the same path (which they hash)
    monkeypatch.setattr(BackboneSpec, "weights_id", lambda self: "file:sha256=" + "0" * 64)
    with pytest.raises(
        UserError, match=r"Dask worker tcp://\S+ has other weights at '.*w\.weights\.h5'"
    ):
        extract(data, tmp_path / "art", spec, log=log, embedder_fn=cluster.embedder(two_workers))


def test_a_worker_that_cannot_see_data_is_named(tmp_path, spec, quiet, two_workers, monkeypatch):
    log, _ = quiet
    data = make_dataset(tmp_path / "data", per_class=2, n_classes=2)
    gone = tmp_path / "elsewhere"
    fn = cluster.embedder(two_workers)

    def moved(spec, batches, seed):  # the workers are sent paths they do not have
        import dataclasses

        batches = ([dataclasses.replace(j, abspath=gone / j.path) for j in b] for b in batches)
        yield from fn(spec, batches, seed)

    with pytest.raises(
        UserError, match=r"Dask worker tcp://\S+ cannot see '.*elsewhere.*' .*same absolute path"
    ):
        extract(data, tmp_path / "art", spec, log=log, embedder_fn=moved)
    # nothing was remembered as unreadable: with the data where workers see it, all is embedded
    s = extract(data, tmp_path / "art", spec, log=log, embedder_fn=fn)
    assert s.new == 4 and s.skipped == 0
