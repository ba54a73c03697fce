"""Tests for everest.scoring.calibration and plots.plot_reliability: known distortions inverted, hand-computed isotonic,
JSON round trips, input validation, ECE-consistent reliability bins and group-disjoint out-of-fold comparison."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit

import everest.scoring.calibration as cal
from everest.analysis.plots import plot_reliability
from everest.scoring.calibration import (
    METHODS,
    Calibrator,
    choose_method,
    compare_methods,
    fit_calibrator,
    group_folds,
    reliability_table,
)
from everest.scoring.metrics import ECE_BINS, brier, ece


def _calibrated_sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """p_true ~ U(0, 1) and y ~ Bernoulli(p_true): p_true is perfectly calibrated for y."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.0, 1.0, n)
    return (rng.uniform(0.0, 1.0, n) < p).astype(int), p


@pytest.fixture(scope="module")
def big() -> tuple[np.ndarray, np.ndarray]:
    return _calibrated_sample(200_000, seed=1)


# ---------------------------------------------------------------------------------------------------------------------
# Parametric fits recover known distortions (n = 200k: standard errors of T, slope, intercept are ~0.005)


def test_calibrated_input_is_left_alone(big):
    y, p = big
    assert fit_calibrator(y, p, "temperature").temperature == pytest.approx(1.0, abs=0.03)
    platt = fit_calibrator(y, p, "platt")
    assert platt.slope == pytest.approx(1.0, abs=0.03)
    assert platt.intercept == pytest.approx(0.0, abs=0.03)


def test_temperature_undoes_overconfidence(big):
    # Logits doubled (sigmoid(logit / 0.5)): the map sigmoid(logit / T) that undoes this has T = 2.
    y, p_true = big
    p_model = expit(logit(p_true) / 0.5)
    c = fit_calibrator(y, p_model, "temperature")
    assert c.temperature == pytest.approx(2.0, abs=0.06)
    assert brier(y, c.apply(p_model)) < brier(y, p_model)
    np.testing.assert_allclose(c.apply(p_model), p_true, atol=0.05)


def test_platt_inverts_affine_logit_distortion(big):
    # p_model = sigmoid(2 logit(p) + 1)  =>  logit(p) = 0.5 logit(p_model) - 0.5.
    y, p_true = big
    p_model = expit(2.0 * logit(p_true) + 1.0)
    c = fit_calibrator(y, p_model, "platt")
    assert c.slope == pytest.approx(0.5, abs=0.02)
    assert c.intercept == pytest.approx(-0.5, abs=0.03)
    assert brier(y, c.apply(p_model)) < brier(y, p_model)


def test_platt_is_deterministic():
    y, p = _calibrated_sample(5_000, seed=2)
    assert fit_calibrator(y, p ** 2, "platt") == fit_calibrator(y, p ** 2, "platt")


# ---------------------------------------------------------------------------------------------------------------------
# Isotonic


def test_isotonic_hand_computed_and_clipped():
    # Pool adjacent violators on y = [0, 1, 0, 1]: (1, 0) is a violation, pooled to 0.5 each.
    c = fit_calibrator([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], "isotonic")
    np.testing.assert_allclose(c.apply([0.1, 0.2, 0.3, 0.4]), [0.0, 0.5, 0.5, 1.0])
    assert c.apply([0.25])[0] == pytest.approx(0.5)
    assert c.apply([0.35])[0] == pytest.approx(0.75)  # linear between breakpoints, like sklearn's predict
    np.testing.assert_allclose(c.apply([0.0, 0.05, 0.9, 1.0]), [0.0, 0.0, 1.0, 1.0])  # clipped outside the range


