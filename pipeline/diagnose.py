"""Know your data, from what a run already has: out-of-fold probabilities and pooled features.

Nothing here runs the backbone. Each function is pure NumPy/scikit-learn on arrays:

- `label_issues`: confident learning (Northcutt, Jiang & Chuang 2021, "Confident Learning:
  Estimating Uncertainty in Dataset Labels", JAIR 70), written from the paper, as cleanlab's
  `filter.find_label_issues(filter_by="prune_by_noise_rate")` does it: per-class thresholds
  (the mean self-confidence of each given class), the confident joint of given and true labels
  calibrated to the class counts, and pruning, for every off-diagonal cell (given i, true j),
  the n·Q[i, j] images of given label i with the largest margin p_j - p_i, kept only where the
  most probable class is not the given one (cleanlab's `filter_by="both"`, its most precise
  filter in the paper's benchmarks). Ranked by the normalised margin (p_given - max other),
  lowest first. Several partitions' out-of-fold
  probabilities vote: an image is flagged when at least half of them flag it.
- `neighbours` (pipeline/neighbours.py, shared with HEAD=knn): k nearest neighbours on
  L2-normalised features, block by block.
- `near_duplicates`: sets of images much closer to each other than to their other
  neighbours (a ratio of each row's own neighbour distances), joined transitively.
- `outlier_scores`: mean distance to the k nearest neighbours.
- `calibration`: expected calibration error, Brier score and a reliability table;
  `fit_temperature`: the temperature that minimises the log loss of held-out probabilities.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.neighbours import neighbours, normalize

__all__ = ["neighbours", "normalize"]  # the audit's neighbour search is the knn head's


def _check_probs(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels, np.int64)
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probabilities of shape {probs.shape} for {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError("a label outside the probability columns")
    return labels, probs


def confident_joint(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """C[i, j]: images given label i confidently of class j (p_j at least class j's threshold,
    the largest such p_j), calibrated so row i sums to the count of label i and all to n."""
    labels, probs = _check_probs(labels, probs)
    k = probs.shape[1]
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    thresholds = np.array([probs[labels == j, j].mean() if counts[j] else 1.0 for j in range(k)])
    above = probs >= thresholds[None, :] - 1e-12
    masked = np.where(above, probs, -np.inf)
    true = np.argmax(masked, axis=1)
    has = above.any(axis=1)
    c = np.zeros((k, k))
    np.add.at(c, (labels[has], true[has]), 1.0)
    rows = c.sum(axis=1, keepdims=True)
    c = np.divide(c, rows, out=np.zeros_like(c), where=rows > 0) * counts[:, None]
    total = c.sum()
    return c * (len(labels) / total) if total else c


def label_issues(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Bool per image: its given label is likely wrong (prune by noise rate)."""
    labels, probs = _check_probs(labels, probs)
    n, k = probs.shape
    joint = confident_joint(labels, probs)
    flagged = np.zeros(n, bool)
    for i in range(k):
        mine = np.flatnonzero(labels == i)
        if len(mine) == 0:
            continue
        for j in range(k):
            if i == j:
                continue
            m = int(round(joint[i, j]))
            if m <= 0:
                continue
            margin = probs[mine, j] - probs[mine, i]
            flagged[mine[np.argsort(-margin, kind="stable")[:m]]] = True
    # an image whose given label is also its most probable one is never flagged (cleanlab's
    # "both" rule keeps only images pruned whose argmax disagrees with the given label)
    flagged &= np.argmax(probs, axis=1) != labels
    return flagged


