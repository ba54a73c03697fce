"""The Markdown report: every number in it is read from the analyzer's computed tables, none is typed.

Its first screen answers: what was run, one line per target with EVEREST against the best baseline and the
verdict word, and the verdict figure. Then the tables, none wider than :data:`MAX_COLUMNS` columns or
:data:`MAX_WIDTH` characters (wide ones are split; an interval that needs its words gets a row of its own in
an interval table); the method text comes last (:mod:`everest.analysis.guide`).

Every interval is printed with what it is and its n (seeds, or resampled regions), e.g. ``[0.470, 0.550] (t,
n=5 seeds)``; seed t-intervals go through :func:`everest.analysis.stats.seed_interval` (clipped to the metric's
range, said where it happened; the region bootstrap instead below 3 seeds).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from everest import __version__
from everest.analysis.guide import how_to_read
from everest.analysis.stats import CLIPPED, Interval, ShownInterval, seed_interval
from everest.config import all_targets
from everest.results import bundle_dir

if TYPE_CHECKING:
    from everest.analysis.analyzer import ProductionAnalyzer

PLOT_CAPTIONS = {
    "verdict": "Verdict: ΔTSS (EVEREST minus the best baseline) per target with its paired region-bootstrap interval",
    "performance": "TSS, F1 and ROC AUC by class and horizon (mean ± std over seeds); TSS by horizon with "
                   "95 % t-intervals over seeds (clipped to the TSS range; region bootstrap below 3 seeds)",
    "detailed": "Every metric across seeds, per target (each dot is one seed)",
    "threshold": "Chosen thresholds, threshold vs TSS, threshold stability and test TSS over the threshold grid",
    "latency": "Performance vs inference latency",
    "reliability": "Reliability diagrams (calibration), band: min-max over seeds; samples per bin below",
    "roc_pr": "ROC curves (band: min-max over seeds) and precision-recall curves (one line per seed)",
    "training": "Training curves: validation TSS and losses per epoch, every seed",
}


def fmt(x: Any, nd: int = 3) -> str:
    """A number for the report: fixed decimals, 'n/a' for missing or undefined values."""
    if x is None:
        return "n/a"
    if isinstance(x, bool | np.bool_):
        return "yes" if x else "no"
    if isinstance(x, int | np.integer):
        return str(int(x))
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(v):
        return "n/a"
    if v != 0 and abs(v) < 10 ** (-nd):
        return f"{v:.2g}"
    return f"{v:.{nd}f}"


def _p(x: Any) -> str:
    v = float(x) if x is not None else float("nan")
    return "n/a" if not math.isfinite(v) else (f"{v:.2g}" if v < 0.001 else f"{v:.3f}")


MAX_COLUMNS = 8  # a report table's most columns, and its most characters when rendered with aligned columns
MAX_WIDTH = 110


def rendered_width(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> int:
    """Characters a table takes rendered with aligned columns: ``| `` + cells + `` | `` separators + `` |``."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    return sum(widths) + 3 * len(widths) + 1


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; cells are formatted with :func:`fmt` unless already strings. Fits the report's limits
    (:data:`MAX_COLUMNS`, :data:`MAX_WIDTH`): the layout of every table is chosen so, and a test reads them."""
    def cell(v: Any) -> str:
        return (v if isinstance(v, str) else fmt(v)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _int(x: Any) -> str:
    try:
        return str(int(x)) if math.isfinite(float(x)) else "n/a"
    except (TypeError, ValueError):
        return "n/a"


def _count(n: Any, unit: str) -> str:
    """'5 seeds', '1 seed', '30 regions'."""
    v = _int(n)
    return f"{v} {unit}{'' if v == '1' else 's'}"


def _ci(lo: Any, hi: Any, how: str) -> str:
    """'[lo, hi] (how)': ``how`` names the interval and its n; 'n/a' when the interval is undefined."""
    if not all(isinstance(v, int | float | np.number) and math.isfinite(v) for v in (lo, hi)):
        return "n/a"
    return f"[{fmt(lo)}, {fmt(hi)}] ({how})"


def _boot(lo: Any, hi: Any, n_units: Any, *more: str) -> str:
    """A region-bootstrap interval with its n, e.g. '[0.410, 0.620] (bootstrap, n=30 regions, 3 seed pairs)'."""
    return _ci(lo, hi, ", ".join([f"bootstrap, n={_count(n_units, 'region')}", *more]))


def interval_text(iv: ShownInterval) -> str:
    """A shown seed interval with what it is and its n, e.g. '[0.470, 0.550] (t, n=5 seeds)' or '[0.410, 0.620]
    (bootstrap, n=30 regions, instead of t with n=2 seeds)'; a clipped one says so."""
    how = (f"t, n={_count(iv.n, 'seed')}" if iv.kind == "t" else
           f"bootstrap, n={_count(iv.n, 'region')}, instead of t with n={_count(iv.n_seeds, 'seed')}")
    return _ci(iv.low, iv.high, f"{how}, {CLIPPED}" if iv.clipped else how)


