"""Probability calibration fitted on the validation split: temperature, Platt and isotonic maps.

Focal loss and class weighting distort the model's probabilities; a monotone map fitted on validation
predictions (never test) repairs them without changing the ranking. A :class:`Calibrator` is a frozen record
of plain floats, so it saves as JSON (:meth:`Calibrator.to_dict`) and needs no pickle. :func:`compare_methods`
scores every method out of fold, with active regions kept whole, so the method to ship is chosen on validation
data alone (:func:`choose_method`). :func:`reliability_table` gives the bins of :func:`everest.scoring.metrics.ece`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit
from sklearn.isotonic import IsotonicRegression

from everest.scoring.metrics import ECE_BINS, brier, calibration_bins, check_inputs, ece

__all__ = [
    "EPS",
    "METHODS",
    "Calibrator",
    "Method",
    "choose_method",
    "compare_methods",
    "fit_calibrator",
    "group_folds",
    "log_loss",
    "reliability_table",
]

Method = Literal["none", "temperature", "platt", "isotonic"]
METHODS: tuple[str, ...] = get_args(Method)  # simplest first: choose_method breaks ties in this order
EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] before logits and log losses
ArrayLike = Sequence[Any] | np.ndarray

# Search ranges: wide enough for any model worth calibrating, finite so separable data cannot run off to infinity.
_LOG_T_BOUNDS = (math.log(1e-2), math.log(1e2))
_SLOPE_BOUNDS = (0.0, 100.0)  # slope >= 0 keeps the Platt map non-decreasing
_INTERCEPT_BOUNDS = (-100.0, 100.0)
_TIE = 1e-12  # Brier scores closer than this count as equal in choose_method


# ---------------------------------------------------------------------------------------------------------------------
# Validation and small helpers


def _probabilities(y_prob: Any, name: str = "y_prob") -> np.ndarray:
    """y_prob as a float64 array of finite values in [0, 1], else a ValueError naming the problem."""
    p = np.asarray(y_prob)
    if p.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric probabilities, got dtype {p.dtype}")
    p = p.astype(np.float64)
    bad = ~((p >= 0.0) & (p <= 1.0))  # NaN fails both comparisons; so does +-inf
    if bad.any():
        shown = np.unique(p[bad])[:5].tolist()
        raise ValueError(f"{name} must hold finite probabilities in [0, 1], got {int(bad.sum())} other value(s), "
                         f"e.g. {shown}")
    return p


def _check_xy(y_true: ArrayLike, y_prob: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated labels and probabilities (:func:`everest.scoring.metrics.check_inputs`) as float64 arrays."""
    y, p = check_inputs(y_true, y_prob)
    return y.astype(np.float64), p


def _check_method(method: Any) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; allowed: {', '.join(METHODS)}")
    return str(method)


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, EPS, 1.0 - EPS)
    return np.log(q) - np.log1p(-q)


def _log_loss_logits(y: np.ndarray, z: np.ndarray) -> float:
    """Mean log loss of sigmoid(z) against y, computed from logits without overflow."""
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def log_loss(y_true: ArrayLike, y_prob: ArrayLike) -> float:
    """Mean log loss with probabilities clipped to [EPS, 1 - EPS], so a 0 or 1 from isotonic stays finite."""
    y, p = _check_xy(y_true, y_prob)
    return _log_loss_logits(y, _logit(p))


# ---------------------------------------------------------------------------------------------------------------------
# The calibrator


