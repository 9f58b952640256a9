"""Uncertainty of the figures: intervals for CV and validation accuracy, paired comparisons.

- Cross-validated accuracy over r repeats of k folds: the corrected resampled t interval of
  Nadeau and Bengio (2003, "Inference for the Generalization Error", Machine Learning 52),
  as corrected for repeated k-fold CV by Bouckaert and Frank (2004): the variance of the r·k
  fold figures is inflated by (1/(r·k) + n_test/n_train), since the training sets overlap,
  with a t distribution of r·k - 1 degrees of freedom.
- The difference of two runs on the same folds: the same interval on the fold-by-fold
  differences (paired).
- Validation accuracy: the Wilson score interval (Wilson, 1927).
- Two runs on the same validation images: McNemar's exact test on the images one run gets
  right and the other wrong (McNemar, 1947; exact binomial form).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

LEVEL = 0.95
CV_INTERVAL = (
    "95 % interval of the mean over repeated k-fold CV: corrected resampled t "
    "(Nadeau & Bengio 2003; Bouckaert & Frank 2004)"
)
VALIDATION_INTERVAL = "95 % Wilson score interval"


def corrected_t(
    values: list[float] | np.ndarray,
    folds: int,
    level: float = LEVEL,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> dict:
    """Mean of r·k fold figures with its corrected resampled t interval (Nadeau & Bengio).

    `folds` is k: each test fold is 1/k of the data, so n_test/n_train = 1/(k-1). The
    interval is cut to `bounds`, where the figure can lie: [0, 1] for an accuracy, [-1, 1]
    for a difference of two; `clipped` says it was (a t interval knows no bounds).
    """
    from scipy import stats as st

    v = np.asarray(values, dtype=np.float64)
    j = len(v)
    mean = float(v.mean()) if j else float("nan")
    if j < 2 or folds < 2:
        return {"mean": mean, "low": None, "high": None, "half_width": None, "n": j}
    var = float(v.var(ddof=1)) * (1.0 / j + 1.0 / (folds - 1))
    half = float(st.t.ppf(0.5 + level / 2, j - 1)) * math.sqrt(var)
    t_stat = mean / math.sqrt(var) if var > 0 else (math.inf if mean else 0.0)
    p = float(2 * st.t.sf(abs(t_stat), j - 1)) if var > 0 else (0.0 if mean else 1.0)
    low, high = mean - half, mean + half
    return {
        "mean": mean,
        "low": max(bounds[0], low),
        "high": min(bounds[1], high),
        "half_width": half,
        "clipped": bool(low < bounds[0] or high > bounds[1]),
        "n": j,
        "p_value": p,
    }


def wilson(correct: int, n: int, level: float = LEVEL) -> dict[str, Any]:
    """The Wilson score interval of a proportion correct/n (scipy's `binomtest`)."""
    from scipy import stats as st

    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    ci = st.binomtest(int(correct), int(n)).proportion_ci(level, method="wilson")
    return {"mean": correct / n, "low": float(ci.low), "high": float(ci.high), "n": n}


def mcnemar(a_right: np.ndarray, b_right: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test: do runs a and b differ on the same images?

    b01: images a gets wrong and b right; b10: the reverse. Two-sided exact binomial p-value.
    """
    from scipy import stats as st

    a, b = np.asarray(a_right, bool), np.asarray(b_right, bool)
    only_b, only_a = int((~a & b).sum()), int((a & ~b).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else float(st.binomtest(only_a, n, 0.5).pvalue)  # two-sided
    return {"only_a_right": only_a, "only_b_right": only_b, "p_value": p}


def pack_bits(right: np.ndarray) -> str:
    """Booleans as base64 text: a held-out split's per-image results, 1 bit each."""
    import base64

    return base64.b64encode(np.packbits(np.asarray(right, bool)).tobytes()).decode()


def unpack_bits(text: str, n: int) -> np.ndarray:
    import base64

    return np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8))[:n].astype(bool)


