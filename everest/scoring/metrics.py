"""Binary forecast metrics and the decision-threshold search.

All functions take ``y_true`` (labels 0/1 as bool, int or float) and ``y_prob`` (the positive-class
probability in [0, 1]); a sample is predicted positive when ``y_prob >= threshold``. Inputs are
validated once, here at the boundary: a bad argument raises :class:`ValueError` whose message names
the argument, what is allowed and what was given.

Degenerate inputs get a value chosen on purpose plus an :class:`UndefinedMetricWarning`, so that a
threshold sweep never crashes or silently turns into NaN (:func:`evaluate`, whose values are the ones
reported, gives NaN instead: an undefined metric is shown as undefined, never as a number):

* precision with no predicted positives (tp + fp = 0) is 0.0: "no positive forecasts" earns no credit;
* recall with no positive samples (tp + fn = 0) is 0.0 and specificity with no negative samples
  (tn + fp = 0) is 0.0: skill on a class that is absent cannot be shown;
* TSS is always ``recall + specificity - 1`` with the values above, so with one class present it lies
  in [-1, 0] (0 when every sample is right): one-class data can never look skilful;
* F1 is ``2 tp / (2 tp + fp + fn)``, which is 0 whenever precision is; only when there are neither
  positives nor predicted positives (denominator 0) is it undefined, and then it is 0.0 with a warning;
* ROC AUC needs both classes; with one class it is NaN plus a warning (no value would be honest).

Accuracy, Brier score and ECE are defined for every non-empty input.
"""

from __future__ import annotations

import contextlib
import numbers
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from everest.config import ThresholdConfig

__all__ = [
    "DEFAULT_THRESHOLD",
    "ECE_BINS",
    "METRICS",
    "PROBABILITY_METRICS",
    "TABLE_COLUMNS",
    "THRESHOLD_METRICS",
    "Confusion",
    "UndefinedMetricWarning",
    "accuracy",
    "balanced_score",
    "brier",
    "calibration_bins",
    "check_inputs",
    "confusion_counts",
    "ece",
    "evaluate",
    "f1",
    "precision",
    "recall",
    "roc_auc",
    "shown",
    "at_grid_edge",
    "best_threshold",
    "select_threshold",
    "specificity",
    "threshold_grid",
    "thin_sweep",
    "threshold_table",
    "tss",
]

ECE_BINS = 15
DEFAULT_THRESHOLD = 0.5
# Decimals kept in threshold grid values: far below any meaningful step, far above float noise
# (linspace gives 0.29000000000000004; rounding turns it back into the literal 0.29).
_GRID_DECIMALS = 12

ArrayLike = Sequence[Any] | np.ndarray
Counts = int | np.ndarray  # one count, or one per threshold


class UndefinedMetricWarning(UserWarning):
    """A metric was undefined for these inputs; the documented substitute value was returned."""


@contextlib.contextmanager
def ignore_undefined() -> Iterator[None]:
    """Silence :class:`UndefinedMetricWarning` for a block that records the documented values on purpose
    (threshold scans, bootstrap resamples, ceilings), so they do not flood the log."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        yield


class Confusion(NamedTuple):
    """Confusion counts at one threshold, named so that their order cannot be confused."""

    tp: int
    fp: int
    tn: int
    fn: int


# ---------------------------------------------------------------------------------------------------------------------
# Boundary validation


def _check_1d(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of samples, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must hold at least one sample, got an empty sequence")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric (bool, int or float), got dtype {arr.dtype}")
    return arr


def check_inputs(y_true: ArrayLike, y_prob: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels and probabilities; return them as (int8 0/1 array, float64 array)."""
    y = _check_1d(y_true, "y_true")
    p = _check_1d(y_prob, "y_prob")
    if y.shape != p.shape:
        raise ValueError(
            f"y_true and y_prob must have the same length, got {y.shape[0]} labels and {p.shape[0]} probabilities"
        )
    bad = ~((y == 0) | (y == 1))  # NaN labels fail both comparisons, so they are caught here too
    if bad.any():
        shown = np.unique(y[bad])[:5].tolist()
        raise ValueError(
            f"y_true must contain only the labels 0 and 1 (binary; bool, int or float), "
            f"got {int(bad.sum())} other value(s), e.g. {shown}"
        )
    p = p.astype(np.float64, copy=False)
    bad = ~((p >= 0.0) & (p <= 1.0))  # NaN fails both comparisons
    if bad.any():
        shown = np.unique(p[bad])[:5].tolist()
        raise ValueError(
            f"y_prob must contain probabilities in [0, 1] with no NaN, got {int(bad.sum())} value(s) outside "
            f"(finite values in [0, 1] only), e.g. {shown}"
        )
    return y.astype(np.int8), p


