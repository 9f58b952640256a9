"""The one embedding stage: jobs (a file, its expected content hash, label, split, view) to maps.

`make features` (and through it `make finetune`'s block-4 cache and the sweep's per-backbone
extraction) and `make predict` embed through `embed`, modelled on clip-retrieval's inference:

- reader: `pipeline.batches` decodes a batch in threads, once per file (its views drawn from
  that one decoding), with the one decoder check: the bytes decoded are hashed, and a file whose
  bytes are not those of its job's hash (rewritten since it was hashed) comes back
  `images.Changed`, never embedded under the old hash;
- mapper: the backbone (`mapped`), built at the first batch that has something to embed;
- distributor: an engine, `Local` (threads here, the next batch decoding while the backbone runs
  on this one) or `Dask` (batches sent to a cluster's workers, each worker checking the weights
  by content and building the backbone once; a worker killed mid-run has its batches run again
  elsewhere by the scheduler); either yields one result per batch, in the order given;
- writer: the caller's `sink` (the store's segment writer for features, the predicted-images
  store for predict), given each batch's rows before they are yielded.

One retry policy: a job whose file changed while it was read is given to the caller's `again`
with the hash of the bytes read, which says what to embed for that content now (nothing when it
is found already), at most `retries` times; then it is skipped with `changed_reason`, the same
words for every command. One progress line (`label`), counted in jobs.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, overload

import numpy as np

from pipeline import backbone, images, signature, store
from pipeline import batches as reader
from pipeline.errors import UserError
from pipeline.hashing import Hashed
from pipeline.listing import SPLITS, Listing
from pipeline.progress import Progress

Stat = tuple[int, int, int]
# what an engine yields per batch: the batch, {position in it: why not embedded}, and the maps
# and image signatures (`pipeline.signature`) of the others in the batch's order (None: none)
Result = tuple[list[Any], dict[int, images.Unreadable], np.ndarray | None, np.ndarray | None]


@dataclass(frozen=True)
class Job:
    """One row to embed: a file, its expected content hash, label, split and view (0: the image
    itself, 1..K: augmented views, drawn from the hash and the view number)."""

    path: str
    abspath: Path
    sha256: str | None
    label: int = -1
    split: str = ""
    view: int = 0
    stat: Stat = (0, 0, 0)
    reason: str = ""  # why the file could not be hashed (sha256 is None)

    @property
    def ident(self) -> str:
        if self.sha256 is None:
            return f"unhashable:{self.path}"
        return store.ident(self.sha256, self.view)


class Jobs(Sequence[Job]):
    """Jobs as columns, a `Job` made only when asked (a batch): which listed file each job is
    (`at`, None: each file once, in order) and which view (`view`, None: 0); the files' paths,
    labels and splits are the listing's, their stats and hashes `hashed`'s. What a run holds
    per job is a few bytes, not an object."""

    def __init__(
        self,
        root: Path,
        listing: Listing,
        hashed: Hashed,
        at: np.ndarray | None = None,
        view: np.ndarray | None = None,
    ) -> None:
        self.root, self.listing, self.hashed, self.at, self.view = root, listing, hashed, at, view

    def __len__(self) -> int:
        return len(self.listing) if self.at is None else len(self.at)

    def file(self, k: int) -> int:
        """The listed file of job `k`."""
        return k if self.at is None else int(self.at[k])

    def files(self) -> np.ndarray:
        """The listed file of every job."""
        return np.arange(len(self.listing)) if self.at is None else self.at

    def view_of(self, k: int) -> int:
        return 0 if self.view is None else int(self.view[k])

    def ok(self) -> np.ndarray:
        """Whether each job's file was hashed (the others are listed with their reason)."""
        return self.hashed.ok if self.at is None else self.hashed.ok[self.at]

    def ident(self, k: int) -> str:
        i = self.file(k)
        h = self.hashed.hex(i)
        if h is None:
            return f"unhashable:{self.listing.shown(i)}"
        return store.ident(h, self.view_of(k))

    def idents(self, ks: np.ndarray) -> _Idents:
        """The identities of jobs `ks`, each made when read."""
        return _Idents(self, ks)

    def label(self, k: int) -> int:
        return int(self.listing.label[self.file(k)])

    def split(self, k: int) -> str:
        return SPLITS[int(self.listing.split[self.file(k)])]

    def path(self, k: int) -> str:
        return self.listing.shown(self.file(k))

    def take(self, ks: np.ndarray, view: np.ndarray | None = None) -> Jobs:
        """Jobs `ks` of these (with other views: `view`)."""
        at = self.files()[ks]
        if view is None and self.view is not None:
            view = self.view[ks]
        return Jobs(self.root, self.listing, self.hashed, at, view)

    @overload
    def __getitem__(self, k: int) -> Job: ...
    @overload
    def __getitem__(self, k: slice) -> list[Job]: ...
    def __getitem__(self, k: int | slice) -> Job | list[Job]:
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        i, h = self.file(k), self.hashed
        return Job(
            self.listing.shown(i),
            self.root / self.listing.path(i),
            h.hex(i),
            int(self.listing.label[i]),
            SPLITS[int(self.listing.split[i])],
            self.view_of(k),
            h.stat_of(i),
            "" if h.ok[i] else h.reasons.get(i, ""),
        )

    def __iter__(self) -> Iterator[Job]:
        for k in range(len(self)):
            yield self[k]


