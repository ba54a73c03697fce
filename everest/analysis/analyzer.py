"""ProductionAnalyzer: statistics, figures and the report over a results root, callable from anywhere.

A notebook, the command line (``python -m everest.analysis``) and the Prefect flow (which only wraps
:func:`run_analysis`) all run the same code. Nothing here knows its launcher. The analyzer computes and reads:
its tables, statistics and figures are cached properties and methods that write nothing (the seed ensembles
are built before the analysis, by :func:`everest.scoring.ensemble.build_ensembles`); :mod:`everest.analysis.
writing` writes them to disk.
"""

from __future__ import annotations

import logging
import numbers
import zlib
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from everest.analysis import plots, report
from everest.analysis import stats as st
from everest.analysis.loading import (
    ExperimentResult,
    ResultSet,
    load_results,
    resampling_units,
)
from everest.analysis.writing import AnalysisSummary, jsonable, write_analysis
from everest.config import HORIZONS, ConfigError, Target, all_targets
from everest.results import experiment_dir
from everest.scoring.calibration import reliability_table
from everest.scoring.ensemble import ensemble_name, ensemble_root, read_ensembles

log = logging.getLogger(__name__)

# Metrics summarised across seeds, as they are named in raw_results.csv.
SUMMARY_METRICS: tuple[str, ...] = ("tss", "accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "brier",
                                    "ece", "latency_ms", "threshold")
TEST_METRICS: tuple[str, ...] = ("tss", "accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "brier",
                                 "ece", "latency_ms", "latency_single_ms", "tp", "fp", "tn", "fn")
SEED_STATS: tuple[str, ...] = ("n", "mean", "std", "min", "median", "max", "ci_low", "ci_high")
# Bootstrapped metrics reported per experiment and pooled per target.
REPORTED_BOOTSTRAP: tuple[str, ...] = ("tss", "f1", "recall", "specificity", "precision", "brier")
# ``<out_dir>/baselines/<model>/results``: where everest.scoring.baselines writes (its ``baseline_root``).
BASELINES_FOLDER = "baselines"
# Columns of every verdict row, in order; ``tss_<model>`` and ``val_tss_<model>`` per baseline follow "everest_brier".
# ``n_units``: regions resampled for the ΔTSS interval; ``ensemble_brier_n_*``: baseline seeds and regions of the
# ensemble's Brier comparison.
VERDICT_COLUMNS: tuple[str, ...] = (
    "target", "everest_seeds", "everest_tss", "everest_tss_t_ci_low", "everest_tss_t_ci_high",
    "everest_tss_boot_ci_low", "everest_tss_boot_ci_high", "everest_brier", "best_baseline", "best_baseline_seeds",
    "best_baseline_val_tss", "best_baseline_tss", "best_baseline_brier", "delta", "ci_low", "ci_high", "p_value",
    "p_holm", "n_pairs", "n_units", "verdict", "note", "sentence", "everest_brier_raw", "ensemble_seeds",
    "ensemble_tss", "ensemble_tss_boot_ci_low", "ensemble_tss_boot_ci_high", "ensemble_brier", "ensemble_brier_raw",
    "ensemble_brier_delta", "ensemble_brier_ci_low", "ensemble_brier_ci_high", "ensemble_brier_p_holm",
    "ensemble_brier_n_pairs", "ensemble_brier_n_units", "ensemble_sentence")
# Columns of the ensemble table (analysis/ensemble.csv), one row per expected target.
ENSEMBLE_COLUMNS: tuple[str, ...] = (
    "target", "members", "tss", "tss_boot_ci_low", "tss_boot_ci_high", "n_units", "threshold", "at_grid_edge",
    "roc_auc", "brier_raw", "brier", "ece_raw", "ece", "calibration", "seed_tss_mean", "seed_brier_raw_mean",
    "seed_brier_mean", "note")


