"""`make report`: one report comparing every trained head, as JSON, Markdown and HTML.

Current runs (trained on the cache the latest `make features` wrote) are ranked; stale ones are
listed apart with the reason. CV accuracy with its spread (said what it is), runs compared fold
by fold on the same outer folds, validation accuracy as the honest figure for the pick,
per-class results, a confusion-matrix picture per head, identical files (across classes, or in
train and validation), every skipped image with its reason, and what `make audit` found
(pipeline/report_audit.py: label errors, near-duplicates, outliers, calibration, a map). The
HTML, rendered from pipeline/templates/report.html.j2 (Jinja2, autoescaped), embeds its pictures
and escapes every user-given string: one file to open.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import pipeline.report_audit as report_audit
from pipeline import dataset, duplicates, heads, layout, outputs, pictures, runs, stats, store
from pipeline.cache_identity import RANDOM_BANNER
from pipeline.errors import UserError
from pipeline.provenance import environment

Log = Callable[[str], None]


def _learning_curve(
    artifacts: Path, out: Path, current: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The latest sweep's learning curve, with its picture, if a sweep ran on the current cache."""
    path = layout.sweep_file(artifacts)
    if not path.is_file() or current is None:
        return None
    sweep = json.loads(path.read_text())
    if sweep.get("features", {}).get("data_id") != current.get("data_id"):
        return None
    curve = sweep["learning_curve"]
    pictures.learning_curve(curve, out / "learning-curve.png")
    curve["png"] = "learning-curve.png"
    return curve


EXPLAIN = {
    "spread": "CV accuracy is the mean over r seeded partitions of k folds (REPEATS; by default "
    "as many as a time budget (BUDGET, 3 minutes a run) holds at the first partition's cost, "
    "at most 10 up to 1,000 training images, 5 up to 5,000, 3 up to 20,000, then 1; a third "
    "of that for network heads; a sweep's race stops after the first partition the runs that "
    "are already clearly worse than the best, marked 'screened out'), with "
    "its 95 % interval by the corrected resampled t test (Nadeau & Bengio 2003, Bouckaert & "
    "Frank 2004), which accounts for the overlap of training sets between folds. The validation "
    "accuracy has a 95 % Wilson interval.",
    "protocol": "Up to 200,000 training images the number is k-fold cross-validation (5 folds "
    "unless FOLDS says otherwise); above that, one held-out split of the training images (1/5, "
    "by content group, stratified) with a 95 % Wilson interval, because k fits of hours each "
    "would add little: 40,000 held-out images already put the interval near +-0.3 points. "
    "FOLDS=k asks for k-fold at any size. Held-out runs are paired image by image (the "
    "difference of paired proportions and McNemar's test).",
    "paired": "Every run on this cache with the same seed and repeats is scored on the same "
    "folds (drawn on the original images, an image's augmented views and identical copies in "
    "its fold), so runs are compared fold by fold: 'vs best' is the mean fold-by-fold "
    "difference to the top run with its 95 % interval (same correction). A run whose interval "
    "includes 0 is tied with the best: the data cannot tell them apart. On the validation "
    "split, McNemar's exact test compares the two runs on the same images.",
    "optimism": "The top of the ranking is picked on the same folds that score it: the best of "
    "many runs is optimistic. The honest figure for the pick is its accuracy on a split that "
    "played no part in choosing it: the validation split (DATA/validation/), shown beside it.",
    "curve": "The learning curve refits the sweep's best head and pooling (without augmented "
    "views) on fewer images per class, on those same outer folds.",
}


