"""`make report`: one report comparing every trained head, as JSON, Markdown and HTML.

Current runs (trained on the cache the latest `make features` wrote) are ranked; stale ones are
listed apart with the reason. CV accuracy with its spread (said what it is), runs compared fold
by fold on the same outer folds, validation accuracy as the honest figure for the pick,
per-class results, a confusion-matrix picture per head, identical files (across classes, or in
train and validation), and every skipped image with its reason. The HTML embeds its pictures
and escapes every user-given string: one file to open.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import duplicates, layout, runs, store
from pipeline.errors import UserError
from pipeline.features import RANDOM_BANNER
from pipeline.provenance import environment

Log = Callable[[str], None]


def _plot_confusion(cm: list[list[int]], classes: list[str], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.array(cm, dtype=float)
    n = len(classes)
    size = max(3.5, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=100)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(
                        j,
                        i,
                        int(m[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = curve["points"]
    x = [p["per_class"] for p in pts]
    m = np.array([p["accuracy_mean"] for p in pts])
    s = np.array([p["accuracy_std"] for p in pts])
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.plot(x, m, "o-")
    ax.fill_between(x, m - s, m + s, alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training images per class")
    ax.set_ylabel("cross-validated accuracy")
    ax.set_title(f"learning curve: {curve['head']}, {curve['pooling']} pooling", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "learning-curve.png")
    plt.close(fig)
    curve["png"] = "learning-curve.png"
    return curve


EXPLAIN = {
    "spread": "± is the standard deviation of the k outer-fold accuracies of one run (the "
    "spread between folds, not a confidence interval of the mean).",
    "paired": "Every run on this cache with the same seed is scored on the same outer folds "
    "(drawn on the original images, an image's augmented views and identical copies in its "
    "fold), so runs are compared fold by fold: 'vs best' is the mean fold-by-fold difference "
    "to the top run and the number of folds where the top run is better.",
    "optimism": "The top of the ranking is picked on the same folds that score it: the best of "
    "many runs is optimistic. The honest figure for the pick is its accuracy on a split that "
    "played no part in choosing it: the validation split (DATA/validation/), shown beside it.",
    "curve": "The learning curve refits the sweep's best run on fewer images per class on those "
    "same outer folds.",
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
        "cv_fold_accuracies": r["cv"]["fold_accuracies"],
        "validation_accuracy": v["accuracy"] if v else None,
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
    """Fold-by-fold comparison of `other` with `best`, when both were scored on the same folds."""
    if not best["cv_folds_id"] or best["cv_folds_id"] != other["cv_folds_id"]:
        return None
    d = np.array(best["cv_fold_accuracies"]) - np.array(other["cv_fold_accuracies"])
    return {
        "mean_difference": float(d.mean()),
        "std_difference": float(d.std()),
        "folds_best_better": int((d > 0).sum()),
        "folds_tied": int((d == 0).sum()),
        "folds": int(len(d)),
    }


def build_report(artifacts: Path, log: Log = print) -> dict[str, Any]:
    """Collect every head's result and write report.json, report.md and report.html."""
    artifacts = Path(artifacts)
    all_runs = runs.list_runs(artifacts)
    if not all_runs:
        raise UserError(
            f"no trained heads in '{layout.heads_dir(artifacts)}'; run `make train-head` first"
        )
    entries = [_entry(r) for r in all_runs if r["current"]]
    stale = [_entry(r) for r in all_runs if not r["current"]]
    if entries:
        for e in entries:
            e["vs_best"] = paired(entries[0], e) if e is not entries[0] else None
    current = idx = None
    skipped: list[dict[str, str]] = []
    dups = None
    try:
        cache = layout.current_cache(artifacts)
        idx = store.read_index(cache)
        current = idx.attrs
        skipped = [{"path": s["path"], "reason": s["reason"]} for s in idx.skipped]
        dups = duplicates.find(idx.paths, idx.sha256, idx.labels.tolist(), idx.split, idx.classes)
    except UserError as e:
        log(f"warning: {e}")
    random_w = any(e["random_weights"] for e in entries)
    out = layout.report_dir(artifacts)
    out.mkdir(parents=True, exist_ok=True)
    for i, e in enumerate(entries):
        cm = e["validation_confusion"] or e["cv_confusion"]
        src = "validation" if e["validation_confusion"] else "out-of-fold"
        png = out / f"confusion-{i}.png"
        _plot_confusion(cm, e["classes"], f"{e['run']} ({src})", png)
        e["confusion_png"] = png.name
    curve = _learning_curve(artifacts, out, current)
    report = {
        "banner": RANDOM_BANNER if random_w else None,
        "explain": EXPLAIN,
        "learning_curve": curve,
        "results": entries,
        "stale": stale,
        "duplicates": dups,
        "skipped": skipped,
        "environment": environment(),
    }
    _write(out / "report.json", json.dumps(report, indent=1))
    _write(out / "report.md", _markdown(report))
    _write(out / "report.html", _html(report, out))
    log(f"report: {out / 'report.html'}")
    if stale:
        log(f"{len(stale)} stale run(s) listed apart, not ranked (see the report)")
    return report


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _vs(e: dict[str, Any], rank: int) -> str:
    """The paired comparison with the top run, in words."""
    if rank == 1:
        return "best"
    v = e.get("vs_best")
    if v is None:
        return "not paired (other folds)"
    return f"{-v['mean_difference']:+.4f} (best better on {v['folds_best_better']}/{v['folds']})"


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
    lines += ["## What the numbers mean", ""] + [f"- {t}" for t in rep["explain"].values()] + [""]
    lines += [
        "| rank | run | backbone | head | pooling | views | CV accuracy (mean ± std of folds) "
        "| folds | vs best (paired) | validation accuracy | train | validation |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, e in enumerate(rep["results"], 1):
        lines.append(
            f"| {i} | {e['run']} | {e['backbone']} | {e['head']} | {e['pooling']} | {e['views']} | "
            f"{e['cv_accuracy_mean']:.4f} ± {e['cv_accuracy_std']:.4f} | {e['cv_folds']} | "
            f"{_vs(e, i)} | {_fmt(e['validation_accuracy'])} | {e['n_train']} | "
            f"{e['n_validation']} |"
        )
    if not rep["results"]:
        lines.append("| | no current run: rerun `make train-head` | | | | | | | | | | |")
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


def _html(rep: dict[str, Any], folder: Path) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<title>Transfer-learning report</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}"
        ".banner{background:#fdd;border:2px solid #c00;padding:1em;font-weight:bold}"
        ".stale{color:#777}img{max-width:100%}details{margin:1em 0}</style></head><body>",
        "<h1>Transfer-learning report</h1>",
    ]
    if rep["banner"]:
        parts.append(f"<p class='banner'>{esc(rep['banner'])}</p>")
    parts.append("<h2>What the numbers mean</h2><ul>")
    parts += [f"<li>{esc(t)}</li>" for t in rep["explain"].values()]
    parts.append("</ul>")
    parts.append(
        "<table><tr><th>rank</th><th>run</th><th>backbone</th><th>head</th><th>pooling</th>"
        "<th>views</th>"
        "<th>CV accuracy</th><th>± std of folds</th><th>folds</th><th>vs best (paired)</th>"
        "<th>validation accuracy</th><th>train</th><th>validation</th></tr>"
    )
    for i, e in enumerate(rep["results"], 1):
        parts.append(
            f"<tr><td>{i}</td><td>{esc(e['run'])}</td><td>{esc(e['backbone'])}</td>"
            f"<td>{esc(e['head'])}</td>"
            f"<td>{esc(e['pooling'])}</td><td>{e['views']}</td>"
            f"<td>{e['cv_accuracy_mean']:.4f}</td><td>{e['cv_accuracy_std']:.4f}</td>"
            f"<td>{e['cv_folds']}</td><td>{esc(_vs(e, i))}</td>"
            f"<td>{_fmt(e['validation_accuracy'])}</td>"
            f"<td>{e['n_train']}</td><td>{e['n_validation']}</td></tr>"
        )
    parts.append("</table>")
    if not rep["results"]:
        parts.append("<p>No current run: rerun <code>make train-head</code>.</p>")
    if rep["stale"]:
        parts.append(f"<h2>Stale runs ({len(rep['stale'])}), not ranked</h2><ul class='stale'>")
        parts += [
            f"<li>{esc(e['run'])}: CV {e['cv_accuracy_mean']:.4f}; {esc(e['stale_reason'])}</li>"
            for e in rep["stale"]
        ]
        parts.append("</ul>")
    for e in rep["results"]:
        img = base64.b64encode((folder / e["confusion_png"]).read_bytes()).decode()
        parts.append(f"<h2>{esc(e['run'])}</h2>")
        parts.append(
            f"<p>fold accuracies: {', '.join(f'{a:.3f}' for a in e['cv_fold_accuracies'])}; "
            f"chosen: {esc(json.dumps(e['final_params']))}</p>"
        )
        parts.append(f"<img alt='confusion matrix' src='data:image/png;base64,{img}'>")
        parts.append(
            f"<table><tr><th>class ({e['per_class_source']})</th><th>precision</th><th>recall</th>"
            "<th>F1</th><th>support</th></tr>"
        )
        for c in e["per_class"]:
            parts.append(
                f"<tr><td>{esc(c['class'])}</td><td>{c['precision']:.3f}</td>"
                f"<td>{c['recall']:.3f}</td><td>{c['f1']:.3f}</td><td>{c['support']}</td></tr>"
            )
        parts.append("</table>")
    if rep.get("learning_curve"):
        c = rep["learning_curve"]
        img = base64.b64encode((folder / c["png"]).read_bytes()).decode()
        parts.append("<h2>Learning curve</h2>")
        parts.append(f"<img alt='learning curve' src='data:image/png;base64,{img}'>")
        parts.append(f"<p>{esc(c['advice'])}</p>")
    for title, groups in _dup_lines(rep.get("duplicates")):
        parts.append(f"<h2>Identical files: {esc(title)} ({len(groups)})</h2><ul>")
        parts += [
            "<li>"
            + " = ".join(
                f"<code>{esc(f['path'])}</code> ({esc(f['class'])}, {esc(f['split'])})"
                for f in g["files"]
            )
            + "</li>"
            for g in groups
        ]
        parts.append("</ul>")
    parts.append(f"<h2>Skipped images ({len(rep['skipped'])})</h2><ul>")
    parts += [f"<li><code>{esc(s['path'])}</code>: {esc(s['reason'])}</li>" for s in rep["skipped"]]
    parts.append("</ul></body></html>")
    return "\n".join(parts)