def interval_table(rows: Sequence[tuple[str, str, str]]) -> str:
    """Intervals one per row, (target or comparison, quantity, interval with what it is and its n): the form
    that keeps each interval's words and the table narrow."""
    return table(["target", "interval of", "interval"], [list(r) for r in rows if r[2] != "n/a"] or [["-", "-", "-"]])


def _pooled(a: ProductionAnalyzer, target: str, metric: str = "tss") -> Interval | None:
    """The target's region-bootstrap interval of the seed mean of ``metric``, if it has one."""
    boot = a.bootstrap.get(target)
    return boot.pooled.get(metric) if boot else None


def _regions(a: ProductionAnalyzer, target: str) -> int | None:
    """Resampling units (regions) of the target's bootstrap, if it has one."""
    boot = a.bootstrap.get(target)
    return boot.n_units if boot else None


def _seed_ci(a: ProductionAnalyzer, row: dict[str, Any], metric: str) -> str:
    """The shown seed interval of ``metric`` from a summary-statistics row (``{metric}_n``, ``_ci_low``, ...)."""
    iv = seed_interval(metric, int(row[f"{metric}_n"]), row[f"{metric}_ci_low"], row[f"{metric}_ci_high"],
                       _pooled(a, row["target"], metric))
    return interval_text(iv)


def _pm(mean: Any, std: Any) -> str:
    return f"{fmt(mean)} ± {fmt(std)}"


def verdict_sentence(row: dict[str, Any], confidence: float = 0.95) -> str:
    """One plain sentence on a verdict row, e.g. 'M-24: EVEREST trails the best baseline (logistic) by 0.041
    TSS (95 % CI 0.012-0.070, Holm p = 0.003).' For *trails* the interval is that of the shortfall."""
    t, word, best = row["target"], row["verdict"], row.get("best_baseline")
    if word not in ("beats", "ties", "trails"):
        return f"{t}: no verdict ({row.get('note') or 'no paired comparison'})."
    conf = f"{int(round(confidence * 100))} % CI"
    holm = f"Holm p = {_p(row['p_holm'])}"
    delta, lo, hi = float(row["delta"]), row["ci_low"], row["ci_high"]
    if word == "ties":
        sign = "+" if delta >= 0 else "-"
        return (f"{t}: EVEREST ties the best baseline ({best}): difference {sign}{fmt(abs(delta))} TSS "
                f"({conf} {fmt(lo)} to {fmt(hi)}, {holm}).")
    if word == "trails":
        lo, hi = -hi, -lo
    return (f"{t}: EVEREST {word} the best baseline ({best}) by {fmt(abs(delta))} TSS "
            f"({conf} {fmt(lo)}-{fmt(hi)}, {holm}).")


def ensemble_sentence(row: dict[str, Any], confidence: float = 0.95) -> str:
    """One plain sentence on the ensemble's calibrated probabilities against the best baseline's, e.g.
    'M-24: the EVEREST ensemble's probabilities are worse than logistic's: Brier 0.1136 vs 0.1132 (...)'."""
    t, best = row["target"], row.get("best_baseline")
    if not isinstance(best, str) or not math.isfinite(float(row.get("ensemble_brier_delta", math.nan))):
        return f"{t}: no ensemble Brier comparison (an ensemble needs two finished seeds, and a baseline)."
    lo, hi, p = row["ensemble_brier_ci_low"], row["ensemble_brier_ci_high"], row["ensemble_brier_p_holm"]
    alpha = 1 - confidence
    delta = float(row["ensemble_brier_delta"])
    nominal = "nominally worse than" if delta > 0 else "nominally better than" if delta < 0 else "equal to"
    word = ("better than {}'s" if hi < 0 and p < alpha else "worse than {}'s" if lo > 0 and p < alpha else
            nominal + " {}'s, within the noise").format(best)
    return (f"{t}: the EVEREST ensemble's calibrated probabilities are {word}: Brier "
            f"{fmt(row['ensemble_brier'], 4)} vs {fmt(row['best_baseline_brier'], 4)} (difference "
            f"{delta:+.4f}, {int(round(confidence * 100))} % CI {fmt(lo, 4)} to {fmt(hi, 4)} by paired region "
            f"bootstrap, n={_count(row.get('ensemble_brier_n_units'), 'region')}, "
            f"{_count(row.get('ensemble_brier_n_pairs'), 'baseline seed')}; Holm p = {_p(p)}; lower is better).")


