"""The Markdown report: every number in it is read from the analyzer's computed tables, none is typed.

Every interval is printed with what it is and its n (seeds, or resampled regions), e.g. ``[0.470, 0.550] (t,
n=5 seeds)``; seed t-intervals go through :func:`everest.analysis.stats.seed_interval` (clipped to the metric's
range, said where it happened; the region bootstrap instead below 3 seeds). :func:`embed_figures` makes the
report self-contained (figures inlined) for places where its relative image links resolve nowhere.
"""

from __future__ import annotations

import base64
import json
import math
import mimetypes
import re
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from everest import __version__
from everest.analysis.stats import CLIPPED, MIN_T_SEEDS, Interval, ShownInterval, seed_interval
from everest.results import bundle_dir

if TYPE_CHECKING:
    from everest.analysis.analyzer import ProductionAnalyzer

PLOT_CAPTIONS = {
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


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; cells are formatted with :func:`fmt` unless already strings."""
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


def _intervals_note(a: ProductionAnalyzer) -> str:
    """How the report's intervals are shown: one paragraph before the tables that print them."""
    return (f"Every interval is a {int(round(a.confidence * 100))} % interval printed with what it is and its n: "
            "*t* is the Student-t interval of the seed mean over n seeds (training randomness), *bootstrap* the "
            "percentile interval from a region-block bootstrap of the test set over n active regions (or day-long "
            "row blocks where no region is recorded). A t-interval is cut to the metric's range (TSS in [-1, 1]; "
            f"rates, AUC, Brier and ECE in [0, 1]; times ≥ 0), marked *{CLIPPED}* where that happened; with fewer "
            f"than {MIN_T_SEEDS} seeds it says nothing, and the bootstrap interval is shown instead where one "
            "exists.\n")


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
    v = a.verdict
    models = list(a.baseline_models)
    conf = int(round(a.confidence * 100))
    alpha = fmt(1 - a.confidence, 2)
    out.append("Baselines: " + ", ".join(f"`{m}` (`{p}`)" for m, p in a.baseline_models.items()) + ".\n")
    out.append("**Best baseline** of a target: the baseline with the highest mean **validation** TSS over its seeds "
               "(ties: model name), so the choice never sees test data. Test TSS and Brier: means over seeds. "
               f"EVEREST's t-CI: {conf} % Student-t interval over seeds; bootstrap CI: region-block bootstrap of the "
               "seed mean. **ΔTSS**: EVEREST minus the best baseline, mean over the seeds both have, paired on test "
               f"samples; its CI: paired region bootstrap; p: paired region permutation test, Holm-corrected over "
               f"the targets. **Verdict**: *beats* when the CI lies above 0 and the Holm p is below {alpha}, "
               f"*trails* when it lies below 0 and the Holm p is below {alpha}, else *ties*.\n")
    out.append(_intervals_note(a))
    records = v.to_dict("records")
    rows = [[r["target"], f"{fmt(r['everest_tss'])} ({r['everest_seeds']})",
             interval_text(seed_interval("tss", r["everest_seeds"], r["everest_tss_t_ci_low"],
                                         r["everest_tss_t_ci_high"], _pooled(a, r["target"]))),
             _boot(r["everest_tss_boot_ci_low"], r["everest_tss_boot_ci_high"], _regions(a, r["target"])),
             *[r[f"tss_{m}"] for m in models],
             f"{r['best_baseline']} ({fmt(r['best_baseline_val_tss'])})" if isinstance(r["best_baseline"], str)
             else "none",
             r["delta"], _boot(r["ci_low"], r["ci_high"], r["n_units"], _count(r["n_pairs"], "seed pair")),
             _p(r["p_value"]), _p(r["p_holm"]), r["everest_brier"], r["best_baseline_brier"], f"**{r['verdict']}**"]
            for r in records]
    out.append(table(["target", "EVEREST TSS (seeds)", "t-CI", "bootstrap CI", *[f"{m} TSS" for m in models],
                      "best baseline (val. TSS)", "ΔTSS", "ΔTSS CI", "p", "p (Holm)", "Brier EVEREST",
                      "Brier best baseline", "verdict"], rows))
    out += [f"* {r['sentence']}{_pairs_note(r)}" for r in records]
    out.append("")
    ensemble_regions = dict(zip(a.ensemble_table["target"], a.ensemble_table["n_units"], strict=True))
    out.append("The seed ensemble (mean of the seeds' probabilities, its own calibration and threshold on validation) "
               "against the best baseline; Brier scores on the calibrated scale (raw model scores in brackets):\n")
    out.append(table(["target", "ensemble TSS (seeds)", "bootstrap CI", "best baseline TSS", "Brier ensemble",
                      "Brier EVEREST (seed mean)", "Brier best baseline"],
                     [[r["target"], f"{fmt(r['ensemble_tss'])} ({r['ensemble_seeds']})",
                       _boot(r["ensemble_tss_boot_ci_low"], r["ensemble_tss_boot_ci_high"],
                             ensemble_regions.get(r["target"])), r["best_baseline_tss"],
                       f"{fmt(r['ensemble_brier'], 4)} ({fmt(r['ensemble_brier_raw'], 4)})",
                       f"{fmt(r['everest_brier'], 4)} ({fmt(r['everest_brier_raw'], 4)})",
                       fmt(r["best_baseline_brier"], 4)] for r in records]))
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
    conf = int(round(a.confidence * 100))
    methods = ", ".join(sorted(set(built["calibration"])))
    out.append("Every model's probabilities are **calibrated** on the validation split before the threshold search "
               f"({methods}); Brier score and ECE are shown raw and calibrated, on test. The **ensemble** averages "
               "its seeds' raw probabilities; the seeds share one validation split, so its calibration and "
               "threshold are fitted on regions none of its members trained on (and the seed intervals above "
               "describe training randomness only, not the choice of validation regions). Thresholds are searched "
               "on the raw scores and shown on the calibrated scale. TSS CI: region-block bootstrap "
               f"({conf} %). A threshold at the edge of the design grid is marked *edge*.\n")
    rows = [[r["target"], _int(r["members"]), fmt(r["tss"]), _boot(r["tss_boot_ci_low"], r["tss_boot_ci_high"],
                                                                 r["n_units"]),
             fmt(r["seed_tss_mean"]), f"{fmt(r['threshold'], 4)}{' (edge)' if r['at_grid_edge'] is True else ''}",
             fmt(r["roc_auc"]), f"{fmt(r['brier_raw'], 4)} → {fmt(r['brier'], 4)}",
             f"{fmt(r['ece_raw'], 4)} → {fmt(r['ece'], 4)}",
             f"{fmt(r['seed_brier_raw_mean'], 4)} → {fmt(r['seed_brier_mean'], 4)}"] for r in built.to_dict("records")]
    out.append(table(["target", "seeds", "ensemble TSS", "bootstrap CI", "mean seed TSS", "threshold", "ROC AUC",
                      "Brier raw → calibrated", "ECE raw → calibrated", "seeds' Brier raw → calibrated"], rows))
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
        out.append(table(["experiment", "why"], [[name, why] for name, why in rs.stale.items()]))
    if rs.failed:
        out.append(f"### Failed experiments ({len(rs.failed)})\n")
        out.append(table(["experiment", "target", "seed", "error type", "error", "time"],
                         [[f.name, f.target, str(f.seed), f.error_type, f.error[:200], f.time] for f in rs.failed]))
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
    conf = int(round(a.confidence * 100))
    out = ["## Per-target results with confidence intervals\n",
           f"Mean ± sample std (ddof = 1) over seeds; **t-CI**: {conf} % Student-t confidence interval of the seed "
           "mean (training randomness; undefined for one seed). **Bootstrap CI**: "
           f"{conf} % percentile interval of the seed-mean score from a region-block bootstrap of the test set "
           f"({a.n_bootstrap:,} resamples of whole active regions, seed {a.seed}): how much the score depends on "
           "which regions fell in the test period. Rows of one region are near-duplicates (9 of 10 time steps "
           "shared), so regions, not rows, are the independent units.\n", _intervals_note(a)]
    rows = [[r["target"], 0, f"{r['n_failed']}/{r['n_missing']}", "no finished seed", *[""] * 8]
            if r["n_seeds"] == 0 else
            [r["target"], r["n_seeds"], f"{r['n_failed']}/{r['n_missing']}", _pm(r["tss_mean"], r["tss_std"]),
             _seed_ci(a, r, "tss"), _boot(r["pooled_boot_tss_low"], r["pooled_boot_tss_high"], r["n_units"]),
             _pm(r["f1_mean"], r["f1_std"]), _boot(r["pooled_boot_f1_low"], r["pooled_boot_f1_high"], r["n_units"]),
             _pm(r["roc_auc_mean"], r["roc_auc_std"]), _pm(r["brier_mean"], r["brier_std"]),
             _pm(r["ece_mean"], r["ece_std"]), _pm(r["threshold_mean"], r["threshold_std"])]
            for r in s.to_dict("records")]
    out.append(table(["target", "seeds", "failed/missing", "TSS", "TSS t-CI", "TSS bootstrap CI", "F1",
                      "F1 bootstrap CI", "ROC AUC", "Brier", "ECE", "threshold"], rows))
    out.append("\nFull statistics (n, mean, std, min, median, max, t-CI of every metric, as computed: not clipped) "
               "are in `summary_statistics.csv`.\n")
    d = a.analysed_frame
    if len(d) and "boot_tss_low" in d:
        out.append("### Every experiment (test TSS with its region-bootstrap confidence interval)\n")
        out.append(table(["experiment", "TSS", "bootstrap CI", "F1", "ROC AUC", "threshold", "best epoch"],
                         [[r["experiment"], r["tss"], _boot(r.get("boot_tss_low"), r.get("boot_tss_high"),
                                                             r.get("n_units")), r["f1"],
                           r["roc_auc"], r["threshold"], _int(r.get("best_epoch"))] for r in d.to_dict("records")]))
    return out


def _significance(a: ProductionAnalyzer) -> list[str]:
    out = ["## Significance tests\n"]
    alpha = 1 - a.confidence
    h = a.horizon_comparisons
    out.append("**Horizon comparisons** (difference of seed-mean test TSS, A minus B; positive: A better). Two-level "
               f"bootstrap, {a.n_bootstrap:,} resamples: active regions drawn once from the union of both test sets "
               "and applied to both (they share regions), seeds resampled within each arm. p: two-sided bootstrap "
               "p-value for a zero difference; Holm-corrected over all horizon comparisons (family-wise "
               f"α = {fmt(alpha, 2)}). Effect sizes: the TSS difference and Hedges' g over the seeds' scores.\n")
    if h.empty:
        out.append("No class has results at two horizons.\n")
    else:
        out.append(table(["comparison", "ΔTSS", "CI", "Hedges' g", "p", "p (Holm)", "significant"],
                         [[r["comparison"], r["delta"], _boot(r["ci_low"], r["ci_high"], r["n_units"],
                                                              f"{_int(r['n_a'])}/{_int(r['n_b'])} seeds"),
                           r["hedges_g"], _p(r["p_value"]), _p(r["p_holm"]), r["significant"]]
                          for r in h.to_dict("records")]))
    b = a.baseline_comparisons
    if a.baseline_dir is not None:
        out.append(f"\n**Candidate vs baseline** (baseline: `{a.baseline_dir}`; candidate minus baseline seed-mean "
                   "TSS, seeds paired by number, same test samples). CI: paired region bootstrap; p: paired region "
                   "permutation test (each region's predictions swapped between the models at random); Holm over "
                   "targets. Effect sizes: ΔTSS and Cohen's d_z over the per-seed differences.\n")
        if b.empty:
            out.append("No target has results in both.\n")
        else:
            out.append(table(["target", "baseline", "candidate", "ΔTSS", "CI", "d_z", "p", "p (Holm)",
                              "significant", "note"],
                             [[r["a"], r.get("baseline_mean"), r.get("candidate_mean"), r.get("delta"),
                               _boot(r.get("ci_low"), r.get("ci_high"), r.get("n_units"),
                                     _count(r.get("n_pairs"), "seed pair")), r.get("cohens_dz"),
                               _p(r.get("p_value")), _p(r.get("p_holm")), r.get("significant"), r.get("note", "") or ""]
                              for r in b.to_dict("records")]))
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
    out.append("Our protocol picks the threshold on the validation split. The first implementation tuned it on the "
               "test set (the *oracle*); the difference (oracle minus validation-chosen, mean over seeds) is how much "
               "that protocol inflates each reported metric.\n")
    p = a.protocol_inflation
    out.append(table(["target", "TSS (val-chosen)", "TSS (oracle)", "TSS inflation", "F1 inflation",
                      "precision infl.", "recall infl.", "specificity infl."],
                     [[r["target"], r["tss_validation"], r["tss_oracle"], _pm(r["tss_inflation_mean"],
                       r["tss_inflation_std"]), r["f1_inflation_mean"], r["precision_inflation_mean"],
                       r["recall_inflation_mean"], r["specificity_inflation_mean"]] for r in p.to_dict("records")]))
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
    out = ["## Provenance\n"]
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
    out.append(table(["file", "sha256"], [[f, ", ".join(sorted(h))] for f, h in sorted(files.items())]))
    prov = pd.DataFrame([r.results.get("provenance", {}) for r in runs])
    rows = [[k, _counted(prov[k].tolist())] for k in ("code_version", "everest", "git_commit", "python", "torch",
                                                       "numpy", "pandas", "scipy", "device", "device_name", "host")
            if k in prov]
    out.append("\nVersions and devices (experiments per value):\n")
    out.append(table(["item", "values"], rows))
    import numpy
    import scipy

    out.append(f"\nAnalysis: everest {__version__}, numpy {numpy.__version__}, scipy {scipy.__version__}, "
               f"{a.n_bootstrap:,} bootstrap resamples, seed {a.seed}, confidence {fmt(a.confidence, 2)}.\n")
    return out


def render(a: ProductionAnalyzer, rel_plots: dict[str, str]) -> str:
    """The whole report as Markdown (the verdict against the baselines first, then status and failures,
    statistics, tests, plots, provenance)."""
    head = ["# EVEREST production training report\n",
            f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} from `{a.results_dir}`. Decision thresholds "
            "are chosen on the validation split; test-oracle values are shown only as a labelled reference.\n"]
    parts = head + _verdict(a) + _ensemble(a) + _status(a) + _overall(a) + _detailed(a) + _significance(a)
    parts += _thresholds(a) + _latency(a) + _plots(rel_plots) + _provenance(a)
    return "\n".join(parts).rstrip() + "\n"


