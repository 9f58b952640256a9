"""The report's pictures: confusion matrices, the runs' comparison, the learning curve, a
reliability diagram, thumbnails.

Each function writes a PNG (matplotlib, Agg) or returns PNG bytes; the report embeds them as data
URIs, so the HTML stays one self-contained file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import outputs


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion(cm: list[list[int]], classes: list[str], title: str, out: Path) -> None:
    """Rows normalised per true class (colour and percentage), with the counts in each cell."""
    plt = _plt()
    m = np.array(cm, dtype=float)
    n = len(classes)
    size = max(3.5, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=100)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (rows sum to 100 %)")
    ax.set_title(title, fontsize=9)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{norm[i, j]:.0%}\n{int(m[i, j])}",
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    fig.tight_layout()
    with outputs.written(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def comparison(entries: list[dict[str, Any]], out: Path) -> None:
    """Every current run: its fold accuracies as points, mean ± std, validation beside it.

    Runs scored on the same folds are paired: one thin line per fold joins its points.
    """
    plt = _plt()
    n = len(entries)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * n + 2), 4), dpi=100)
    xs = np.arange(n)
    by_folds: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        by_folds.setdefault(e.get("cv_folds_id") or f"#{i}", []).append(i)
    for members in by_folds.values():
        if len(members) < 2:
            continue
        k = min(len(entries[i]["cv_fold_accuracies"]) for i in members)
        for f in range(k):
            ax.plot(
                members,
                [entries[i]["cv_fold_accuracies"][f] for i in members],
                color="0.8",
                lw=0.8,
                zorder=1,
            )
    for i, e in enumerate(entries):
        accs = e["cv_fold_accuracies"]
        ax.scatter([i] * len(accs), accs, s=14, color="0.45", zorder=2)
        m = e["cv_accuracy_mean"]
        lo, hi = e.get("cv_low"), e.get("cv_high")
        err = [[max(0.0, m - lo)], [max(0.0, hi - m)]] if lo is not None else [[0.0], [0.0]]
        tied = e.get("tied_with_best")
        ax.errorbar(
            i,
            m,
            yerr=err,
            fmt="o" if tied or e.get("is_best") else "s",
            color="C0" if tied or e.get("is_best") else "C7",
            capsize=4,
            zorder=3,
            label="CV mean, 95 % interval (blue: best or tied with it)" if i == 0 else None,
        )
        if e.get("validation_low") is not None:
            ax.vlines(i + 0.18, e["validation_low"], e["validation_high"], color="C3", lw=1)
        if e.get("validation_accuracy") is not None:
            ax.scatter(
                i + 0.18,
                e["validation_accuracy"],
                marker="D",
                color="C3",
                zorder=3,
                label="validation, 95 % Wilson interval" if i == 0 else None,
            )
    ax.set_xticks(xs, [e["run"].split("--")[0] for e in entries], rotation=35, ha="right")
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylabel("accuracy")
    ax.set_title("runs, best first (grey: fold accuracies; lines join the same fold)", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    with outputs.written(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def learning_curve(curve: dict[str, Any], out: Path) -> None:
    plt = _plt()
    pts = curve["points"]
    x = [p["per_class"] for p in pts]
    m = np.array([p["accuracy_mean"] for p in pts])
    s = np.array([p["accuracy_std"] for p in pts])
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    lo = np.array(
        [p["low"] if p.get("low") is not None else v for p, v in zip(pts, m - s, strict=False)]
    )
    hi = np.array(
        [p["high"] if p.get("high") is not None else v for p, v in zip(pts, m + s, strict=False)]
    )
    ax.plot(x, m, "o-")
    ax.fill_between(x, lo, hi, alpha=0.2, label="95 % interval (corrected resampled t)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training images per class")
    ax.set_ylabel("cross-validated accuracy")
    ax.set_title(f"learning curve: {curve['head']}, {curve['pooling']} pooling", fontsize=9)
    fig.tight_layout()
    with outputs.written(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def reliability(
    table: list[dict[str, Any]],
    title: str,
    out: Path,
    scaled: list[dict[str, Any]] | None = None,
) -> None:
    """A reliability diagram: per confidence bin, the accuracy as a bar (the bin's width) and
    its mean confidence as a point, the diagonal where they would agree; `scaled` (the bins
    after the temperature, cross-fitted) as a second series. Bins hold `count` images each."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.0), dpi=100)
    ax.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1, label="perfectly calibrated")
    lows = [float(b["low"]) for b in table]
    widths = [float(b["high"]) - float(b["low"]) for b in table]
    accs = [float(b["accuracy"]) for b in table]
    ax.bar(lows, accs, width=widths, align="edge", color="C0", alpha=0.55, label="accuracy")
    confs = [float(b["confidence"]) for b in table]
    ax.scatter(confs, accs, s=14, color="C0", zorder=3, label="at the bin's mean confidence")
    if scaled:
        xs, ys = [float(b["confidence"]) for b in scaled], [float(b["accuracy"]) for b in scaled]
        ax.plot(xs, ys, "o-", color="C3", ms=3, lw=1, label="after the temperature (cross-fitted)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (the top class's probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    with outputs.written(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def thumbnail(path: Path, size: int = 96) -> bytes | None:
    """A small PNG of the image, through the same loader as the features (None: unreadable)."""
    from PIL import Image

    from pipeline.images import ImageError, load_image

    try:
        arr = load_image(path, size)
    except (ImageError, OSError):
        return None
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
