"""Trained runs: written whole, listed, loaded after a hash check, and told current or stale.

A run is one folder `ARTIFACTS/heads/<run>/`: `result.json` (metrics, settings, the cache it was
trained on by key and content, the SHA-256 of every saved file) and the saved head. It is
written in a temporary folder and renamed into place, so a reader sees a whole run or none.
Its name carries a short id of the cache key, the cache's content, the seed and the folds, so
runs on different caches never share a folder.

A run is *current* when the cache it was trained on is still on disk unchanged (same key, same
content) and describes the same images, labels and splits as the latest `make features`, and,
for a run with VIEWS, its augmented-views cache is too (same key, content and versions);
otherwise it is *stale*: shown apart, never ranked with current runs, never picked by default.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import layout, outputs, store
from pipeline.errors import UserError

RESULT = "result.json"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def run_name(
    base: str, cache_key: str, data_id: str, seed: int, folds: int, repeats: int = 1
) -> str:
    """`<head>-<pooling>[-settings][-views=K]--<id>`, the id from the cache and the CV settings."""
    ident: list[Any] = [cache_key, data_id, seed, folds] + ([repeats] if repeats != 1 else [])
    rid = hashlib.sha256(json.dumps(ident).encode()).hexdigest()
    return f"{base}--{rid[:10]}"


def base_of(name: str) -> str:
    return name.split("--")[0]


def write_run(
    artifacts: Path, name: str, result: dict[str, Any], save: Callable[[Path], list[Path]]
) -> Path:
    """Write a run whole: `save(folder)` writes the head's files, then result.json with hashes."""
    hdir = layout.heads_dir(artifacts)
    hdir.mkdir(parents=True, exist_ok=True)
    # each writer its own folder (two train-heads of one run, in two processes or threads)
    tmp = hdir / f".tmp-{name}.{secrets.token_hex(4)}-{os.getpid()}"
    tmp.mkdir()
    final, old = hdir / name, hdir / f".old-{name}-{os.getpid()}"
    kept = f"run '{name}' as it was is intact" if final.exists() else "no run was saved"
    try:
        try:  # each file through `outputs.written` (on disk before the folder takes the name)
            with outputs.telling(kept, needed=_size(final) or None):
                files = save(tmp)
                result = {**result, "run": name, "files": {p.name: file_sha256(p) for p in files}}
                outputs.write_text(tmp / RESULT, json.dumps(result, indent=1))
        except OSError as e:  # no room: one line; the run as it was stays
            told = {"needed": _size(final) or _size(tmp), "kept": kept, "rerun": "the same command"}
            raise store.disk_error(e, tmp, **told) or e from None
        with _one_at_a_time(hdir):  # a second writer waits here: the last one's run stays
            _recover(hdir)
            if final.exists():
                os.rename(final, old)
            try:
                os.rename(tmp, final)
            except OSError:  # a writer that does not take turns (NFS without locks)
                raise UserError(
                    f"another train-head wrote run '{name}' at the same moment; rerun this one"
                ) from None
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _size(folder: Path) -> int:
    """Bytes of the files in `folder` (0 if none): what a run like it takes."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


@contextmanager
def _one_at_a_time(hdir: Path) -> Iterator[None]:
    """Run writers take turns for the renames that put a run in place: two train-heads of one
    run (same cache, settings, seed and folds) make the same run, so the second waits for the
    first and its run stays, whole (`outputs.owned`, waiting)."""
    with outputs.owned(hdir, "train-head", wait=True):
        yield


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover(hdir: Path) -> None:
    """Undo what a killed writer left: restore a run moved aside, drop half-written folders."""
    for p in hdir.glob(".old-*"):
        name, _, pid = p.name[len(".old-") :].rpartition("-")
        if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
            continue
        if not (hdir / name).exists():
            os.rename(p, hdir / name)  # killed between the two renames: the old run comes back
        else:
            shutil.rmtree(p, ignore_errors=True)
    for p in hdir.glob(".tmp-*"):
        pid = p.name.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _current_cache(artifacts: Path) -> tuple[dict[str, Any] | None, str]:
    try:
        return store.read_attrs(layout.current_cache(artifacts)), ""
    except UserError as e:
        return None, str(e)


def status(
    result: dict[str, Any], artifacts: Path, current: dict[str, Any] | None
) -> tuple[bool, str]:
    """(current?, why not) for one run against the latest `make features` cache."""
    feats = result.get("features", {})
    if "data_id" not in feats or "file" not in feats:
        return False, "made by an older version of the pipeline (no cache identity recorded)"
    if current is None:
        return False, "no current feature cache: run `make features`"
    if feats["data_id"] != current.get("data_id"):
        return False, "trained on other images, labels or splits than the current cache"
    path = layout.cache_by_name(artifacts, feats["file"])
    try:
        attrs = store.read_attrs(path)
    except UserError:
        return False, f"its feature cache '{feats['file']}' is gone or damaged"
    if attrs.get("cache_key") != feats["cache_key"] or attrs.get("data_id") != feats["data_id"]:
        return False, f"its feature cache '{feats['file']}' has changed since"
    if "embedders" in feats and attrs.get("embedders") != feats["embedders"]:
        return (
            False,
            "its features were embedded again since, with other decoder/framework versions",
        )
    return _views_status(feats.get("augmented"), artifacts)


def _views_status(views: dict[str, Any] | None, artifacts: Path) -> tuple[bool, str]:
    """A VIEWS run is bound to its views cache by key and content, like to its cache."""
    if not views:
        return True, ""
    if "data_id" not in views:
        return False, "made by an older version of the pipeline (no views cache identity recorded)"
    fix = "rerun `make train-head` with its VIEWS"
    try:
        attrs = store.read_attrs(layout.cache_by_name(artifacts, views["file"]))
    except UserError:
        return False, f"its augmented views cache '{views['file']}' is gone or damaged; {fix}"
    if attrs.get("cache_key") != views["cache_key"]:
        return False, (
            f"its augmented views in '{views['file']}' were embedded again since with other "
            f"settings or another augmentation; {fix}"
        )
    if attrs.get("data_id") != views["data_id"]:
        return False, (
            f"its augmented views cache '{views['file']}' holds other views since (`make "
            f"features AUGMENT=...` embedded views of other images or another number); {fix}"
        )
    if attrs.get("embedders") != views.get("embedders"):
        return False, (
            f"its augmented views in '{views['file']}' were embedded again since, with other "
            f"decoder/framework versions; {fix}"
        )
    return True, ""


def list_runs(artifacts: Path) -> list[dict[str, Any]]:
    """Every run with `current` and `stale_reason` added: current ones first, best CV first."""
    current, _ = _current_cache(artifacts)
    out = []
    for p in sorted(layout.heads_dir(artifacts).glob(f"*/{RESULT}")):
        if p.parent.name.startswith("."):
            continue
        try:
            r = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        r["current"], r["stale_reason"] = status(r, artifacts, current)
        out.append(r)
    # a sweep's run screened out after one partition ranks after those that raced
    return sorted(
        out,
        key=lambda r: (
            not r["current"],
            bool(r.get("screened_out")),
            -r["cv"]["accuracy_mean"],
            r["run"],
        ),
    )


def pick(artifacts: Path, run: str | None = None) -> dict[str, Any]:
    """The named run (full name, or a base name with one current match), or the best current."""
    runs = list_runs(artifacts)
    if not runs:
        raise UserError(
            f"no trained heads in '{layout.heads_dir(artifacts)}'; run `make train-head` first"
        )
    current = [r for r in runs if r["current"]]
    if run is None:
        if not current:
            raise UserError(
                f"every trained head in '{layout.heads_dir(artifacts)}' is stale "
                f"({runs[0]['run']}: {runs[0]['stale_reason']}); rerun `make train-head`, or "
                "name one with RUN="
            )
        return current[0]
    exact = [r for r in runs if r["run"] == run]
    if exact:
        return exact[0]
    by_base = [r for r in current if base_of(r["run"]) == run]
    if len(by_base) == 1:
        return by_base[0]
    if len(by_base) > 1:
        raise UserError(
            f"RUN '{run}' matches {len(by_base)} current runs "
            f"({', '.join(r['run'] for r in by_base)}); give the full name"
        )
    names = ", ".join(r["run"] for r in current) or "none current"
    raise UserError(f"RUN '{run}' is not a trained head; current runs: {names}")


def folder(artifacts: Path, result: dict[str, Any]) -> Path:
    return layout.heads_dir(artifacts) / result["run"]


def verify(artifacts: Path, result: dict[str, Any]) -> Path:
    """The run's folder, after checking every saved file against the hash its run recorded.

    Heads are pickles: a file that is not the one this pipeline wrote is never loaded.
    """
    d = folder(artifacts, result)
    files = result.get("files")
    if not files:
        raise UserError(
            f"run '{result['run']}' records no file hashes (made by an older version); "
            "rerun `make train-head`"
        )
    for name, want in files.items():
        p = d / name
        if not p.is_file() or file_sha256(p) != want:
            raise UserError(
                f"'{p}' is not the file run '{result['run']}' saved (SHA-256 differs or missing); "
                "refusing to load it: rerun `make train-head`"
            )
    return d


def load_estimator(artifacts: Path, result: dict[str, Any]) -> Any:
    """The run's fitted head, loaded only after its files pass `verify`."""
    from pipeline import heads

    return heads.load_head(verify(artifacts, result))