class _Idents(Sequence[str]):
    """The identities of some jobs, each made when read (`Writer.has_many` streams them)."""

    def __init__(self, jobs: Jobs, ks: np.ndarray) -> None:
        self.jobs, self.ks = jobs, ks

    def __len__(self) -> int:
        return len(self.ks)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.jobs.ident(int(self.ks[i]))

    def __iter__(self) -> Iterator[str]:
        for a in range(0, len(self.ks), 1024):  # no Python int per job held
            for k in self.ks[a : a + 1024].tolist():
                yield self.jobs.ident(k)


class Engine(Protocol):
    """Embeds batches of jobs somewhere: one `Result` per batch, in the order given."""

    def __call__(
        self, spec: Any, batches: Iterable[Sequence[Job]], augment_seed: int
    ) -> Iterator[Result]: ...


CHANGED = (
    "the file changed while it was read (its bytes are not the ones hashed a moment before): "
    "not cached this time; rerun `{command}` when nothing writes it any more"
)


def changed_reason(command: str) -> str:
    """Why a file that kept changing while it was read is skipped (`command`: what to rerun)."""
    return CHANGED.format(command=command)


@dataclass
class Embedded:
    """One batch after the stage: what was embedded (one row of `maps` each, in order; a job
    retried after its file changed: the job `again` gave, under the new bytes' hash) and what
    was not, with why."""

    jobs: list[Any]
    done: list[Any] = field(default_factory=list)
    maps: np.ndarray | None = None
    failed: list[tuple[Any, images.Unreadable]] = field(default_factory=list)
    signatures: np.ndarray | None = None  # one row per embedded job (`pipeline.signature`)

    def add(
        self, chunk: Sequence[Any], reasons: dict[int, Any], maps: Any, sigs: Any = None
    ) -> None:
        self.done += [j for n, j in enumerate(chunk) if n not in reasons]
        self.failed += [(chunk[n], reasons[n]) for n in sorted(reasons)]
        if maps is not None and len(maps):
            m = np.asarray(maps)
            self.maps = m if self.maps is None else np.concatenate([self.maps, m])
            s = np.asarray(sigs) if sigs is not None else np.full((len(m), signature.WIDTH), np.nan)
            s = s.astype(signature.DTYPE)
            self.signatures = s if self.signatures is None else np.concatenate([self.signatures, s])


def batched(jobs: Sequence[Job], size: int) -> Iterator[Sequence[Job]]:
    """Batches of `size` jobs, each made when the stage takes it (`Jobs`: no object before)."""
    for i in range(0, len(jobs), size):
        yield jobs[i : i + size]


