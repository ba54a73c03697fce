"""Analysis: statistics against scipy / hand-computed values on constructed results, the
region-block bootstrap, significance tests, partial results, and an end-to-end run on real tiny training runs.

Constructed results are written in the trainer's layout with known values, so every expected number is
computable by hand or by scipy; real results come from a session fixture that trains a handful of tiny models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from tiny import ONE_THREAD, overrides

from everest.analysis import (
    AnalysisError,
    ProductionAnalyzer,
    compare_result_sets,
    load_results,
    run_analysis,
)
from everest.analysis import stats as st
from everest.analysis.__main__ import main as cli_main
from everest.config import ConfigError, EverestConfig, Experiment, Target
from everest.results import CODE_VERSION
from everest.scoring import metrics as M
from everest.scoring.ensemble import build_ensembles

N_BOOT = 400  # enough for the assertions below; production default is 10,000
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------------
# Constructed results in the trainer's layout


def region_data(rng: np.random.Generator, n_regions: int = 30, rows: int = 40, pos_frac: float = 0.4,
                skill: float = 0.25, first_region: int = 11000) -> pd.DataFrame:
    """Test predictions whose labels and errors are shared within a region (one episode per region)."""
    regions = np.repeat(np.arange(first_region, first_region + n_regions), rows)
    y_region = rng.random(n_regions) < pos_frac
    shift = rng.normal(0, 0.2, n_regions)  # region-level error: the correlation the bootstrap must respect
    y = np.repeat(y_region, rows).astype(int)
    p = 0.5 + skill * (2 * y - 1) + np.repeat(shift, rows) + rng.normal(0, 0.02, y.size)
    return pd.DataFrame({"y_true": y, "y_prob": np.clip(p, 0.0, 1.0), "noaa_ar": regions})


def write_experiment(root: Path, target: str, seed: int, pred: pd.DataFrame | None = None, *,
                     threshold: float = 0.5, metrics: dict[str, float] | None = None, config_hash: str = "cfg0",
                     oracle: dict[str, float] | None = None, oracle_threshold: float | None = None,
                     latency: float = 0.1, data_hash: str = "d0", code_version: str = CODE_VERSION,
                     val_tss: float | None = None) -> Path:
    """Write one finished experiment; metrics come from ``pred`` (via everest.scoring.metrics) or are given.
    Validation metrics equal the test metrics unless ``val_tss`` replaces their TSS."""
    exp = Experiment(target=Target.parse(target), seed=seed)
    folder = root / exp.name
    folder.mkdir(parents=True, exist_ok=True)
    if pred is not None:
        pred = pred.assign(y_pred=(pred["y_prob"] >= threshold).astype(int))
        pred.to_csv(folder / "predictions.csv", index=False)
        metrics = M.evaluate(pred["y_true"], pred["y_prob"], threshold)
        with warnings.catch_warnings():  # thresholds above every probability: documented 0.0 precision
            warnings.simplefilter("ignore", M.UndefinedMetricWarning)
            table = M.threshold_table(pred["y_true"], pred["y_prob"])
        pd.concat([table.add_prefix("val_").rename(columns={"val_threshold": "threshold"}),
                   table.drop(columns="threshold").add_prefix("test_")], axis=1).to_csv(
            folder / "threshold_optimization.csv", index=False)
    metrics = {"latency_ms": latency, **(metrics or {})}
    res = {
        "experiment": {"name": exp.name, "flare_class": exp.target.flare_class, "horizon_hours": exp.target.horizon,
                       "target": str(exp.target), "seed": seed},
        "threshold": {"source": "validation", "selected": threshold, "validation": threshold,
                      "oracle_test": oracle_threshold if oracle_threshold is not None else threshold},
        "test_metrics": metrics, "oracle_test_metrics": oracle or metrics,
        "validation_metrics": metrics if val_tss is None else {**metrics, "tss": val_tss},
        "training": {"best_epoch": 2, "epochs_run": 3, "stop_reason": "max_epochs", "seconds": 1.0},
        "data": {"n_test": int(len(pred)) if pred is not None else 0},
        "history": [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "val_tss": 0.2 * e} for e in (1, 2, 3)],
        "provenance": {"config_hash": config_hash, "data_hashes": {f"testing_data_{target}.csv": data_hash},
                       "code_version": code_version, "everest": "0.1.0", "python": "3.11", "device": "cpu"},
    }
    (folder / "results.json").write_text(json.dumps(res))
    return folder


def write_failure(root: Path, target: str, seed: int, error: str = "CUDA out of memory") -> Path:
    exp = Experiment(target=Target.parse(target), seed=seed)
    folder = root / exp.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "failure.json").write_text(json.dumps({"experiment": exp.name, "target": target, "seed": seed,
                                                     "error_type": "RuntimeError", "error": error,
                                                     "time": "2026-01-01T00:00:00"}))
    return folder


def fixed(tss: float, **extra: float) -> dict[str, float]:
    base = {"accuracy": 0.8, "precision": 0.5, "recall": 0.7, "specificity": 0.9, "f1": 0.6, "roc_auc": 0.9,
            "brier": 0.1, "ece": 0.05}
    return {"tss": tss, **base, **extra}


# ---------------------------------------------------------------------------------------------------------------------
# Seed statistics


def test_seed_summary_matches_scipy():
    v = np.array([0.71, 0.75, 0.80, 0.72, 0.93])
    s = st.seed_summary(v)
    lo, hi = sps.t.interval(0.95, df=4, loc=v.mean(), scale=sps.sem(v))
    assert s["n"] == 5
    assert s["mean"] == pytest.approx(v.mean()) and s["std"] == pytest.approx(np.std(v, ddof=1))
    assert (s["min"], s["median"], s["max"]) == (0.71, 0.75, 0.93)
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    s90 = st.seed_summary(v, confidence=0.9)
    assert s90["ci_high"] - s90["ci_low"] < hi - lo


def test_seed_summary_degenerate_cases_are_nan_not_errors():
    one = st.seed_summary([0.5])
    assert one["n"] == 1 and one["mean"] == 0.5 and one["median"] == 0.5
    assert np.isnan(one["std"]) and np.isnan(one["ci_low"]) and np.isnan(one["ci_high"])
    none = st.seed_summary([])
    assert none["n"] == 0 and np.isnan(none["mean"])
    nan_auc = st.seed_summary([0.8, np.nan, 0.9])  # an undefined AUC is not a seed's score
    assert nan_auc["n"] == 2 and nan_auc["mean"] == pytest.approx(0.85)
    const = st.seed_summary([0.4, 0.4, 0.4])
    assert const["std"] == pytest.approx(0, abs=1e-12) and const["ci_low"] == pytest.approx(const["ci_high"])


def test_summary_statistics_every_metric_vs_hand_values(tmp_path):
    tss = [0.6, 0.7, 0.8, 0.75, 0.65]
    thr = [0.4, 0.5, 0.6, 0.5, 0.5]
    for seed, (t, h) in enumerate(zip(tss, thr, strict=True)):
        write_experiment(tmp_path, "M-24", seed, metrics=fixed(t, f1=0.5 + seed / 10), threshold=h,
                         latency=0.1 * (seed + 1))
    write_experiment(tmp_path, "C-24", 0, metrics=fixed(0.9))  # one seed: CI undefined, no crash
    a = ProductionAnalyzer(tmp_path, tmp_path / "out", targets=["C-24", "M-24"], n_bootstrap=N_BOOT)
    s = a.summary_statistics.set_index("target")
    m = s.loc["M-24"]
    lo, hi = sps.t.interval(0.95, df=4, loc=np.mean(tss), scale=sps.sem(tss))
    assert m["n_seeds"] == 5 and m["tss_n"] == 5
    assert m["tss_mean"] == pytest.approx(0.7) and m["tss_std"] == pytest.approx(np.std(tss, ddof=1))
    assert (m["tss_ci_low"], m["tss_ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert (m["tss_min"], m["tss_median"], m["tss_max"]) == (0.6, 0.7, 0.8)
    assert m["f1_mean"] == pytest.approx(0.7) and m["latency_ms_max"] == pytest.approx(0.5)
    assert m["threshold_mean"] == pytest.approx(0.5) and m["threshold_cv"] == pytest.approx(np.std(thr, ddof=1) / 0.5)
    c = s.loc["C-24"]
    assert c["n_seeds"] == 1 and c["tss_mean"] == 0.9 and np.isnan(c["tss_std"]) and np.isnan(c["tss_ci_low"])
    assert c["n_missing"] == 4 and m["n_missing"] == 0
    for metric in ("tss", "accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "brier", "ece",
                   "latency_ms", "threshold"):
        for stat in st.seed_summary([1.0]):
            assert f"{metric}_{stat}" in s.columns


def test_holm_and_effect_sizes_by_hand():
    adj = st.holm([0.01, 0.04, 0.03, 0.005, np.nan])
    # sorted: .005*4=.02, .01*3=.03, .03*2=.06, .04*1=.04 -> running max .06
    np.testing.assert_allclose(adj[:4], [0.03, 0.06, 0.06, 0.02])
    assert np.isnan(adj[4])
    assert st.holm([0.6, 0.9]).tolist() == [1.0, 1.0]
    a, b = [1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 1.0]
    pooled = np.sqrt((2 * 1.0 + 3 * np.var(b, ddof=1)) / 5)
    assert st.hedges_g(a, b) == pytest.approx((2.0 - 1.0) / pooled * (1 - 3 / (4 * 7 - 9)))
    assert np.isnan(st.hedges_g([1.0], b))
    assert st.cohens_dz([0.1, 0.2, 0.3]) == pytest.approx(0.2 / 0.1)
    assert np.isnan(st.cohens_dz([0.1]))


def test_threshold_stability_and_protocol_inflation_by_hand(tmp_path):
    thr, tss, otss = [0.4, 0.5, 0.6], [0.5, 0.6, 0.8], [0.7, 0.7, 0.8]
    for s in range(3):
        write_experiment(tmp_path, "M5-72", s, metrics=fixed(tss[s]), threshold=thr[s],
                         oracle=fixed(otss[s], f1=0.7), oracle_threshold=0.3)
    a = ProductionAnalyzer(tmp_path, tmp_path / "o", targets=["M5-72"], seeds=[0, 1, 2], n_bootstrap=N_BOOT)
    ts = a.threshold_stability.iloc[0]
    assert ts["threshold_mean"] == pytest.approx(0.5) and ts["threshold_std"] == pytest.approx(0.1)
    assert ts["threshold_cv"] == pytest.approx(0.2) and ts["oracle_threshold_mean"] == pytest.approx(0.3)
    assert ts["corr_threshold_tss"] == pytest.approx(sps.pearsonr(thr, tss)[0])
    inf = a.protocol_inflation.iloc[0]
    assert inf["tss_inflation_mean"] == pytest.approx(np.mean(np.subtract(otss, tss)))
    assert inf["tss_inflation_std"] == pytest.approx(np.std(np.subtract(otss, tss), ddof=1))
    assert inf["f1_inflation_mean"] == pytest.approx(0.1) and inf["tss_oracle"] == pytest.approx(np.mean(otss))


# ---------------------------------------------------------------------------------------------------------------------
# Region-block bootstrap


def test_unit_statistics_reproduce_the_metrics_module():
    pred = region_data(np.random.default_rng(1))
    yhat = pred["y_prob"] >= 0.5
    u = st.unit_statistics(pred["y_true"], yhat, pred["y_prob"], pred["noaa_ar"])
    ref = M.evaluate(pred["y_true"], pred["y_prob"], 0.5)
    assert u.ids.size == 30 and u.totals[:4].tolist() == [ref["tp"], ref["fp"], ref["tn"], ref["fn"]]
    for m in st.BOOTSTRAP_METRICS:
        assert st.metric_from_totals(m, u.totals) == pytest.approx(ref[m])


def test_bootstrap_totals_equal_an_explicit_resampling_loop():
    pred = region_data(np.random.default_rng(2), n_regions=12, rows=5)
    u = st.unit_statistics(pred["y_true"], pred["y_prob"] >= 0.5, pred["y_prob"], pred["noaa_ar"])
    got = st.bootstrap_totals(u.stats[None], 50, np.random.default_rng(7))[0]
    draws = np.random.default_rng(7).integers(0, 12, size=(50, 12))  # the same stream, drawn by hand
    want = np.array([u.stats[d].sum(axis=0) for d in draws])
    np.testing.assert_allclose(got, want)
    w = st.resample_weights(12, 50, np.random.default_rng(7))
    assert (w.sum(axis=1) == 12).all()


def _ci_width(pred: pd.DataFrame, units: np.ndarray, seed: int = 0) -> float:
    u = st.unit_statistics(pred["y_true"], pred["y_prob"] >= 0.5, pred["y_prob"], units)
    boot = st.bootstrap_target([u], 2000, np.random.default_rng(seed))
    return boot.pooled["tss"].high - boot.pooled["tss"].low


def test_region_bootstrap_is_wider_than_iid_rows_for_correlated_data():
    pred = region_data(np.random.default_rng(3), n_regions=60, rows=50)
    region = _ci_width(pred, pred["noaa_ar"].to_numpy())
    rows = _ci_width(pred, np.arange(len(pred)))
    assert region > 3 * rows  # 50 near-duplicate rows per region: roughly sqrt(50) ~ 7x
    # Control: when rows are independent the two bootstraps agree.
    rng = np.random.default_rng(4)
    iid = pd.DataFrame({"y_true": rng.random(3000) < 0.4})
    iid["y_prob"] = np.clip(0.5 + 0.2 * (2 * iid["y_true"] - 1) + rng.normal(0, 0.25, 3000), 0, 1)
    ratio = _ci_width(iid, rng.integers(0, 60, 3000)) / _ci_width(iid, np.arange(3000))
    assert 0.7 < ratio < 1.4


def test_pooled_bootstrap_and_determinism():
    rng = np.random.default_rng(5)
    parts = []
    for _ in range(3):
        p = region_data(rng)
        parts.append(st.unit_statistics(p["y_true"], p["y_prob"] >= 0.5, p["y_prob"], p["noaa_ar"]))
    b1 = st.bootstrap_target(parts, 500, np.random.default_rng(0))
    b2 = st.bootstrap_target(parts, 500, np.random.default_rng(0))
    assert b1 == b2
    est = [st.metric_from_totals("tss", p.totals) for p in parts]
    assert b1.pooled["tss"].estimate == pytest.approx(np.mean(est))
    assert all(b1.per_seed[i]["tss"].estimate == pytest.approx(est[i]) for i in range(3))
    assert b1.pooled["tss"].low <= b1.pooled["tss"].estimate <= b1.pooled["tss"].high
    assert b1.n_units == 30 and b1.pooled["tss"].n_boot == 500


# ---------------------------------------------------------------------------------------------------------------------
# Significance tests


def _units(pred: pd.DataFrame) -> st.UnitStats:
    return st.unit_statistics(pred["y_true"], pred["y_prob"] >= 0.5, pred["y_prob"], pred["noaa_ar"])


def test_paired_comparison_identical_better_and_mismatched():
    rng = np.random.default_rng(6)
    base = {s: region_data(np.random.default_rng(100 + s), skill=0.1) for s in range(3)}
    same = st.compare_paired({s: _units(p) for s, p in base.items()}, {s: _units(p) for s, p in base.items()},
                             500, rng)
    assert same["delta"] == 0 and same["p_value"] == 1.0 and same["n_pairs"] == 3
    perfect = {s: p.assign(y_prob=p["y_true"] * 0.9 + 0.05) for s, p in base.items()}
    better = st.compare_paired({s: _units(p) for s, p in base.items()}, {s: _units(p) for s, p in perfect.items()},
                               500, rng)
    assert better["delta"] > 0.2 and better["p_value"] < 0.01 and better["ci_low"] > 0
    other = {0: _units(region_data(np.random.default_rng(999)))}
    with pytest.raises(ValueError, match="same test samples"):
        st.compare_paired({0: _units(base[0])}, other, 100, rng)
    with pytest.raises(ValueError, match="no seed in common"):
        st.compare_paired({0: _units(base[0])}, {1: _units(base[0])}, 100, rng)


def test_horizon_comparison_detects_a_real_gap_with_holm(tmp_path):
    for s in range(3):
        write_experiment(tmp_path, "C-24", s, region_data(np.random.default_rng(s), skill=0.35))
        write_experiment(tmp_path, "C-48", s, region_data(np.random.default_rng(10 + s), skill=0.33))
        write_experiment(tmp_path, "C-72", s, region_data(np.random.default_rng(20 + s), skill=0.02))
    a = ProductionAnalyzer(tmp_path, tmp_path / "o", targets=["C-24", "C-48", "C-72"], seeds=[0, 1, 2],
                           n_bootstrap=1000)
    h = a.horizon_comparisons.set_index("comparison")
    assert list(h.index) == ["C: 24 h vs 48 h", "C: 24 h vs 72 h", "C: 48 h vs 72 h"]
    far = h.loc["C: 24 h vs 72 h"]
    raw = a.analysed_frame.groupby("target")["tss"].mean()
    assert far["delta"] == pytest.approx(raw["C-24"] - raw["C-72"])
    assert far["delta"] > 0.3 and far["significant"] and far["p_holm"] >= far["p_value"]
    assert far["hedges_g"] > 0
    np.testing.assert_allclose(h["p_holm"], st.holm(h["p_value"].to_numpy()))
    assert not h.loc["C: 24 h vs 48 h", "significant"]


def test_baseline_comparison_of_two_results_dirs(tmp_path):
    for s in range(3):
        pred = region_data(np.random.default_rng(s), skill=0.05)
        write_experiment(tmp_path / "base", "M-24", s, pred)
        write_experiment(tmp_path / "cand", "M-24", s, pred.assign(y_prob=pred["y_true"] * 0.8 + 0.1),
                         config_hash="cfg1")
    a = ProductionAnalyzer(tmp_path / "cand", tmp_path / "o", targets=["M-24"], seeds=[0, 1, 2], n_bootstrap=500,
                           baseline_dir=tmp_path / "base")
    row = a.baseline_comparisons.iloc[0]
    assert row["delta"] > 0 and row["p_value"] < 0.01 and row["significant"] and row["n_pairs"] == 3
    direct = compare_result_sets(load_results(tmp_path / "base", ["M-24"], [0, 1, 2]),
                                 load_results(tmp_path / "cand", ["M-24"], [0, 1, 2]), 500)
    assert direct.iloc[0]["delta"] == pytest.approx(row["delta"])
    a.run_complete_analysis()
    assert "Candidate vs baseline" in (tmp_path / "o" / "analysis" / "production_training_report.md").read_text()


# ---------------------------------------------------------------------------------------------------------------------
# Partial, failed, unexpected and mixed results


def test_partial_results_are_sorted_and_listed(tmp_path):
    rng = np.random.default_rng(8)
    for s in range(3):
        write_experiment(tmp_path, "M-48", s, region_data(rng))
    write_failure(tmp_path, "M-48", 3)
    write_experiment(tmp_path, "M-48", 4, region_data(rng))
    write_failure(tmp_path, "M-48", 4)  # a rerun failed beside earlier results: the latest attempt failed
    write_experiment(tmp_path, "M-48", 7, region_data(rng))  # outside the expected seeds
    (tmp_path / "everest_M_72h_seed0").mkdir()  # started, never finished: missing
    bad = tmp_path / "everest_M_72h_seed1"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    rs = load_results(tmp_path, targets=["M-48", "M-72"])
    assert [r.seed for r in rs.analysed] == [0, 1, 2] and [r.name for r in rs.unexpected] == ["everest_M_48h_seed7"]
    assert sorted(f.error_type for f in rs.failed) == ["RuntimeError", "RuntimeError", "UnreadableResults"]
    assert [e.name for e in rs.missing] == [f"everest_M_72h_seed{s}" for s in (0, 2, 3, 4)]
    a = ProductionAnalyzer(tmp_path, tmp_path / "o", targets=["M-48", "M-72"], n_bootstrap=N_BOOT, make_plots=False)
    summary = a.run_complete_analysis()
    assert summary.n_completed == 3 and summary.n_failed == 3 and summary.n_missing == 4
    raw = pd.read_csv(summary.raw_results)
    assert raw["status"].value_counts().to_dict() == {"completed": 3, "missing": 4, "failed": 3, "unexpected": 1}
    text = Path(summary.report).read_text()
    status = text.split("## Overall statistics")[0]  # failures and gaps are listed before any statistic
    assert "3 of 10 expected experiments finished; 3 failed; 4 missing." in status
    for name in ["everest_M_48h_seed3", "everest_M_48h_seed4", "everest_M_72h_seed0", "everest_M_48h_seed7",
                 "CUDA out of memory"]:
        assert name in status


def test_without_regions_the_bootstrap_resamples_row_blocks(tmp_path):
    pred = region_data(np.random.default_rng(11), n_regions=10, rows=24)
    write_experiment(tmp_path, "M-24", 0, pred.drop(columns="noaa_ar"))
    a = ProductionAnalyzer(tmp_path, tmp_path / "o", targets=["M-24"], seeds=[0], n_bootstrap=N_BOOT)
    assert any("contiguous blocks" in n for n in a.results.analysed[0].notes)
    assert a.bootstrap["M-24"].n_units == 2  # 240 rows in blocks of 120 (one day at the 12-minute cadence)
    row = a.summary_statistics.iloc[0]
    assert row["pooled_boot_tss_low"] <= row["tss_mean"] <= row["pooled_boot_tss_high"]


def test_partial_retrain_reports_the_stale_experiments(tmp_path):
    """C-72 seeds 0-2 retrained with config bbbb, seeds 3-4 left from config aaaa: the report is produced,
    names seeds 3 and 4 as stale and keeps them out of the statistics."""
    rng = np.random.default_rng(9)
    for s in range(5):
        write_experiment(tmp_path, "C-72", s, region_data(rng), config_hash="bbbb" if s < 3 else "aaaa")
    a = ProductionAnalyzer(tmp_path, tmp_path / "o", targets=["C-72"], n_bootstrap=N_BOOT, make_plots=False)
    summary = a.run_complete_analysis()
    stale = ["everest_C_72h_seed3", "everest_C_72h_seed4"]
    assert list(summary.stale) == stale and summary.stale[stale[0]] == "config aaaa (the run's: bbbb)"
    assert (summary.n_completed, summary.n_stale) == (3, 2) and [r.seed for r in a.results.analysed] == [0, 1, 2]
    status = Path(summary.report).read_text().split("## Overall statistics")[0]
    assert "3 of 5 expected experiments finished; 0 failed; 0 missing; 2 stale." in status
    assert "### Stale results (2; listed, not in the statistics)" in status
    assert all(f"* `{name}`: config aaaa (the run's: bbbb)" in status for name in stale)
    raw = pd.read_csv(summary.raw_results).set_index("experiment")
    assert list(raw["status"]) == ["completed"] * 3 + ["stale"] * 2
    assert a.summary_statistics.iloc[0]["config_hashes"] == "bbbb"
    assert a.results.select("aaaa").analysed[0].seed == 3  # the old configuration alone, for a comparison
    assert cli_main(["--results-dir", str(tmp_path), "--targets", "C-72", "--bootstrap", "100", "--no-plots"]) == 0


def test_stale_code_version_data_files_and_ties(tmp_path):
    rng = np.random.default_rng(10)
    write_experiment(tmp_path, "C-72", 0, region_data(rng), code_version="everest-0")
    write_experiment(tmp_path, "C-72", 1, region_data(rng))
    write_experiment(tmp_path, "C-72", 2, region_data(rng))
    write_experiment(tmp_path, "M-24", 0, region_data(rng))
    write_experiment(tmp_path, "M-24", 1, region_data(rng))
    write_experiment(tmp_path, "M-24", 2, region_data(rng), data_hash="d1")
    rs = load_results(tmp_path, targets=["C-72", "M-24"], seeds=[0, 1, 2])
    assert rs.stale == {"everest_C_72h_seed0": f"code version everest-0 (the run's: {CODE_VERSION})",
                        "everest_M_24h_seed2": "data files testing_data_M-24.csv differ from the other seeds of M-24"}
    # One result per configuration: the newest (what a partial retrain wrote last) is the run's.
    tie = tmp_path / "tie"
    old = write_experiment(tie, "C-72", 0, region_data(rng), config_hash="aaaa") / "results.json"
    write_experiment(tie, "C-72", 1, region_data(rng), config_hash="bbbb")
    os.utime(old, (old.stat().st_mtime - 60, old.stat().st_mtime - 60))
    assert load_results(tie, targets=["C-72"], seeds=[0, 1]).stale == {
        "everest_C_72h_seed0": "config aaaa (the run's: bbbb)"}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_bootstrap": 0}, "n_bootstrap must be an integer >= 100, got 0"),
    ({"n_bootstrap": True}, "n_bootstrap must be an integer"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"confidence": 1.5}, "confidence must be a number strictly between 0 and 1, got 1.5"),
    ({"targets": ["X-1"]}, "invalid target 'X-1'"),
    ({"seeds": [-2]}, "seeds\\[i\\] must be an integer >= 0, got -2"),
])
def test_bad_arguments_name_the_parameter(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ProductionAnalyzer(tmp_path, **kwargs)


def test_missing_results_dir_and_empty_dir(tmp_path):
    with pytest.raises(AnalysisError, match="is not a directory"):
        ProductionAnalyzer(tmp_path / "nope").run_complete_analysis()
    (tmp_path / "results").mkdir()
    assert cli_main(["--results-dir", str(tmp_path / "results"), "--bootstrap", "100"]) == 1  # nothing finished
    text = (tmp_path / "analysis" / "production_training_report.md").read_text()
    assert "0 of 45 expected experiments finished" in text and "everest_M5_72h_seed4" in text


def test_analysis_of_45_constructed_experiments_is_fast(tmp_path):
    """All 45 experiments with a region bootstrap run in seconds (vectorised), the default targets and seeds."""
    for exp_ in [Experiment.from_array_index(k) for k in range(1, 46)]:
        write_experiment(tmp_path, str(exp_.target), exp_.seed,
                         region_data(np.random.default_rng(exp_.array_index), n_regions=20, rows=30))
    a = ProductionAnalyzer(tmp_path, tmp_path / "o", n_bootstrap=1000, make_plots=False)
    summary = a.run_complete_analysis()
    assert summary.n_completed == 45 and summary.n_missing == 0 and summary.seconds < 30
    assert len(a.horizon_comparisons) == 9 and len(pd.read_csv(summary.summary_statistics)) == 9


# ---------------------------------------------------------------------------------------------------------------------
# End to end on real (tiny) training results


@pytest.fixture(scope="session")
def real_results(tmp_path_factory) -> Path:
    """M-24 seeds 0-2 and C-24 seeds 0-1 trained for real, C-24 seed 2 failed, M5-24 never ran (3 missing)."""
    from everest.data import synthetic
    from everest.training.train import ProductionTrainer

    base = tmp_path_factory.mktemp("analysis-real")
    synthetic.generate(base / "data", size="tiny", seed=0)
    cfg = EverestConfig().with_overrides(overrides("train.epochs=2", ONE_THREAD))
    for cls, seeds in (("M", (0, 1, 2)), ("C", (0, 1))):
        for s in seeds:
            ProductionTrainer(Experiment.of(f"{cls}-24", s), config=cfg, data_dir=base / "data",
                              output_dir=base / "out").train()
    write_failure(base / "out" / "results", "C-24", 2, error="TrainingDiverged: loss became nan")
    return base / "out" / "results"


REAL_ARGS = ["--targets", "C-24", "M-24", "M5-24", "--seeds", "0", "1", "2"]
EXPECTED_PANELS = {"performance": 4, "detailed": 9, "threshold": 4, "latency": 2, "reliability": 2, "roc_pr": 4,
                   "training": 4}


def test_end_to_end_on_real_results(real_results, tmp_path):
    out = tmp_path / "A"
    build_ensembles(real_results, out, [Target.parse(t) for t in ("C-24", "M-24", "M5-24")])  # the step before
    summary = ProductionAnalyzer(real_results, out, targets=["C-24", "M-24", "M5-24"], seeds=[0, 1, 2],
                                 n_bootstrap=500).run_complete_analysis()
    assert (summary.n_completed, summary.n_failed, summary.n_missing) == (5, 1, 3)
    assert summary.plot_panels == EXPECTED_PANELS
    for key, path in summary.plots.items():
        assert Path(path).stat().st_size > 10_000, key
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = Path(summary.report)
    assert report == out / "analysis" / "production_training_report.md"
    text = report.read_text()
    for needle in ("everest_C_24h_seed2", "TrainingDiverged", "everest_M5_24h_seed0", "everest_M5_24h_seed2",
                   "bootstrap", "confidence interval", "Holm", "Provenance", "sha256", "protocol inflation"):
        assert needle.lower() in text.lower(), needle
    links = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert len(links) == len(summary.plots) and all((report.parent / link).resolve().is_file() for link in links)
    # the seed ensemble of every target with two finished seeds, its reliability diagram and calibration
    ens = pd.read_csv(out / "analysis" / "ensemble.csv").set_index("target")
    by_target = pd.read_csv(out / "analysis" / "raw_results.csv")
    raw_counts = by_target[by_target["status"] == "completed"].groupby("target").size()
    for t, n in raw_counts.items():
        if n >= 2:
            assert ens.loc[t, "members"] == n and f"reliability_{t}" in summary.plots
            assert 0 <= ens.loc[t, "brier"] and ens.loc[t, "tss_boot_ci_low"] <= ens.loc[t, "tss"]
        else:
            assert "at least two" in ens.loc[t, "note"]
    assert len(links) == 7 + int((raw_counts >= 2).sum())
    assert "## The seed ensemble and calibrated probabilities" in text and "calibrated" in text
    raw = pd.read_csv(out / "analysis" / "raw_results.csv")
    assert len(raw) == 9
    done = raw[raw["status"] == "completed"]
    for r in done.itertuples():  # bootstrap estimates rest on the same numbers as results.json
        res = json.loads((real_results / r.experiment / "results.json").read_text())
        assert r.tss == pytest.approx(res["test_metrics"]["tss"])
        assert r.boot_tss_low <= r.tss <= r.boot_tss_high
    s = pd.read_csv(out / "analysis" / "summary_statistics.csv").set_index("target")
    assert list(s.index) == ["C-24", "M-24", "M5-24"] and s.loc["M-24", "n_seeds"] == 3
    assert s.loc["M-24", "tss_mean"] == pytest.approx(done[done.target == "M-24"]["tss"].mean())
    assert s.loc["M5-24", "n_missing"] == 3 and s.loc["C-24", "n_failed"] == 1
    assert json.loads((out / "analysis" / "analysis_summary.json").read_text())["n_missing"] == 3


def test_run_analysis_returns_json_and_self_comparison_is_null(real_results, tmp_path):
    d = run_analysis(real_results, tmp_path, targets=["M-24"], seeds=[0, 1, 2], n_bootstrap=200,
                     baseline_dir=real_results, make_plots=False)
    json.dumps(d, allow_nan=False)
    assert d["n_completed"] == 3 and d["targets"][0]["target"] == "M-24" and d["targets"][0]["n"] == 3
    base = [c for c in d["comparisons"] if c["family"] == "baseline"][0]
    assert base["delta"] == 0 and base["p_value"] == 1.0


def test_command_line_module(real_results, tmp_path):
    res = subprocess.run([sys.executable, "-m", "everest.analysis", "--results-dir", str(real_results), "--out",
                          str(tmp_path), "--bootstrap", "200", "--no-plots", *REAL_ARGS],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "5/9 experiments analysed (1 failed, 3 missing)" in res.stdout
    assert (tmp_path / "analysis" / "summary_statistics.csv").is_file()
    bad = subprocess.run([sys.executable, "-m", "everest.analysis", "--results-dir", str(real_results),
                          "--bootstrap", "5"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "n_bootstrap must be an integer >= 100" in bad.stderr
