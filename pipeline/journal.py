"""`make predict`'s CSV, resumable: written as `<out>.partial` batch by batch, renamed onto OUT.

Its sidecar `<out>.partial.jsonl` says what made it (the run and its files, TOPK, TTA, the
images asked) and lists the images that could not be read. A killed predict, run again with the
same settings, takes the rows already written back from the partial file (with the CSV's 6
digits) and predicts only the rest; other settings start over, said in one line. A full disk is
said in one line naming what is kept (`told`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pipeline import store

Log = Callable[[str], None]


def columns(classes: list[str], topk: int = 0) -> list[str]:
    """The CSV's header: path,label,probability, the k-1 next best, `p_<class>` per class, and
    whether the backbone ran for the image (`backbone_ran`: no when its features were cached),
    its distance to the training set and whether it is unlike it (`pipeline.novelty`)."""
    top = [f"{c}_{i}" for i in range(2, topk + 1) for c in ("label", "probability")]
    return [
        "path",
        "label",
        "probability",
        *top,
        *(f"p_{c}" for c in classes),
        "backbone_ran",
        "distance_to_training",
        "unlike_training",
    ]


def csv_row(r: dict[str, Any]) -> list[str]:
    """A row of `stream` as the CSV holds it (probabilities to 6 digits)."""
    top = [x for lab, pr in r["top"][1:] for x in (lab, f"{pr:.6f}")]
    rest = [f"{v:.6f}" for v in r["probabilities"].values()]
    ran = "yes" if r["backbone_ran"] else "no"
    d = r.get("distance_to_training")
    far = "" if d is None or d != d else f"{d:.6f}"  # not measured (no training cache): empty
    unlike = "" if not far else "yes" if r.get("unlike_training") else "no"
    return [r["path"], r["label"], f"{r['probability']:.6f}", *top, *rest, ran, far, unlike]


PARTIAL = "partial-predictions/1"  # the sidecar's format


def partial_paths(out: Path) -> tuple[Path, Path]:
    """The CSV being written next to `out`, and its sidecar (what made it; unreadable images)."""
    return out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.jsonl")


def digest(todo: Sequence[Any]) -> str:
    """What identifies the images asked (each path as written and the file it leads to)."""
    h = hashlib.sha256()
    for j in todo:
        h.update(f"{j.path}\0{os.path.abspath(j.abspath)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def resume(partial: Path, side: Path, made: dict[str, Any], log: Log) -> tuple[Counter, dict]:
    """(path -> count of rows already in `partial`, path -> reason of images found unreadable)
    if `partial` was made by the same settings; otherwise both empty and both files gone."""
    if not partial.exists() and not side.exists():
        return Counter(), {}
    try:
        _cut_torn_row(side)
        with open(side, encoding="utf-8") as fh:
            first = json.loads(fh.readline() or "null")
            failed = {}
            for line in fh:
                e = json.loads(line)
                failed[e["path"]] = e["error"]
        if first != made:
            raise ValueError("made by other settings")
        _cut_torn_row(partial)  # a row cut by the kill is predicted again
        done: Counter = Counter()
        with open(partial, newline="", encoding="utf-8") as fh:  # streamed: one row at a time
            rows = csv.reader(fh)
            if next(rows, None) != made["columns"]:
                raise ValueError("its header is not this CSV's")
            for row in rows:
                if len(row) != len(made["columns"]):
                    raise ValueError("a row is not this CSV's")
                done[row[0]] += 1
    except (OSError, ValueError, KeyError, TypeError, csv.Error) as e:
        why = str(e) if type(e) is ValueError else "it cannot be read"
        log(
            f"starting over: '{partial}' is not this predict's ({why}); resuming needs the same "
            "run, TOPK, TTA and images"
        )
        partial.unlink(missing_ok=True)
        side.unlink(missing_ok=True)
        return Counter(), {}
    log(f"resuming '{partial}': {sum(done.values()) + len(failed)} images already predicted")
    return done, failed


def _cut_torn_row(path: Path) -> None:
    """Truncate `path` after its last newline (what a kill in the middle of a write leaves)."""
    with open(path, "r+b") as fh:
        end = fh.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - (1 << 16))
            fh.seek(start)
            nl = fh.read(pos - start).rfind(b"\n")
            if nl >= 0:
                if start + nl + 1 != end:
                    fh.truncate(start + nl + 1)
                return
            pos = start
        fh.truncate(0)


def from_csv(row: list[str], classes: list[str], topk: int) -> dict[str, Any]:
    """A row written by an earlier, killed run: the CSV's 6-digit figures."""
    k = max(topk, 1)
    top = [(row[1], float(row[2]))] + [
        (row[3 + 2 * i], float(row[4 + 2 * i])) for i in range(k - 1)
    ]
    p = [float(v) for v in row[3 + 2 * (k - 1) : -3]]
    return {
        "path": row[0],
        "label": row[1],
        "probability": float(row[2]),
        "probabilities": dict(zip(classes, p, strict=True)),
        "top": top,
        "backbone_ran": row[-3] == "yes",
        "distance_to_training": float(row[-2]) if row[-2] else None,
        "unlike_training": row[-1] == "yes" if row[-1] else None,
        "error": "",
    }


def closed(*handles: Any) -> OSError | None:
    """Close every handle; the first OSError (a buffer that a full disk kept) or None."""
    first = None
    for h in handles:
        try:
            h.close()
        except OSError as e:
            first = first or e
    return first


def told(partial: Path, out: Path, needed: int | None = None) -> dict[str, Any]:
    """What a full disk's line says while predict writes `partial` (`store.disk_error`)."""
    kept = f"the old '{out.name}' is intact" if out.exists() else f"'{out.name}' was not written"
    return {
        "needed": needed,
        "kept": f"{kept}, the rows made so far are kept in '{partial.name}'",
        "rerun": "the same predict (it resumes)",
    }


def opened(partial: Path, side: Path, made: dict[str, Any], out: Path) -> tuple[Any, Any, Any]:
    """The CSV being written (made with its header and sidecar if it is not there yet): a handle
    reading the rows already in it, one appending to it, and one appending to its sidecar."""
    try:
        if not partial.exists():
            with open(side, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(made) + "\n")
            with open(partial, "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerow(made["columns"])
        with ExitStack() as opening:  # one that fails closes those already open
            old = opening.enter_context(open(partial, newline="", encoding="utf-8"))
            fh = opening.enter_context(open(partial, "a", newline="", encoding="utf-8"))
            errs = opening.enter_context(open(side, "a", encoding="utf-8"))
            opening.pop_all()
    except OSError as e:
        raise store.disk_error(e, partial, **told(partial, out)) or e from None
    return old, fh, errs


def commit(partial: Path, side: Path, out: Path) -> None:
    """The whole CSV takes OUT's name (on disk first); its sidecar goes."""
    try:
        with open(partial, "rb") as done_fh:
            os.fsync(done_fh.fileno())  # on disk before it takes OUT's name
        os.replace(partial, out)
    except OSError as e:
        raise store.disk_error(e, out, **told(partial, out)) or e from None
    side.unlink(missing_ok=True)