@dataclass(frozen=True)
class Calibrator:
    """A fitted monotone map from raw to calibrated probabilities, stored as plain floats (JSON-safe).

    ``temperature`` is used by "temperature", ``slope``/``intercept`` by "platt", the breakpoints ``x``/``y``
    by "isotonic"; "none" is the identity. ``note`` says why a fit fell back to the identity.
    """

    method: str
    temperature: float = 1.0
    slope: float = 1.0
    intercept: float = 0.0
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        """Reject parameters that would not give a monotone map into [0, 1] (also guards from_dict)."""
        _check_method(self.method)
        for name in ("temperature", "slope", "intercept"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"Calibrator.{name} must be a finite real number, got {value!r}")
        if not self.temperature > 0.0:
            raise ValueError(f"Calibrator.temperature must be > 0, got {self.temperature!r}")
        if self.slope < 0.0:
            raise ValueError(f"Calibrator.slope must be >= 0 (a non-decreasing map), got {self.slope!r}")
        x, y = np.asarray(self.x, dtype=np.float64), np.asarray(self.y, dtype=np.float64)
        if x.shape != y.shape:
            raise ValueError(f"Calibrator.x and .y must have the same length, got {x.size} and {y.size}")
        if self.method == "isotonic" and x.size == 0:
            raise ValueError("an isotonic Calibrator needs at least one breakpoint in x and y")
        if x.size and (not np.all(np.isfinite(x)) or np.any(np.diff(x) <= 0)):
            raise ValueError("Calibrator.x must be finite and strictly increasing")
        if y.size and (not np.all((y >= 0.0) & (y <= 1.0)) or np.any(np.diff(y) < 0)):
            raise ValueError("Calibrator.y must lie in [0, 1] and be non-decreasing")

    def apply(self, p: ArrayLike) -> np.ndarray:
        """Calibrated probabilities (float64, same shape as ``p``, in [0, 1], non-decreasing in ``p``)."""
        q = _probabilities(p, "p")
        if self.method == "temperature":
            return expit(_logit(q) / self.temperature)
        if self.method == "platt":
            return expit(self.slope * _logit(q) + self.intercept)
        if self.method == "isotonic":
            return np.interp(q, self.x, self.y)  # constant beyond the fitted range: clips
        return q.copy()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict (floats, lists, strings); :meth:`from_dict` rebuilds an equal Calibrator."""
        d = asdict(self)
        d["x"], d["y"] = [float(v) for v in self.x], [float(v) for v in self.y]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibrator:
        """Rebuild a Calibrator from :meth:`to_dict` output; unknown keys are an error, not silently dropped."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown Calibrator field(s) {sorted(unknown)}; allowed: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        kw = dict(d)
        for key in ("x", "y"):
            if key in kw:
                kw[key] = tuple(float(v) for v in kw[key])
        return cls(**kw)


# ---------------------------------------------------------------------------------------------------------------------
# Fitting


def _fit_temperature(y: np.ndarray, z: np.ndarray) -> float:
    """T minimising the mean log loss of sigmoid(z / T); searched on log T so T stays positive."""
    res = minimize_scalar(lambda log_t: _log_loss_logits(y, z * math.exp(-log_t)), bounds=_LOG_T_BOUNDS,
                          method="bounded", options={"xatol": 1e-10})
    return float(math.exp(res.x))


def _fit_platt(y: np.ndarray, z: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) maximising the likelihood of sigmoid(a z + b); slope kept >= 0.

    The targets are Platt's (1999) smoothed labels, (N+ + 1)/(N+ + 2) and 1/(N- + 2), not 0/1: on a
    validation split that the model separates (a few M5 positives) plain maximum likelihood drives the slope
    to its bound and saturates the calibrated probabilities at 0 and 1.
    """
    n_pos = float(np.sum(y))
    y = np.where(y > 0, (n_pos + 1) / (n_pos + 2), 1 / (y.size - n_pos + 2))

    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        s = theta[0] * z + theta[1]
        r = expit(s) - y
        return _log_loss_logits(y, s), np.array([np.mean(r * z), np.mean(r)])

    res = minimize(loss_grad, x0=np.array([1.0, 0.0]), jac=True, method="L-BFGS-B",
                   bounds=[_SLOPE_BOUNDS, _INTERCEPT_BOUNDS], options={"gtol": 1e-10, "ftol": 1e-15, "maxiter": 1000})
    return float(res.x[0]), float(res.x[1])


def _fit_isotonic(y: np.ndarray, p: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Breakpoints of the pooled-adjacent-violators fit of y on p, for np.interp."""
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(p, y)
    return tuple(float(v) for v in iso.X_thresholds_), tuple(float(v) for v in iso.y_thresholds_)


def fit_calibrator(y_true: ArrayLike, y_prob: ArrayLike, method: Method | str) -> Calibrator:
    """Fit ``method`` on validation labels and probabilities; one-class labels give the identity with a note."""
    method = _check_method(method)
    y, p = _check_xy(y_true, y_prob)
    if method == "none":
        return Calibrator("none")
    if y.min() == y.max():
        return Calibrator("none", note=f"{method} not fitted: the labels hold one class only (all {int(y[0])}); "
                                       f"identity returned")
    if method == "temperature":
        return Calibrator("temperature", temperature=_fit_temperature(y, _logit(p)))
    if method == "platt":
        slope, intercept = _fit_platt(y, _logit(p))
        return Calibrator("platt", slope=slope, intercept=intercept)
    bx, by = _fit_isotonic(y, p)
    return Calibrator("isotonic", x=bx, y=by)


