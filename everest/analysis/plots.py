"""The analysis figures: each function returns a matplotlib Figure built without pyplot
(:func:`plot_reliability` writes its figure to a PNG and returns the path).

Figures are created with :class:`matplotlib.figure.Figure` (Agg canvas), never through ``pyplot``: no global
backend switch in a user's notebook, no shared state between Prefect worker threads, nothing to close.
Per-target figures have one panel per target that has results (array-job order), so a partial run still
plots what exists.
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
from sklearn.metrics import precision_recall_curve, roc_curve

from everest import io
from everest.analysis.loading import ExperimentResult
from everest.analysis.stats import seed_summary
from everest.config import FLARE_CLASSES, HORIZONS, Target
from everest.metrics import ECE_BINS

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
    """Class x horizon cells coloured by the seed mean, annotated mean +/- std (n)."""
    mean = np.full((len(FLARE_CLASSES), len(HORIZONS)), np.nan)
    for i, c in enumerate(FLARE_CLASSES):
        for j, h in enumerate(HORIZONS):
            s = seed_summary(raw.loc[raw["target"] == f"{c}-{h}", metric].to_numpy(float))
            mean[i, j] = s["mean"]
            text = "no results" if s["n"] == 0 else f"{s['mean']:.3f}\n± {s['std']:.3f}\n(n={s['n']})"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="black" if not np.isfinite(s["mean"]) or s["mean"] > 0.35 else "white")
    ax.imshow(np.ma.masked_invalid(mean), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(HORIZONS)), [f"{h} h" for h in HORIZONS])
    ax.set_yticks(range(len(FLARE_CLASSES)), [f"≥{c}" for c in FLARE_CLASSES])
    ax.set_title(f"{LABELS[metric]}: mean ± std over seeds")


def performance_figure(raw: pd.DataFrame) -> Figure:
    """Heatmaps of TSS, F1 and ROC AUC (class x horizon) and TSS vs horizon with 95 % t-intervals: 4 panels."""
    fig = Figure(figsize=(12, 9), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, metric in zip(axes[:3], ("tss", "f1", "roc_auc"), strict=True):
        _heatmap(ax, raw, metric)
    ax = axes[3]
    for c in FLARE_CLASSES:
        xs, ys, lo, hi = [], [], [], []
        for h in HORIZONS:
            s = seed_summary(raw.loc[raw["target"] == f"{c}-{h}", "tss"].to_numpy(float))
            if s["n"]:
                xs.append(h)
                ys.append(s["mean"])
                lo.append(s["mean"] - s["ci_low"] if np.isfinite(s["ci_low"]) else 0.0)
                hi.append(s["ci_high"] - s["mean"] if np.isfinite(s["ci_high"]) else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=4, label=f"≥{c}", color=CLASS_COLOURS[c])
    ax.set_xticks(list(HORIZONS))
    ax.set_xlabel("horizon (h)")
    ax.set_ylabel("test TSS")
    ax.set_title("TSS by horizon (mean, 95 % t-interval over seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
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


def latency_figure(raw: pd.DataFrame) -> Figure:
    """Mean TSS vs mean latency per target (seed std as error bars) and latency per target: 2 panels."""
    order = _target_order(raw)
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    a, b = fig.subplots(1, 2)
    for t in order:
        g = raw[raw["target"] == t]
        lat, tss = seed_summary(g["latency_ms"].to_numpy(float)), seed_summary(g["tss"].to_numpy(float))
        a.errorbar(lat["mean"], tss["mean"], xerr=np.nan_to_num(lat["std"]), yerr=np.nan_to_num(tss["std"]),
                   marker="o", color=_colour(t), capsize=3)
        a.annotate(t, (lat["mean"], tss["mean"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    a.set_xlabel(LABELS["latency_ms"])
    a.set_ylabel("test TSS")
    a.set_title("Performance vs latency (mean ± std over seeds)")
    a.grid(alpha=0.3)
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


def _band(ax: Axes, x: np.ndarray, curves: list[np.ndarray], colour: str, label: str) -> None:
    """Seed mean as a line, the seeds' min-max as a shaded band."""
    arr = np.vstack(curves)
    with warnings.catch_warnings():  # bins empty in every seed stay NaN (a gap in the line), on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi, mean = np.nanmin(arr, axis=0), np.nanmax(arr, axis=0), np.nanmean(arr, axis=0)
    ax.fill_between(x, lo, hi, color=colour, alpha=0.25, linewidth=0)
    ax.plot(x, mean, color=colour, label=label)