def embed(
    batches: Iterable[Sequence[Job]],
    spec: Any,
    engine: Engine | None = None,
    *,
    augment_seed: int = 0,
    retries: int = 0,
    again: Callable[[Any, str], Sequence[Job]] | None = None,
    sink: Callable[[Embedded], None] | None = None,
    command: str = "make features",
    label: str = "",
    total: int = 0,
) -> Iterator[Embedded]:
    """Embed each batch of jobs with `engine` (default `Local()`), yielding an `Embedded` per
    batch in the order given, after `sink` has it.

    A job whose file changed while it was read: `again(job, sha256 of the bytes read)` gives the
    jobs to embed now for that content (an empty list: nothing to embed, it is found already),
    embedded at once; at most `retries` rounds, then it is failed with `changed_reason(command)`
    (an `images.Changed` naming the last hash read). `label`: a progress line over `total` jobs.
    """
    engine = engine if engine is not None else Local()
    progress = Progress(total, label) if label else None
    for chunk, reasons, maps, *sigs in engine(spec, batches, augment_seed):
        out = Embedded(list(chunk))
        out.add(chunk, reasons, maps, *sigs)
        for _ in range(retries if again is not None else 0):
            moved = [(j, r) for j, r in out.failed if isinstance(r, images.Changed)]
            if not moved:
                break
            out.failed = [(j, r) for j, r in out.failed if not isinstance(r, images.Changed)]
            redo = [k for j, r in moved for k in again(j, r.sha256)]  # type: ignore[misc]
            if redo:
                for c, rs, m, *sg in engine(spec, [redo], augment_seed):
                    out.add(c, rs, m, *sg)
        out.failed = [
            (j, images.Changed(changed_reason(command), r.sha256))
            if isinstance(r, images.Changed)
            else (j, r)
            for j, r in out.failed
        ]
        if sink is not None:
            sink(out)
        if progress is not None:
            progress.update(len(chunk))
        yield out


def mapped(model: Any, arrays: Sequence[np.ndarray], spec: Any) -> np.ndarray:
    """The mapper: the backbone's maps of decoded uint8 arrays (one batch, preprocessed)."""
    return np.asarray(model.predict_on_batch(backbone.preprocess(np.stack(arrays), spec.name)))


def _split(decoded: Sequence[Any]) -> tuple[list[Any], dict[int, Any]]:
    """The arrays decoded, and {position: reason} of the others."""
    ok = [d for d in decoded if not isinstance(d, str)]
    return ok, {n: d for n, d in enumerate(decoded) if isinstance(d, str)}


class Local:
    """The engine of this process: decoding in `workers` threads, a batch ahead of the backbone
    (`model`, or built once per setting at the first batch with something to embed)."""

    def __init__(self, workers: int | None = None, model: Any = None) -> None:
        self.workers = workers or min(8, (os.cpu_count() or 2) + 2)
        self.model = model
        self._models: dict[Any, Any] = {}

    def _model(self, spec: Any) -> Any:
        if self.model is not None:
            return self.model
        if spec not in self._models:
            self._models[spec] = backbone.build(spec)
        return self._models[spec]

    def __call__(
        self, spec: Any, batches: Iterable[Sequence[Job]], augment_seed: int = 0
    ) -> Iterator[Result]:
        size = spec.input_size
        for chunk, decoded in reader.decoded_batches(batches, size, self.workers, augment_seed):
            ok, reasons = _split(decoded)
            if not ok:
                yield chunk, reasons, None, None
                continue
            yield chunk, reasons, mapped(self._model(spec), ok, spec), signature.of_arrays(ok)


# -- the Dask engine: batches to a cluster's workers ------------------------------------------

_MODELS: dict[Any, Any] = {}  # per worker process: the backbone, built once per setting
_BUILDS: list[str] = []  # what this worker process built (the tests count it)


class WorkerRefused(Exception):
    """A worker cannot do what it was sent (other weights, files it cannot see): said by name."""