# A Markdown image ``![alt](path)`` (alt text may hold balanced brackets; a path without spaces or title).
_IMAGE = re.compile(r"!\[(?P<alt>(?:[^\[\]]|\[[^\[\]]*\])*)\]\((?P<target>[^)\s]+)\)")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # http:, data:, ...: nothing to embed


def embed_figures(markdown: str, base_dir: Path, max_width_px: int | None = 1600) -> str:
    """``markdown`` with every local image inlined as a base64 data URI, for viewers where the report's relative
    links resolve nowhere (the Prefect UI).

    Image paths are relative to ``base_dir`` (the report's folder); a missing file becomes the text
    '(figure <name> not found)' instead of a broken image; URLs are left alone, and so is all other text.
    PNGs are embedded scaled down to at most ``max_width_px`` wide with a 256-colour palette (a full 9-target
    report's figures shrink from about 2.4 to 1 MB of base64 at 1600 px); ``None`` embeds the files byte for
    byte. The files themselves are never changed.
    """
    if max_width_px is not None and (isinstance(max_width_px, bool) or not isinstance(max_width_px, int)
                                     or max_width_px < 1):
        raise ValueError(f"max_width_px must be a positive integer or None, got {max_width_px!r}")

    def inline(m: re.Match[str]) -> str:
        if _URL.match(m["target"]):
            return m[0]
        path = Path(base_dir) / m["target"]
        if not path.is_file():
            return f"(figure {path.name} not found)"
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        data = path.read_bytes()
        if max_width_px is not None and mime == "image/png":
            data = _smaller_png(data, max_width_px)
        return f"![{m['alt']}](data:{mime};base64,{base64.b64encode(data).decode('ascii')})"

    return _IMAGE.sub(inline, markdown)


def _smaller_png(png: bytes, max_width_px: int) -> bytes:
    """The PNG scaled down to at most ``max_width_px`` wide (aspect kept) and re-encoded with a 256-colour
    palette: plots have few colours, so it looks the same at a third of the bytes (scaling alone saves little:
    smoothed pixels compress worse)."""
    from PIL import Image  # matplotlib's own dependency

    with Image.open(BytesIO(png)) as source:
        image = source.convert("RGB")
    if image.width > max_width_px:
        height = max(1, round(image.height * max_width_px / image.width))
        image = image.resize((max_width_px, height), Image.Resampling.LANCZOS)
    out = BytesIO()
    image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, format="PNG",
                                                                                          optimize=True)
    return out.getvalue()