def reliability_figure(runs: Sequence[ExperimentResult]) -> Figure:
    """Reliability diagram per target (the ECE's 15 bins; seed mean and min-max band): 1 panel per target."""
    preds = _with_predictions(runs)
    fig, axes = _panels(len(preds), 1)
    edges = np.arange(ECE_BINS + 1) / ECE_BINS
    centres = (edges[:-1] + edges[1:]) / 2
    for ax, (t, frames) in zip(axes, preds.items(), strict=True):
        curves = []
        for p in frames:
            prob, y = p["y_prob"].to_numpy(float), p["y_true"].to_numpy(float)
            idx = np.minimum(np.searchsorted(edges, prob, side="right") - 1, ECE_BINS - 1)
            n = np.bincount(idx, minlength=ECE_BINS)
            frac = np.bincount(idx, weights=y, minlength=ECE_BINS) / np.where(n > 0, n, np.nan)
            curves.append(frac)
        _band(ax, centres, curves, _colour(t), f"{len(frames)} seeds")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("forecast probability (bin centre)")
        ax.set_ylabel("observed flare frequency")
        ax.set_title(f"{t} reliability")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Reliability diagrams (band: min-max over seeds)")
    return fig


def roc_pr_figure(runs: Sequence[ExperimentResult]) -> Figure:
    """ROC and precision-recall curves per target, seed mean with min-max band: 2 panels per target."""
    preds = _with_predictions(runs)
    fig, axes = _panels(len(preds), 2)
    for i, (t, frames) in enumerate(preds.items()):
        roc_ax, pr_ax = axes[2 * i], axes[2 * i + 1]
        rocs, prs, base = [], [], []
        for p in frames:
            # the model's own ranking: a calibration map can only merge scores (saturation), never improve it
            y, prob = p["y_true"].to_numpy(int), p["y_prob_raw" if "y_prob_raw" in p else "y_prob"].to_numpy(float)
            if y.min() == y.max():
                continue  # one class only: no curve exists
            fpr, tpr, _ = roc_curve(y, prob)
            rocs.append(np.interp(_GRID, fpr, tpr))
            prec, rec, _ = precision_recall_curve(y, prob)
            prs.append(np.interp(_GRID, rec[::-1], prec[::-1]))
            base.append(y.mean())
        if rocs:
            _band(roc_ax, _GRID, rocs, _colour(t), f"{len(rocs)} seeds")
            _band(pr_ax, _GRID, prs, _colour(t), f"{len(prs)} seeds")
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
    fig.suptitle("ROC and precision-recall curves (band: min-max over seeds)")
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
                    loss_ax.plot(h["epoch"], h[col], ls=ls, color=colour)
        tss_ax.set(xlabel="epoch", ylabel="validation TSS", title=f"{t} validation TSS (*: best epoch)")
        loss_ax.set(xlabel="epoch", ylabel="loss", title=f"{t} loss (solid: val, dotted: train)")
        if tss_ax.get_legend_handles_labels()[0]:  # models without epochs (baselines) draw no curves
            tss_ax.legend(fontsize=6)
        tss_ax.grid(alpha=0.3)
        loss_ax.grid(alpha=0.3)
    fig.suptitle("Training curves (all seeds)")
    return fig


def plot_reliability(curves: Mapping[str, pd.DataFrame], path: str | Path, title: str) -> Path:
    """Reliability curves from :func:`everest.calibration.reliability_table` on one panel, written as PNG.

    One line per curve (label = key) through the non-empty bins' (mean probability, observed frequency); marker
    area grows with the bin's sample count. Written atomically; returns the path.
    """
    fig = Figure(figsize=(5.5, 5.0), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for k, (label, table) in enumerate(curves.items()):
        missing = {"n", "mean_prob", "observed_frequency"} - set(table.columns)
        if missing:
            raise ValueError(f"curve {label!r} lacks column(s) {sorted(missing)}; pass reliability_table() output")
        t = table[table["n"] > 0]
        n = t["n"].to_numpy(float)
        colour = f"C{k % 10}"
        ax.plot(t["mean_prob"], t["observed_frequency"], color=colour, lw=1.5, label=label)
        if n.size:
            ax.scatter(t["mean_prob"], t["observed_frequency"], s=12 + 120 * np.sqrt(n / n.max()), color=colour,
                       alpha=0.8, zorder=3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("forecast probability")
    ax.set_ylabel("observed frequency")
    ax.set_title(title)
    ax.text(0.98, 0.02, "marker area ~ samples in bin", transform=ax.transAxes, ha="right", va="bottom",
            fontsize=7, color="grey")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    return io.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