def _check_threshold(threshold: Any, name: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        kind = type(threshold).__name__
        raise ValueError(f"{name} must be a real number in [0, 1], got {threshold!r} of type {kind}")
    t = float(threshold)
    if not 0.0 <= t <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be a real number in [0, 1], got {t!r}")
    return t


def _check_config(cfg: ThresholdConfig | None) -> ThresholdConfig:
    if cfg is None:
        return ThresholdConfig()
    if not isinstance(cfg, ThresholdConfig):
        raise ValueError(f"cfg must be an everest.config.ThresholdConfig or None, got {type(cfg).__name__}")
    return cfg


# ---------------------------------------------------------------------------------------------------------------------
# Ratios from counts: shared by the scalar metrics and the vectorised threshold table, so they cannot disagree


def _caller_stacklevel() -> int:
    """Stack level of the first frame outside this module, so warnings point at the caller's line."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        level, frame = level + 1, frame.f_back
    return level


def _ratio(num: Counts, den: Counts, metric: str, reason: str) -> np.ndarray:
    """num / den elementwise, 0.0 where den == 0, with one warning naming how often that happened."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    zero = den == 0
    if zero.any():
        where = "" if zero.ndim == 0 else f" at {int(zero.sum())} of {zero.size} thresholds"
        message = f"{metric} is undefined{where} ({reason}); returning 0.0"
        warnings.warn(message, UndefinedMetricWarning, stacklevel=_caller_stacklevel())
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=~zero)


def _precision(tp: Counts, fp: Counts, tn: Counts, fn: Counts) -> np.ndarray:
    return _ratio(tp, tp + fp, "precision", "no predicted positives")


def _recall(tp: Counts, fp: Counts, tn: Counts, fn: Counts) -> np.ndarray:
    return _ratio(tp, tp + fn, "recall", "no positive samples")


def _specificity(tp: Counts, fp: Counts, tn: Counts, fn: Counts) -> np.ndarray:
    return _ratio(tn, tn + fp, "specificity", "no negative samples")


def _tss(tp: Counts, fp: Counts, tn: Counts, fn: Counts) -> np.ndarray:
    return _recall(tp, fp, tn, fn) + _specificity(tp, fp, tn, fn) - 1.0


def _accuracy(tp: Counts, fp: Counts, tn: Counts, fn: Counts) -> np.ndarray:
    return np.asarray((tp + tn) / (tp + fp + tn + fn), dtype=np.float64)


def _f1(tp: Counts, fp: Counts, tn: Counts, fn: Counts) -> np.ndarray:
    return _ratio(2 * tp, 2 * tp + fp + fn, "f1", "no positive samples and no predicted positives")


METRICS_FROM_COUNTS: dict[str, Callable[..., np.ndarray]] = {
    "tss": _tss,
    "accuracy": _accuracy,
    "precision": _precision,
    "recall": _recall,
    "specificity": _specificity,
    "f1": _f1,
}


def _counts(y: np.ndarray, p: np.ndarray, t: float) -> Confusion:
    pred = p >= t
    pos = y == 1
    tp = int(np.count_nonzero(pred & pos))
    fp = int(np.count_nonzero(pred & ~pos))
    fn = int(np.count_nonzero(pos)) - tp
    tn = y.size - tp - fp - fn
    return Confusion(tp=tp, fp=fp, tn=tn, fn=fn)


def _scalar(name: str, y_true: ArrayLike, y_prob: ArrayLike, threshold: float) -> float:
    y, p = check_inputs(y_true, y_prob)
    return float(METRICS_FROM_COUNTS[name](*_counts(y, p, _check_threshold(threshold))))


# ---------------------------------------------------------------------------------------------------------------------
# Public threshold metrics


def confusion_counts(y_true: ArrayLike, y_prob: ArrayLike, threshold: float = DEFAULT_THRESHOLD) -> Confusion:
    """Confusion counts (tp, fp, tn, fn) when predicting positive for ``y_prob >= threshold``."""
    y, p = check_inputs(y_true, y_prob)
    return _counts(y, p, _check_threshold(threshold))