def _rng(seed: int, purpose: str, index: int = 0) -> np.random.Generator:
    """An independent, reproducible stream per (seed, purpose, index): one target's numbers never depend on
    which other targets happen to exist."""
    return np.random.default_rng([seed, zlib.crc32(purpose.encode()), index])


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class ProductionAnalyzer:
    """Analyse the 45 (or any expected subset of) experiments under ``results_dir`` into ``out_dir``.

    Outputs go to ``out_dir/analysis`` (report, CSVs, summary JSON) and ``out_dir/plots``; ``out_dir``
    defaults to the parent of ``results_dir`` (``output/results`` -> ``output``). ``baseline_dir``, if
    given, is a second results root compared target by target (paired on seeds and test samples), e.g.
    another EVEREST configuration. The verdict, the report's first section, compares EVEREST with the
    simple baselines of :mod:`everest.scoring.baselines`: every ``out_dir/baselines/<model>/results`` found, plus
    ``baseline_dirs`` (model name -> results root; it wins over a found folder of the same name).
    Stale results (another config, code version or data than the run's, see :func:`load_results`) are
    listed in the report and left out of the statistics. The seed ensembles are read as built before the
    analysis (:attr:`ensembles`). Nothing is written until :meth:`run_complete_analysis`; a run that makes plots
    leaves under ``plots/`` only its own figures (:func:`everest.analysis.writing.remove_stale_plots`).
    """

    def __init__(self, results_dir: str | Path = "output/results", out_dir: str | Path | None = None, *,
                 targets: Sequence[str | Target] | None = None, seeds: Sequence[int] | None = None,
                 n_bootstrap: int = 10_000, seed: int = 0, confidence: float = 0.95,
                 baseline_dir: str | Path | None = None, baseline_dirs: Mapping[str, str | Path] | None = None,
                 make_plots: bool = True) -> None:
        self.results_dir = Path(results_dir)
        self.out_dir = Path(out_dir) if out_dir is not None else self.results_dir.resolve().parent
        self.n_bootstrap = _check_int(n_bootstrap, "n_bootstrap", 100)
        self.seed = _check_int(seed, "seed", 0)
        if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real) or not 0 < confidence < 1:
            raise ConfigError(f"confidence must be a number strictly between 0 and 1, got {confidence!r}")
        self.confidence = float(confidence)
        self.targets = [Target.parse(t) for t in targets] if targets is not None else None
        self.seeds = [_check_int(s, "seeds[i]", 0) for s in seeds] if seeds is not None else None
        self.baseline_dir = Path(baseline_dir) if baseline_dir is not None else None
        for name in baseline_dirs or {}:
            if not isinstance(name, str) or not name or "/" in name:
                raise ConfigError(f"baseline_dirs keys must be model names (non-empty, no '/'), got {name!r}")
        self._explicit_baselines = {name: Path(d) for name, d in (baseline_dirs or {}).items()}
        self.make_plots = bool(make_plots)
        self.analysis_dir = self.out_dir / "analysis"
        self.plots_dir = self.out_dir / "plots"

    # ------------------------------------------------------------------ loading
    @cached_property
    def results(self) -> ResultSet:
        """The results found under ``results_dir`` (read once)."""
        return load_results(self.results_dir, self.targets, self.seeds)

    @cached_property
    def baseline(self) -> ResultSet | None:
        """The baseline results to compare with, if a ``baseline_dir`` was given."""
        if self.baseline_dir is None:
            return None
        return load_results(self.baseline_dir, self.targets, self.seeds)

    @cached_property
    def baseline_models(self) -> dict[str, Path]:
        """Results roots of the simple baselines the verdict compares with, by model name (sorted): every
        ``out_dir/baselines/<model>/results`` folder, plus the ``baseline_dirs`` given."""
        parent = self.out_dir / BASELINES_FOLDER
        found = {p.name: p / "results" for p in parent.iterdir() if (p / "results").is_dir()} if parent.is_dir() else {}
        found.update(self._explicit_baselines)
        return dict(sorted(found.items()))

    @cached_property
    def baseline_results(self) -> dict[str, ResultSet]:
        """Each simple baseline's results (same expected targets and seeds as EVEREST), by model name."""
        return {m: load_results(path, self.targets, self.seeds) for m, path in self.baseline_models.items()}

    # ------------------------------------------------------------------ statistics
    @cached_property
    def unit_stats(self) -> dict[str, st.UnitStats]:
        """Per-unit sufficient statistics of every analysed experiment with predictions, by experiment name."""
        return {r.name: _unit_stats(r) for r in self.results.analysed if r.predictions is not None}

    @cached_property
    def bootstrap(self) -> dict[str, st.TargetBootstrap]:
        """Region-block bootstrap per target (per seed and pooled), shared draws within a target."""
        out = {}
        for target, runs in self.results.by_target().items():
            parts = [self.unit_stats[r.name] for r in runs if r.name in self.unit_stats]
            if parts:
                rng = _rng(self.seed, "bootstrap", all_targets().index(target))
                out[str(target)] = st.bootstrap_target(parts, self.n_bootstrap, rng, confidence=self.confidence)
        return out

    @cached_property
    def ensembles(self) -> dict[str, dict[str, Any] | str]:
        """Each expected target's seed ensemble as built before the analysis, under ``<out_dir>/ensemble`` and
        current for the finished seeds under ``results_dir`` (:func:`everest.scoring.ensemble.read_ensembles`),
        or the reason there is none (e.g. not built). Reads only. An ensemble of results this analysis calls
        stale is left out, with that reason: the statistics never mix configurations."""
        targets = list(dict.fromkeys(e.target for e in self.results.expected))
        found = read_ensembles(self.results_dir, self.out_dir, targets)
        for t, res in found.items():
            members = [m["name"] for m in res["members"]] if isinstance(res, dict) else []
            if stale := [name for name in members if name in self.results.stale]:
                found[t] = f"built from results this analysis leaves out as stale ({', '.join(stale)})"
        return found

    def _ensemble_predictions(self, target: str) -> pd.DataFrame:
        folder = experiment_dir(ensemble_root(self.out_dir), ensemble_name(Target.parse(target)))
        return pd.read_csv(folder / "predictions.csv")

    @cached_property
    def ensemble_units(self) -> dict[str, st.UnitStats]:
        """Per-unit sufficient statistics of each built ensemble's test predictions, by target."""
        out = {}
        for t, res in self.ensembles.items():
            if isinstance(res, dict):
                pred = self._ensemble_predictions(t)
                units, _ = resampling_units(pred)
                out[t] = st.unit_statistics(pred["y_true"].to_numpy(), pred["y_pred"].to_numpy(),
                                            pred["y_prob"].to_numpy(float), units)
        return out

    @cached_property
    def ensemble_table(self) -> pd.DataFrame:
        """Per expected target: the ensemble's test scores (TSS with its region-bootstrap CI; Brier and ECE
        raw and calibrated) beside the mean of its members' own."""
        rows = []
        for t, res in self.ensembles.items():
            row: dict[str, Any] = {"target": t, "note": res if isinstance(res, str) else ""}
            if isinstance(res, dict):
                boot = st.bootstrap_target([self.ensemble_units[t]], self.n_bootstrap, _rng(self.seed, "ensemble",
                                           all_targets().index(Target.parse(t))), ("tss",), self.confidence)
                m, members = res["test_metrics"], res["members"]
                cal = res["calibration"]["test"]
                row.update(members=len(members), tss=m["tss"], tss_boot_ci_low=boot.pooled["tss"].low,
                           tss_boot_ci_high=boot.pooled["tss"].high, n_units=boot.n_units,
                           threshold=res["threshold"]["selected"],
                           at_grid_edge=res["threshold"]["at_grid_edge"], roc_auc=m["roc_auc"],
                           brier_raw=cal["brier_raw"], brier=cal["brier"], ece_raw=cal["ece_raw"], ece=cal["ece"],
                           calibration=res["calibration"]["method"],
                           seed_tss_mean=float(np.mean([x["test_tss"] for x in members])),
                           seed_brier_mean=float(np.mean([x["test_brier"] for x in members])))
                row["seed_brier_raw_mean"] = float(np.mean([x["test_brier_raw"] for x in members]))
            rows.append(row)
        return pd.DataFrame(rows, columns=list(ENSEMBLE_COLUMNS))

    def _seed_mean(self, target: str, metric: str) -> float:
        runs = self.results.by_target().get(Target.parse(target), [])
        return st.seed_summary([r.results.get("test_metrics", {}).get(metric, np.nan) for r in runs])["mean"]

    def reliability_curves(self) -> dict[str, dict[str, pd.DataFrame]]:
        """Per target with an ensemble, the reliability tables of one diagram on the test split: the ensemble raw
        and calibrated, and each baseline's first seed (calibrated), by curve label."""
        out = {}
        for t, res in self.ensembles.items():
            if not isinstance(res, dict):
                continue
            pred = self._ensemble_predictions(t)
            y = pred["y_true"].to_numpy()
            curves = {"EVEREST ensemble, raw": reliability_table(y, pred["y_prob_raw"].to_numpy(float)),
                      "EVEREST ensemble, calibrated": reliability_table(y, pred["y_prob"].to_numpy(float))}
            for model, rs in self.baseline_results.items():
                runs = [r for r in rs.by_target().get(Target.parse(t), []) if r.predictions is not None]
                if runs:
                    p = runs[0].predictions
                    curves[f"{model} (seed {runs[0].seed})"] = reliability_table(p["y_true"].to_numpy(),
                                                                                 p["y_prob"].to_numpy(float))
            out[t] = curves
        return out

    @cached_property
    def raw_results(self) -> pd.DataFrame:
        """One row per experiment (completed, stale, failed, missing, unexpected) with every metric and provenance."""
        rows = [self._completed_row(r) for r in self.results.completed]
        rows += [{"experiment": f.name, "target": f.target, "flare_class": f.target.split("-")[0],
                  "horizon": int(f.target.split("-")[1]) if "-" in f.target else None, "seed": f.seed,
                  "status": "failed", "expected": f.expected, "error_type": f.error_type, "error": f.error,
                  "path": str(f.path)} for f in self.results.failed]
        rows += [{"experiment": e.name, "target": str(e.target), "flare_class": e.target.flare_class,
                  "horizon": e.target.horizon, "seed": e.seed, "status": "missing", "expected": True}
                 for e in self.results.missing]
        return pd.DataFrame(rows)

    def _completed_row(self, r: ExperimentResult) -> dict[str, Any]:
        res = r.results
        tm, om, vm = res.get("test_metrics", {}), res.get("oracle_test_metrics", {}), res.get("validation_metrics", {})
        th, tr, data, prov = (res.get(k, {}) for k in ("threshold", "training", "data", "provenance"))
        stale = self.results.stale.get(r.name)
        status = "unexpected" if not r.expected else "stale" if stale else "completed"
        row: dict[str, Any] = {"experiment": r.name, "target": str(r.target), "flare_class": r.target.flare_class,
                               "horizon": r.target.horizon, "seed": r.seed, "status": status,
                               "expected": r.expected, "stale_reason": stale}
        row.update({m: tm.get(m, np.nan) for m in TEST_METRICS})
        row.update(threshold=th.get("selected", np.nan), threshold_source=th.get("source"),
                   threshold_at_grid_edge=th.get("at_grid_edge"), brier_raw=tm.get("brier_raw", np.nan),
                   validation_threshold=th.get("validation", np.nan), oracle_threshold=th.get("oracle_test", np.nan))
        row.update({f"oracle_{m}": om.get(m, np.nan) for m in st.INFLATION_METRICS + ("roc_auc",)})
        row.update({f"val_{m}": vm.get(m, np.nan) for m in ("tss", "f1", "roc_auc", "brier")})
        row.update(best_epoch=tr.get("best_epoch"), epochs_run=tr.get("epochs_run"), stop_reason=tr.get("stop_reason"),
                   train_seconds=tr.get("seconds"), n_parameters=tr.get("n_parameters"), n_train=data.get("n_train"),
                   n_test=data.get("n_test"), n_test_positive=data.get("n_test_positive"))
        boot = self.bootstrap.get(str(r.target))
        if r.expected and boot is not None and r.name in self.unit_stats:
            runs = [x for x in self.results.by_target()[r.target] if x.name in self.unit_stats]
            cis = boot.per_seed[[x.name for x in runs].index(r.name)]
            row["n_units"] = boot.n_units
            for m in REPORTED_BOOTSTRAP:
                row.update({f"boot_{m}_low": cis[m].low, f"boot_{m}_high": cis[m].high, f"boot_{m}_se": cis[m].se})
        row.update(config_hash=r.config_hash, code_version=r.code_version, git_commit=prov.get("git_commit"),
                   everest=prov.get("everest"), device=prov.get("device_name") or prov.get("device"),
                   path=str(r.path), notes="; ".join(r.notes))
        return row

    @cached_property
    def analysed_frame(self) -> pd.DataFrame:
        """The rows of raw_results the statistics cover: completed experiments inside the expected set."""
        raw = self.raw_results
        if raw.empty or "status" not in raw:
            return raw
        return raw[raw["status"] == "completed"].reset_index(drop=True)

    @cached_property
    def summary_statistics(self) -> pd.DataFrame:
        """One row per expected target: coverage, seed statistics of every metric and pooled bootstrap CIs.

        The t-intervals are as computed (they may leave the metric's range with few seeds); the report and the
        plots show them through :func:`everest.analysis.stats.seed_interval`.
        """
        a = self.analysed_frame
        rows = []
        targets = list(dict.fromkeys(e.target for e in self.results.expected))
        for t in targets:
            name = str(t)
            g = a[a["target"] == name] if len(a) else a
            fails = [f for f in self.results.failed if f.target == name and f.expected]
            miss = [e for e in self.results.missing if e.target == t]
            row: dict[str, Any] = {"target": name, "flare_class": t.flare_class, "horizon": t.horizon,
                                   "n_seeds": int(len(g)), "n_failed": len(fails), "n_missing": len(miss),
                                   "seeds": " ".join(str(s) for s in sorted(g["seed"])) if len(g) else "",
                                   "config_hashes": " ".join(sorted(set(g["config_hash"]))) if len(g) else ""}
            for m in SUMMARY_METRICS:
                s = st.seed_summary(g[m].to_numpy(float) if len(g) else [], self.confidence)
                row.update({f"{m}_{k}": v for k, v in s.items()})
            boot = self.bootstrap.get(name)
            row["n_units"] = boot.n_units if boot else 0
            for m in REPORTED_BOOTSTRAP:
                iv = boot.pooled[m] if boot else None
                row.update({f"pooled_boot_{m}_low": iv.low if iv else np.nan,
                            f"pooled_boot_{m}_high": iv.high if iv else np.nan})
            row["threshold_cv"] = row["threshold_std"] / row["threshold_mean"] if row["threshold_mean"] else np.nan
            if len(g):
                row["tss_inflation_mean"] = float((g["oracle_tss"] - g["tss"]).mean())
            rows.append(row)
        return pd.DataFrame(rows)

    @cached_property
    def horizon_comparisons(self) -> pd.DataFrame:
        """Every horizon pair within each class (e.g. C 24 h vs 72 h): TSS difference, CI, p, Holm-adjusted p."""
        by_target = {str(t): [self.unit_stats[r.name] for r in runs if r.name in self.unit_stats]
                     for t, runs in self.results.by_target().items()}
        rows = []
        for cls in dict.fromkeys(e.target.flare_class for e in self.results.expected):
            for i, ha in enumerate(HORIZONS):
                for hb in HORIZONS[i + 1:]:
                    a, b = by_target.get(f"{cls}-{ha}"), by_target.get(f"{cls}-{hb}")
                    if not a or not b:
                        continue
                    rng = _rng(self.seed, f"horizon {cls} {ha} {hb}")
                    res = st.compare_independent(a, b, self.n_bootstrap, rng, "tss", self.confidence)
                    rows.append({"family": "horizon", "comparison": f"{cls}: {ha} h vs {hb} h", "a": f"{cls}-{ha}",
                                 "b": f"{cls}-{hb}", **res})
        return _with_holm(pd.DataFrame(rows), 1 - self.confidence)

    @cached_property
    def baseline_comparisons(self) -> pd.DataFrame:
        """Candidate (``results_dir``) minus baseline TSS per target, paired on seeds and test samples."""
        if self.baseline is None:
            return pd.DataFrame()
        return compare_result_sets(self.baseline, self.results, self.n_bootstrap, self.seed, self.confidence)

    @cached_property
    def verdict(self) -> pd.DataFrame:
        """Per expected target: EVEREST against the best simple baseline (empty frame when there is none).

        The best baseline of a target is the model with the highest mean validation TSS over its seeds
        (ties: model name), so its choice never sees test data. The difference EVEREST minus best baseline
        comes from :func:`compare_result_sets` (paired on seeds and test samples; region bootstrap CI,
        permutation p, Holm over the targets compared). Verdict: ``beats`` when the CI lies above 0 and the
        Holm p is below ``1 - confidence``, ``trails`` when it lies below 0 with such p, else ``ties``;
        ``n/a`` (with a note) when no paired comparison is possible.
        """
        if not self.baseline_results:
            return pd.DataFrame()
        models = list(self.baseline_results)
        means = {m: _seed_means(rs) for m, rs in self.baseline_results.items()}
        targets = list(dict.fromkeys(e.target for e in self.results.expected))
        best: dict[Target, str] = {}
        for t in targets:
            ranked = sorted((-means[m][t]["val_tss"], m) for m in models
                            if t in means[m] and np.isfinite(means[m][t]["val_tss"]))
            if ranked:
                best[t] = ranked[0][1]
        chosen = ResultSet(root=self.out_dir, expected=self.results.expected, failed=[], missing=[],
                           completed=[r for t, m in best.items() for r in self.baseline_results[m].by_target()[t]])
        cmp = compare_result_sets(chosen, self.results, self.n_bootstrap, self.seed, self.confidence)
        cmp_by = {r["a"]: r for r in cmp.to_dict("records")} if len(cmp) else {}
        brier_by = self._ensemble_brier_comparison(chosen)
        stats = self.summary_statistics.set_index("target")
        ensembles = {r["target"]: r for r in self.ensemble_table.to_dict("records") if not r["note"]}
        alpha = 1 - self.confidence
        rows = []
        for t in targets:
            name, e = str(t), stats.loc[str(t)]
            row: dict[str, Any] = {
                "target": name, "everest_seeds": int(e["n_seeds"]), "everest_tss": e["tss_mean"],
                "everest_tss_t_ci_low": e["tss_ci_low"], "everest_tss_t_ci_high": e["tss_ci_high"],
                "everest_tss_boot_ci_low": e["pooled_boot_tss_low"],
                "everest_tss_boot_ci_high": e["pooled_boot_tss_high"], "everest_brier": e["brier_mean"]}
            for m in models:
                got = means[m].get(t, {})
                row.update({f"tss_{m}": got.get("tss", np.nan), f"val_tss_{m}": got.get("val_tss", np.nan)})
            b = best.get(t)
            got = means[b][t] if b else {}
            row.update(best_baseline=b, best_baseline_seeds=got.get("n", 0),
                       best_baseline_val_tss=got.get("val_tss", np.nan), best_baseline_tss=got.get("tss", np.nan),
                       best_baseline_brier=got.get("brier", np.nan))
            c = cmp_by.get(name, {})
            row.update({k: c.get(k, np.nan) for k in ("delta", "ci_low", "ci_high", "p_value", "p_holm")})
            row["n_pairs"] = int(c["n_pairs"]) if np.isfinite(c.get("n_pairs", np.nan)) else 0
            row["n_units"] = c.get("n_units", np.nan)
            note = ""
            if not row["everest_seeds"]:
                note = "EVEREST has no finished seed"
            elif b is None:
                note = "no baseline has a finished seed with a validation TSS"
            elif not c:
                note = "no test predictions to pair"
            elif not np.isfinite(row["p_holm"]):
                note = str(c.get("note") or "no paired comparison")
            if note:
                row["verdict"] = "n/a"
            elif row["ci_low"] > 0 and row["p_holm"] < alpha:
                row["verdict"] = "beats"
            elif row["ci_high"] < 0 and row["p_holm"] < alpha:
                row["verdict"] = "trails"
            else:
                row["verdict"] = "ties"
            row["note"] = note
            row["sentence"] = report.verdict_sentence(row, self.confidence)
            row["everest_brier_raw"] = self._seed_mean(name, "brier_raw")
            ens = ensembles.get(name, {})
            row.update(ensemble_seeds=int(ens.get("members") or 0), ensemble_tss=ens.get("tss", np.nan),
                       ensemble_tss_boot_ci_low=ens.get("tss_boot_ci_low", np.nan),
                       ensemble_tss_boot_ci_high=ens.get("tss_boot_ci_high", np.nan),
                       ensemble_brier=ens.get("brier", np.nan), ensemble_brier_raw=ens.get("brier_raw", np.nan))
            b_cmp = brier_by.get(name, {})
            row.update({f"ensemble_brier_{k}": b_cmp.get(k, np.nan)
                        for k in ("delta", "ci_low", "ci_high", "p_holm", "n_pairs", "n_units")})
            row["ensemble_sentence"] = report.ensemble_sentence(row, self.confidence)
            rows.append(row)
        return pd.DataFrame(rows)

    def _ensemble_brier_comparison(self, best: ResultSet) -> dict[str, dict[str, float]]:
        """Per target: ensemble minus best-baseline Brier score, paired on test samples against each baseline
        seed (region bootstrap CI, permutation p, Holm over the targets compared)."""
        rows = {}
        for t, runs in best.by_target().items():
            ens = self.ensemble_units.get(str(t))
            base = {r.seed: _unit_stats(r) for r in runs if r.predictions is not None}
            if ens is None or not base:
                continue
            try:
                rows[str(t)] = st.compare_paired(base, {s: ens for s in base}, self.n_bootstrap,
                                                 _rng(self.seed, "ensemble-brier", all_targets().index(t)), "brier",
                                                 self.confidence)
            except ValueError:  # not the same test samples: no paired comparison
                continue
        holm = st.holm([r["p_value"] for r in rows.values()]) if rows else []
        for r, p in zip(rows.values(), holm, strict=True):
            r["p_holm"] = float(p)
        return rows

    @cached_property
    def threshold_stability(self) -> pd.DataFrame:
        """Per target: mean, std and CV of the chosen threshold and its correlation with TSS across seeds."""
        a = self.analysed_frame
        return st.threshold_stability(a) if len(a) else pd.DataFrame()

    @cached_property
    def protocol_inflation(self) -> pd.DataFrame:
        """Per target: validation-chosen vs test-oracle threshold metrics and the oracle's inflation."""
        a = self.analysed_frame
        return st.protocol_inflation(a) if len(a) else pd.DataFrame()

    # ------------------------------------------------------------------ plots
    def figures(self) -> dict[str, Any]:
        """Every figure of the analysis as ``{key: matplotlib Figure}`` (empty when nothing finished)."""
        a = self.analysed_frame
        if not len(a):
            return {}
        runs = self.results.analysed
        boot = {t: b.pooled["tss"] for t, b in self.bootstrap.items()}
        verdict = plots.verdict_figure(self.verdict, 1 - self.confidence, self.confidence) \
            if self.baseline_models else None
        return {**({"verdict": verdict} if verdict is not None else {}),
                "performance": plots.performance_figure(a, boot), "detailed": plots.detailed_metrics_figure(a),
                "threshold": plots.threshold_figure(a, runs), "latency": plots.latency_figure(a),
                "reliability": plots.reliability_figure(runs), "roc_pr": plots.roc_pr_figure(runs),
                "training": plots.training_figure(runs)}

    # ------------------------------------------------------------------ everything
    def run_complete_analysis(self) -> AnalysisSummary:
        """Compute every statistic and write the CSVs, plots, report and summary JSON
        (:func:`everest.analysis.writing.write_analysis`); return the summary."""
        return write_analysis(self)

    def target_table(self) -> list[dict[str, Any]]:
        """Per-target headline numbers (small, JSON-able): n, TSS mean/std/CIs, F1, ROC AUC, threshold."""
        cols = {"target": "target", "n_seeds": "n", "n_failed": "failed", "n_missing": "missing",
                "tss_mean": "tss_mean", "tss_std": "tss_std", "tss_ci_low": "tss_t_ci_low",
                "tss_ci_high": "tss_t_ci_high", "pooled_boot_tss_low": "tss_boot_ci_low",
                "pooled_boot_tss_high": "tss_boot_ci_high", "f1_mean": "f1_mean", "roc_auc_mean": "roc_auc_mean",
                "threshold_mean": "threshold_mean"}
        s = self.summary_statistics
        return jsonable([{new: row[old] for old, new in cols.items()} for row in s.to_dict("records")])