def test_isotonic_matches_sklearn_predict():
    from sklearn.isotonic import IsotonicRegression

    y, p = _calibrated_sample(2_000, seed=3)
    p = p ** 3
    c = fit_calibrator(y, p, "isotonic")
    ref = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(p, y)
    grid = np.linspace(0.0, 1.0, 1001)
    np.testing.assert_allclose(c.apply(grid), ref.predict(grid), atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_monotone_into_unit_interval(method):
    y, p = _calibrated_sample(3_000, seed=4)
    c = fit_calibrator(y, expit(3.0 * logit(np.clip(p, 1e-6, 1 - 1e-6)) - 1.0), method)
    grid = np.concatenate([[0.0, 1e-12, 1e-7], np.linspace(0.0, 1.0, 2001), [1 - 1e-7, 1.0]])
    grid.sort()
    out = c.apply(grid)
    assert out.dtype == np.float64 and out.shape == grid.shape
    assert np.all((out >= 0.0) & (out <= 1.0))
    assert np.all(np.diff(out) >= 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Serialisation, degenerate labels, validation


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_through_json(method):
    y, p = _calibrated_sample(1_000, seed=5)
    c = fit_calibrator(y, p ** 2, method)
    assert c.method == method
    back = Calibrator.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c
    np.testing.assert_array_equal(back.apply(p), c.apply(p))


def test_one_class_labels_give_identity_with_note():
    c = fit_calibrator([1, 1, 1], [0.2, 0.5, 0.9], "platt")
    assert c.method == "none"
    assert "one class" in c.note
    np.testing.assert_array_equal(c.apply([0.2, 0.5, 0.9]), [0.2, 0.5, 0.9])
    assert Calibrator.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize(("y", "p", "method", "match"), [
    ([0, 1], [0.5], "platt", "same length"),
    ([0, 2], [0.5, 0.5], "platt", "binary"),
    ([0, 1], [0.5, 1.5], "platt", r"\[0, 1\]"),
    ([0, 1], [0.5, np.nan], "platt", "finite"),
    ([0, 1], [0.5, np.inf], "isotonic", "finite"),
    ([], [], "platt", "at least one"),
    ([[0, 1]], [[0.5, 0.5]], "platt", "1-D"),
    ([0, 1], [0.2, 0.8], "beta", "allowed: none, temperature, platt, isotonic"),
])
def test_bad_inputs_raise(y, p, method, match):
    with pytest.raises(ValueError, match=match):
        fit_calibrator(y, p, method)


def test_bad_calibrator_parameters_raise():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Calibrator("temperature", temperature=0.0)
    with pytest.raises(ValueError, match="slope"):
        Calibrator("platt", slope=-1.0)
    with pytest.raises(ValueError, match="unknown Calibrator field"):
        Calibrator.from_dict({"method": "none", "scale": 2.0})
    with pytest.raises(ValueError, match="strictly increasing"):
        Calibrator("isotonic", x=(0.5, 0.2), y=(0.1, 0.3))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Calibrator("none").apply([1.2])


# ---------------------------------------------------------------------------------------------------------------------
# Reliability bins


@pytest.mark.parametrize("n_bins", [1, 10, ECE_BINS])
def test_reliability_table_reproduces_ece(n_bins):
    y, p = _calibrated_sample(5_000, seed=6)
    p = np.concatenate([p ** 2, np.arange(n_bins + 1) / n_bins])  # every bin edge, 0.0 and 1.0 included
    y = np.concatenate([y, np.zeros(n_bins + 1, dtype=int)])
    t = reliability_table(y, p, n_bins)
    assert list(t.columns) == ["bin_lower", "bin_upper", "n", "mean_prob", "observed_frequency"]
    assert len(t) == n_bins and t["n"].sum() == y.size
    full = t[t["n"] > 0]
    from_table = float(np.sum(full["n"] / y.size * np.abs(full["mean_prob"] - full["observed_frequency"])))
    assert from_table == pytest.approx(ece(y, p, n_bins), abs=1e-12)


def test_reliability_table_edges_and_empty_bins():
    t = reliability_table([0, 1, 1], [0.0, 0.4, 1.0], n_bins=5)
    assert t["n"].tolist() == [1, 0, 1, 0, 1]  # 0.4 sits on an inner edge: the bin above; 1.0: the last bin
    assert t.loc[1, ["mean_prob", "observed_frequency"]].isna().all()
    assert t.loc[2, "mean_prob"] == pytest.approx(0.4)
    assert t["bin_lower"].tolist() == [0.0, 0.2, 0.4, 0.6, 0.8]


# ---------------------------------------------------------------------------------------------------------------------
# Group-disjoint comparison of methods


def _distorted_regions(n_regions: int = 40, per_region: int = 100, seed: int = 7):
    rng = np.random.default_rng(seed)
    y, p_true = _calibrated_sample(n_regions * per_region, seed)
    groups = rng.permutation(np.repeat(np.arange(11000, 11000 + n_regions), per_region))
    return y, expit(logit(np.clip(p_true, 1e-6, 1 - 1e-6)) / 0.5), groups


def test_group_folds_are_disjoint_and_cover_everything():
    groups = np.repeat(np.array(["a", "b", "c", "d", "e", "f", "g"]), [50, 10, 10, 20, 5, 5, 30])
    folds = group_folds(groups, folds=3, seed=0)
    assert len(folds) == 3
    assert np.array_equal(np.sort(np.concatenate(folds)), np.arange(groups.size))
    seen = [set(groups[f]) for f in folds]
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])
    assert [f.tolist() for f in group_folds(groups, 3, seed=0)] == [f.tolist() for f in folds]  # seeded