def normalized_margin(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """p_given - max of the others: low (negative) = likely wrong label."""
    labels, probs = _check_probs(labels, probs)
    given = probs[np.arange(len(labels)), labels]
    others = probs.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    return given - others.max(axis=1)


def vote(labels: np.ndarray, partitions: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Several partitions' out-of-fold probabilities: flagged where at least half flag it and
    their mean disagrees with the given label; the score and the suggested label from the
    mean."""
    flags = np.mean([label_issues(labels, p) for p in partitions], axis=0)
    mean = sum(partitions[1:], np.array(partitions[0], np.float64)) / len(partitions)
    return {
        "flagged": (flags >= 0.5) & (np.argmax(mean, axis=1) != labels),
        "votes": flags,
        "score": normalized_margin(labels, mean),
        "suggested": np.argmax(mean, axis=1),
    }


def swapped_pairs(labels: np.ndarray, suggested: np.ndarray, flagged: np.ndarray, k: int):
    """Counts of (given, suggested) among flagged images: the most swapped class pairs."""
    m = np.zeros((k, k), np.int64)
    np.add.at(m, (labels[flagged], suggested[flagged]), 1)
    return m


def outlier_scores(dist: np.ndarray) -> np.ndarray:
    """Mean distance to the k nearest neighbours: high = unlike every other image."""
    return dist.mean(axis=1)


RATIO = 0.65  # a near-duplicate pair: closer than this share of its rows' usual neighbours
# by image signatures (`pipeline.signature`): measured, mirrored, resized and re-encoded copies
# sit at 0.00-0.10 of the usual neighbours' distance, different images at 0.85 and above
SIGNATURE_RATIO = 0.3
# and always below this distance (a mirror's signature is the image's own, bit for bit: a set
# of many identical ones would leave no neighbour distance to be a share of)
SIGNATURE_FLOOR = 0.02


def near_pairs(
    dist: np.ndarray,
    idx: np.ndarray,
    ratio: float = RATIO,
    valid: np.ndarray | None = None,
    floor: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, float]:
    """(rows, cols, the collection's median nearest-neighbour distance): each pair closer
    than `ratio` times the median of the row's own k neighbour distances (a copy stands out
    from its row's neighbourhood, as in Lowe's ratio test) and than that median distance (two
    odd images near each other only are not copies), or closer than `floor` whatever the
    neighbourhood. `valid`: the rows that count (others are neither measured nor paired)."""
    n = len(dist)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0.0
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    typical = float(np.median(dist[valid, 0])) if valid.any() else 0.0
    local = np.median(dist, axis=1, keepdims=True)
    close = (((dist < ratio * local) & (dist <= typical)) | (dist < floor)) & valid[:, None]
    r = np.repeat(np.arange(n), close.sum(axis=1))
    c = idx[close].astype(np.int64)
    keep = valid[c]
    return r[keep], c[keep], typical


def near_duplicates(
    dist: np.ndarray,
    idx: np.ndarray,
    ratio: float = RATIO,
    extra: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, float]:
    """(set id per row, -1 when alone; the collection's median nearest-neighbour distance).

    Pairs by `near_pairs` on the features (measured: JPEG, resized and cropped copies sit at
    0.04-0.58 of their rows' usual neighbour distance, different images of one kind at 0.74
    and above), with `extra` pairs (rows, cols) beside them (the image signatures' mirrored
    copies), joined transitively into sets."""
    n = len(dist)
    if n == 0:
        return np.zeros(0, np.int64), 0.0
    r, c, typical = near_pairs(dist, idx, ratio)
    if extra is not None:
        r, c = np.concatenate([r, extra[0]]), np.concatenate([c, extra[1]])
    g = coo_matrix((np.ones(len(r), np.int8), (r, c)), shape=(n, n))
    _, comp = connected_components(g, directed=False)
    sizes = np.bincount(comp)
    return np.where(sizes[comp] > 1, comp, -1), typical


K = 10  # neighbours per image for near-duplicates and outliers


def join_groups(groups: np.ndarray, sets: np.ndarray) -> np.ndarray:
    """`groups` (one integer per row) joined wherever rows share a near-duplicate set
    (`sets`, -1 alone): connected components over the groups, numbered by first appearance."""
    groups = np.asarray(groups, np.int64)
    _, g = np.unique(groups, return_inverse=True)
    n = int(g.max()) + 1 if len(g) else 0
    inset = np.flatnonzero(sets >= 0)
    order = inset[np.argsort(sets[inset], kind="stable")]
    first = np.r_[True, sets[order][1:] != sets[order][:-1]] if len(order) else np.zeros(0, bool)
    head = order[np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))]
    graph = coo_matrix((np.ones(len(order), np.int8), (g[order], g[head])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    joined = comp[g]
    _, firsts, inv = np.unique(joined, return_index=True, return_inverse=True)
    rank = np.empty(len(firsts), np.int64)
    rank[np.argsort(firsts, kind="stable")] = np.arange(len(firsts))
    return rank[inv.reshape(-1)]


def calibration(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> dict[str, Any]:
    """Expected calibration error (equal-width confidence bins), Brier score and the
    reliability table (per bin: mean confidence, accuracy, count)."""
    labels, probs = _check_probs(labels, probs)
    conf = probs.max(axis=1)
    right = np.argmax(probs, axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        m = which == b
        if not m.any():
            continue
        c, a = float(conf[m].mean()), float(right[m].mean())
        ece += m.mean() * abs(c - a)
        table.append(
            {
                "low": edges[b],
                "high": edges[b + 1],
                "confidence": c,
                "accuracy": a,
                "count": int(m.sum()),
            }
        )
    onehot = np.eye(probs.shape[1])[labels]
    brier = float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))
    return {"ece": float(ece), "brier": brier, "reliability": table}


def scaled(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities with their log-odds divided by `temperature` (softmax of log p / T)."""
    p = np.asarray(probs, np.float64)
    logp = np.log(np.clip(p, 1e-12, 1.0)) / temperature
    logp -= logp.max(axis=1, keepdims=True)
    e = np.where(p > 0, np.exp(logp), 0.0)  # a class the head never gives stays at 0
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(labels: np.ndarray, probs: np.ndarray) -> float:
    """The temperature T in [0.05, 20] minimising the log loss of `scaled(probs, T)`: above
    1 for an over-confident head, below 1 for an under-confident one."""
    labels, probs = _check_probs(labels, probs)

    def loss(log_t: float) -> float:
        p = scaled(probs, float(np.exp(log_t)))
        return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1))))

    res = minimize_scalar(loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


def calibrate(
    labels: np.ndarray, partitions: list[np.ndarray], folds: list[np.ndarray]
) -> dict[str, Any]:
    """A run's calibration from its out-of-fold probabilities: ECE, Brier score and the
    reliability table of the first partition; the temperature fitted on all partitions (what
    `make predict` applies); and its effect measured out of fold: each fold's probabilities
    scaled by the temperature fitted on the other folds' (cross-fitted: a fold's labels never
    choose its own temperature). Applied where the cross-fitted ECE is lower than the raw one.
    """
    labels = np.asarray(labels, np.int64)
    p0, f0 = np.asarray(partitions[0], np.float64), np.asarray(folds[0])
    scored = f0 >= 0
    raw = calibration(labels[scored], p0[scored])
    crossed = np.full_like(p0, np.nan)
    temps = []
    for i in np.unique(f0[scored]):
        other, mine = scored & (f0 != i), f0 == i
        t = fit_temperature(labels[other], p0[other]) if other.any() else 1.0
        temps.append(t)
        crossed[mine] = scaled(p0[mine], t)
    after = calibration(labels[scored], crossed[scored])
    every = np.concatenate([p[f >= 0] for p, f in zip(partitions, folds, strict=True)])
    y_every = np.concatenate([labels[f >= 0] for f in folds])
    t_all = fit_temperature(y_every, every) if len(every) else 1.0
    applied = bool(after["ece"] < raw["ece"])
    if raw["ece"] < 0.01 or abs(np.log(t_all)) < 0.05:  # calibrated already: leave it be
        applied = False
    return {
        "ece": raw["ece"],
        "brier": raw["brier"],
        "reliability": raw["reliability"],
        "temperature": t_all if applied else 1.0,
        "temperature_fitted": t_all,
        "fold_temperatures": [float(t) for t in temps],
        "ece_scaled": after["ece"],
        "brier_scaled": after["brier"],
        "reliability_scaled": after["reliability"],
        "applied": applied,
        "confidence": "over" if t_all > 1 else "under" if t_all < 1 else "right",
        "how": "out-of-fold probabilities of the first partition; the temperature minimises "
        "the log loss of all kept partitions' out-of-fold probabilities; its effect "
        "(ece_scaled) is cross-fitted: each fold scaled by the temperature of the other folds",
    }


def calibration_line(c: dict[str, Any]) -> str:
    """One line: the run's ECE and what its temperature does out of fold."""
    line = f"calibration: ECE {c['ece']:.3f}, Brier {c['brier']:.3f}"
    t = c["temperature_fitted"]
    if c["applied"]:
        return (
            f"{line}; {c['confidence']}-confident: temperature {t:.2f} brings the out-of-fold "
            f"ECE to {c['ece_scaled']:.3f} (predict applies it)"
        )
    return f"{line}; temperature {t:.2f} would give {c['ece_scaled']:.3f} out of fold: not applied"