def _verdict(a: ProductionAnalyzer) -> list[str]:
    out = ["## Verdict: EVEREST against simple baselines\n"]
    if not a.baseline_models:
        return out + [f"No baseline results under `{a.out_dir / 'baselines'}`: fit them with `python -m "
                      f"everest baselines --array-index K --output-dir {a.out_dir}` (K = 1..45) and rerun the "
                      "analysis.\n"]
    models = list(a.baseline_models)
    out.append("Baselines: " + ", ".join(f"`{m}` (`{p}`)" for m, p in a.baseline_models.items()) + ". How the best "
               "baseline, ΔTSS, p and the verdict are defined: [How to read this report](#how-to-read-this-report).\n")
    records = a.verdict.to_dict("records")
    out.append(table(["target", "EVEREST TSS (seeds)", "best baseline (val. TSS)", "ΔTSS", "p", "p (Holm)",
                      "verdict"],
                     [[r["target"], f"{fmt(r['everest_tss'])} ({r['everest_seeds']})",
                       f"{r['best_baseline']} ({fmt(r['best_baseline_val_tss'])})"
                       if isinstance(r["best_baseline"], str) else "none",
                       r["delta"], _p(r["p_value"]), _p(r["p_holm"]), f"**{r['verdict']}**"] for r in records]))
    out += [f"* {r['sentence']}{_pairs_note(r)}" for r in records]
    out.append("")
    out.append("Test TSS of every baseline and Brier scores (calibrated), means over seeds:\n")
    out.append(table(["target", *[f"{m} TSS" for m in models], "Brier EVEREST", "Brier best baseline"],
                     [[r["target"], *[r[f"tss_{m}"] for m in models], r["everest_brier"], r["best_baseline_brier"]]
                      for r in records]))
    out.append(interval_table([row for r in records for row in (
        (r["target"], "EVEREST TSS (t)", interval_text(seed_interval("tss", r["everest_seeds"],
                                                                     r["everest_tss_t_ci_low"],
                                                                     r["everest_tss_t_ci_high"],
                                                                     _pooled(a, r["target"])))),
        (r["target"], "EVEREST TSS (bootstrap)", _boot(r["everest_tss_boot_ci_low"], r["everest_tss_boot_ci_high"],
                                                      _regions(a, r["target"]))),
        (r["target"], "ΔTSS", _boot(r["ci_low"], r["ci_high"], r["n_units"], _count(r["n_pairs"], "seed pair"))))]))
    ensemble_regions = dict(zip(a.ensemble_table["target"], a.ensemble_table["n_units"], strict=True))
    out.append("The seed ensemble (mean of the seeds' probabilities, its own calibration and threshold on validation) "
               "against the best baseline:\n")
    out.append(table(["target", "ensemble TSS (seeds)", "best baseline TSS"],
                     [[r["target"], f"{fmt(r['ensemble_tss'])} ({r['ensemble_seeds']})", r["best_baseline_tss"]]
                      for r in records]))
    out.append("Brier scores on the calibrated scale (raw model scores in brackets):\n")
    out.append(table(["target", "ensemble", "EVEREST (seed mean)", "best baseline"],
                     [[r["target"], f"{fmt(r['ensemble_brier'], 4)} ({fmt(r['ensemble_brier_raw'], 4)})",
                       f"{fmt(r['everest_brier'], 4)} ({fmt(r['everest_brier_raw'], 4)})",
                       fmt(r["best_baseline_brier"], 4)] for r in records]))
    out.append(interval_table([(r["target"], "ensemble TSS (bootstrap)",
                                _boot(r["ensemble_tss_boot_ci_low"], r["ensemble_tss_boot_ci_high"],
                                      ensemble_regions.get(r["target"]))) for r in records]))
    out += [f"* {r['ensemble_sentence']}" for r in records]
    out.append("")
    return out