def _unit_stats(r: ExperimentResult) -> st.UnitStats:
    """Sufficient statistics per resampling unit of one experiment, at its chosen threshold."""
    p = r.predictions
    prob = p["y_prob"].to_numpy(float)
    if "y_pred" in p.columns:
        pred = p["y_pred"].to_numpy()
    else:
        pred = prob >= float(r.results.get("threshold", {}).get("selected", 0.5))
    units, _ = resampling_units(p)
    return st.unit_statistics(p["y_true"].to_numpy(), pred, prob, units)


def _seed_means(rs: ResultSet) -> dict[Target, dict[str, float]]:
    """Per target of a results set: seeds, and the mean over seeds of test TSS, validation TSS and test Brier."""
    def mean(runs: list[ExperimentResult], part: str, metric: str) -> float:
        return st.seed_summary([r.results.get(part, {}).get(metric, np.nan) for r in runs])["mean"]

    return {t: {"n": len(runs), "tss": mean(runs, "test_metrics", "tss"),
                "val_tss": mean(runs, "validation_metrics", "tss"), "brier": mean(runs, "test_metrics", "brier")}
            for t, runs in rs.by_target().items()}


def _with_holm(df: pd.DataFrame, alpha: float) -> pd.DataFrame:
    if df.empty:
        return df
    df = df.copy()
    df["p_holm"] = st.holm(df["p_value"].to_numpy(float))
    df["significant"] = df["p_holm"] < alpha
    return df