def _worker() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):  # not in a worker (the tests call it directly)
        return f"pid {os.getpid()}"


def _worker_model(spec: Any, weights_id: str) -> Any:
    """The backbone of `spec`, built once per worker process; its weights checked by content.

    A worker whose WEIGHTS file differs from the client's (or is missing there) is refused
    with its address and the path, never embedding with other weights.
    """
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


def embed_batch(spec: Any, jobs: list[Job], augment_seed: int, weights_id: str) -> dict[str, Any]:
    """On a worker: one batch through the reader and the mapper; its reasons and maps.

    Files this worker cannot see at all (the client could: it hashed them) come back apart,
    so that the client says which worker and which path instead of skipping the images.
    """
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.provenance import embedder as versions

    out: dict[str, Any] = {"pid": os.getpid(), "worker": _worker(), "versions": versions()}
    unseen = [str(j.abspath) for j in jobs if not os.path.exists(j.abspath)]
    if unseen:
        return {**out, "unseen": unseen}
    try:
        model = _worker_model(spec, weights_id)
    except WorkerRefused as e:
        return {**out, "refused": str(e)}
    with ThreadPoolExecutor(max_workers=4) as ex:
        decoded = reader.decode_batch(jobs, spec.input_size, augment_seed, ex)()
    ok, reasons = _split(decoded)
    maps = mapped(model, ok, spec) if ok else None
    sigs = signature.of_arrays(ok) if ok else None
    return {**out, "reasons": reasons, "maps": maps, "signatures": sigs, "builds": len(_BUILDS)}


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


class Dask:
    """The engine of a Dask client's workers (`pipeline.cluster.client`).

    At most `window` batches are in flight (default 4 per worker), so memory stays bounded;
    results come back in the order given, one writer here writing them. Task keys are unique
    (a uuid per call and batch), so no task is ever served another's result. Workers are sent
    only what they read (path, hash, view); `source` (DATA or IMAGES) names what a worker that
    cannot see a file must be given.
    """

    def __init__(self, client: Any, window: int | None = None, source: str = "DATA") -> None:
        self.client, self.window, self.source = client, window, source
        self._sent: dict[
            Any, tuple[Any, Any, str]
        ] = {}  # spec -> (its absolute form, scattered, weights id)

    def _spec(self, spec: Any) -> tuple[Any, str]:
        if spec not in self._sent:
            sent = spec
            if spec.weights_kind == "file":  # workers resolve no relative path of the client's
                sent = dataclasses.replace(spec, weights=str(Path(spec.weights).absolute()))
            self._sent[spec] = (sent, self.client.scatter(sent, broadcast=True), sent.weights_id())
        _, scattered, weights_id = self._sent[spec]
        return scattered, weights_id

    def __call__(
        self, spec: Any, batches: Iterable[Sequence[Job]], augment_seed: int = 0
    ) -> Iterator[Result]:
        from pipeline.provenance import embedder as versions

        c = self.client
        limit = self.window or 4 * max(1, len(c.scheduler_info().get("workers", {})))
        here = versions()
        call = uuid.uuid4().hex[:12]
        queue: deque[tuple[list[Any], Any]] = deque()

        def result(chunk: list[Any], fut: Any) -> Result:
            if fut is None:
                return chunk, {}, None, None
            out = checked(fut.result(), here, self.source)
            fut.release()
            return chunk, out["reasons"], out["maps"], out.get("signatures")

        for k, b in enumerate(batches):
            chunk = list(b)
            fut = None
            if chunk:
                spec_f, weights_id = self._spec(spec)
                sent = [
                    Job(j.path, Path(os.path.abspath(j.abspath)), j.sha256, view=j.view)
                    for j in chunk
                ]
                fut = c.submit(
                    embed_batch, spec_f, sent, augment_seed, weights_id, key=f"embed-{call}-{k}"
                )
            queue.append((chunk, fut))
            while queue and (len(queue) > limit or queue[0][1] is None):
                yield result(*queue.popleft())
        while queue:
            yield result(*queue.popleft())