def tss(y_true: ArrayLike, y_prob: ArrayLike, threshold: float = DEFAULT_THRESHOLD) -> float:
    """True skill statistic, recall + specificity - 1: the headline flare-forecasting score."""
    return _scalar("tss", y_true, y_prob, threshold)


def accuracy(y_true: ArrayLike, y_prob: ArrayLike, threshold: float = DEFAULT_THRESHOLD) -> float:
    """Fraction of samples classified correctly at ``threshold``."""
    return _scalar("accuracy", y_true, y_prob, threshold)


def precision(y_true: ArrayLike, y_prob: ArrayLike, threshold: float = DEFAULT_THRESHOLD) -> float:
    """tp / (tp + fp): how many positive forecasts came true; 0.0 with a warning if none were made."""
    return _scalar("precision", y_true, y_prob, threshold)


def recall(y_true: ArrayLike, y_prob: ArrayLike, threshold: float = DEFAULT_THRESHOLD) -> float:
    """tp / (tp + fn): fraction of flares caught; 0.0 with a warning if there are no positives."""
    return _scalar("recall", y_true, y_prob, threshold)


def specificity(y_true: ArrayLike, y_prob: ArrayLike, threshold: float = DEFAULT_THRESHOLD) -> float:
    """tn / (tn + fp): fraction of quiet samples kept quiet; 0.0 with a warning if there are no negatives."""
    return _scalar("specificity", y_true, y_prob, threshold)


def f1(y_true: ArrayLike, y_prob: ArrayLike, threshold: float = DEFAULT_THRESHOLD) -> float:
    """2 tp / (2 tp + fp + fn), the harmonic mean of precision and recall; 0.0 with a warning if undefined."""
    return _scalar("f1", y_true, y_prob, threshold)


# ---------------------------------------------------------------------------------------------------------------------
# Public probability metrics


def roc_auc(y_true: ArrayLike, y_prob: ArrayLike) -> float:
    """ROC AUC from average ranks (Mann-Whitney U), ties counted half; NaN with a warning for one class."""
    y, p = check_inputs(y_true, y_prob)
    n_pos = int(np.count_nonzero(y))
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        warnings.warn(
            f"roc_auc is undefined with only one class present ({n_pos} positives, {n_neg} negatives); returning nan",
            UndefinedMetricWarning,
            stacklevel=2,
        )
        return float("nan")
    # Average rank of each distinct value: tied samples share the mean of the ranks they occupy.
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def max_tss(y_true: ArrayLike, y_prob: ArrayLike) -> float:
    """Highest TSS over every possible threshold (Youden's J, the ROC curve's peak of TPR - FPR).

    With the generator's true probabilities this is the Bayes ceiling a forecaster can reach; NaN with
    a warning for one class only.
    """
    y, p = check_inputs(y_true, y_prob)
    n_pos = int(np.count_nonzero(y))
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        warnings.warn(f"max_tss is undefined with only one class present ({n_pos} positives, {n_neg} negatives)"
                      "; returning nan", UndefinedMetricWarning, stacklevel=2)
        return float("nan")
    order = np.argsort(-p, kind="stable")
    ys, ps = y[order], p[order]
    last_of_value = np.r_[ps[1:] != ps[:-1], True]  # evaluate only between distinct probabilities
    tpr = np.cumsum(ys)[last_of_value] / n_pos
    fpr = np.cumsum(1 - ys)[last_of_value] / n_neg
    return float(max(0.0, np.max(tpr - fpr)))


def brier(y_true: ArrayLike, y_prob: ArrayLike) -> float:
    """Brier score, mean (p - y)^2: a proper score of the probabilities themselves (lower is better)."""
    y, p = check_inputs(y_true, y_prob)
    return float(np.mean((p - y) ** 2))