def _entry(r: dict[str, Any]) -> dict[str, Any]:
    v = r.get("validation")
    return {
        "run": r["run"],
        "current": r["current"],
        "stale_reason": r["stale_reason"],
        "head": r["head"],
        "backbone": (r["features"].get("settings") or {}).get("name", "vgg16"),
        "input_size": (r["features"].get("settings") or {}).get("input_size"),
        "layer": (r["features"].get("settings") or {}).get("layer"),
        "pooling": r["pooling"],
        "params": r["params"],
        "final_params": r.get("final_params", {}),
        "seed": r.get("seed"),
        "cv_accuracy_mean": r["cv"]["accuracy_mean"],
        "cv_accuracy_std": r["cv"]["accuracy_std"],
        "cv_folds": r["cv"]["folds"],
        "cv_folds_id": r["cv"].get("folds_id"),
        "cv_partition_ids": r["cv"].get("partition_ids"),
        "cv_fold_accuracies": r["cv"]["fold_accuracies"],
        "cv_repeats": r["cv"].get("repeats", 1),
        "repeats_reason": r.get("repeats_reason"),
        "screened_out": bool(r.get("screened_out")),  # by a sweep's race, after 1 partition
        "cv_protocol": r["cv"].get("protocol", "k-fold"),
        "cv_protocol_reason": r["cv"].get("protocol_reason"),
        "cv_holdout_right": r["cv"].get("holdout_right"),
        "cv_holdout_images": r["cv"].get("holdout_images"),
        "tuning": r["cv"].get("tuning"),
        "cv_low": r["cv"].get("accuracy_low"),
        "cv_high": r["cv"].get("accuracy_high"),
        "validation_accuracy": v["accuracy"] if v else None,
        "validation_low": v.get("accuracy_low") if v else None,
        "validation_high": v.get("accuracy_high") if v else None,
        "validation_right": (  # by path, where every image's prediction is kept
            {p["path"]: p["true"] == p["pred"] for p in v.get("predictions") or []}
            if v and not v.get("predictions_kept")
            else {}
        ),
        "validation_bits": (  # every image right or wrong, in content order
            {"id": v["images_id"], "right": v["right"], "images": r["n_validation"]}
            if v and v.get("right")
            else None
        ),
        "n_train": r["n_train"],
        "n_validation": r["n_validation"],
        "views": r.get("views", 0),
        "random_weights": r["features"]["random_weights"],
        "cache_key": r["features"]["cache_key"],
        "cache_file": r["features"].get("file"),
        "per_class": (v or r["cv"])["per_class"],
        "per_class_source": "validation" if v else "cross-validation",
        "cv_confusion": r["cv"]["confusion"],
        "validation_confusion": v["confusion"] if v else None,
        "classes": r["classes"],
        "seconds": r["timing_s"]["total"],
    }


def paired(best: dict[str, Any], other: dict[str, Any]) -> dict[str, Any] | None:
    """`best` - `other` fold by fold with its corrected 95 % interval, when both were scored on
    the same folds; and McNemar's test on the validation images both predicted."""
    shared = stats.common_folds(
        {
            "partition_ids": best.get("cv_partition_ids"),
            "folds": best["cv_folds"],
            "folds_id": best["cv_folds_id"],
            "fold_accuracies": best["cv_fold_accuracies"],
        },
        {
            "partition_ids": other.get("cv_partition_ids"),
            "folds": other["cv_folds"],
            "folds_id": other["cv_folds_id"],
            "fold_accuracies": other["cv_fold_accuracies"],
        },
    )
    if shared is None:
        return None
    a, b = np.array(shared[0]), np.array(shared[1])
    d = a - b
    if best.get("cv_protocol") == "holdout" and best.get("cv_holdout_right"):
        n = int(best["cv_holdout_images"])  # the same images, in content order, in both runs
        pv = stats.paired_holdout(
            stats.unpack_bits(best["cv_holdout_right"], n),
            stats.unpack_bits(other["cv_holdout_right"], n),
        )
    else:
        pv = stats.paired(a, b, best["cv_folds"])
    out = {
        "mean_difference": float(d.mean()),
        "std_difference": float(d.std()),
        "low": pv["diff_low"],
        "high": pv["diff_high"],
        "p_value": pv["p_value"],
        "tied": pv["tied"],
        "folds_best_better": int((d > 0).sum()),
        "folds_tied": int((d == 0).sum()),
        "folds": int(len(d)),
        "validation_mcnemar": None,
    }
    vb, vo = best.get("validation_bits"), other.get("validation_bits")
    common = sorted(set(best["validation_right"]) & set(other["validation_right"]))
    if vb and vo and vb["id"] == vo["id"]:  # the same images: paired image by image
        m = stats.mcnemar(
            stats.unpack_bits(vb["right"], vb["images"]),
            stats.unpack_bits(vo["right"], vo["images"]),
        )
        out["validation_mcnemar"] = {**m, "images": vb["images"]}
    elif common and not (vb and vo):  # older runs: by path (bits of other images: never)
        m = stats.mcnemar(
            np.array([best["validation_right"][p] for p in common]),
            np.array([other["validation_right"][p] for p in common]),
        )
        out["validation_mcnemar"] = {**m, "images": len(common)}
    return out


