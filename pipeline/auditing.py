"""`make audit`: know your data from a run, without running the backbone.

From the run's out-of-fold probabilities (`oof.h5`, every partition it kept) and its cache's
pooled features (the run's pooling, in `neighbours.space`), writes `ARTIFACTS/audit/`:

- `label_issues.csv`: images whose given label the out-of-fold probabilities contradict
  (confident learning, every partition voting: `pipeline.audit`), lowest normalised margin
  first, with the suggested label; `swapped_pairs.csv`: given x suggested among them;
- `near_duplicates.csv`: sets of images much nearer each other than to their other neighbours
  (`diagnose.near_duplicates`; training and validation images together), each set
  marked where it crosses training and validation (a leak) or its labels disagree; sets of
  one content only (the same bytes) are already grouped by the folds and are not listed;
- `outliers.csv`: the outliers (training images above the 99th percentile of the mean
  distance to their k nearest neighbours), farthest first;
- `reliability.csv`: the run's reliability table (its calibration, fitted at train-head);
- `map.html`: the collection drawn in two dimensions (`pipeline.collection_map`);
- `audit.json`: all of it for tools, with what made it (run, cache key, data id, seed, k).

The report shows the audit of a current run, and an audit whose run or cache changed since as
stale. The neighbour search is exact up to `neighbours.EXACT_UP_TO` rows and by blocks of exact
search above (`neighbours.approximate`); memory follows the rows (features, k neighbours each).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import (
    collection_map,
    diagnose,
    layout,
    neighbours,
    oof,
    outputs,
    pictures,
    runs,
    store,
)
from pipeline.errors import UserError
from pipeline.near import signature_edges
from pipeline.provenance import environment
from pipeline.store.format import prefix64
from pipeline.store.reader import texts
from pipeline.train import load

Log = Callable[[str], None]
K = diagnose.K  # neighbours per image: outliers, near-duplicates
LISTED = 200  # rows listed in audit.json per finding (the CSV files hold every one)
OUTLIER_QUANTILE = 0.99  # training images above it are called outliers


def audit_dir(artifacts: Path) -> Path:
    return Path(artifacts) / "audit"


def run_audit(
    artifacts: Path,
    run: str | None = None,
    seed: int = 0,
    k: int = K,
    map_sample: int = collection_map.SAMPLE,
    log: Log = print,
) -> dict[str, Any]:
    """Audit `run` (default: the best current run) into ARTIFACTS/audit; its summary."""
    artifacts = Path(artifacts)
    r = runs.pick(artifacts, run)
    if not r["current"]:
        log(f"warning: run '{r['run']}' is stale ({r['stale_reason']}): auditing it as it was")
    saved = oof.load(runs.verify(artifacts, r))
    if saved is None or not saved.probabilities.size:
        raise UserError(
            f"run '{r['run']}' keeps no out-of-fold probabilities (trained by an older "
            "version); run its `make train-head` again, then `make audit`"
        )
    cache = layout.cache_by_name(artifacts, r["features"]["file"])
    if not cache.is_file():
        raise UserError(f"run '{r['run']}' was trained on '{cache}', which is gone; rerun it")
    classes = list(r["classes"])
    # the features stay in the cache (lazy), read a block at a time into the space
    with store.reading(cache.parent):
        data = load(cache, r["pooling"], lazy=True)
        attrs = data.index.attrs
        mine = (attrs.get("cache_key"), attrs.get("data_id"))
        if mine != (r["features"]["cache_key"], r["features"]["data_id"]):
            raise UserError(
                f"the cache '{cache.name}' changed since run '{r['run']}' was trained (other "
                "images or settings); run `make train-head` again before `make audit`"
            )
        ts, va = data.train, data.validation
        if not _same_rows(ts, saved):
            raise UserError(
                f"run '{r['run']}''s out-of-fold rows are not the cache's training images; run "
                "`make train-head` again before `make audit`"
            )
        with outputs.owned(audit_dir(artifacts), "make audit", fix="use another ARTIFACTS"):
            with outputs.together():
                return _audit(artifacts, r, saved, ts, va, classes, attrs, seed, k, map_sample, log)


def _same_rows(ts: Any, saved: oof.Saved) -> bool:
    """The run's scored rows are the cache's training images: their labels, and their hashes
    a block at a time (the cache's side by the 64-bit prefixes it holds in memory, when it is
    read lazily: nothing read from its segments)."""
    n, block = len(ts.y), oof.BLOCK
    if n != len(saved.label) or n != len(saved.sha256) or not np.array_equal(ts.y, saved.label):
        return False
    prefix = getattr(ts.sha256, "prefix", None)
    for a in range(0, n, block):
        mine = saved.sha256[a : a + block]
        if prefix is not None:
            same = np.array_equal(prefix64(mine), prefix[a : a + block])
        else:
            same = np.array_equal(np.array(texts(ts.sha256, range(a, a + len(mine))), "S64"), mine)
        if not same:
            return False
    return True


def _audit(
    artifacts: Path,
    r: dict[str, Any],
    saved: oof.Saved,
    ts: Any,
    va: Any,
    classes: list[str],
    attrs: dict[str, Any],
    seed: int,
    k: int,
    map_sample: int,
    log: Log,
) -> dict[str, Any]:
    out = audit_dir(artifacts)
    n_tr = len(ts.y)
    text = _Texts(ts, va)

    # label issues: the rows every kept partition scored
    scored = (saved.fold >= 0).all(axis=0)
    rows = np.flatnonzero(scored)
    every = scored.all()  # k-fold: every row scored, the partitions taken as they are (no copy)
    v = diagnose.vote(
        saved.label if every else saved.label[rows],
        list(saved.probabilities) if every else [p[rows] for p in saved.probabilities],
    )
    flagged = np.zeros(n_tr, bool)
    flagged[rows] = v["flagged"]
    score = np.full(n_tr, np.nan)
    score[rows] = v["score"]
    suggested = np.full(n_tr, -1)
    suggested[rows] = v["suggested"]
    order = rows[np.argsort(v["score"], kind="stable")]
    listed = order[flagged[order]]  # the flagged rows, ranked: their texts only are read
    votes = v["votes"][np.searchsorted(rows, listed)]
    issues = [
        {
            "path": path,
            "sha256": sha,
            "given": classes[int(ts.y[i])],
            "suggested": classes[int(suggested[i])],
            "score": round(float(score[i]), 6),
            "votes": round(float(vo), 4),
        }
        for i, vo, path, sha in zip(
            listed, votes, text.paths(listed), text.hashes(listed), strict=True
        )
    ]
    pairs = diagnose.swapped_pairs(saved.label[rows], v["suggested"], v["flagged"], len(classes))
    log(
        f"likely label errors: {len(issues)} of {len(rows)} scored images "
        f"({len(saved.probabilities)} partition(s) voting)"
    )

    # neighbours of every image, training and validation together, in the space built a
    # block at a time (a file beside the audit above `neighbours.IN_MEMORY_UP_TO`)
    with outputs.scratch(out.parent, "space") as tmp:
        X = neighbours.space_of([ts.X, va.X], tmp, seed)
        dist, idx = neighbours.search(X, k, seed=seed)
        searched = "exact" if len(X) <= neighbours.EXACT_UP_TO else "approximate"
        xy, picked = collection_map.embed_2d(X[:n_tr], seed, map_sample)
        del X
        # mirrored copies: by the images' signatures, searched the same way
        sig_r, sig_c, unsigned = signature_edges([ts.X, va.X], tmp, k, seed)
    if unsigned:
        log(
            f"mirrored copies: not searched among {unsigned:,} image(s) embedded before image "
            "signatures were kept (`make features REBUILD=1` embeds them again with theirs)"
        )
    is_val = np.arange(len(dist)) >= n_tr
    labels = np.concatenate([ts.y, va.y]).astype(np.int32)
    sets, threshold = diagnose.near_duplicates(dist, idx, extra=(sig_r, sig_c))
    del idx
    near = _near_sets(sets, is_val, labels, text, classes)
    leaks = sum(s["leak"] for s in near)
    log(
        f"near-duplicate sets: {len(near)} (closer than {diagnose.RATIO} of their usual "
        f"neighbours' distance); {leaks} cross training and validation, "
        f"{sum(s['labels_disagree'] for s in near)} disagree on the label"
    )

    # outliers: training images far from every other
    far = diagnose.outlier_scores(dist[:n_tr])
    del dist
    cut = float(np.quantile(far, OUTLIER_QUANTILE)) if n_tr else 0.0
    ranked = np.argsort(-far, kind="stable")
    n_out = int((far > cut).sum())
    top_out = ranked[: min(LISTED, max(1, n_out))]
    outliers = [
        {
            "path": path,
            "label": classes[int(ts.y[i])],
            "distance": round(float(far[i]), 6),
            "outlier": bool(far[i] > cut),
        }
        for i, path in zip(top_out, text.paths(top_out), strict=True)
    ]
    log(
        f"outliers: {n_out} training image(s) farther from their "
        f"{k} nearest neighbours than {OUTLIER_QUANTILE:.0%} of them"
    )
    calib = r.get("calibration") or {}
    if calib:
        log(diagnose.calibration_line(calib))

    # the map: a seeded sample of the training images
    root = attrs.get("data_root")
    marks = {
        "likely label error": flagged[picked],
        "outlier": far[picked] > cut,
    }
    chosen = set(np.flatnonzero(marks["likely label error"] | marks["outlier"]).tolist())
    picked_paths = text.paths(picked)
    thumbs = [
        pictures.thumbnail(Path(root) / path, 64)
        if root and path and (j in chosen or j < collection_map.MAX_THUMBS)
        else None
        for j, path in enumerate(picked_paths)
    ]
    titles = [
        f"{path or i}: {classes[int(ts.y[i])]}"
        + (f" (suggested {classes[int(suggested[i])]})" if flagged[i] else "")
        for i, path in zip(picked, picked_paths, strict=True)
    ]
    fragment = collection_map.render(xy, ts.y[picked], classes, marks, thumbs, titles, seed=seed)

    summary = {
        "run": r["run"],
        "made_by": {
            "run": r["run"],
            "run_files": r.get("files"),
            "cache_key": attrs.get("cache_key"),
            "data_id": attrs.get("data_id"),
            "seed": seed,
            "k": k,
            "environment": environment(),
        },
        "classes": classes,
        "label_issues": {
            "method": "confident learning (Northcutt et al. 2021), prune by noise rate and "
            "argmax disagreement, written from the paper (pipeline/diagnose.py); partitions vote",
            "partitions": len(saved.probabilities),
            "scored": int(len(rows)),
            "flagged": len(issues),
            "top": issues[:LISTED],
            "swapped_pairs": pairs.tolist(),
        },
        "near_duplicates": {
            "ratio": diagnose.RATIO,
            "median_nearest_distance": threshold,
            "sets": len(near),
            "leaks": leaks,
            "labels_disagree": sum(s["labels_disagree"] for s in near),
            "top": near[:LISTED],
            "search": searched,
            "signature_ratio": diagnose.SIGNATURE_RATIO,
            "without_signature": unsigned,
        },
        "outliers": {
            "quantile": OUTLIER_QUANTILE,
            "threshold": cut,
            "count": n_out,
            "top": outliers,
        },
        "calibration": {key: calib.get(key) for key in _CALIBRATION if key in calib},
        "map": {"points": int(len(picked)), "of": n_tr, "seed": seed, "file": "map.html"},
    }
    _csv(
        out / "label_issues.csv", issues, ["path", "sha256", "given", "suggested", "score", "votes"]
    )
    _csv(
        out / "swapped_pairs.csv",
        [
            {"given": classes[i], **dict(zip(classes, row, strict=True))}
            for i, row in enumerate(pairs.tolist())
        ],
        ["given", *classes],
    )
    flat = [
        {**m, "set": s["set"], "leak": s["leak"], "labels_disagree": s["labels_disagree"]}
        for s in near
        for m in s["members"]
    ]
    _csv(
        out / "near_duplicates.csv",
        flat,
        ["set", "path", "split", "label", "sha256", "leak", "labels_disagree"],
    )
    listed_out = ranked[:n_out]  # the outliers, ranked: their paths read at once
    _csv_blocks(
        out / "outliers.csv",
        ["path", "label", "distance", "outlier"],
        [
            [
                {
                    "path": path,
                    "label": classes[int(ts.y[i])],
                    "distance": round(float(far[i]), 6),
                    "outlier": True,
                }
                for i, path in zip(listed_out, text.paths(listed_out), strict=True)
            ]
        ],
    )
    _csv(
        out / "reliability.csv",
        calib.get("reliability") or [],
        ["low", "high", "confidence", "accuracy", "count"],
    )
    page = f"<!doctype html><meta charset=utf-8><title>map of {r['run']}</title>{fragment}"
    outputs.write_text(out / "map.html", page)
    summary["map_html"] = fragment
    outputs.write_text(out / "audit.json", json.dumps(summary, indent=1))
    log(f"audit: {out}")
    return summary


_CALIBRATION = (
    "ece",
    "brier",
    "temperature",
    "temperature_fitted",
    "ece_scaled",
    "brier_scaled",
    "applied",
    "confidence",
    "reliability",
    "how",
)


class _Texts:
    """Paths and content hashes of the audit's rows (training rows, then validation ones),
    read from the cache for the rows asked only: never a list of them all."""

    def __init__(self, ts: Any, va: Any) -> None:
        self.parts, self.n = (ts, va), len(ts.y)

    def _of(self, name: str, rows: np.ndarray) -> list[str]:
        rows = np.asarray(rows, np.int64)
        out = [""] * len(rows)
        for part, sel, base in (
            (self.parts[0], rows < self.n, 0),
            (self.parts[1], rows >= self.n, self.n),
        ):
            col = getattr(part, name, None)
            if col is None or not sel.any():
                continue
            for j, t in zip(np.flatnonzero(sel), texts(col, rows[sel] - base), strict=True):
                out[j] = t.decode() if isinstance(t, bytes) else str(t)
        return out

    def paths(self, rows: np.ndarray) -> list[str]:
        return self._of("paths", rows)

    def hashes(self, rows: np.ndarray) -> list[str]:
        return self._of("sha256", rows)


def _near_sets(
    sets: np.ndarray,
    is_val: np.ndarray,
    labels: np.ndarray,
    text: _Texts,
    classes: list[str],
) -> list[dict[str, Any]]:
    """The near-duplicate sets of more than one content, leaks and disagreements first (the
    members' texts only are read)."""
    members_all = np.flatnonzero(sets >= 0)
    if not len(members_all):
        return []
    order = members_all[np.argsort(sets[members_all], kind="stable")]
    paths, hashes = text.paths(order), text.hashes(order)
    at = {int(i): j for j, i in enumerate(order)}
    ids, starts = np.unique(sets[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    out = []
    for sid, a, b in zip(ids, starts, ends, strict=True):
        members = order[a:b]
        if len({hashes[at[int(i)]] for i in members}) < 2:  # the same bytes: grouped already
            continue
        split = ["validation" if is_val[i] else "train" for i in members]
        out.append(
            {
                "set": int(sid),
                "leak": len(set(split)) > 1,
                "labels_disagree": bool(len(set(labels[members].tolist())) > 1),
                "members": [
                    {
                        "path": paths[at[int(i)]],
                        "split": sp,
                        "label": classes[int(labels[i])],
                        "sha256": hashes[at[int(i)]],
                    }
                    for i, sp in zip(members, split, strict=True)
                ],
            }
        )
    out.sort(key=lambda s: (not s["leak"], not s["labels_disagree"], -len(s["members"])))
    return out


def _csv_blocks(path: Path, fields: list[str], blocks: Iterable[list[dict[str, Any]]]) -> None:
    """A CSV file written whole (`outputs.written`), its rows made a block at a time."""
    with outputs.written(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for rows in blocks:
            w.writerows(rows)


def _csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    outputs.write_text(path, buf.getvalue())
