"""Past one machine: the CLUSTER setting, on Dask.

`CLUSTER=local:N` starts a `distributed.LocalCluster` of N worker processes on this machine;
`CLUSTER=tcp://host:8786` connects to a running scheduler (workers with this package installed,
DATA and ARTIFACTS on a shared filesystem). Embedding sends batches of missing images to the
workers (`embedder`: the Dask engine of `pipeline.embedding`); each worker process builds the
backbone once and keeps it; the features come back to this process, which alone writes them
through the store (one writer, the same crash-safe segments): a worker killed mid-run has its
batches run again elsewhere, and every row is written once.
Cross-validation folds run through joblib's Dask backend with the data scattered once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from pipeline.errors import UserError

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


def embedder(c: Any, window: int | None = None) -> Any:
    """The embedding stage's Dask engine on client `c` (`pipeline.embedding.Dask`): batches go
    to the workers, at most `window` in flight (default 4 per worker), results come back here."""
    from pipeline.embedding import Dask

    return Dask(c, window)


@contextmanager
def joblib_backend(c: Any, *scatter: np.ndarray) -> Iterator[None]:
    """Run joblib (scikit-learn's folds) on the cluster, with the arrays sent once."""
    if c is None:
        yield
        return
    import joblib

    with joblib.parallel_backend("dask", scatter=list(scatter)):
        yield
