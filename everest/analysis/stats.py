"""Statistics over seeds and over the test set, each computed from the results, never typed in.

* Across seeds: n, mean, sample standard deviation (ddof=1), min, median, max and a Student-t confidence
  interval of the mean. With one seed the spread and the interval are undefined and are NaN, on purpose.
* Across the test set: a bootstrap that resamples whole **units** (active regions; contiguous row blocks
  when no region is recorded) with replacement. Consecutive samples of a region share 9 of 10 time steps
  and positives come in long runs (a flare labels every record of the 24/48/72 h before it), so resampling
  rows would treat one flare episode as hundreds of independent cases and give intervals that are far too
  narrow. Each unit is reduced to sufficient statistics (tp, fp, tn, fn at the chosen threshold, sum of
  squared probability errors); a resample is a vector of unit multiplicities, so the totals of all
  resamples are one matrix product.
* Comparisons: two targets (e.g. 24 h vs 72 h) by a two-level bootstrap (shared region draws, seeds
  resampled in each arm); a baseline and a candidate on the same test samples by a paired region bootstrap
  (interval) and a paired region permutation test (p-value); Holm's step-down correction per family.
* Shown intervals (:func:`seed_interval`): what the report prints and the plots draw. A t-interval is clipped
  to the metric's range (:data:`METRIC_RANGES`), and with fewer than :data:`MIN_T_SEEDS` seeds the region
  bootstrap interval replaces it where one exists; the tables keep the t-interval as computed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

from everest.scoring import metrics as M

# Sufficient statistics kept per resampling unit; totals of these determine every bootstrapped metric.
UNIT_STATS: tuple[str, ...] = ("tp", "fp", "tn", "fn", "sq_err")
BOOTSTRAP_METRICS: tuple[str, ...] = ("tss", "accuracy", "precision", "recall", "specificity", "f1", "brier")
_MAX_CELLS = 4_000_000  # resample-matrix entries built at once (32 MB of float64): bounds memory for big sets


@dataclass(frozen=True)
class UnitStats:
    """Per-unit sufficient statistics of one experiment's test predictions: ``stats[i]`` belongs to ``ids[i]``."""

    ids: np.ndarray
    stats: np.ndarray  # (n_units, len(UNIT_STATS))

    @property
    def totals(self) -> np.ndarray:
        """Statistics of the whole test set (every unit once)."""
        return self.stats.sum(axis=0)


@dataclass(frozen=True)
class Interval:
    """A bootstrap estimate: the value on the full test set and its percentile confidence interval."""

    estimate: float
    low: float
    high: float
    se: float
    n_boot: int
    n_units: int

    def as_dict(self, prefix: str) -> dict[str, float]:
        """Flat ``{prefix}_{field}`` mapping for one table row."""
        return {f"{prefix}_{k}": v for k, v in asdict(self).items()}


# The values each reported metric can take (scores and probabilities in [0, 1], TSS in [-1, 1], times >= 0): an
# interval shown beyond them would claim impossible values.
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "tss": (-1.0, 1.0),
    **dict.fromkeys(("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "brier", "brier_raw", "ece",
                     "ece_raw", "threshold"), (0.0, 1.0)),
    **dict.fromkeys(("latency_ms", "latency_single_ms", "train_seconds"), (0.0, math.inf)),
}
# Fewer seeds give a t-interval too wide to mean anything (2 seeds: mean +/- 12.7 sd / sqrt 2).
MIN_T_SEEDS = 3
# What the report and the plots say beside an interval that was clipped.
CLIPPED = "clipped to the metric's range"


@dataclass(frozen=True)
class ShownInterval:
    """An interval as the report prints it and a plot draws it: its bounds, which interval it is and its n."""

    low: float
    high: float
    kind: str  # "t": Student-t over seeds; "bootstrap": region-block bootstrap of the test set
    n: int  # seeds for "t", resampled regions for "bootstrap"
    n_seeds: int
    clipped: bool  # a bound was moved onto the metric's range


def clip_to_range(metric: str, low: float, high: float) -> tuple[float, float, bool]:
    """``(low, high)`` cut to the metric's range (a metric without one is left alone) and whether it was cut."""
    lo_lim, hi_lim = METRIC_RANGES.get(metric, (-math.inf, math.inf))
    clipped = bool(low < lo_lim or high > hi_lim)  # False for NaN bounds: nothing to cut
    return float(np.clip(low, lo_lim, hi_lim)), float(np.clip(high, lo_lim, hi_lim)), clipped


