"""The analysis figures: each function returns a matplotlib Figure built without pyplot
(:func:`plot_reliability` writes its figure to a PNG and returns the path).

Figures are created with :class:`matplotlib.figure.Figure` (Agg canvas), never through ``pyplot``: no global
backend switch in a user's notebook, no shared state between Prefect worker threads, nothing to close.
Per-target figures have one panel per target that has results (array-job order), so a partial run still
plots what exists. Colour bars and bin-count histograms are child axes of their panel (``ax.child_axes``), so
``fig.axes`` counts panels only. Error bars never leave the metric's range (see :func:`everest.analysis.stats.
seed_interval`); a note on the panel says where one was clipped.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import precision_recall_curve, roc_curve

from everest import io
from everest.analysis.loading import ExperimentResult
from everest.analysis.stats import CLIPPED, MIN_T_SEEDS, Interval, clip_to_range, seed_interval, seed_summary
from everest.config import FLARE_CLASSES, HORIZONS, Target
from everest.scoring.metrics import ECE_BINS

CLASS_COLOURS = {"C": "tab:blue", "M": "tab:orange", "M5": "tab:red"}
DETAIL_METRICS: tuple[str, ...] = ("tss", "accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "brier",
                                   "ece")
LABELS = {"tss": "TSS", "accuracy": "Accuracy", "precision": "Precision", "recall": "Recall",
          "specificity": "Specificity", "f1": "F1", "roc_auc": "ROC AUC", "brier": "Brier score (lower better)",
          "ece": "ECE (lower better)", "latency_ms": "Latency (ms / sample)", "threshold": "Threshold"}
_GRID = np.linspace(0.0, 1.0, 101)


def _target_order(raw: pd.DataFrame) -> list[str]:
    order = [f"{c}-{h}" for c in FLARE_CLASSES for h in HORIZONS]
    present = set(raw["target"])
    return [t for t in order if t in present]


def _colour(target: str) -> str:
    return CLASS_COLOURS[target.split("-")[0]]


def _panels(n_targets: int, per_target: int, size: tuple[float, float] = (3.6, 3.0)) -> tuple[Figure, list[Axes]]:
    """A figure with ``per_target`` panels for each target, three targets per row; unused cells removed."""
    cols_t = max(1, min(3, n_targets))
    rows = max(1, math.ceil(n_targets / cols_t))
    fig = Figure(figsize=(size[0] * cols_t * per_target, size[1] * rows), layout="constrained")
    grid = fig.subplots(rows, cols_t * per_target, squeeze=False)
    axes: list[Axes] = []
    for i in range(rows * cols_t):
        r, c = divmod(i, cols_t)
        cell = [grid[r, c * per_target + k] for k in range(per_target)]
        if i < n_targets:
            axes.extend(cell)
        else:
            for ax in cell:
                fig.delaxes(ax)
    return fig, axes


def _heatmap(ax: Axes, raw: pd.DataFrame, metric: str) -> None:
    """Class x horizon cells coloured by the seed mean, annotated mean +/- std (n), with a colour bar."""
    mean = np.full((len(FLARE_CLASSES), len(HORIZONS)), np.nan)
    for i, c in enumerate(FLARE_CLASSES):
        for j, h in enumerate(HORIZONS):
            s = seed_summary(raw.loc[raw["target"] == f"{c}-{h}", metric].to_numpy(float))
            mean[i, j] = s["mean"]
            text = "no results" if s["n"] == 0 else f"{s['mean']:.3f}\n± {s['std']:.3f}\n(n={s['n']})"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="black" if not np.isfinite(s["mean"]) or s["mean"] > 0.35 else "white")
    image = ax.imshow(np.ma.masked_invalid(mean), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    bar = ax.figure.colorbar(image, cax=ax.inset_axes([1.03, 0.0, 0.04, 1.0]), extend="min" if metric == "tss" else
                             "neither")  # TSS below 0 shows as the arrow's colour
    bar.set_label(f"seed-mean {LABELS[metric]}")
    ax.set_xticks(range(len(HORIZONS)), [f"{h} h" for h in HORIZONS])
    ax.set_yticks(range(len(FLARE_CLASSES)), [f"≥{c}" for c in FLARE_CLASSES])
    ax.set_title(f"{LABELS[metric]}: mean ± std over seeds")


def _errors(mean: float, low: float, high: float) -> tuple[float, float]:
    """Error-bar lengths below and above ``mean`` for the interval (low, high); none where it is undefined."""
    return (mean - low if np.isfinite(low) else 0.0), (high - mean if np.isfinite(high) else 0.0)


def _notes(ax: Axes, notes: Sequence[str]) -> None:
    """Small grey notes in the panel's lower right corner (what an error bar shows, where one was clipped)."""
    if notes:
        ax.text(0.99, 0.01, "\n".join(dict.fromkeys(notes)), transform=ax.transAxes, ha="right", va="bottom",
                fontsize=7, color="dimgrey")