def paired_holdout(best: np.ndarray, other: np.ndarray) -> dict[str, Any]:
    """best - other on the same held-out images: the difference of paired proportions with
    its 95 % interval (Wald, from the discordant pairs, cut to [-1, 1]) and McNemar's exact p;
    tied when the interval includes 0 or the exact test finds no difference (p >= 0.05)."""
    from scipy import stats as st

    best, other = np.asarray(best, bool), np.asarray(other, bool)
    n = len(best)
    only_b, only_o = int((best & ~other).sum()), int((other & ~best).sum())
    d = (only_b - only_o) / n if n else 0.0
    se = np.sqrt(max(0.0, only_b + only_o - (only_b - only_o) ** 2 / n)) / n if n else 0.0
    z = float(st.norm.ppf(0.5 + LEVEL / 2))
    low, high = max(-1.0, d - z * se), min(1.0, d + z * se)
    p = mcnemar(best, other)["p_value"]
    return {
        "diff_mean": float(d),
        "diff_low": float(low),
        "diff_high": float(high),
        "p_value": p,
        "better_folds": int(d > 0),
        "worse_folds": int(d < 0),
        "folds": 1,
        # the Wald interval collapses on few discordant pairs ([1, 1] from two): the exact
        # test must agree before a difference is called one
        "tied": bool(low <= 0 <= high or p >= 1 - LEVEL),
    }


def paired(best: list[float], other: list[float], folds: int) -> dict[str, Any]:
    """best - other fold by fold, with its corrected interval; tied when it includes 0."""
    d = np.asarray(best, np.float64) - np.asarray(other, np.float64)
    ci = corrected_t(d, folds, bounds=(-1.0, 1.0))
    tied = ci["low"] is None or (ci["low"] <= 0 <= ci["high"])
    return {
        "diff_mean": ci["mean"],
        "diff_low": ci["low"],
        "diff_high": ci["high"],
        "p_value": ci.get("p_value"),
        "better_folds": int((d > 0).sum()),
        "worse_folds": int((d < 0).sum()),
        "folds": len(d),
        "tied": bool(tied),
    }


