"""`make report`: one report comparing every trained head, as JSON, Markdown and HTML.

CV accuracy with spread, validation accuracy, per-class results, a confusion-matrix picture per
head, and every skipped image with its reason. The HTML embeds its pictures: one file to open.
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

from pipeline import store
from pipeline.errors import UserError
from pipeline.features import RANDOM_BANNER, current_cache
from pipeline.provenance import environment
from pipeline.train import load_results

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


def _learning_curve(artifacts: Path, out: Path) -> dict[str, Any] | None:
    """The latest sweep's learning curve, with its picture, if a sweep ran."""
    path = artifacts / "sweep" / "sweep.json"
    if not path.is_file():
        return None
    curve = json.loads(path.read_text())["learning_curve"]
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


def _entry(r: dict[str, Any]) -> dict[str, Any]:
    v = r.get("validation")
    return {
        "run": r["run"],
        "head": r["head"],
        "pooling": r["pooling"],
        "params": r["params"],
        "final_params": r.get("final_params", {}),
        "cv_accuracy_mean": r["cv"]["accuracy_mean"],
        "cv_accuracy_std": r["cv"]["accuracy_std"],
        "cv_folds": r["cv"]["folds"],
        "cv_fold_accuracies": r["cv"]["fold_accuracies"],
        "validation_accuracy": v["accuracy"] if v else None,
        "n_train": r["n_train"],
        "n_validation": r["n_validation"],
        "views": r.get("views", 0),
        "random_weights": r["features"]["random_weights"],
        "cache_key": r["features"]["cache_key"],
        "per_class": (v or r["cv"])["per_class"],
        "per_class_source": "validation" if v else "cross-validation",
        "cv_confusion": r["cv"]["confusion"],
        "validation_confusion": v["confusion"] if v else None,
        "classes": r["classes"],
        "seconds": r["timing_s"]["total"],
    }


def build_report(artifacts: Path, log: Log = print) -> dict[str, Any]:
    """Collect every head's result and write report.json, report.md and report.html."""
    artifacts = Path(artifacts)
    results = load_results(artifacts)
    if not results:
        raise UserError(f"no trained heads in '{artifacts / 'heads'}'; run `make train-head` first")
    caches = {r["features"]["path"] for r in results}
    try:
        caches.add(str(current_cache(artifacts)))
    except UserError:
        pass
    skipped: dict[str, str] = {}
    for c in sorted(caches):
        if Path(c).is_file():
            for s in store.read_index(Path(c)).skipped:
                skipped.setdefault(s["path"], s["reason"])
    entries = [_entry(r) for r in results]
    random_w = any(e["random_weights"] for e in entries)
    out = artifacts / "report"
    out.mkdir(parents=True, exist_ok=True)
    for e in entries:
        cm = e["validation_confusion"] or e["cv_confusion"]
        src = "validation" if e["validation_confusion"] else "out-of-fold"
        png = out / f"confusion-{e['run']}.png"
        _plot_confusion(cm, e["classes"], f"{e['run']} ({src})", png)
        e["confusion_png"] = png.name
    curve = _learning_curve(artifacts, out)
    report = {
        "banner": RANDOM_BANNER if random_w else None,
        "learning_curve": curve,
        "results": entries,
        "skipped": [{"path": p, "reason": r} for p, r in sorted(skipped.items())],
        "environment": environment(),
    }
    _write(out / "report.json", json.dumps(report, indent=1))
    _write(out / "report.md", _markdown(report))
    _write(out / "report.html", _html(report, out))
    log(f"report: {out / 'report.html'}")
    return report


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _markdown(rep: dict[str, Any]) -> str:
    lines = ["# Transfer-learning report", ""]
    if rep["banner"]:
        lines += [f"> **{rep['banner']}**", ""]
    lines += [
        "| rank | head | pooling | views | CV accuracy (mean ± std) | folds | validation accuracy "
        "| train | validation |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, e in enumerate(rep["results"], 1):
        lines.append(
            f"| {i} | {e['run']} | {e['pooling']} | {e['views']} | {e['cv_accuracy_mean']:.4f} ± "
            f"{e['cv_accuracy_std']:.4f} | {e['cv_folds']} | {_fmt(e['validation_accuracy'])} | "
            f"{e['n_train']} | {e['n_validation']} |"
        )
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
    lines += ["", f"## Skipped images ({len(rep['skipped'])})", ""]
    lines += [f"- `{s['path']}`: {s['reason']}" for s in rep["skipped"]] or ["None."]
    return "\n".join(lines) + "\n"


def _html(rep: dict[str, Any], folder: Path) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Transfer-learning report</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}"
        ".banner{background:#fdd;border:2px solid #c00;padding:1em;font-weight:bold}"
        "details{margin:1em 0}</style></head><body>",
        "<h1>Transfer-learning report</h1>",
    ]
    if rep["banner"]:
        parts.append(f"<p class='banner'>{esc(rep['banner'])}</p>")
    parts.append(
        "<table><tr><th>rank</th><th>head</th><th>pooling</th><th>views</th><th>CV accuracy</th>"
        "<th>± std</th><th>folds</th><th>validation accuracy</th><th>train</th><th>validation</th>"
        "</tr>"
    )
    for i, e in enumerate(rep["results"], 1):
        parts.append(
            f"<tr><td>{i}</td><td>{esc(e['run'])}</td><td>{e['pooling']}</td><td>{e['views']}</td>"
            f"<td>{e['cv_accuracy_mean']:.4f}</td><td>{e['cv_accuracy_std']:.4f}</td>"
            f"<td>{e['cv_folds']}</td><td>{_fmt(e['validation_accuracy'])}</td>"
            f"<td>{e['n_train']}</td><td>{e['n_validation']}</td></tr>"
        )
    parts.append("</table>")
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
    parts.append(f"<h2>Skipped images ({len(rep['skipped'])})</h2><ul>")
    parts += [f"<li><code>{esc(s['path'])}</code>: {esc(s['reason'])}</li>" for s in rep["skipped"]]
    parts.append("</ul></body></html>")
    return "\n".join(parts)