def ties_sentence(entries: list[dict[str, Any]]) -> str:
    """One sentence: which runs the data cannot tell from the best, and what would."""
    if len(entries) < 2:
        return ""
    best = entries[0]["run"]
    tied = [e["run"] for e in entries[1:] if e.get("tied_with_best")]
    apart = [e["run"] for e in entries[1:] if e.get("vs_best") is None]
    if tied:
        n = entries[0]["n_train"]
        return (
            f"{len(tied)} run(s) are tied with the best ({best}): {', '.join(tied)}; their "
            "paired 95 % intervals include 0, so the ranking between them is noise. More "
            f"training images (now {n}) or more repeats (REPEATS, now "
            f"{entries[0]['cv_repeats']}) would narrow the intervals and may separate them."
            + (f" Not paired (other folds): {', '.join(apart)}." if apart else "")
        )
    return (
        f"The best run ({best}) is better than every other paired run on the same folds "
        "(their 95 % intervals of the difference exclude 0)."
        + (f" Not paired (other folds): {', '.join(apart)}." if apart else "")
    )


def header(artifacts: Path, idx: store.Index | None, entries: list[dict[str, Any]]) -> dict:
    """What was evaluated: data, classes per split, backbone, weights, settings, versions, date."""
    env = environment()
    out: dict[str, Any] = {"date": env["created_utc"], "versions": env["packages"]}
    if idx is None:
        return out
    a, st = idx.attrs, idx.attrs.get("settings") or {}
    counts = {c: {"train": 0, "validation": 0} for c in idx.classes}
    for lab, sp, v in zip(idx.labels.tolist(), idx.split, idx.view, strict=True):
        if v == 0:
            counts[idx.classes[lab]][sp] += 1
    out.update(
        data=a.get("data") or a.get("data_root"),
        layout=a.get("layout"),
        labels_changed=dataset.source_changed(a) or None,
        classes=[{"class": c, **n} for c, n in counts.items()],
        images={"train": sum(n["train"] for n in counts.values()),
                "validation": sum(n["validation"] for n in counts.values())},
        skipped=len(idx.skipped),
        backbone=st.get("name"),
        weights=a.get("weights"),
        weights_id=st.get("weights_id"),
        random_weights=bool(a.get("random_weights")),
        input_size=st.get("input_size"),
        layer=st.get("layer"),
        preprocessing=st.get("preprocessing"),
        precision=st.get("precision", "float32"),  # the resolved one (never "auto")
        dtype=st.get("dtype"),
        seeds=sorted({e["seed"] for e in entries if e.get("seed") is not None}),
        cache=idx.path.name,
        made_with=a.get("embedders"),
    )  # fmt: skip
    return out


def gallery(
    r: dict[str, Any], data_root: str | None, limit: int = 24, size: int = 96
) -> dict[str, Any]:
    """The run's mistakes, most confident first: validation images, else out-of-fold ones.

    Each with its path, true and predicted class, probability, and a thumbnail (PNG bytes,
    embedded by the HTML; the JSON keeps the rest).
    """
    v = r.get("validation")
    if v and v.get("predictions"):
        source = "validation"
        rows = [p for p in v["predictions"] if p["true"] != p["pred"]]
    else:
        source = "out-of-fold"
        cv, classes = r["cv"], r["classes"]
        paths = cv.get("oof_paths") or [None] * len(cv["oof_pred"])
        rows = [
            {"path": p, "true": classes[t], "pred": classes[q], "probability": pr}
            for p, t, q, pr in zip(
                paths,
                cv.get("oof_true") or [],
                cv["oof_pred"],
                cv.get("oof_probability") or [],
                strict=False,
            )
            if t != q
        ]
    rows.sort(key=lambda x: -(x.get("probability") or 0))
    mistakes = (
        v.get("mistakes", len(rows)) if source == "validation" and v
        else r["cv"].get("oof_mistakes", len(rows))
    )  # fmt: skip
    items = []
    for row in rows[:limit]:
        thumb = None
        if data_root and row.get("path"):
            thumb = pictures.thumbnail(Path(data_root) / row["path"], size)
        items.append({**row, "thumbnail": thumb})
    return {"run": r["run"], "source": source, "mistakes": mistakes, "items": items}