def performance_figure(raw: pd.DataFrame, boot: Mapping[str, Interval] | None = None) -> Figure:
    """Heatmaps of TSS, F1 and ROC AUC (class x horizon) and TSS vs horizon with 95 % intervals: 4 panels.

    The intervals are the seeds' t-intervals clipped to [-1, 1]; a target with fewer than 3 seeds shows its
    region-bootstrap interval from ``boot`` (by target name) instead, with a hollow marker.
    """
    fig = Figure(figsize=(12, 9), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, metric in zip(axes[:3], ("tss", "f1", "roc_auc"), strict=True):
        _heatmap(ax, raw, metric)
    ax, notes = axes[3], []
    for c in FLARE_CLASSES:
        xs, ys, lo, hi, hollow = [], [], [], [], []
        for h in HORIZONS:
            s = seed_summary(raw.loc[raw["target"] == f"{c}-{h}", "tss"].to_numpy(float))
            if s["n"]:
                iv = seed_interval("tss", s["n"], s["ci_low"], s["ci_high"], (boot or {}).get(f"{c}-{h}"))
                xs.append(h)
                ys.append(s["mean"])
                below, above = _errors(s["mean"], iv.low, iv.high)
                lo.append(below)
                hi.append(above)
                if iv.kind == "bootstrap":
                    hollow.append((h, s["mean"]))
                    notes.append(f"hollow: region-bootstrap interval (fewer than {MIN_T_SEEDS} seeds)")
                if iv.clipped:
                    notes.append(f"interval(s) {CLIPPED} [-1, 1]")
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=4, label=f"≥{c}", color=CLASS_COLOURS[c])
        for h, m in hollow:
            ax.scatter([h], [m], marker="o", s=40, facecolor="white", edgecolor=CLASS_COLOURS[c], zorder=3)
    ax.set_xticks(list(HORIZONS))
    ax.set_xlabel("horizon (h)")
    ax.set_ylabel("test TSS")
    ax.set_title("TSS by horizon (mean, 95 % t-interval over seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    _notes(ax, notes)
    fig.suptitle("EVEREST production performance")
    return fig


def _box_strip(ax: Axes, raw: pd.DataFrame, metric: str, order: list[str]) -> None:
    data = [raw.loc[raw["target"] == t, metric].dropna().to_numpy(float) for t in order]
    ax.boxplot(data, positions=range(len(order)), widths=0.6, showfliers=False)
    rng = np.random.default_rng(0)  # fixed jitter: identical figures on reruns
    for i, (t, d) in enumerate(zip(order, data, strict=True)):
        ax.scatter(i + rng.uniform(-0.15, 0.15, d.size), d, s=14, color=_colour(t), zorder=3)
    ax.set_xticks(range(len(order)), order, rotation=45, ha="right", fontsize=8)
    ax.set_title(LABELS.get(metric, metric))
    ax.grid(axis="y", alpha=0.3)


def detailed_metrics_figure(raw: pd.DataFrame) -> Figure:
    """Box plot with every seed's point, per target, for each of the 9 metrics: 9 panels."""
    order = _target_order(raw)
    fig = Figure(figsize=(14, 11), layout="constrained")
    for ax, metric in zip(fig.subplots(3, 3).ravel(), DETAIL_METRICS, strict=True):
        _box_strip(ax, raw, metric, order)
    fig.suptitle("Every metric across seeds (every seed shown)")
    return fig


def threshold_figure(raw: pd.DataFrame, runs: Sequence[ExperimentResult]) -> Figure:
    """Chosen thresholds per target, threshold vs TSS, threshold CV, and test TSS vs threshold: 4 panels."""
    order = _target_order(raw)
    fig = Figure(figsize=(13, 9), layout="constrained")
    a, b, c, d = fig.subplots(2, 2).ravel()
    _box_strip(a, raw, "threshold", order)
    for i, t in enumerate(order):
        o = raw.loc[raw["target"] == t, "oracle_threshold"].to_numpy(float)
        a.scatter(np.full(o.size, i + 0.3), o, marker="x", color="grey", zorder=3,
                  label="test-oracle threshold" if i == 0 else None)
    a.set_title("Validation-chosen threshold per target (x: test oracle)")
    a.legend(fontsize=8)
    for cls in FLARE_CLASSES:
        g = raw[raw["target"].str.split("-").str[0] == cls]
        if len(g):
            b.scatter(g["threshold"], g["tss"], color=CLASS_COLOURS[cls], label=f"≥{cls}", s=18)
    b.set_xlabel("chosen threshold")
    b.set_ylabel("test TSS")
    b.set_title("Threshold vs TSS (every experiment)")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    cv = [seed_summary(raw.loc[raw["target"] == t, "threshold"].to_numpy(float)) for t in order]
    c.bar(range(len(order)), [s["std"] / s["mean"] if s["mean"] else np.nan for s in cv],
          color=[_colour(t) for t in order])
    c.set_xticks(range(len(order)), order, rotation=45, ha="right", fontsize=8)
    c.set_title("Threshold stability: coefficient of variation across seeds")
    c.grid(axis="y", alpha=0.3)
    for t in order:  # each seed searched its own thresholds: one line per seed
        tables = [r.threshold_table for r in runs if str(r.target) == t and r.threshold_table is not None]
        for k, tb in enumerate(tables):
            x = tb["threshold_calibrated"] if "threshold_calibrated" in tb else tb["threshold"]
            d.plot(x, tb["test_tss"], color=_colour(t), alpha=0.6, lw=1, label=t if k == 0 else None)
    d.set_xlabel("threshold (calibrated scale)")
    d.set_ylabel("test TSS")
    d.set_title("Test TSS across each seed's searched thresholds")
    d.legend(fontsize=7, ncol=3)
    d.grid(alpha=0.3)
    fig.suptitle("Decision-threshold analysis")
    return fig


def _std_bar(metric: str, s: Mapping[str, float]) -> tuple[list[list[float]], bool]:
    """Error-bar lengths ``[[below], [above]]`` of mean +/- std clipped to the metric's range (none for one
    seed), and whether it was clipped."""
    std = s["std"] if np.isfinite(s["std"]) else 0.0
    low, high, clipped = clip_to_range(metric, s["mean"] - std, s["mean"] + std)
    below, above = _errors(s["mean"], low, high)
    return [[below], [above]], clipped


def latency_figure(raw: pd.DataFrame) -> Figure:
    """Mean TSS vs mean latency per target (seed std as error bars, clipped to each metric's range) and latency
    per target: 2 panels."""
    order = _target_order(raw)
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    a, b = fig.subplots(1, 2)
    notes = []
    for t in order:
        g = raw[raw["target"] == t]
        lat, tss = seed_summary(g["latency_ms"].to_numpy(float)), seed_summary(g["tss"].to_numpy(float))
        xerr, x_clipped = _std_bar("latency_ms", lat)
        yerr, y_clipped = _std_bar("tss", tss)
        a.errorbar(lat["mean"], tss["mean"], xerr=xerr, yerr=yerr, marker="o", color=_colour(t), capsize=3)
        a.annotate(t, (lat["mean"], tss["mean"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        if x_clipped or y_clipped:
            notes.append(f"error bars {CLIPPED} (latency >= 0, TSS in [-1, 1])")
    a.set_xlabel(LABELS["latency_ms"])
    a.set_ylabel("test TSS")
    a.set_title("Performance vs latency (mean ± std over seeds)")
    a.grid(alpha=0.3)
    _notes(a, notes)
    _box_strip(b, raw, "latency_ms", order)
    fig.suptitle("Inference latency (batch 32, after warm-up)")
    return fig


def _by_target(runs: Sequence[ExperimentResult]) -> dict[str, list[ExperimentResult]]:
    out: dict[str, list[ExperimentResult]] = {}
    for r in runs:
        out.setdefault(str(r.target), []).append(r)
    order = [str(t) for t in (Target(flare_class=c, horizon=h) for c in FLARE_CLASSES for h in HORIZONS)]
    return {t: out[t] for t in order if t in out}


def _with_predictions(runs: Sequence[ExperimentResult]) -> dict[str, list[pd.DataFrame]]:
    return {t: [r.predictions for r in rs if r.predictions is not None]
            for t, rs in _by_target(runs).items() if any(r.predictions is not None for r in rs)}


def _band(ax: Axes, x: np.ndarray, curves: list[np.ndarray], colour: str, label: str,
          marker: str | None = None) -> None:
    """Seed mean as a line (``marker`` at each point), the seeds' min-max as a shaded band."""
    arr = np.vstack(curves)
    with warnings.catch_warnings():  # bins empty in every seed stay NaN (a gap in the line), on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi, mean = np.nanmin(arr, axis=0), np.nanmax(arr, axis=0), np.nanmean(arr, axis=0)
    ax.fill_between(x, lo, hi, color=colour, alpha=0.25, linewidth=0)
    ax.plot(x, mean, color=colour, label=label, marker=marker, markersize=3)


def _count_axes(ax: Axes) -> Axes:
    """A bin-count histogram panel right under a reliability diagram (a child axes sharing its x axis); the
    x label moves to it. Log scale: rare-event forecasts put most samples in the first bins."""
    counts = ax.inset_axes([0.0, -0.34, 1.0, 0.26], sharex=ax)
    ax.tick_params(labelbottom=False)
    counts.set_yscale("log")
    counts.set_ylabel("samples", fontsize=7)
    counts.tick_params(labelsize=7)
    counts.grid(alpha=0.3)
    return counts


def reliability_figure(runs: Sequence[ExperimentResult]) -> Figure:
    """Reliability diagram per target (the ECE's 15 bins; seed mean and min-max band) over a histogram of the
    samples per bin: 1 panel per target. A bin empty in every seed is a gap (NaN), not a point at 0."""
    preds = _with_predictions(runs)
    fig, axes = _panels(len(preds), 1, size=(3.6, 4.0))
    edges = np.arange(ECE_BINS + 1) / ECE_BINS
    centres = (edges[:-1] + edges[1:]) / 2
    for ax, (t, frames) in zip(axes, preds.items(), strict=True):
        curves, counts = [], []
        for p in frames:
            prob, y = p["y_prob"].to_numpy(float), p["y_true"].to_numpy(float)
            idx = np.minimum(np.searchsorted(edges, prob, side="right") - 1, ECE_BINS - 1)
            n = np.bincount(idx, minlength=ECE_BINS)
            curves.append(np.bincount(idx, weights=y, minlength=ECE_BINS) / np.where(n > 0, n, np.nan))
            counts.append(n)
        _band(ax, centres, curves, _colour(t), f"{len(frames)} seeds", marker="o")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("observed flare frequency")
        ax.set_title(f"{t} reliability")
        ax.legend(fontsize=7, loc="upper left")
        hist = _count_axes(ax)
        hist.bar(centres, np.mean(counts, axis=0), width=1 / ECE_BINS, color=_colour(t), alpha=0.6)
        hist.set_xlabel("forecast probability (bin centre)")
        hist.set_ylabel("samples / bin\n(seed mean)", fontsize=7)
    fig.suptitle("Reliability diagrams (band: min-max over seeds; empty bins left out)")
    return fig


def _pr_operating_points(y: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every distinct threshold, from the highest threshold to the lowest.

    scikit-learn appends (recall 0, precision 1), which no threshold reaches; it is dropped, so a curve starts
    at the highest-threshold operating point and ends at (1, base rate).
    """
    prec, rec, _ = precision_recall_curve(y, prob)
    return rec[-2::-1], prec[-2::-1]


def roc_pr_figure(runs: Sequence[ExperimentResult]) -> Figure:
    """ROC curves per target (seed mean with min-max band) and precision-recall curves (one line per seed, its
    operating points from the highest threshold on): 2 panels per target."""
    preds = _with_predictions(runs)
    fig, axes = _panels(len(preds), 2)
    for i, (t, frames) in enumerate(preds.items()):
        roc_ax, pr_ax = axes[2 * i], axes[2 * i + 1]
        rocs, base = [], []
        for p in frames:
            # the model's own ranking: a calibration map can only merge scores (saturation), never improve it
            y, prob = p["y_true"].to_numpy(int), p["y_prob_raw" if "y_prob_raw" in p else "y_prob"].to_numpy(float)
            if y.min() == y.max():
                continue  # one class only: no curve exists
            fpr, tpr, _ = roc_curve(y, prob)
            rocs.append(np.interp(_GRID, fpr, tpr))
            pr_ax.plot(*_pr_operating_points(y, prob), color=_colour(t), alpha=0.7, lw=1)
            base.append(y.mean())
        if rocs:
            _band(roc_ax, _GRID, rocs, _colour(t), f"{len(rocs)} seeds")
            pr_ax.lines[0].set_label(f"{len(rocs)} seeds, one line each")
            pr_ax.axhline(float(np.mean(base)), ls="--", color="grey", lw=1, label="base rate")
        roc_ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
        roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{t} ROC", xlim=(0, 1),
                   ylim=(0, 1))
        pr_ax.set(xlabel="recall", ylabel="precision", title=f"{t} precision-recall", xlim=(0, 1), ylim=(0, 1.02))
        roc_ax.legend(fontsize=7, loc="lower right")
        if not rocs:
            pr_ax.text(0.5, 0.5, "one class only in every seed:\nno curve", ha="center", va="center")
        else:
            pr_ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("ROC (band: min-max over seeds) and precision-recall curves (from the highest threshold)")
    return fig


def training_figure(runs: Sequence[ExperimentResult]) -> Figure:
    """Validation TSS and losses per epoch, every seed, per target: 2 panels per target."""
    groups = _by_target(runs)
    fig, axes = _panels(len(groups), 2)
    for i, (t, rs) in enumerate(groups.items()):
        tss_ax, loss_ax = axes[2 * i], axes[2 * i + 1]
        for k, r in enumerate(rs):
            h, colour = r.history, f"C{k % 10}"  # one colour per seed in both panels
            if h.empty or "epoch" not in h:
                continue
            if "val_tss" in h:
                tss_ax.plot(h["epoch"], h["val_tss"], marker=".", color=colour, label=f"seed {r.seed}")
            best = r.results.get("training", {}).get("best_epoch")
            if best is not None and "val_tss" in h and (h["epoch"] == best).any():
                tss_ax.scatter([best], h.loc[h["epoch"] == best, "val_tss"], marker="*", s=80, color="black",
                               zorder=3)
            for col, ls in (("val_loss", "-"), ("train_loss", ":")):
                if col in h:
                    loss_ax.plot(h["epoch"], h[col], ls=ls, color=colour,
                                 label=f"seed {r.seed}" if col == "val_loss" else None)
        tss_ax.set(xlabel="epoch", ylabel="validation TSS", title=f"{t} validation TSS (*: best epoch)")
        loss_ax.set(xlabel="epoch", ylabel="loss", title=f"{t} loss (solid: val, dotted: train)")
        for ax in (tss_ax, loss_ax):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
            if ax.get_legend_handles_labels()[0]:  # models without epochs (baselines) draw no curves
                ax.legend(fontsize=6)
            ax.grid(alpha=0.3)
    fig.suptitle("Training curves (all seeds)")
    return fig


def reliability_curves_figure(curves: Mapping[str, pd.DataFrame], title: str) -> Figure:
    """Reliability curves from :func:`everest.scoring.calibration.reliability_table` on one panel, over a histogram of
    each curve's samples per bin.

    One line per curve (label = key) through the bins' (mean probability, observed frequency), broken at empty
    bins (their NaN means); marker area grows with the bin's sample count.
    """
    fig = Figure(figsize=(5.5, 6.2), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    hist = _count_axes(ax)
    for k, (label, table) in enumerate(curves.items()):
        missing = {"n", "bin_lower", "bin_upper", "mean_prob", "observed_frequency"} - set(table.columns)
        if missing:
            raise ValueError(f"curve {label!r} lacks column(s) {sorted(missing)}; pass reliability_table() output")
        n = table["n"].to_numpy(float)
        colour = f"C{k % 10}"
        ax.plot(table["mean_prob"], table["observed_frequency"], color=colour, lw=1.5, label=label)
        if n.max(initial=0) > 0:
            ax.scatter(table["mean_prob"], table["observed_frequency"], s=12 + 120 * np.sqrt(n / n.max()),
                       color=colour, alpha=0.8, zorder=3)
        edges = np.append(table["bin_lower"].to_numpy(float), table["bin_upper"].iloc[-1])
        hist.stairs(np.where(n > 0, n, np.nan), edges, color=colour, lw=1.2)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_ylabel("observed frequency")
    hist.set_xlabel("forecast probability; below: samples per bin")
    ax.set_title(title)
    ax.text(0.98, 0.02, "marker area ~ samples in bin", transform=ax.transAxes, ha="right", va="bottom",
            fontsize=7, color="grey")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    return fig


def plot_reliability(curves: Mapping[str, pd.DataFrame], path: str | Path, title: str) -> Path:
    """:func:`reliability_curves_figure` written as PNG (atomically); returns the path."""
    fig = reliability_curves_figure(curves, title)
    return io.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))


def verdict_figure(verdict: pd.DataFrame, alpha: float, confidence: float) -> Figure | None:
    """The verdict at a glance: per target, ΔTSS (EVEREST's seed mean minus the best baseline, test) with its
    paired region-bootstrap interval, the seed ensemble's ΔTSS beside it (a point: the ensemble is one model),
    a line at zero; filled markers are Holm-significant (Holm p < ``alpha``). None when no target has a ΔTSS."""
    rows = [r for r in verdict.to_dict("records") if _finite(r.get("delta"))]
    if not rows:
        return None
    order = _target_order(verdict)
    rows.sort(key=lambda r: order.index(r["target"]))
    fig = Figure(figsize=(7.5, 0.55 * len(rows) + 1.7), layout="constrained")
    ax = fig.subplots()
    ys = np.arange(len(rows))[::-1].astype(float)
    for y, r in zip(ys, rows, strict=True):
        colour, delta = _colour(r["target"]), float(r["delta"])
        filled = _finite(r.get("p_holm")) and float(r["p_holm"]) < alpha
        lo, hi = (float(r[k]) if _finite(r.get(k)) else delta for k in ("ci_low", "ci_high"))
        ax.errorbar(delta, y + 0.12, xerr=[[delta - lo], [hi - delta]], fmt="o", color=colour, capsize=3,
                    markerfacecolor=colour if filled else "white", markersize=7)
        if _finite(r.get("ensemble_tss")) and _finite(r.get("best_baseline_tss")):
            ax.plot(float(r["ensemble_tss"]) - float(r["best_baseline_tss"]), y - 0.18, marker="D", linestyle="none",
                    color=colour, markerfacecolor="none", markersize=6)
        ax.annotate(str(r.get("verdict", "")), (1.01, y), xycoords=("axes fraction", "data"), va="center",
                    fontsize=9, fontweight="bold")
    ax.axvline(0.0, color="0.3", linewidth=1, linestyle="--")
    ax.set_yticks(ys, [r["target"] for r in rows])
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel("ΔTSS on test: EVEREST minus the best baseline (right of 0: EVEREST better)")
    conf = int(round(confidence * 100))
    handles = [ax.plot([], [], "o", color="0.3", markerfacecolor="0.3")[0],
               ax.plot([], [], "o", color="0.3", markerfacecolor="white")[0],
               ax.plot([], [], "D", color="0.3", markerfacecolor="none")[0]]
    ax.legend(handles, [f"seed mean, {conf} % paired bootstrap CI, Holm p < {alpha:.2g}", "seed mean, not significant",
                        "seed ensemble (point)"], loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8,
              frameon=False)
    return fig


def _finite(value: object) -> bool:
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