def _pairs_note(row: dict[str, Any]) -> str:
    """What a verdict sentence's interval rests on (the sentence itself stays the verdict's own text)."""
    if row["verdict"] not in ("beats", "ties", "trails"):
        return ""
    return (f" (CI: paired region bootstrap, n={_count(row['n_units'], 'region')}, "
            f"{_count(row['n_pairs'], 'seed pair')}.)")


def _ensemble(a: ProductionAnalyzer) -> list[str]:
    out = ["## The seed ensemble and calibrated probabilities\n"]
    e = a.ensemble_table
    built = e[e["note"] == ""] if len(e) else e
    if not len(built):
        reasons = "; ".join(f"{r['target']}: {r['note']}" for r in e.to_dict("records")) or "no expected target"
        return out + [f"No ensemble: {reasons}.\n"]
    rows = built.to_dict("records")
    out.append("Calibration, thresholds and the ensemble: [How to read this report](#how-to-read-this-report). A "
               "threshold at the edge of the design grid is marked *edge*.\n")
    out.append(table(["target", "seeds", "ensemble TSS", "mean seed TSS", "threshold", "ROC AUC"],
                     [[r["target"], _int(r["members"]), fmt(r["tss"]), fmt(r["seed_tss_mean"]),
                       f"{fmt(r['threshold'], 4)}{' (edge)' if r['at_grid_edge'] is True else ''}", fmt(r["roc_auc"])]
                      for r in rows]))
    out.append(table(["target", "Brier raw → calibrated", "ECE raw → calibrated", "seeds' Brier raw → calibrated"],
                     [[r["target"], f"{fmt(r['brier_raw'], 4)} → {fmt(r['brier'], 4)}",
                       f"{fmt(r['ece_raw'], 4)} → {fmt(r['ece'], 4)}",
                       f"{fmt(r['seed_brier_raw_mean'], 4)} → {fmt(r['seed_brier_mean'], 4)}"] for r in rows]))
    out.append(interval_table([(r["target"], "ensemble TSS", _boot(r["tss_boot_ci_low"], r["tss_boot_ci_high"],
                                                                   r["n_units"])) for r in rows]))
    missing = [f"{r['target']} ({r['note']})" for r in e.to_dict("records") if r["note"]]
    if missing:
        out.append("No ensemble for: " + "; ".join(missing) + ".\n")
    edges = [r["target"] for r in a.analysed_frame.to_dict("records") if r.get("threshold_at_grid_edge") is True]
    if edges:
        out.append(f"Seeds whose validation threshold lies at an edge of the searched grid: {_counted(edges)}.\n")
    return out


def _status(a: ProductionAnalyzer) -> list[str]:
    rs = a.results
    out = ["## Status of the run\n"]
    synthetic = [r.name for r in rs.analysed if r.results.get("data", {}).get("synthetic")]
    if synthetic:
        out.append(f"**Synthetic data: {len(synthetic)} of {len(rs.analysed)} finished experiments trained and were "
                   "tested on tables made by the project's generator (`everest data synth`, the embedded demo), "
                   "not on SHARP observations.**\n")
    n_failed = sum(f.expected for f in rs.failed)
    stale = f"; {len(rs.stale)} stale" if rs.stale else ""
    out.append(f"**{len(rs.analysed)} of {len(rs.expected)} expected experiments finished; {n_failed} failed; "
               f"{len(rs.missing)} missing{stale}.** Statistics cover the finished ones; every finished seed is "
               "included (no seed is ever dropped for its score).\n")
    if rs.stale:
        out.append(f"### Stale results ({len(rs.stale)}; listed, not in the statistics)\n")
        out.append("Finished with another configuration, code version or data than the run's (the one most "
                   "results share): averaging them in would describe no single configuration. Rerun them.\n")
        out += [f"* `{name}`: {why}" for name, why in rs.stale.items()]
        out.append("")
    if rs.failed:
        out.append(f"### Failed experiments ({len(rs.failed)})\n")
        out += [f"* `{f.name}` ({f.target}, seed {f.seed}, {f.time}): {f.error_type}: {f.error[:200]}"
                for f in rs.failed]
        out.append("")
    if rs.missing:
        out.append(f"### Missing experiments ({len(rs.missing)})\n")
        out.append("Expected but with neither `results.json` nor `failure.json`: "
                   + ", ".join(f"`{e.name}`" for e in rs.missing) + "\n")
    if rs.unexpected:
        out.append(f"### Results outside the expected set ({len(rs.unexpected)}; listed, not in the statistics)\n")
        out.append(", ".join(f"`{r.name}`" for r in rs.unexpected) + "\n")
    notes = [(r.name, n) for r in rs.completed for n in r.notes]
    if notes:
        out.append("### Notes on individual results\n")
        out += [f"* `{name}`: {note}" for name, note in notes]
        out.append("")
    return out


