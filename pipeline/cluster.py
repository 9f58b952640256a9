"""Past one machine: the CLUSTER setting, on Dask.

`CLUSTER=local:N` starts a `distributed.LocalCluster` of N worker processes on this machine;
`CLUSTER=tcp://host:8786` connects to a running scheduler (workers with this package installed,
DATA and ARTIFACTS on a shared filesystem). Extraction sends batches of missing images to the
workers; each worker process builds the backbone once and keeps it; the features come back to
this process, which alone writes them through the store (one writer, the same crash-safe shards):
a worker killed mid-run has its batches run again elsewhere, and every row is written once.
Cross-validation folds run through joblib's Dask backend with the data scattered once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from pipeline.errors import UserError

_MODELS: dict[str, Any] = {}  # per worker process: the backbone, built once per setting
_BUILDS: list[str] = []  # what this worker process built (the tests count it)


def parse(value: str | None) -> tuple[str, int | str] | None:
    """('local', N), ('address', 'tcp://...'), or None for no cluster."""
    if not value:
        return None
    m = re.fullmatch(r"local:(\d+)", value)
    if m and int(m.group(1)) >= 1:
        return ("local", int(m.group(1)))
    if re.fullmatch(r"(tcp|tls|ucx|inproc)://\S+", value):
        return ("address", value)
    raise UserError(
        f"CLUSTER must be local:N (N worker processes here) or a scheduler address such as "
        f"tcp://host:8786; got '{value}'"
    )


@contextmanager
def client(value: str | None) -> Iterator[Any]:
    """A Dask client for CLUSTER (None when it is empty); the local cluster ends with the block."""
    how = parse(value)
    if how is None:
        yield None
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover - a dependency of the package
        raise UserError("CLUSTER needs Dask: pip install 'distributed'") from None
    if how[0] == "local":
        with (
            LocalCluster(
                n_workers=int(how[1]),
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
                silence_logs=40,
            ) as lc,
            Client(lc) as c,
        ):
            yield c
        return
    try:
        c = Client(str(how[1]), timeout="20s")
    except OSError as e:
        raise UserError(
            f"cannot reach the Dask scheduler at {how[1]} ({e}); start one with "
            "`dask scheduler` and workers with `dask worker ADDRESS` (see the README)"
        ) from None
    with c:
        yield c


def _model(spec: Any) -> Any:
    from pipeline import backbone, store
    from pipeline.features import cache_settings

    key = store.cache_key(cache_settings(spec, "float32"))
    if key not in _MODELS:
        _MODELS[key] = backbone.build(spec)
        _BUILDS.append(key)
    return _MODELS[key]


def embed_batch(spec: Any, jobs: list[Any], augment_seed: int) -> dict[str, Any]:
    """On a worker: decode and embed one batch; the reasons of unreadable files, and the maps."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline import backbone
    from pipeline.backbone import output_shape
    from pipeline.batches import decode

    with ThreadPoolExecutor(max_workers=4) as ex:
        decoded = list(ex.map(lambda j: decode(j, spec.input_size, augment_seed), jobs))
    ok = [d for d in decoded if not isinstance(d, str)]
    reasons = {j.ident: d for j, d in zip(jobs, decoded, strict=True) if isinstance(d, str)}
    maps = np.zeros((0,) + output_shape(spec), np.float32)
    if ok:
        x = backbone.preprocess(np.stack(ok), spec.name)
        maps = np.asarray(_model(spec).predict_on_batch(x))
    from pipeline.provenance import embedder as versions

    return {
        "reasons": reasons,
        "maps": maps,
        "pid": os.getpid(),
        "builds": len(_BUILDS),
        "versions": versions(),
    }


def embedder(c: Any, window: int | None = None) -> Any:
    """An `embedder_fn` for `features.extract`: batches go to the workers, results come back.

    At most `window` batches are in flight (default 4 per worker), so memory stays bounded;
    results are yielded in completion order, each written as one shard by the caller.
    """
    from distributed import as_completed

    def run(spec: Any, todo: list[Any], batch: int, augment_seed: int):
        chunks = [todo[i : i + batch] for i in range(0, len(todo), batch)]
        n_workers = max(1, len(c.scheduler_info().get("workers", {})))
        limit = window or 4 * n_workers
        spec_f = c.scatter(spec, broadcast=True)
        pending = iter(enumerate(chunks))
        ac = as_completed()
        chunk_of: dict[str, list[Any]] = {}

        def submit_next() -> bool:
            try:
                i, chunk = next(pending)
            except StopIteration:
                return False
            f = c.submit(embed_batch, spec_f, chunk, augment_seed, key=f"embed-{i}-{id(todo)}")
            chunk_of[f.key] = chunk
            ac.add(f)
            return True

        for _ in range(limit):
            if not submit_next():
                break
        from pipeline.provenance import difference
        from pipeline.provenance import embedder as versions

        here = versions()
        for f in ac:
            out = f.result()
            if out["versions"] != here:
                raise UserError(
                    "a Dask worker decodes or embeds with other versions than this machine "
                    f"({difference(here, out['versions'])}); install the same versions on every "
                    "worker (one cache never mixes two)"
                )
            chunk = chunk_of.pop(f.key)
            f.release()
            submit_next()
            yield chunk, out["reasons"], out["maps"]

    return run


@contextmanager
def joblib_backend(c: Any, *scatter: np.ndarray) -> Iterator[None]:
    """Run joblib (scikit-learn's folds) on the cluster, with the arrays sent once."""
    if c is None:
        yield
        return
    import joblib

    with joblib.parallel_backend("dask", scatter=list(scatter)):
        yield
