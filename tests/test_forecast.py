"""The scoring path every model shares (everest.scoring.forecast): calibration and threshold on validation, test
scored."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from everest.config import EverestConfig
from everest.scoring import metrics as M
from everest.scoring.forecast import Predictions, final_metrics_row, score_forecast, write_forecast

CFG = EverestConfig()


def _split(seed: int, n: int, distort: bool = False) -> tuple[Predictions, np.ndarray]:
    """Samples whose true probability p ~ Beta(2, 18) (base rate 0.1); the forecast is p, or a known distortion
    sigmoid(2 logit p + 1) of it (over-confident and over-forecasting, as focal loss with class weights is)."""
    rng = np.random.default_rng(seed)
    p = rng.beta(2, 18, n)
    y = (rng.random(n) < p).astype(np.int8)
    prob = 1 / (1 + np.exp(-(2 * np.log(p / (1 - p)) + 1))) if distort else p
    t = (np.datetime64("2016-01-01T00:00:00") + np.arange(n).astype("timedelta64[m]")).astype("datetime64[s]")
    return Predictions(y, prob, np.arange(n) // 20, np.arange(n), t), p


def test_calibrated_forecast_keeps_its_scale_and_thresholds_at_the_base_rate():
    (val, _), (test, _) = _split(0, 100_000), _split(1, 100_000)
    s = score_forecast(val, test, CFG)
    cal = s.sections["calibration"]
    assert cal["method"] == "platt" and cal["slope"] == pytest.approx(1, abs=0.03)
    assert cal["intercept"] == pytest.approx(0, abs=0.08)
    assert cal["test"]["brier"] == pytest.approx(cal["test"]["brier_raw"], rel=0.002)
    # TSS-optimal threshold of a calibrated forecast = the base rate E[p] = 0.1
    assert s.threshold == pytest.approx(0.1, abs=0.012)
    assert s.sections["threshold"]["at_grid_edge"] is False


def test_distorted_forecast_is_repaired_on_validation():
    (val, _), (test, p_test) = _split(2, 100_000, distort=True), _split(3, 100_000, distort=True)
    s = score_forecast(val, test, CFG)
    cal = s.sections["calibration"]
    # the inverse of the distortion: slope 1/2, intercept -1/2
    assert cal["slope"] == pytest.approx(0.5, abs=0.02) and cal["intercept"] == pytest.approx(-0.5, abs=0.06)
    assert cal["test"]["brier"] < cal["test"]["brier_raw"] - 0.002
    assert cal["test"]["brier"] == pytest.approx(M.brier(test.y, p_test), rel=0.005)
    assert cal["test"]["ece"] < 0.01 < cal["test"]["ece_raw"]
    # on the calibrated scale the threshold is again the base rate; a monotone map leaves TSS where it was
    assert s.threshold == pytest.approx(0.1, abs=0.012)
    assert s.sections["test_metrics"]["tss"] == pytest.approx(M.tss(test.y, p_test, s.threshold), abs=0.02)
    assert s.sections["test_metrics"]["brier_raw"] == cal["test"]["brier_raw"]


def test_design_grid_is_kept_by_name_and_flags_its_edge():
    (val, _), (test, _) = _split(4, 20_000), _split(5, 20_000)
    low = [Predictions(x.y, x.prob * 0.5, x.region, x.row, x.time) for x in (val, test)]  # useful p below 0.10
    design = EverestConfig().with_overrides(["threshold.grid=design", "threshold.score=balanced",
                                             "calibration.method=none"])
    s = score_forecast(*low, design)
    assert s.sections["threshold"]["grid"] == "design" and s.threshold == 0.1
    assert s.sections["threshold"]["at_grid_edge"] is True and len(s.val_table) == 81
    ours = score_forecast(*low, EverestConfig().with_overrides(["calibration.method=none"]))
    assert ours.threshold < 0.1 and ours.sections["threshold"]["at_grid_edge"] is False
    assert ours.sections["test_metrics"]["tss"] > s.sections["test_metrics"]["tss"] + 0.05


def test_saturating_calibration_does_not_merge_decisions():
    # A validation split the model separates perfectly: calibration may be steep, but decisions and ROC AUC
    # come from the raw scores, so test samples with different scores are never tied by the map.
    rng = np.random.default_rng(11)
    y = (rng.random(4000) < 0.05).astype(np.int8)
    raw = np.where(y == 1, rng.uniform(0.6, 0.99, y.size), rng.uniform(0.01, 0.5, y.size))
    t = (np.datetime64("2016-01-01T00:00:00") + np.arange(y.size).astype("timedelta64[m]")).astype("datetime64[s]")
    val = Predictions(y, raw, np.arange(y.size) // 20, np.arange(y.size), t)
    test = Predictions(y[::-1].copy(), rng.permutation(raw), val.region, val.row, t)
    s = score_forecast(val, test, CFG)
    assert s.sections["calibration"]["slope"] < 100  # smoothed targets: no run to the bound
    assert s.sections["test_metrics"]["roc_auc"] == pytest.approx(M.roc_auc(test.y, test.prob))
    assert 0.5 < s.raw_threshold <= 0.6  # midway between the highest negative and the lowest positive


def test_oracle_is_the_best_test_tss_and_test_source_uses_it():
    (val, _), (test, _) = _split(6, 5_000), _split(7, 5_000)
    s = score_forecast(val, test, CFG)
    assert s.sections["oracle_test_metrics"]["tss"] == pytest.approx(M.max_tss(test.y, test.prob))
    assert s.sections["oracle_test_metrics"]["tss"] >= s.sections["test_metrics"]["tss"]
    assert "oracle" in s.sections["threshold"]["note"]
    published = score_forecast(val, test, EverestConfig().with_overrides(["threshold.source=test"]))
    assert published.threshold == published.sections["threshold"]["oracle_test"]


def test_files_round_trip(tmp_path):
    (val, _), (test, _) = _split(8, 3_000), _split(9, 2_000)
    s = score_forecast(val, test, CFG)
    res = {"experiment": {"name": "everest_M_24h_seed0", "target": "M-24", "seed": 0}, **s.sections,
           "provenance": {"config_hash": "abc"}}
    write_forecast(tmp_path, s, val, test, final_metrics_row(res, best_epoch=3))
    pred = pd.read_csv(tmp_path / "predictions.csv")
    assert list(pred.columns[:7]) == ["y_true", "y_prob", "y_prob_raw", "y_pred", "noaa_ar", "row", "time"]
    assert (pred.y_pred == (pred.y_prob_raw >= s.raw_threshold)).all()
    assert (pred.y_pred == (pred.y_prob >= s.threshold)).all()  # the same decisions: Platt is increasing
    again = Predictions.read(tmp_path / "val_predictions.csv")
    np.testing.assert_array_equal(again.y, val.y)
    np.testing.assert_allclose(again.prob, val.prob, rtol=1e-15)
    np.testing.assert_array_equal(again.time, val.time)
    final = pd.read_csv(tmp_path / "final_metrics.csv").iloc[0]
    assert final.oracle_max_tss == pytest.approx(s.sections["oracle_test_metrics"]["tss"]) and final.best_epoch == 3
    sweep = pd.read_csv(tmp_path / "threshold_optimization.csv")
    assert {"threshold", "threshold_calibrated", "val_tss", "test_tss"} <= set(sweep.columns)
    assert len(sweep) == min(81, len(s.val_table)) and s.raw_threshold in sweep.threshold.to_numpy()
    with pytest.raises(ValueError, match="missing columns"):
        Predictions.read(tmp_path / "final_metrics.csv")