def _history(a: ProductionAnalyzer) -> list[str]:
    """Per target and file: the base rate, the records' cadence, gaps and padded windows (from the trainer)."""
    out = ["## Data: how much history the model had\n",
           "Per target, the training file (before the validation split and augmentation) and the test file: the "
           "share of positive samples, the most common step between a region's consecutive records, the gaps "
           "(steps of two cadences or more), and the windows that hold padding (steps before a region's first "
           "record or inside a gap) with the mean number of real records per window.\n"]
    rows = []
    for t in [str(t) for t in all_targets()]:
        run = next((r for r in sorted(a.results.analysed, key=lambda r: r.seed) if str(r.target) == t), None)
        history = (run.results.get("data", {}).get("history_profile") if run else None) or {}
        for split in ("train", "test"):
            h = history.get(split)
            if run is None or h is None:
                continue
            n = h.get("samples") or 0
            padded = f"{_int(h.get('padded_windows'))} ({fmt(h['padded_windows'] / n * 100, 1)} %)" if n else "n/a"
            rate, cadence = h.get("base_rate"), h.get("cadence_minutes")
            rows.append([t, split, _int(n), "n/a" if rate is None else f"{fmt(rate * 100, 2)} %",
                         "n/a" if cadence is None else f"{fmt(cadence, 0)} min", _int(h.get("gaps")), padded,
                         fmt(h.get("mean_real_steps"), 2)])
    if not rows:
        return out + ["Not recorded (results written before the trainer recorded it).\n"]
    headers = ["target", "file", "samples", "base rate", "cadence", "gaps", "padded windows", "real steps"]
    return out + [table(headers, rows), ""]


def _overall(a: ProductionAnalyzer) -> list[str]:
    d = a.analysed_frame
    out = ["## Overall statistics\n"]
    if not len(d):
        return out + ["No finished experiment: nothing to summarise.\n"]
    metrics = ["tss", "f1", "precision", "recall", "specificity", "accuracy", "roc_auc", "brier", "ece", "latency_ms"]
    out.append(f"Over all {len(d)} finished experiments (targets pooled; see the per-target tables for meaning):\n")
    out.append(table(["metric", "mean", "std", "min", "median", "max"],
                     [[m, d[m].mean(), d[m].std(ddof=1), d[m].min(), d[m].median(), d[m].max()] for m in metrics]))
    s = a.summary_statistics[a.summary_statistics["n_seeds"] > 0]
    best_t = s.loc[s["tss_mean"].idxmax()]
    best_e = d.loc[d["tss"].idxmax()]
    out.append("### Best models\n")
    out.append(f"* Best target by mean test TSS: **{best_t['target']}**, "
               f"{_pm(best_t['tss_mean'], best_t['tss_std'])} over {int(best_t['n_seeds'])} seed(s), "
               f"{int(round(a.confidence * 100))} % interval {_seed_ci(a, best_t.to_dict(), 'tss')}.")
    out.append(f"* Best single experiment: **{best_e['experiment']}**, TSS {fmt(best_e['tss'])} "
               f"(the maximum of many runs is optimistic; quote the seed mean).\n")
    for key, label in (("flare_class", "By flare class"), ("horizon", "By horizon")):
        out.append(f"### {label}\n")
        rows = []
        for v, g in d.groupby(key, sort=False):
            rows.append([str(v), len(g), _pm(g["tss"].mean(), g["tss"].std(ddof=1)),
                         _pm(g["f1"].mean(), g["f1"].std(ddof=1)), _pm(g["roc_auc"].mean(), g["roc_auc"].std(ddof=1))])
        out.append(table([key, "experiments", "TSS", "F1", "ROC AUC"], rows))
    return out