def calibration_bins(y_true: ArrayLike, y_prob: ArrayLike,
                     n_bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Equal-width probability bins: (edges, count, sum of p, sum of y) per bin, the basis of ECE and of
    reliability diagrams.

    Bin k holds k/n <= p < (k+1)/n; the last bin is closed, so p = 1.0 lands in it, and a p exactly on an
    inner edge belongs to the bin above that edge.
    """
    y, p = check_inputs(y_true, y_prob)
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    # Edges as k / n (correctly rounded), so an edge equals the literal a caller would write (6/15 == 0.4).
    edges = np.arange(n_bins + 1) / n_bins
    idx = np.minimum(np.searchsorted(edges, p, side="right") - 1, n_bins - 1)
    return (edges, np.bincount(idx, minlength=n_bins), np.bincount(idx, weights=p, minlength=n_bins),
            np.bincount(idx, weights=y.astype(np.float64), minlength=n_bins))


def ece(y_true: ArrayLike, y_prob: ArrayLike, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error over the equal-width bins of :func:`calibration_bins`: sum of
    (n_bin / N) |mean p - positive fraction|. Empty bins contribute nothing.
    """
    _, n, sum_p, sum_y = calibration_bins(y_true, y_prob, n_bins)
    full = n > 0
    return float(np.sum(np.abs(sum_p[full] - sum_y[full])) / n.sum())  # (n_b/N)|mean_p - frac| = |sum_p - sum_y|/N


THRESHOLD_METRICS: dict[str, Callable[..., float]] = {
    "tss": tss,
    "accuracy": accuracy,
    "precision": precision,
    "recall": recall,
    "specificity": specificity,
    "f1": f1,
}
PROBABILITY_METRICS: dict[str, Callable[..., float]] = {"roc_auc": roc_auc, "brier": brier, "ece": ece}
# Every metric, each callable as f(y_true, y_prob); threshold metrics default to threshold 0.5.
METRICS: dict[str, Callable[..., float]] = {**THRESHOLD_METRICS, **PROBABILITY_METRICS}


def evaluate(y_true: ArrayLike, y_prob: ArrayLike, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """All metrics at one threshold plus roc_auc, brier, ece and the counts tp/fp/tn/fn, for one results row.

    These are the values reported, so a metric undefined for these samples is NaN (with the warning), not the
    substitute a threshold sweep uses: without positives recall, TSS and ROC AUC (and F1 when nothing is
    forecast positive either), without negatives specificity and TSS, without positive forecasts precision.
    """
    y, p = check_inputs(y_true, y_prob)
    t = _check_threshold(threshold)
    counts = _counts(y, p, t)
    out: dict[str, float] = {name: float(fn(*counts)) for name, fn in METRICS_FROM_COUNTS.items()}
    tp, fp, tn, fn = counts
    undefined = {"precision": tp + fp == 0, "recall": tp + fn == 0, "specificity": tn + fp == 0,
                 "f1": 2 * tp + fp + fn == 0}
    undefined["tss"] = undefined["recall"] or undefined["specificity"]
    out.update({name: float("nan") for name, undef in undefined.items() if undef})
    out.update(roc_auc=roc_auc(y, p), brier=brier(y, p), ece=ece(y, p))
    out.update(counts._asdict())
    return out


def shown(value: float | None, spec: str = ".3f") -> str:
    """A reported metric for a person: ``value`` formatted with ``spec``, or "undefined" when it is NaN or None
    (what :func:`evaluate` gives a metric these samples cannot define)."""
    return "undefined" if value is None or value != value else format(value, spec)


# ---------------------------------------------------------------------------------------------------------------------
# Threshold search

TABLE_COLUMNS: tuple[str, ...] = ("threshold", "tp", "fp", "tn", "fn", *THRESHOLD_METRICS, "balanced_score")


def threshold_grid(cfg: ThresholdConfig | None = None, y_true: ArrayLike | None = None,
                   y_prob: ArrayLike | None = None) -> np.ndarray:
    """The thresholds searched, ascending.

    ``design``: ``cfg.points`` evenly spaced from start to stop (0.10, 0.11, ..., 0.90). ``validation``:
    one threshold per distinct probability ``v`` of the positives in ``y_true``/``y_prob`` (the split the
    threshold is chosen on), placed midway between ``v`` and the next lower probability of any sample. TSS
    changes its true-positive count only at the positives' values, so its maximum over all thresholds is at
    one of these, and the midpoint keeps the counts of ``v`` while leaving a margin on both sides for unseen
    samples. Without
    positives the validation grid is the design grid.
    """
    cfg = _check_config(cfg)
    design = np.round(np.linspace(cfg.start, cfg.stop, cfg.points), _GRID_DECIMALS)
    if cfg.grid == "design":
        return design
    if y_true is None or y_prob is None:
        raise ValueError("threshold grid 'validation' needs y_true and y_prob of the split it is chosen on")
    y, p = check_inputs(y_true, y_prob)
    values = np.unique(p[y == 1])
    if values.size == 0:
        return design
    every = np.unique(p)
    below = every[np.maximum(np.searchsorted(every, values) - 1, 0)]
    mid = below + (values - below) / 2
    return np.where((below < values) & (mid > below), mid, values)


def balanced_score(values: Mapping[str, Any], weights: Mapping[str, float]) -> Any:
    """Weighted sum of metrics, sum_m weights[m] * values[m]; works on scalars and on arrays alike."""
    missing = sorted(set(weights) - set(values))
    if missing:
        raise ValueError(f"weights name metrics {missing} that are not in values; available: {sorted(values)}")
    return sum(float(w) * values[m] for m, w in weights.items())


def threshold_table(y_true: ArrayLike, y_prob: ArrayLike, cfg: ThresholdConfig | None = None,
                    grid: ArrayLike | None = None) -> pd.DataFrame:
    """Counts, metrics and balanced score at every threshold, computed at once from one sort.

    ``grid`` defaults to :func:`threshold_grid` of ``cfg`` on these samples; pass the validation grid to
    score the test split at the same thresholds.
    """
    y, p = check_inputs(y_true, y_prob)
    cfg = _check_config(cfg)
    grid = threshold_grid(cfg, y, p) if grid is None else np.asarray(grid, dtype=np.float64)
    pos = np.sort(p[y == 1])
    neg = np.sort(p[y == 0])
    # searchsorted(..., side="left") counts values < t, so size minus it counts values >= t.
    tp = pos.size - np.searchsorted(pos, grid, side="left")
    fp = neg.size - np.searchsorted(neg, grid, side="left")
    fn = pos.size - tp
    tn = neg.size - fp
    table: dict[str, np.ndarray] = {"threshold": grid, "tp": tp, "fp": fp, "tn": tn, "fn": fn}
    for name, fn_ in METRICS_FROM_COUNTS.items():
        table[name] = fn_(tp, fp, tn, fn)
    table["balanced_score"] = balanced_score(table, cfg.weights) + np.zeros(grid.size)
    return pd.DataFrame(table, columns=list(TABLE_COLUMNS))


SCORE_COLUMNS = {"balanced": "balanced_score", "tss": "tss"}


def select_threshold(table: pd.DataFrame, score: str = "tss") -> float:
    """The threshold with the highest ``score`` (``balanced`` or ``tss``); ties go to the lowest threshold."""
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"table must be a pandas DataFrame from threshold_table, got {type(table).__name__}")
    if score not in SCORE_COLUMNS:
        raise ValueError(f"score must be one of {sorted(SCORE_COLUMNS)}, got {score!r}")
    column = SCORE_COLUMNS[score]
    missing = [c for c in ("threshold", column) if c not in table.columns]
    if missing:
        raise ValueError(f"table must have columns 'threshold' and {column!r}, missing {missing}")
    if table.empty:
        raise ValueError("table must have at least one row, got an empty table")
    t = table["threshold"].to_numpy(dtype=np.float64)
    s = table[column].to_numpy(dtype=np.float64)
    if not (np.isfinite(t).all() and np.isfinite(s).all()):
        raise ValueError(f"table columns 'threshold' and {column!r} must be finite, got NaN or inf")
    best = s == s.max()  # exact ties: equal counts give bit-identical scores
    return float(t[best].min())


def thin_sweep(table: pd.DataFrame, points: int, keep: float) -> np.ndarray:
    """Row positions of ``points`` thresholds of a sweep, evenly spaced in rank, always including ``keep``
    (the chosen threshold): what a results folder shows of a search over thousands of thresholds."""
    n = len(table)
    if n <= points:
        return np.arange(n)
    rows = np.round(np.linspace(0, n - 1, points)).astype(np.int64)  # distinct: the step is at least 1
    chosen = int(np.flatnonzero(table["threshold"].to_numpy() == keep)[0])
    if chosen not in rows:
        rows[np.argmin(np.abs(rows - chosen))] = chosen
    return np.sort(rows)


def at_grid_edge(table: pd.DataFrame, threshold: float) -> bool:
    """Whether ``threshold`` is the lowest or highest value searched: the optimum may lie beyond the grid."""
    t = table["threshold"].to_numpy(dtype=np.float64)
    return bool(len(t) > 1 and (threshold <= t.min() or threshold >= t.max()))


def best_threshold(y_true: ArrayLike, y_prob: ArrayLike) -> float:
    """The threshold of the highest TSS over all thresholds (:func:`max_tss`); the lowest one on ties."""
    y, p = check_inputs(y_true, y_prob)
    table = threshold_table(y, p, ThresholdConfig(grid="validation"))
    return select_threshold(table, "tss")