def compare_result_sets(baseline: ResultSet, candidate: ResultSet, n_bootstrap: int = 10_000, seed: int = 0,
                        confidence: float = 0.95) -> pd.DataFrame:
    """Per target, candidate minus baseline TSS: paired region bootstrap CI, permutation p, Holm over targets.

    Use two results roots, or two configurations of one tree via ``ResultSet.select(config_hash)``.
    Targets whose test samples differ between the two get a row with the reason and no p-value.
    """
    base_t = {t: {r.seed: _unit_stats(r) for r in rs if r.predictions is not None}
              for t, rs in baseline.by_target().items()}
    rows = []
    for t, runs in candidate.by_target().items():
        cand = {r.seed: _unit_stats(r) for r in runs if r.predictions is not None}
        base = base_t.get(t, {})
        if not cand or not base:
            continue
        row: dict[str, Any] = {"family": "baseline", "comparison": f"{t}: candidate vs baseline", "a": str(t),
                               "b": f"{t} (baseline)"}
        try:
            res = st.compare_paired(base, cand, n_bootstrap, _rng(seed, "baseline", all_targets().index(t)), "tss",
                                    confidence)
            row.update(res)
        except ValueError as err:
            row.update(p_value=np.nan, note=str(err))
        rows.append(row)
    return _with_holm(pd.DataFrame(rows), 1 - confidence)


def run_analysis(results_dir: str | Path = "output/results", out_dir: str | Path | None = None,
                 **kwargs: Any) -> dict[str, Any]:
    """Run the complete analysis and return its JSON-able summary (the function a Prefect task wraps)."""
    return ProductionAnalyzer(results_dir, out_dir, **kwargs).run_complete_analysis().to_dict()