def test_group_folds_with_few_groups():
    assert len(group_folds([1, 1, 2, 2, 3], folds=5)) == 3
    with pytest.raises(ValueError, match="at least 2 distinct groups"):
        group_folds([4, 4, 4], folds=5)
    with pytest.raises(ValueError, match="folds must be an integer >= 2"):
        group_folds([1, 2], folds=1)


def test_compare_methods_ranks_real_methods_above_none():
    y, p, groups = _distorted_regions()
    table = compare_methods(y, p, groups, folds=5, seed=0)
    assert table["method"].tolist() == list(METHODS)
    assert list(table.columns) == ["method", "log_loss", "brier", "ece", "folds"]
    assert (table["folds"] == 5).all()
    scores = table.set_index("method")
    for m in ("temperature", "platt", "isotonic"):
        assert scores.loc[m, "brier"] < scores.loc["none", "brier"]
        assert scores.loc[m, "log_loss"] < scores.loc["none", "log_loss"]
    assert choose_method(table) in ("temperature", "platt")


def test_compare_methods_trains_on_other_regions_only(monkeypatch):
    # Each sample's probability is unique, so the fit's training probabilities identify its samples.
    y, p, groups = _distorted_regions(n_regions=12, per_region=30)
    p = p + np.linspace(0.0, 1e-9, p.size)  # break any ties
    p = np.clip(p, 0.0, 1.0)
    group_of = dict(zip(p.tolist(), groups.tolist(), strict=True))
    fits: list[set] = []
    real = cal.fit_calibrator

    def spy(y_tr, p_tr, method):
        fits.append({group_of[v] for v in np.asarray(p_tr).tolist()})
        return real(y_tr, p_tr, method)

    monkeypatch.setattr(cal, "fit_calibrator", spy)
    compare_methods(y, p, groups, methods=("platt",), folds=4)
    assert len(fits) == 4
    held_out = [set(groups.tolist()) - trained for trained in fits]
    assert all(held_out)  # a fold's regions are never in its training set
    assert sorted(g for h in held_out for g in h) == sorted(set(groups.tolist()))  # every region held out once


def test_compare_methods_validates():
    y, p, groups = _distorted_regions(n_regions=4, per_region=10)
    with pytest.raises(ValueError, match="one entry per sample"):
        compare_methods(y, p, groups[:-1])
    with pytest.raises(ValueError, match="allowed"):
        compare_methods(y, p, groups, methods=("none", "beta"))


def test_choose_method_breaks_ties_towards_simpler():
    table = pd.DataFrame({"method": ["isotonic", "platt", "none"], "brier": [0.1, 0.2, 0.1]})
    assert choose_method(table) == "none"
    table = pd.DataFrame({"method": ["isotonic", "temperature"], "brier": [0.1, 0.1 + 1e-15]})
    assert choose_method(table) == "temperature"
    with pytest.raises(ValueError, match="brier"):
        choose_method(pd.DataFrame({"method": ["none"]}))


# ---------------------------------------------------------------------------------------------------------------------
# Plot and layering


def test_plot_reliability_writes_png(tmp_path):
    y, p, _ = _distorted_regions(n_regions=10, per_region=50)
    c = fit_calibrator(y, p, "temperature")
    curves = {"EVEREST raw": reliability_table(y, p), "EVEREST calibrated": reliability_table(y, c.apply(p))}
    out = plot_reliability(curves, tmp_path / "sub" / "reliability.png", "M-24 validation")
    assert out == tmp_path / "sub" / "reliability.png"
    data = out.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f.name for f in out.parent.iterdir()] == ["reliability.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match="observed_frequency"):
        plot_reliability({"bad": pd.DataFrame({"n": [1], "mean_prob": [0.5]})}, tmp_path / "x.png", "t")


def test_calibration_imports_no_orchestration():
    code = ("import sys, everest.scoring.calibration; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'dask', 'distributed', 'flows')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