def build_report(
    artifacts: Path, log: Log = print, gallery_runs: str | None = None
) -> dict[str, Any]:
    """Collect every head's result and write report.json, report.md and report.html.

    `gallery_runs`: a run name (or "all") to show the mistakes of, besides the best run.
    The report folder is this report's while it is made (a second report stops at once) and
    its files take their names together at the end: a failure (a full disk) leaves the old
    report whole.
    """
    artifacts = Path(artifacts)
    folder = layout.report_dir(artifacts)
    fix = "use another ARTIFACTS folder"
    with outputs.owned(folder, "make report", fix=fix), outputs.together():
        return _build(artifacts, log, gallery_runs)


def _build(artifacts: Path, log: Log, gallery_runs: str | None) -> dict[str, Any]:
    all_runs = runs.list_runs(artifacts)
    if not all_runs:
        raise UserError(
            f"no trained heads in '{layout.heads_dir(artifacts)}'; run `make train-head` first"
        )
    current_runs = [r for r in all_runs if r["current"]]
    entries = [_entry(r) for r in current_runs]
    stale = [_entry(r) for r in all_runs if not r["current"]]
    if entries:
        for e in entries:
            e["vs_best"] = paired(entries[0], e) if e is not entries[0] else None
            e["is_best"] = e is entries[0]
            e["tied_with_best"] = (
                True if e is entries[0] else (e["vs_best"]["tied"] if e["vs_best"] else None)
            )
    for e in entries + stale:  # per-image right/wrong served McNemar; not kept in the report
        e.pop("validation_right", None)
        e.pop("validation_bits", None)
    current = idx = None
    skipped: list[dict[str, str]] = []
    dups = None
    try:
        cache = layout.current_cache(artifacts)
        with store.reading(cache.parent):  # no segment deleted mid-read by `make features`
            idx = store.read_index(cache)
        current = idx.attrs
        skipped = [{"path": s["path"], "reason": s["reason"]} for s in idx.skipped]
        dups = duplicates.of_index(idx)
    except UserError as e:
        log(f"warning: {e}")
    random_w = any(e["random_weights"] for e in entries)
    out = layout.report_dir(artifacts)
    out.mkdir(parents=True, exist_ok=True)
    for i, e in enumerate(entries):
        cm, src = _confusion_of(e)
        png = out / f"confusion-{i}.png"
        pictures.confusion(cm, e["classes"], f"{e['run']} ({src})", png)
        e["confusion_png"] = png.name
    if entries:
        pictures.comparison(entries, out / "comparison.png")
    curve = _learning_curve(artifacts, out, current)
    data_root = current.get("data_root") if current else None
    wanted = [r for r in current_runs[:1]]
    if gallery_runs:
        named = [
            r for r in current_runs if gallery_runs in ("all", r["run"], r["run"].split("--")[0])
        ]
        if not named:
            raise UserError(f"GALLERY '{gallery_runs}' is not a current run (or 'all')")
        wanted += [r for r in named if r not in wanted]
    galleries = [gallery(r, data_root) for r in wanted]
    audit = report_audit.section(artifacts, all_runs, current, out, log)  # audit/audit.json
    report = {
        "banner": RANDOM_BANNER if random_w else None,
        "header": header(artifacts, idx, entries),
        "explain": EXPLAIN,
        "ties": ties_sentence(entries),
        "comparison_png": "comparison.png" if entries else None,
        "learning_curve": curve,
        "results": entries,
        "stale": stale,
        "galleries": galleries,
        "audit": audit,
        "duplicates": dups,
        "skipped": skipped,
        "environment": environment(),
    }
    if report["header"].get("labels_changed"):
        log(f"warning: {report['header']['labels_changed']}")
    as_json = {
        **report,
        "galleries": [
            {**g, "items": [{k: v for k, v in it.items() if k != "thumbnail"} for it in g["items"]]}
            for g in galleries
        ],
        "audit": report_audit.as_json(audit),
    }
    _write(out / "report.json", json.dumps(as_json, indent=1))
    _write(out / "report.md", _markdown(report))
    _write(out / "report.html", _html(report, out))
    log(f"report: {out / 'report.html'}")
    if stale:
        log(f"{len(stale)} stale run(s) listed apart, not ranked (see the report)")
    return as_json


