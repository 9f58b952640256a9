"""Past one machine: the CLUSTER setting, on Dask.

`CLUSTER=local:N` starts a `distributed.LocalCluster` of N worker processes on this machine;
`CLUSTER=tcp://host:8786` connects to a running scheduler (workers with this package installed,
DATA and ARTIFACTS on a shared filesystem). Extraction sends batches of missing images to the
workers; each worker process builds the backbone once and keeps it; the features come back to
this process, which alone writes them through the store (one writer, the same crash-safe segments):
a worker killed mid-run has its batches run again elsewhere, and every row is written once.
Cross-validation folds run through joblib's Dask backend with the data scattered once.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError

_MODELS: dict[str, Any] = {}  # per worker process: the backbone, built once per setting
_BUILDS: list[str] = []  # what this worker process built (the tests count it)
CONNECT_TIMEOUT = "20s"  # how long a scheduler address is tried (one that is starting: retried)


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
        c = Client(str(how[1]), timeout=CONNECT_TIMEOUT)
    except OSError as e:
        raise UserError(
            f"cannot reach the Dask scheduler at {how[1]} ({e}); start one with "
            "`dask scheduler` and workers with `dask worker ADDRESS` (see the README)"
        ) from None
    with c:
        yield c


class WorkerRefused(Exception):
    """A worker cannot do what it was sent (other weights, files it cannot see): said by name."""


def _worker() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):  # not in a worker (the tests call it directly)
        return f"pid {os.getpid()}"


def _model(spec: Any, weights_id: str) -> Any:
    """The backbone of `spec`, built once per worker process; its weights checked by content.

    A worker whose WEIGHTS file differs from the client's (or is missing there) is refused
    with its address and the path, never embedding with other weights.
    """
    from pipeline import backbone

    if spec not in _MODELS:
        if spec.weights_kind == "file":
            try:
                here = spec.weights_id()  # hashed once per worker and setting, not per batch
            except OSError as e:
                raise WorkerRefused(
                    f"Dask worker {_worker()} cannot read WEIGHTS '{spec.weights}' "
                    f"({e.strerror or e}); put the weights file at that path on every worker "
                    "(a shared filesystem)"
                ) from None
            if here != weights_id:
                raise WorkerRefused(
                    f"Dask worker {_worker()} has other weights at '{spec.weights}' "
                    f"({here[:24]}..., this machine: {weights_id[:24]}...); put the same "
                    "weights file on every worker"
                )
        _MODELS[spec] = backbone.build(spec)
        _BUILDS.append(spec.name)
    return _MODELS[spec]


def embed_batch(
    spec: Any, jobs: list[Any], augment_seed: int, weights_id: str = "", check: bool = False
) -> dict[str, Any]:
    """On a worker: decode and embed one batch; the reasons of unreadable files, and the maps.

    Files this worker cannot see at all (the client could: it hashed them) come back apart,
    so that the client says which worker and which path instead of skipping the images.
    `check`: a file whose bytes are not those of its job's hash any more (rewritten since the
    client hashed it) is not embedded; its reason is an `images.Changed` naming the new hash.
    """
    from concurrent.futures import ThreadPoolExecutor

    from pipeline import backbone
    from pipeline.backbone import output_shape
    from pipeline.batches import decode
    from pipeline.provenance import embedder as versions

    out: dict[str, Any] = {"pid": os.getpid(), "worker": _worker(), "versions": versions()}
    unseen = [str(j.abspath) for j in jobs if not os.path.exists(j.abspath)]
    if unseen:
        return {**out, "unseen": unseen}
    try:
        model = _model(spec, weights_id)
    except WorkerRefused as e:
        return {**out, "refused": str(e)}
    with ThreadPoolExecutor(max_workers=4) as ex:
        decoded = list(ex.map(lambda j: decode(j, spec.input_size, augment_seed, check), jobs))
    ok = [d for d in decoded if not isinstance(d, str)]
    reasons = {j.ident: d for j, d in zip(jobs, decoded, strict=True) if isinstance(d, str)}
    maps = np.zeros((0,) + output_shape(spec), np.float32)
    if ok:
        x = backbone.preprocess(np.stack(ok), spec.name)
        maps = np.asarray(model.predict_on_batch(x))
    return {**out, "reasons": reasons, "maps": maps, "builds": len(_BUILDS)}


def embedder(c: Any, window: int | None = None) -> Any:
    """An `embedder_fn` for `features.extract`: batches go to the workers, results come back.

    At most `window` batches are in flight (default 4 per worker), so memory stays bounded;
    results are yielded in completion order, each staged as one segment by the caller. Task
    keys are unique (a uuid per call and batch), so no task is ever served another's result.
    Workers hash the bytes they decode (`embed_batch` with `check`): a file rewritten since this
    process hashed it comes back as an `images.Changed` reason, never embedded under the old hash.
    """
    import uuid

    from distributed import as_completed

    def run(spec: Any, todo: list[Any], batch: int, augment_seed: int):
        chunks = [todo[i : i + batch] for i in range(0, len(todo), batch)]
        n_workers = max(1, len(c.scheduler_info().get("workers", {})))
        limit = window or 4 * n_workers
        if spec.weights_kind == "file":  # workers resolve no relative path of the client's
            spec = dataclasses.replace(spec, weights=str(Path(spec.weights).absolute()))
        weights_id = spec.weights_id()  # the client's weights, by content, checked by workers
        spec_f = c.scatter(spec, broadcast=True)
        pending = iter(enumerate(chunks))
        ac = as_completed()
        chunk_of: dict[str, list[Any]] = {}
        call = uuid.uuid4().hex[:12]

        def submit_next() -> bool:
            try:
                i, chunk = next(pending)
            except StopIteration:
                return False
            f = c.submit(
                embed_batch, spec_f, chunk, augment_seed, weights_id, True, key=f"embed-{call}-{i}"
            )
            chunk_of[f.key] = chunk
            ac.add(f)
            return True

        for _ in range(limit):
            if not submit_next():
                break
        from pipeline.provenance import embedder as versions

        here = versions()
        for f in ac:
            out = checked(f.result(), here, "DATA")
            chunk = chunk_of.pop(f.key)
            f.release()
            submit_next()
            yield chunk, out["reasons"], out["maps"]

    return run


def checked(out: dict[str, Any], here: dict[str, Any], what: str) -> dict[str, Any]:
    """A worker's batch result, or the one-line refusal it carries: other weights, an image it
    cannot see (`what`: DATA or IMAGES), other decoder/framework versions."""
    from pipeline.provenance import difference

    if "refused" in out:
        raise UserError(out["refused"])
    if "unseen" in out:
        raise UserError(
            f"Dask worker {out['worker']} cannot see '{out['unseen'][0]}' (and "
            f"{len(out['unseen']) - 1} more of its batch), which this machine reads: "
            f"put {what} on a filesystem every worker shares, at the same absolute path"
        )
    if out["versions"] != here:
        raise UserError(
            f"Dask worker {out['worker']} decodes or embeds with other versions than "
            f"this machine ({difference(here, out['versions'])}); install the same "
            "versions on every worker (one cache never mixes two)"
        )
    return out


@contextmanager
def joblib_backend(c: Any, *scatter: np.ndarray) -> Iterator[None]:
    """Run joblib (scikit-learn's folds) on the cluster, with the arrays sent once."""
    if c is None:
        yield
        return
    import joblib

    with joblib.parallel_backend("dask", scatter=list(scatter)):
        yield