def _detailed(a: ProductionAnalyzer) -> list[str]:
    s = a.summary_statistics
    out = ["## Per-target results with confidence intervals\n",
           "Mean ± sample std (ddof = 1) over seeds; the intervals: [How to read this report]"
           "(#how-to-read-this-report).\n"]
    records = s.to_dict("records")
    finished = [r for r in records if r["n_seeds"] > 0]
    out.append(table(["target", "seeds", "failed/missing", "TSS", "F1", "ROC AUC"],
                     [[r["target"], r["n_seeds"], f"{r['n_failed']}/{r['n_missing']}",
                       *([_pm(r["tss_mean"], r["tss_std"]), _pm(r["f1_mean"], r["f1_std"]),
                          _pm(r["roc_auc_mean"], r["roc_auc_std"])] if r["n_seeds"] else ["no finished seed", "", ""])]
                      for r in records]))
    out.append(table(["target", "Brier", "ECE", "threshold"],
                     [[r["target"], _pm(r["brier_mean"], r["brier_std"]), _pm(r["ece_mean"], r["ece_std"]),
                       _pm(r["threshold_mean"], r["threshold_std"])] for r in finished]))
    out.append(interval_table([row for r in finished for row in (
        (r["target"], "TSS (t)", _seed_ci(a, r, "tss")),
        (r["target"], "TSS (bootstrap)", _boot(r["pooled_boot_tss_low"], r["pooled_boot_tss_high"], r["n_units"])),
        (r["target"], "F1 (bootstrap)", _boot(r["pooled_boot_f1_low"], r["pooled_boot_f1_high"], r["n_units"])))]))
    out.append("\nFull statistics (n, mean, std, min, median, max, t-CI of every metric, as computed: not clipped) "
               "are in `summary_statistics.csv`.\n")
    d = a.analysed_frame
    if len(d) and "boot_tss_low" in d:
        out.append("### Every experiment (test TSS with its region-bootstrap confidence interval)\n")
        rows = d.to_dict("records")
        out.append(table(["experiment", "TSS", "bootstrap CI"],
                         [[r["experiment"], r["tss"], _boot(r.get("boot_tss_low"), r.get("boot_tss_high"),
                                                             r.get("n_units"))] for r in rows]))
        out.append(table(["experiment", "F1", "ROC AUC", "threshold", "best epoch"],
                         [[r["experiment"], r["f1"], r["roc_auc"], r["threshold"], _int(r.get("best_epoch"))]
                          for r in rows]))
    return out


def _significance(a: ProductionAnalyzer) -> list[str]:
    out = ["## Significance tests\n", "How each test works: [How to read this report](#how-to-read-this-report).\n"]
    h = a.horizon_comparisons
    out.append("**Horizon comparisons** (difference of seed-mean test TSS, A minus B; positive: A better):\n")
    if h.empty:
        out.append("No class has results at two horizons.\n")
    else:
        rows = h.to_dict("records")
        out.append(table(["comparison", "ΔTSS", "Hedges' g", "p", "p (Holm)", "significant"],
                         [[r["comparison"], r["delta"], r["hedges_g"], _p(r["p_value"]), _p(r["p_holm"]),
                           r["significant"]] for r in rows]))
        out.append(interval_table([(r["comparison"], "ΔTSS", _boot(r["ci_low"], r["ci_high"], r["n_units"],
                                                                   f"{_int(r['n_a'])}/{_int(r['n_b'])} seeds"))
                                   for r in rows]))
    b = a.baseline_comparisons
    if a.baseline_dir is not None:
        out.append(f"\n**Candidate vs baseline** (baseline: `{a.baseline_dir}`; candidate minus baseline seed-mean "
                   "TSS, seeds paired by number, same test samples):\n")
        if b.empty:
            out.append("No target has results in both.\n")
        else:
            rows = b.to_dict("records")
            out.append(table(["target", "baseline", "candidate", "ΔTSS", "d_z", "p", "p (Holm)", "significant"],
                             [[r["a"], r.get("baseline_mean"), r.get("candidate_mean"), r.get("delta"),
                               r.get("cohens_dz"), _p(r.get("p_value")), _p(r.get("p_holm")), r.get("significant")]
                              for r in rows]))
            out.append(interval_table([(r["a"], "ΔTSS", _boot(r.get("ci_low"), r.get("ci_high"), r.get("n_units"),
                                                              _count(r.get("n_pairs"), "seed pair"))) for r in rows]))
            out += [f"* {r['a']}: {r['note']}" for r in rows if r.get("note")]
            out.append("")
    else:
        out.append("\nNo baseline given (`--baseline DIR` compares another results root, paired on seeds and test "
                   "samples).\n")
    return out