def _write(path: Path, text: str) -> None:
    outputs.write_text(path, text)  # whole or not at all; two reports never share a temp name


def _folds(e: dict[str, Any]) -> str:
    if e.get("cv_protocol") == "holdout":
        return f"held-out split ({e.get('cv_holdout_images') or 0:,} images)"
    r = e.get("cv_repeats", 1)
    out = f"{r}x{e['cv_folds']}" if r > 1 else str(e["cv_folds"])
    return out + (" (screened out after the first partition)" if e.get("screened_out") else "")


def _protocol(e: dict[str, Any]) -> str:
    """Which evaluation made the run's number and why; how its hyperparameters were tuned."""
    out = e.get("cv_protocol_reason") or f"{_folds(e)}-fold cross-validation"
    t = e.get("tuning") or {}
    if t.get("alpha") == "inner folds":
        out += f"; alpha tuned by group-aware inner {heads.INNER_FOLDS}-fold CV on " + (
            f"a sample of {t['sample']:,} of the {t['rows']:,} training rows (the full grid "
            "on every row would take hours)"
            if t["sample"] < t["rows"]
            else f"all {t['rows']:,} training rows"
        )
    return out


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _vs(e: dict[str, Any], rank: int) -> str:
    """The paired comparison with the top run, in words."""
    if rank == 1:
        return "best"
    v = e.get("vs_best")
    if v is None:
        return "not paired (other folds)"
    ci = f" [{-v['high']:+.4f}, {-v['low']:+.4f}]" if v.get("low") is not None else ""
    verdict = "tied with the best" if v.get("tied") else "worse than the best"
    mc = v.get("validation_mcnemar")
    val = f"; validation McNemar p={mc['p_value']:.3f}" if mc else ""
    return (
        f"{-v['mean_difference']:+.4f}{ci}: {verdict} (best better on "
        f"{v['folds_best_better']}/{v['folds']} folds{val})"
    )