def default_repeats(n_train: int, slow: bool = False) -> int:
    """Repeated CV by cost: more partitions where the noise is largest and fitting cheapest.

    10 up to 1,000 training images, 5 up to 5,000, 3 up to 20,000, then 1; a third of that
    (at least 1) for heads that train a network. PIPELINE_MAX_REPEATS caps it.
    """
    import os

    r = 10 if n_train <= 1000 else 5 if n_train <= 5000 else 3 if n_train <= 20000 else 1
    if slow:
        r = max(1, r // 3)
    cap = os.environ.get("PIPELINE_MAX_REPEATS")
    return max(1, min(r, int(cap))) if cap else r


BUDGET_MINUTES = 3.0  # what one run's cross-validation may take by default (PIPELINE_BUDGET)


def budget_minutes(budget: float | None = None) -> float:
    """The time budget of one run's cross-validation, in minutes: `budget` (BUDGET=), else
    PIPELINE_BUDGET, else BUDGET_MINUTES."""
    import os

    from pipeline.errors import UserError

    if budget is None:
        env = os.environ.get("PIPELINE_BUDGET", "").strip()
        budget = float(env) if env else BUDGET_MINUTES
    if not budget > 0:
        raise UserError(f"BUDGET must be a positive number of minutes; got {budget}")
    return float(budget)


def budget_repeats(first_s: float, budget_min: float, most: int) -> int:
    """Repeats by time: as many partitions as the budget holds at the first one's cost, at
    least 1 (the one already made) and at most `most` (`default_repeats`: past it the interval
    narrows little)."""
    fits = int(budget_min * 60 // max(first_s, 1e-6))
    return max(1, min(most, fits))


def seconds(s: float) -> str:
    """41 s, 3.2 min: a duration as a person reads it."""
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


RACE_MARGIN = 0.01  # a run this close to the best on the mean keeps racing, tied or not


def keeps_racing(
    best: dict[str, Any], other: dict[str, Any], margin: float = RACE_MARGIN
) -> tuple[bool, dict[str, Any] | None]:
    """Whether `other` stays in a race against the current `best` (their CV results so far):
    their paired 95 % interval on the partitions they share includes 0, or `other` is within
    `margin` of `best` on the mean difference, or the two cannot be paired. The comparison
    comes back with the verdict."""
    pv = paired_runs(best, other)
    if pv is None:
        return True, None
    return bool(pv["tied"] or pv["diff_mean"] <= margin), pv


WIDE = 0.2  # an interval at least this wide says why in the same line


def why_wide(cv: dict[str, Any]) -> str:
    """'' or ', wide: <why>' (few fold figures, few images a fold, spread folds) for an
    interval at least WIDE across, so a user knows what would narrow it."""
    low, high = cv.get("accuracy_low"), cv.get("accuracy_high")
    if low is None or high is None or high - low < WIDE:
        return ""
    if cv.get("protocol") == "holdout":
        return f", wide: only {cv.get('holdout_images', 0):,} held-out images"
    k, r = int(cv["folds"]), int(cv.get("repeats", 1))
    n = cv.get("oof_scored")
    why = []
    if r * k < 10:
        why.append(f"only {r * k} fold figures (REPEATS= adds partitions)")
    if n is not None and n // max(k, 1) < 50:
        why.append(f"about {n // max(k, 1)} images a fold")
    if not why:
        why.append(f"fold accuracies spread widely (sd {cv.get('accuracy_std', 0.0):.3f})")
    return ", wide: " + ", ".join(why)


def cv_line(cv: dict[str, Any]) -> str:
    """One line for a CV result: mean, its interval, what it is, the fold figures' spread,
    and why the interval is wide where it is."""
    if cv.get("protocol") == "holdout":
        return (
            f"{cv['accuracy_mean']:.4f}, 95 % interval {cv['accuracy_low']:.3f} to "
            f"{cv['accuracy_high']:.3f} (held-out split of {cv['holdout_images']:,} training "
            f"images; Wilson{why_wide(cv)})"
        )
    what = (
        f"{cv.get('repeats', 1)}x{cv['folds']} folds"
        if cv.get("repeats", 1) > 1
        else (f"{cv['folds']} folds")
    )
    if cv.get("screened_out"):
        what += ", screened out after the first partition"
    if cv.get("accuracy_low") is None:
        return f"{cv['accuracy_mean']:.4f} ({what})"
    return (
        f"{cv['accuracy_mean']:.4f}, 95 % interval {cv['accuracy_low']:.3f} to "
        f"{cv['accuracy_high']:.3f} ({what}; corrected resampled t), fold sd "
        f"{cv['accuracy_std']:.3f}{why_wide(cv)}"
    )


def common_folds(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[float], list[float]] | None:
    """The fold accuracies two CV results share (the same partitions, in order), or None.

    Partition r of a seed is the same in every run, so a run with 5 repeats and one with 1
    are paired on their first partition's k folds.
    """
    pa, pb = a.get("partition_ids"), b.get("partition_ids")
    k = a.get("folds")
    if pa and pb and k == b.get("folds"):
        n = 0
        while n < min(len(pa), len(pb)) and pa[n] == pb[n]:
            n += 1
        if n == 0:
            return None
        return list(a["fold_accuracies"][: n * k]), list(b["fold_accuracies"][: n * k])
    if a.get("folds_id") and a.get("folds_id") == b.get("folds_id"):
        return list(a["fold_accuracies"]), list(b["fold_accuracies"])
    return None


def paired_runs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    """a - b for two runs' CV results (`result["cv"]`) scored on the same images, or None:
    image by image on one held-out split, else fold by fold (`paired`)."""
    if a.get("protocol") == "holdout" and a.get("holdout_right") and b.get("holdout_right"):
        if a.get("folds_id") != b.get("folds_id"):
            return None
        n = int(a["holdout_images"])
        return paired_holdout(
            unpack_bits(a["holdout_right"], n), unpack_bits(b["holdout_right"], n)
        )
    shared = common_folds(a, b)
    return paired(shared[0], shared[1], a["folds"]) if shared is not None else None