def _thresholds(a: ProductionAnalyzer) -> list[str]:
    from everest.analysis.stats import threshold_tss_correlation

    out = ["## Decision threshold\n", "### Stability across seeds\n"]
    t = a.threshold_stability
    if t.empty:
        return out + ["No finished experiment.\n"]
    out.append(table(["target", "seeds", "mean", "std", "CV", "range", "oracle mean", "r(threshold, TSS)"],
                     [[r["target"], r["n"], r["threshold_mean"], r["threshold_std"], r["threshold_cv"],
                       f"{fmt(r['threshold_min'], 4)}-{fmt(r['threshold_max'], 4)}", r["oracle_threshold_mean"],
                       r["corr_threshold_tss"]] for r in t.to_dict("records")]))
    c = threshold_tss_correlation(a.analysed_frame)
    out.append(f"\nThreshold vs TSS over all {c['n']} experiments: Pearson r = {fmt(c['pearson_r'])} "
               f"(p = {_p(c['p_value'])}); within targets (target means removed) r = {fmt(c['within_target_r'])} "
               f"(p = {_p(c['within_target_p'])}). Per-target r needs 3 or more seeds.\n")
    out.append("### Validation-chosen vs test-oracle threshold (protocol inflation)\n")
    out.append("Oracle minus validation-chosen, mean over seeds ([How to read this report]"
               "(#how-to-read-this-report)):\n")
    rows = a.protocol_inflation.to_dict("records")
    out.append(table(["target", "TSS (val-chosen)", "TSS (oracle)", "TSS inflation"],
                     [[r["target"], r["tss_validation"], r["tss_oracle"],
                       _pm(r["tss_inflation_mean"], r["tss_inflation_std"])] for r in rows]))
    out.append(table(["target", "F1 inflation", "precision infl.", "recall infl.", "specificity infl."],
                     [[r["target"], r["f1_inflation_mean"], r["precision_inflation_mean"], r["recall_inflation_mean"],
                       r["specificity_inflation_mean"]] for r in rows]))
    return out


def _latency(a: ProductionAnalyzer) -> list[str]:
    s = a.summary_statistics[a.summary_statistics["n_seeds"] > 0]
    out = ["## Latency\n", "Milliseconds per sample at batch 32 after warm-up (measured by the trainer).\n"]
    out.append(table(["target", "latency ms/sample", "t-CI"],
                     [[r["target"], _pm(r["latency_ms_mean"], r["latency_ms_std"]), _seed_ci(a, r, "latency_ms")]
                      for r in s.to_dict("records")]))
    return out


def _plots(rel: dict[str, str]) -> list[str]:
    if not rel:
        return ["## Plots\n", "No plots (no finished experiment, or plotting switched off).\n"]
    out = ["## Plots\n"]
    for key, path in rel.items():
        out.append(f"### {PLOT_CAPTIONS.get(key, key)}\n\n![{PLOT_CAPTIONS.get(key, key)}]({path})\n")
    return out


def _counted(values: Sequence[Any]) -> str:
    c = Counter(str(v) for v in values)
    return ", ".join(f"`{k}` ({n})" for k, n in c.most_common())


def _provenance(a: ProductionAnalyzer) -> list[str]:
    runs = a.results.completed
    out = ["## Provenance\n", f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} from `{a.results_dir}`.\n"]
    if not runs:
        return out + ["No finished experiment.\n"]
    by_hash: dict[str, list[str]] = {}
    for r in runs:
        by_hash.setdefault(r.config_hash, []).append(r.name)
    out.append("Config hashes (experiments): " + "; ".join(f"`{h}`: {len(v)}" for h, v in by_hash.items()) + "\n")
    bundle = bundle_dir(a.out_dir)
    out.append(f"Trained models: the study's model bundle `{bundle}` (written after this report, or by `everest bundle "
               f"--output-dir {a.out_dir}`) carries each target's seed ensemble, its best baseline and this verdict; "
               f"forecast with `everest predict --bundle {bundle} --input TABLE.csv`.\n")
    tuned = {json.dumps(t, sort_keys=True) for r in runs if (t := r.results.get("config", {}).get("tuning"))}
    for record in map(json.loads, sorted(tuned)):
        out.append(f"Recipe tuned by study `{record['study']}` ({record['storage']}): {record['trials']} trials on "
                   f"validation folds only ({record['folds']} region folds of the training files of "
                   f"{', '.join(record['targets'])}); best mean {record['metric']} {record['best_value']:.4f} "
                   f"(trial {record['best_trial']}); search space `{record['space_hash']}`.\n")
    files: dict[str, set[str]] = {}
    for r in runs:
        for f, h in r.data_hashes.items():
            files.setdefault(f, set()).add(h)
    out.append("Data files (sha256):\n")
    out.append(table(["file", "sha256"], [[f, h] for f, hs in sorted(files.items()) for h in sorted(hs)]))
    prov = pd.DataFrame([r.results.get("provenance", {}) for r in runs])
    rows = [[k, _counted(prov[k].tolist())] for k in ("code_version", "everest", "git_commit", "python", "torch",
                                                       "numpy", "pandas", "scipy", "device", "device_name", "host")
            if k in prov]
    out.append("\nVersions and devices (experiments per value):\n")
    out += [f"* {k}: {v}" for k, v in rows]
    import numpy
    import scipy

    out.append(f"\nAnalysis: everest {__version__}, numpy {numpy.__version__}, scipy {scipy.__version__}, "
               f"{a.n_bootstrap:,} bootstrap resamples, seed {a.seed}, confidence {fmt(a.confidence, 2)}.\n")
    return out