# ---------------------------------------------------------------------------------------------------------------------
# Choosing a method on validation data


def group_folds(groups: ArrayLike, folds: int = 5, seed: int = 0) -> list[np.ndarray]:
    """Held-out index arrays of group-disjoint folds: every group lies in exactly one fold.

    Groups are shuffled with ``seed``, then placed largest first into the fold with fewest samples so far
    (balanced sizes). With fewer groups than ``folds`` there is one fold per group; fewer than 2 groups raise.
    """
    if isinstance(folds, bool) or not isinstance(folds, numbers.Integral) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    g = np.asarray(groups)
    if g.ndim != 1 or g.size == 0:
        raise ValueError(f"groups must be a non-empty 1-D sequence, got shape {g.shape}")
    _, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    n_groups = counts.size
    if n_groups < 2:
        raise ValueError(f"need at least 2 distinct groups for group-disjoint folds, got {n_groups}")
    k = min(int(folds), n_groups)
    order = np.random.default_rng(seed).permutation(n_groups)
    order = order[np.argsort(-counts[order], kind="stable")]  # largest first; equal sizes in shuffled order
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    sizes = np.zeros(k, dtype=np.int64)
    for gi in order:
        f = int(np.argmin(sizes))
        fold_of_group[gi] = f
        sizes[f] += counts[gi]
    fold = fold_of_group[inverse]
    return [np.flatnonzero(fold == f) for f in range(k)]


def compare_methods(y_true: ArrayLike, y_prob: ArrayLike, groups: ArrayLike, methods: Sequence[str] = METHODS,
                    folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """Out-of-fold log loss, Brier and ECE per method, folds disjoint in ``groups`` (active regions).

    Each fold is calibrated by a map fitted on the other folds; the scores are over all pooled out-of-fold
    predictions. Columns: method, log_loss, brier, ece, folds (the number used).
    """
    y, p = _check_xy(y_true, y_prob)
    g = np.asarray(groups)
    if g.shape != y.shape:
        raise ValueError(f"groups must have one entry per sample, got {g.size} groups for {y.size} samples")
    methods = [_check_method(m) for m in methods]
    if not methods:
        raise ValueError(f"methods must name at least one of {', '.join(METHODS)}")
    held_out = group_folds(g, folds, seed)
    rows = []
    for method in methods:
        oof = np.empty_like(p)
        for test_idx in held_out:
            train = np.ones(y.size, dtype=bool)
            train[test_idx] = False
            oof[test_idx] = fit_calibrator(y[train], p[train], method).apply(p[test_idx])
        rows.append({"method": method, "log_loss": log_loss(y, oof), "brier": brier(y, oof), "ece": ece(y, oof),
                     "folds": len(held_out)})
    return pd.DataFrame(rows, columns=["method", "log_loss", "brier", "ece", "folds"])


def choose_method(table: pd.DataFrame) -> str:
    """The method with the lowest out-of-fold Brier score; near-ties go to the simpler one (METHODS order)."""
    if not {"method", "brier"} <= set(table.columns) or table.empty:
        raise ValueError("table must be a non-empty compare_methods() result with 'method' and 'brier' columns")
    scores = dict(zip(table["method"], table["brier"].astype(float), strict=True))
    best = min(scores.values())
    return next(m for m in METHODS if m in scores and scores[m] <= best + _TIE)


# ---------------------------------------------------------------------------------------------------------------------
# Reliability


def reliability_table(y_true: ArrayLike, y_prob: ArrayLike, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """Per-bin count, mean probability and observed frequency, binned exactly as :func:`everest.scoring.metrics.ece`.

    Bin k holds k/n <= p < (k+1)/n, the last bin closed; empty bins have n = 0 and NaN means.
    """
    edges, n, sum_p, sum_y = calibration_bins(y_true, y_prob, n_bins)
    denom = np.where(n > 0, n, np.nan)
    return pd.DataFrame({
        "bin_lower": edges[:-1],
        "bin_upper": edges[1:],
        "n": n.astype(np.int64),
        "mean_prob": sum_p / denom,
        "observed_frequency": sum_y / denom,
    })