def seed_interval(metric: str, n_seeds: int, low: float, high: float, boot: Interval | None = None) -> ShownInterval:
    """The interval to show for a seed mean: the t-interval ``(low, high)`` over ``n_seeds`` clipped to the
    metric's range, or, with fewer than :data:`MIN_T_SEEDS` seeds, the region-bootstrap interval ``boot`` if given.
    """
    if n_seeds < MIN_T_SEEDS and boot is not None and np.isfinite([boot.low, boot.high]).all():
        low, high, kind, n = boot.low, boot.high, "bootstrap", boot.n_units
    else:
        kind, n = "t", n_seeds
    low, high, clipped = clip_to_range(metric, low, high)
    return ShownInterval(low=low, high=high, kind=kind, n=int(n), n_seeds=int(n_seeds), clipped=clipped)


# ---------------------------------------------------------------------------------------------------------------------
# Across seeds


def seed_summary(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> dict[str, float]:
    """n, mean, sample std, min, median, max and the Student-t CI of the mean over the finite values.

    The t interval is mean +/- t_{(1+c)/2, n-1} * std / sqrt(n), as computed (not clipped: :func:`seed_interval`
    makes the shown one). n = 1 gives std and interval NaN (undefined, not zero); n = 0 gives NaN everywhere.
    Non-finite values (e.g. ROC AUC of a one-class test set) are not seeds' results and are left out of n.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    n = int(v.size)
    nan = float("nan")
    if n == 0:
        return {"n": 0, "mean": nan, "std": nan, "min": nan, "median": nan, "max": nan, "ci_low": nan, "ci_high": nan}
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if n > 1 else nan
    half = float(sps.t.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n)) if n > 1 else nan
    return {"n": n, "mean": mean, "std": std, "min": float(v.min()), "median": float(np.median(v)),
            "max": float(v.max()), "ci_low": mean - half, "ci_high": mean + half}


def hedges_g(a: Sequence[float], b: Sequence[float]) -> float:
    """Standardised mean difference (a - b) / pooled sd with the small-sample correction; NaN if undefined."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    na, nb = a.size, b.size
    if na < 2 or nb < 2:
        return float("nan")
    pooled = math.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    if pooled == 0:
        return float("nan")
    correction = 1 - 3 / (4 * (na + nb) - 9)
    return float((a.mean() - b.mean()) / pooled * correction)


def cohens_dz(diffs: Sequence[float]) -> float:
    """Paired effect size mean(d) / sd(d) over seed pairs; NaN with fewer than 2 pairs or no spread."""
    d = np.asarray(diffs, float)
    if d.size < 2 or d.std(ddof=1) == 0:
        return float("nan")
    return float(d.mean() / d.std(ddof=1))


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values (family-wise error control); NaN entries stay NaN and are not counted."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adj
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Test-set bootstrap


def unit_statistics(y_true: np.ndarray, y_pred: np.ndarray, y_prob: np.ndarray, units: np.ndarray) -> UnitStats:
    """Reduce test predictions to per-unit tp, fp, tn, fn and sum of (p - y)^2."""
    y = np.asarray(y_true).astype(bool)
    yhat = np.asarray(y_pred).astype(bool)
    p = np.asarray(y_prob, dtype=np.float64)
    ids, inv = np.unique(np.asarray(units), return_inverse=True)
    cols = [y & yhat, ~y & yhat, ~y & ~yhat, y & ~yhat]
    stats = np.stack([np.bincount(inv, weights=c.astype(np.float64), minlength=ids.size) for c in cols]
                     + [np.bincount(inv, weights=(p - y) ** 2, minlength=ids.size)], axis=1)
    return UnitStats(ids=ids, stats=stats)


def align_units(parts: Sequence[UnitStats]) -> tuple[np.ndarray, np.ndarray]:
    """Stack experiments on the union of their unit ids: (ids, array (n_experiments, n_units, n_stats))."""
    ids = np.unique(np.concatenate([p.ids for p in parts]))
    out = np.zeros((len(parts), ids.size, len(UNIT_STATS)))
    for i, p in enumerate(parts):
        out[i, np.searchsorted(ids, p.ids)] = p.stats
    return ids, out


def resample_weights(n_units: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_units) multiplicities of units drawn n_units times with replacement per resample."""
    draws = rng.integers(0, n_units, size=(n_boot, n_units))
    flat = (draws + (np.arange(n_boot) * n_units)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n_units).reshape(n_boot, n_units).astype(np.float64)


def bootstrap_totals(stacked: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Totals of every resample for every experiment, with the SAME unit draws for all experiments.

    ``stacked`` is (n_experiments, n_units, n_stats); returns (n_experiments, n_boot, n_stats). Shared draws
    make the experiments' resampled metrics paired, so differences and seed means get their joint spread.
    """
    n_exp, n_units, n_stats = stacked.shape
    flat = stacked.transpose(1, 0, 2).reshape(n_units, n_exp * n_stats)
    out = np.empty((n_boot, n_exp * n_stats))
    chunk = max(1, _MAX_CELLS // max(n_units, 1))
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        out[start:stop] = resample_weights(n_units, stop - start, rng) @ flat
    return out.reshape(n_boot, n_exp, n_stats).transpose(1, 0, 2)


def metric_from_totals(name: str, totals: np.ndarray) -> np.ndarray:
    """A metric from totals (..., UNIT_STATS) using everest.scoring.metrics' count formulas; Brier = sq_err / n.

    Degenerate resamples (e.g. no positives drawn) get the metrics module's documented values, silently:
    they are counted by the caller, not warned about 10,000 times.
    """
    tp, fp, tn, fn, sq = (totals[..., i] for i in range(len(UNIT_STATS)))
    if name == "brier":
        return sq / (tp + fp + tn + fn)
    with M.ignore_undefined():
        return M.METRICS_FROM_COUNTS[name](tp, fp, tn, fn)  # the module's own vectorised count formulas


def percentile_interval(estimate: float, samples: np.ndarray, n_units: int, confidence: float = 0.95) -> Interval:
    """Percentile bootstrap interval of ``samples`` around the full-data ``estimate``."""
    alpha = (1 - confidence) / 2
    low, high = np.quantile(samples, [alpha, 1 - alpha])
    return Interval(estimate=float(estimate), low=float(low), high=float(high), se=float(np.std(samples, ddof=1)),
                    n_boot=int(samples.size), n_units=int(n_units))


def bootstrap_p(samples: np.ndarray) -> float:
    """Two-sided bootstrap p-value for 'the statistic is 0': twice the smaller tail mass at 0, (k+1)/(B+1)."""
    b = samples.size
    low = (np.count_nonzero(samples <= 0) + 1) / (b + 1)
    high = (np.count_nonzero(samples >= 0) + 1) / (b + 1)
    return float(min(1.0, 2 * min(low, high)))


@dataclass(frozen=True)
class TargetBootstrap:
    """Region-bootstrap intervals of one target: per seed, and of the seed mean (pooled)."""

    per_seed: list[dict[str, Interval]]
    pooled: dict[str, Interval]
    n_units: int
    degenerate: int  # resamples (summed over seeds) with no positives or no negatives drawn


def bootstrap_target(parts: Sequence[UnitStats], n_boot: int, rng: np.random.Generator,
                     metrics: Sequence[str] = BOOTSTRAP_METRICS, confidence: float = 0.95) -> TargetBootstrap:
    """Region-block bootstrap of every seed of one target with shared draws, and of the seed mean.

    The pooled interval is that of the mean over seeds when the test set is resampled: it states how much
    the seed-averaged score depends on which regions happen to be in the test period (the seed t-interval
    states how much it depends on training randomness).
    """
    ids, stacked = align_units(parts)
    totals = bootstrap_totals(stacked, n_boot, rng)  # (S, B, K)
    full = stacked.sum(axis=1)  # (S, K)
    per_seed: list[dict[str, Interval]] = [{} for _ in parts]
    pooled: dict[str, Interval] = {}
    for m in metrics:
        boot = metric_from_totals(m, totals)  # (S, B)
        est = metric_from_totals(m, full)  # (S,)
        for s in range(len(parts)):
            per_seed[s][m] = percentile_interval(est[s], boot[s], ids.size, confidence)
        pooled[m] = percentile_interval(est.mean(), boot.mean(axis=0), ids.size, confidence)
    pos = totals[..., 0] + totals[..., 3]
    neg = totals[..., 1] + totals[..., 2]
    return TargetBootstrap(per_seed=per_seed, pooled=pooled, n_units=int(ids.size),
                           degenerate=int(np.count_nonzero((pos == 0) | (neg == 0))))


def compare_independent(arm_a: Sequence[UnitStats], arm_b: Sequence[UnitStats], n_boot: int,
                        rng: np.random.Generator, metric: str = "tss", confidence: float = 0.95) -> dict[str, float]:
    """Difference of seed-mean ``metric`` between two targets (A - B): two-level bootstrap CI and p-value.

    The two arms have different test sets (other labels, maybe other rows) but share active regions, so
    each resample draws regions once from the union and applies the draw to both arms (keeping their
    correlation); seeds are resampled with replacement within each arm, so training randomness counts too.
    Effect sizes: the difference itself (in metric units) and Hedges' g over the seeds' scores.
    """
    ids, stacked = align_units([*arm_a, *arm_b])
    na = len(arm_a)
    totals = bootstrap_totals(stacked, n_boot, rng)
    boot = metric_from_totals(metric, totals)  # (Sa + Sb, B)
    obs = metric_from_totals(metric, stacked.sum(axis=1))
    cols = np.arange(n_boot)[:, None]

    def seed_mean(rows: np.ndarray) -> np.ndarray:
        pick = rng.integers(0, rows.shape[0], size=(n_boot, rows.shape[0]))
        return rows[pick, cols].mean(axis=1)

    delta = seed_mean(boot[:na]) - seed_mean(boot[na:])
    est = float(obs[:na].mean() - obs[na:].mean())
    ci = percentile_interval(est, delta, ids.size, confidence)
    return {"delta": est, "ci_low": ci.low, "ci_high": ci.high, "p_value": bootstrap_p(delta),
            "hedges_g": hedges_g(obs[:na], obs[na:]), "n_a": na, "n_b": len(arm_b), "n_units": int(ids.size)}


def compare_paired(base: Mapping[int, UnitStats], cand: Mapping[int, UnitStats], n_boot: int,
                   rng: np.random.Generator, metric: str = "tss", confidence: float = 0.95) -> dict[str, float]:
    """Candidate minus baseline seed-mean ``metric`` on the same test samples, seeds paired by number.

    Interval: paired region bootstrap (one draw applied to both models). p-value: paired region permutation
    test (each region's predictions of the two models swapped with probability 1/2, all seeds at once;
    (k+1)/(B+1) with B = ``n_boot`` random swaps). Effect sizes: the difference and Cohen's d_z over the
    per-seed differences. Raises :class:`ValueError` if no seed is common or the test samples differ.
    """
    seeds = sorted(set(base) & set(cand))
    if not seeds:
        raise ValueError(f"no seed in common: baseline has {sorted(base)}, candidate {sorted(cand)}")
    ids, stacked = align_units([base[s] for s in seeds] + [cand[s] for s in seeds])
    k = len(seeds)
    b_st, c_st = stacked[:k], stacked[k:]
    n_b = b_st[..., :4].sum(axis=2)
    pos_b = b_st[..., 0] + b_st[..., 3]
    if not (np.array_equal(n_b, c_st[..., :4].sum(axis=2)) and np.array_equal(pos_b, c_st[..., 0] + c_st[..., 3])):
        raise ValueError("baseline and candidate were not evaluated on the same test samples (per-region sample "
                         "or positive counts differ): a paired comparison is impossible")
    obs_b = metric_from_totals(metric, b_st.sum(axis=1))
    obs_c = metric_from_totals(metric, c_st.sum(axis=1))
    est = float((obs_c - obs_b).mean())
    boot = metric_from_totals(metric, bootstrap_totals(stacked, n_boot, rng))  # (2k, B)
    delta = (boot[k:] - boot[:k]).mean(axis=0)
    ci = percentile_interval(est, delta, ids.size, confidence)
    # Permutation: a swap of region r moves (cand - base) stats of r from the candidate to the baseline.
    diff = c_st - b_st  # (k, R, K)
    flat = diff.transpose(1, 0, 2).reshape(ids.size, -1)
    extreme = 0
    chunk = max(1, _MAX_CELLS // max(ids.size, 1))
    for start in range(0, n_boot, chunk):
        size = min(n_boot, start + chunk) - start
        swap = rng.integers(0, 2, size=(size, ids.size)).astype(np.float64) @ flat  # (size, k*K)
        swap = swap.reshape(size, k, -1).transpose(1, 0, 2)
        pc = metric_from_totals(metric, c_st.sum(axis=1)[:, None, :] - swap)
        pb = metric_from_totals(metric, b_st.sum(axis=1)[:, None, :] + swap)
        extreme += int(np.count_nonzero(np.abs((pc - pb).mean(axis=0)) >= abs(est) - 1e-12))
    return {"delta": est, "ci_low": ci.low, "ci_high": ci.high, "p_value": (extreme + 1) / (n_boot + 1),
            "cohens_dz": cohens_dz(obs_c - obs_b), "n_pairs": k, "n_units": int(ids.size),
            "baseline_mean": float(obs_b.mean()), "candidate_mean": float(obs_c.mean())}


# ---------------------------------------------------------------------------------------------------------------------
# Thresholds


def _corr(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Pearson r and its p-value; NaN when fewer than 3 points or either variable is constant."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    r, p = sps.pearsonr(x, y)
    return float(r), float(p)


def threshold_stability(raw: pd.DataFrame) -> pd.DataFrame:
    """Per target: mean, std, coefficient of variation of the chosen threshold and its correlation with TSS.

    ``raw`` needs columns target, threshold, oracle_threshold, tss. CV = std / mean (NaN for one seed).
    """
    rows = []
    for target, g in raw.groupby("target", sort=False):
        thr = g["threshold"].to_numpy(float)
        s = seed_summary(thr)
        o = seed_summary(g["oracle_threshold"].to_numpy(float))
        r, p = _corr(thr, g["tss"].to_numpy(float))
        rows.append({"target": target, "n": s["n"], "threshold_mean": s["mean"], "threshold_std": s["std"],
                     "threshold_cv": s["std"] / s["mean"] if s["mean"] else float("nan"),
                     "threshold_min": s["min"], "threshold_max": s["max"], "oracle_threshold_mean": o["mean"],
                     "oracle_threshold_std": o["std"], "corr_threshold_tss": r, "corr_p": p})
    return pd.DataFrame(rows)


def threshold_tss_correlation(raw: pd.DataFrame) -> dict[str, float]:
    """Correlation of threshold and TSS over all experiments: raw, and within targets (target means removed)."""
    thr = raw["threshold"].to_numpy(float)
    tss = raw["tss"].to_numpy(float)
    r, p = _corr(thr, tss)
    centred = raw.groupby("target")[["threshold", "tss"]].transform(lambda c: c - c.mean())
    rw, pw = _corr(centred["threshold"].to_numpy(float), centred["tss"].to_numpy(float))
    return {"pearson_r": r, "p_value": p, "within_target_r": rw, "within_target_p": pw,
            "n": int(np.isfinite(thr).sum())}


INFLATION_METRICS: tuple[str, ...] = ("tss", "f1", "precision", "recall", "specificity", "accuracy")


def protocol_inflation(raw: pd.DataFrame) -> pd.DataFrame:
    """Per target: mean metric at the validation-chosen threshold, at the test-oracle one, and the difference.

    The oracle threshold is tuned on the test set (the first implementation's protocol); the difference says
    how much that protocol flatters each metric.
    """
    rows = []
    for target, g in raw.groupby("target", sort=False):
        row: dict[str, float | str | int] = {"target": target, "n": int(len(g))}
        for m in INFLATION_METRICS:
            d = seed_summary((g[f"oracle_{m}"] - g[m]).to_numpy(float))
            row.update({f"{m}_validation": float(g[m].mean()), f"{m}_oracle": float(g[f"oracle_{m}"].mean()),
                        f"{m}_inflation_mean": d["mean"], f"{m}_inflation_std": d["std"],
                        f"{m}_inflation_max": d["max"]})
        rows.append(row)
    return pd.DataFrame(rows)