def render(a: ProductionAnalyzer, rel_plots: dict[str, str]) -> str:
    """The whole report as Markdown: the first screen (what was run, one line per target with its verdict, the
    verdict figure), the verdict's tables, the ensemble, status and failures, statistics, tests, plots,
    provenance, and last how to read it."""
    figures = {k: v for k, v in rel_plots.items() if k != "verdict"}
    parts = ["# EVEREST production training report\n", *first_screen(a, rel_plots.get("verdict"))]
    parts += _verdict(a) + _ensemble(a) + _status(a) + _history(a) + _overall(a) + _detailed(a) + _significance(a)
    parts += _thresholds(a) + _latency(a) + _plots(figures) + _provenance(a) + how_to_read(a)
    return "\n".join(parts).rstrip() + "\n"


def first_screen(a: ProductionAnalyzer, figure: str | None) -> list[str]:
    """What was run in one line, one line per target (EVEREST and its ensemble against the best baseline, ΔTSS
    with its interval, the verdict word), then the verdict figure: what a reader needs before any table."""
    rs = a.results
    expected = {str(e.target) for e in rs.expected}
    targets = [str(t) for t in all_targets() if str(t) in expected]
    seeds = sorted({e.seed for e in rs.expected})
    runs = rs.analysed
    data = ("synthetic data (the project's generator)" if runs and all(r.results.get("data", {}).get("synthetic")
                                                                       for r in runs) else
            "real (observed) data" if runs and not any(r.results.get("data", {}).get("synthetic") for r in runs) else
            "synthetic and real data" if runs else "no finished experiment")
    code = _counted([r.code_version for r in runs]) or "n/a"
    config = _counted([r.config_hash for r in runs]) or "n/a"
    out = [f"**Run:** {len(targets)} target(s) × seeds {', '.join(map(str, seeds))} = {len(rs.expected)} experiments, "
           f"{len(runs)} finished; {data}; code {code}; config {config}. "
           "[How to read this report](#how-to-read-this-report)\n"]
    verdicts = {r["target"]: r for r in a.verdict.to_dict("records")} if a.baseline_models else {}
    stats = {r["target"]: r for r in a.summary_statistics.to_dict("records")}
    for t in targets:
        out.append(_target_line(t, verdicts.get(t), stats.get(t)))
    out.append("")
    if figure:
        out.append(f"![Verdict: ΔTSS, EVEREST minus the best baseline, per target]({figure})\n")
    return out


def _target_line(target: str, v: dict[str, Any] | None, s: dict[str, Any] | None) -> str:
    if v is None:
        everest = fmt(s["tss_mean"]) if s and s.get("n_seeds") else "no finished seed"
        return f"* **{target}**: EVEREST TSS {everest} (seed mean); no verdict: no baseline results"
    head = (f"* **{target}**: EVEREST TSS {fmt(v['everest_tss'])} (seed mean of {_int(v['everest_seeds'])}), "
            f"ensemble {fmt(v['ensemble_tss'])}")
    if v["verdict"] not in ("beats", "ties", "trails"):
        return f"{head}; no verdict ({v.get('note') or 'no paired comparison'})"
    interval = _boot(v["ci_low"], v["ci_high"], v["n_units"], _count(v["n_pairs"], "seed pair"))
    return (f"{head}; best baseline {v['best_baseline']} {fmt(v['best_baseline_tss'])}; ΔTSS "
            f"{float(v['delta']):+.3f} {interval} → **{v['verdict']}**")