def _ci(mean: float | None, low: float | None, high: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.4f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")


def _dup_lines(d: dict[str, Any] | None) -> list[tuple[str, list[dict[str, str]]]]:
    if not d:
        return []
    return [
        ("same content under two or more classes", [g for g in d["cross_class"]]),
        ("same content in train and in validation", [g for g in d["train_validation"]]),
    ]


def _markdown(rep: dict[str, Any]) -> str:
    lines = ["# Transfer-learning report", ""]
    if rep["banner"]:
        lines += [f"> **{rep['banner']}**", ""]
    h = rep.get("header") or {}
    lines += ["## What was evaluated", ""] + [f"- {k}: {v}" for k, v in _header_rows(h)] + [""]
    if h.get("classes"):
        lines += ["| class | train | validation |", "|---|---|---|"]
        lines += [f"| {c['class']} | {c['train']} | {c['validation']} |" for c in h["classes"]]
        lines.append("")
    lines += ["## What the numbers mean", ""] + [f"- {t}" for t in rep["explain"].values()] + [""]
    if rep.get("ties"):
        lines += [f"**{rep['ties']}**", ""]
    lines += [
        "| rank | run | backbone | head | pooling | views | CV accuracy [95 % interval] "
        "| folds | vs best (paired, 95 % interval) | validation accuracy [95 % Wilson] | train "
        "| validation |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, e in enumerate(rep["results"], 1):
        lines.append(
            f"| {i} | {e['run']} | {e['backbone']} | {e['head']} | {e['pooling']} | {e['views']} | "
            f"{_ci(e['cv_accuracy_mean'], e['cv_low'], e['cv_high'])} | {_folds(e)} | "
            f"{_vs(e, i)} | "
            f"{_ci(e['validation_accuracy'], e['validation_low'], e['validation_high'])} | "
            f"{e['n_train']} | "
            f"{e['n_validation']} |"
        )
    if not rep["results"]:
        lines.append("| | no current run: rerun `make train-head` | | | | | | | | | | |")
    if rep["results"]:
        lines += ["", "Evaluation of each run:", ""]
        lines += [f"- {e['run']}: {_protocol(e)}" for e in rep["results"]]
    if rep["stale"]:
        lines += ["", f"## Stale runs ({len(rep['stale'])}), not ranked", ""]
        lines += [
            f"- {e['run']}: CV {e['cv_accuracy_mean']:.4f}; stale: {e['stale_reason']}"
            for e in rep["stale"]
        ]
    for e in rep["results"]:
        lines += [
            "",
            f"## {e['run']}",
            "",
            f"![confusion matrix]({e['confusion_png']})",
            "",
            f"Per class ({e['per_class_source']}):",
            "",
            "| class | precision | recall | F1 | support |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['class']} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | "
            f"{c['support']} |"
            for c in e["per_class"]
        ]
    for g in rep.get("galleries", []):
        lines += ["", f"## Mistakes of {g['run']} ({g['source']}, most confident first)", ""]
        lines += [
            f"- `{it['path']}`: true {it['true']}, predicted {it['pred']} "
            f"({(it.get('probability') or 0):.0%})"
            for it in g["items"]
        ] or ["None."]
    lines += report_audit.markdown(rep.get("audit"))
    if rep.get("learning_curve"):
        c = rep["learning_curve"]
        lines += ["", "## Learning curve", "", f"![learning curve]({c['png']})", "", c["advice"]]
    for title, groups in _dup_lines(rep.get("duplicates")):
        lines += ["", f"## Identical files: {title} ({len(groups)})", ""]
        lines += [
            "- " + " = ".join(f"`{f['path']}` ({f['class']}, {f['split']})" for f in g["files"])
            for g in groups
        ] or ["None."]
    lines += ["", f"## Skipped images ({len(rep['skipped'])})", ""]
    lines += [f"- `{s['path']}`: {s['reason']}" for s in rep["skipped"]] or ["None."]
    return "\n".join(lines) + "\n"


def _header_rows(h: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        ("DATA", h.get("data")),
        ("layout", h.get("layout")),
        ("warning", h.get("labels_changed")),
        ("images", f"{h['images']['train']} train, {h['images']['validation']} validation"
         if "images" in h else None),
        ("skipped files", h.get("skipped")),
        ("backbone", h.get("backbone")),
        ("weights", f"{h.get('weights')} ({h.get('weights_id')})" if h.get("weights") else None),
        ("input size", h.get("input_size")),
        ("layer", h.get("layer")),
        ("preprocessing", h.get("preprocessing")),
        ("compute precision", h.get("precision")),
        ("stored type", h.get("dtype")),
        ("seeds", ", ".join(str(v) for v in h.get("seeds", [])) or None),
        ("cache", h.get("cache")),
        ("date (UTC)", h.get("date")),
    ]  # fmt: skip
    return [(k, str(v)) for k, v in rows if v is not None]


def _confusion_of(e: dict[str, Any]) -> tuple[list[list[int]], str]:
    """The confusion matrix a run is shown with: on validation when it has one, else out-of-fold."""
    if e["validation_confusion"]:
        return e["validation_confusion"], "validation"
    return e["cv_confusion"], "out-of-fold"


def _html(rep: dict[str, Any], folder: Path) -> str:
    """report.html from its template (pipeline/templates/report.html.j2), every name escaped;
    the pictures embedded (those of this report, not yet renamed into place: `outputs.current`)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    return env.get_template("report.html.j2").render(
        rep=rep,
        png=lambda name: b64(outputs.current(folder / name).read_bytes()),
        b64=b64,
        header_rows=_header_rows,
        confusion_of=_confusion_of,
        ci=_ci,
        folds=_folds,
        vs=_vs,
        protocol=_protocol,
        dup_lines=_dup_lines,
        dumps=json.dumps,
        audit_status=report_audit.status,
        num=report_audit.num,
        zip=functools.partial(zip, strict=True),
    )
