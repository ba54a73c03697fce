"""Tests for everest.scoring.metrics: hand-computed values, degenerate inputs, invariances over the whole registry."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from everest.config import ThresholdConfig
from everest.scoring.metrics import (
    METRICS,
    PROBABILITY_METRICS,
    TABLE_COLUMNS,
    THRESHOLD_METRICS,
    Confusion,
    UndefinedMetricWarning,
    accuracy,
    at_grid_edge,
    balanced_score,
    best_threshold,
    brier,
    confusion_counts,
    ece,
    evaluate,
    f1,
    max_tss,
    precision,
    recall,
    roc_auc,
    select_threshold,
    shown,
    specificity,
    thin_sweep,
    threshold_grid,
    threshold_table,
    tss,
)

# The worked example used by the hand-computed tests: 4 positives, 6 negatives.
Y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
P = [0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.55, 0.05]


def quiet(fn, *args, **kwargs):
    """Call fn with UndefinedMetricWarning silenced (for checks that are not about the warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return fn(*args, **kwargs)


def same(a: float, b: float) -> bool:
    """Equal up to float rounding, with NaN equal to NaN."""
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Hand-computed cases


def test_confusion_counts_by_hand():
    # At t = 0.5 positives 0.9, 0.8, 0.6 are caught and 0.3 missed -> tp 3, fn 1;
    # negatives 0.7 and 0.55 are >= 0.5 -> fp 2; 0.4, 0.2, 0.1, 0.05 -> tn 4.
    assert confusion_counts(Y, P, 0.5) == Confusion(tp=3, fp=2, tn=4, fn=1)


def test_threshold_is_inclusive():
    # p >= t is positive: with t = 0.6 the positive at exactly 0.6 counts as tp (tp 3 from 0.9, 0.8, 0.6),
    # the negative at 0.7 is fp 1.
    assert confusion_counts(Y, P, 0.6) == Confusion(tp=3, fp=1, tn=5, fn=1)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("recall", 3 / 4),  # tp / (tp + fn) = 3 / 4 = 0.75
        ("specificity", 4 / 6),  # tn / (tn + fp) = 4 / 6 = 0.6667
        ("tss", 3 / 4 + 4 / 6 - 1),  # 0.75 + 0.6667 - 1 = 5/12 = 0.4167
        ("accuracy", 7 / 10),  # (tp + tn) / N = (3 + 4) / 10
        ("precision", 3 / 5),  # tp / (tp + fp) = 3 / (3 + 2)
        ("f1", 2 / 3),  # 2 tp / (2 tp + fp + fn) = 6 / (6 + 2 + 1) = 6/9
        # Pairs (pos, neg) with pos > neg: 0.9 beats all 6, 0.8 all 6, 0.6 beats 5 (not 0.7),
        # 0.3 beats 0.2, 0.1, 0.05 = 3 -> 20 of 4 * 6 = 24 pairs.
        ("roc_auc", 20 / 24),
        # Positives (1 - p)^2: .01 + .04 + .16 + .49 = .70; negatives p^2: .49 + .16 + .04 + .01 + .3025 + .0025
        # = 1.005; (0.70 + 1.005) / 10.
        ("brier", 0.1705),
        # Bins floor(15 p) = 13, 12, 9, 4, 10, 6 (0.4 on an edge -> bin 6), 3 (0.2 on an edge), 1, 8, 0: every
        # sample alone in its bin, so ECE = mean |p - y| = (.1 + .2 + .4 + .7 + .7 + .4 + .2 + .1 + .55 + .05) / 10.
        ("ece", 0.34),
    ],
)
def test_metric_by_hand(name, expected):
    assert METRICS[name](Y, P) == pytest.approx(expected, abs=1e-12)
    assert evaluate(Y, P, 0.5)[name] == pytest.approx(expected, abs=1e-12)


def test_auc_ties_count_half():
    # Positives 0.5, 0.8; negatives 0.5, 0.2. Pairs: (0.5, 0.5) tie = 1/2, (0.5, 0.2) = 1, (0.8, 0.5) = 1,
    # (0.8, 0.2) = 1 -> 3.5 / 4.
    assert roc_auc([1, 1, 0, 0], [0.5, 0.8, 0.5, 0.2]) == pytest.approx(3.5 / 4)


def test_ece_shared_bins_edge_and_one():
    y = [1, 0, 1, 1, 0, 0]
    p = [1.0, 0.95, 0.97, 0.4, 0.41, 0.1]
    # Last bin [14/15, 1.0], closed: {1.0, 0.95, 0.97} -> mean p 2.92/3, positives 2/3 -> 3 * |.97333 - .66667| = .92
    # Bin 6 [0.4, 0.4667): 0.4 is on the edge and belongs here with 0.41 -> mean .405, positives 1/2 -> 2 * .095 = .19
    # Bin 1 [0.0667, 0.1333): {0.1}, no positive -> 1 * .1 = .1
    # ECE = sum (n_b / N) |mean p - frac| = (.92 + .19 + .1) / 6 = 1.21 / 6
    assert ece(y, p) == pytest.approx(1.21 / 6, abs=1e-12)
    # Had 0.4 fallen into bin 5 it would sit alone: (.92 + |.4 - 1| + |.41 - 0| + .1) / 6 = 2.03 / 6, not 1.21 / 6.


def test_ece_probability_one_is_binned_not_dropped():
    # A single sample at p = 1.0 with label 0 must land in the last bin: |1.0 - 0| * 1/1 = 1.
    assert ece([0], [1.0]) == 1.0
    # Two samples both in the last bin: p 1.0 (y 1) and 0.94 (y 0): |0.97 - 0.5| = 0.47.
    assert ece([1, 0], [1.0, 0.94]) == pytest.approx(0.47)


def test_ece_perfect_calibration_and_bin_count():
    # Half the samples at 0.5 are positive -> |0.5 - 0.5| = 0.
    assert ece([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]) == 0.0
    # One bin: |mean p - mean y| = |(0.2 + 0.9) / 2 - 1/2| = 0.05.
    assert ece([1, 0], [0.2, 0.9], n_bins=1) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="n_bins must be a positive integer, got 0"):
        ece([1, 0], [0.2, 0.9], n_bins=0)


def test_evaluate_keys_and_counts():
    out = evaluate(Y, P, 0.5)
    assert set(out) == {*THRESHOLD_METRICS, *PROBABILITY_METRICS, "tp", "fp", "tn", "fn"}
    assert (out["tp"], out["fp"], out["tn"], out["fn"]) == (3, 2, 4, 1)
    assert all(type(v) in (int, float) for v in out.values())  # plain Python numbers: JSON-ready


# ---------------------------------------------------------------------------------------------------------------------
# Degenerate inputs: documented value plus a warning


def test_no_predicted_positives():
    y, p = [1, 0, 1, 0], [0.1, 0.2, 0.3, 0.4]  # t = 0.5: tp 0, fp 0, tn 2, fn 2
    with pytest.warns(UndefinedMetricWarning, match="precision is undefined"):
        assert precision(y, p) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # f1 = 0 / (0 + 0 + 2), recall 0/2 and TSS 0 + 1 - 1 are all defined
        assert f1(y, p) == 0.0
        assert recall(y, p) == 0.0
        assert tss(y, p) == 0.0


def test_only_negatives():
    y, p = [0, 0, 0], [0.2, 0.7, 0.4]  # t = 0.5: fp 1, tn 2, no positives
    with pytest.warns(UndefinedMetricWarning, match="recall is undefined"):
        assert recall(y, p) == 0.0
    with pytest.warns(UndefinedMetricWarning, match="recall is undefined"):
        assert tss(y, p) == pytest.approx(0.0 + 2 / 3 - 1)  # documented recall 0 + specificity 2/3 - 1
    with pytest.warns(UndefinedMetricWarning, match="roc_auc is undefined"):
        assert math.isnan(roc_auc(y, p))
    with pytest.warns(UndefinedMetricWarning, match="f1 is undefined"):
        assert f1([0, 0], [0.1, 0.2]) == 0.0  # no positives and no predicted positives: 0 / 0
    assert specificity(y, p) == pytest.approx(2 / 3)


def test_only_positives():
    y, p = [1, 1], [0.9, 0.3]  # t = 0.5: tp 1, fn 1, no negatives
    with pytest.warns(UndefinedMetricWarning, match="specificity is undefined"):
        assert specificity(y, p) == 0.0
    with pytest.warns(UndefinedMetricWarning, match="specificity is undefined"):
        assert tss(y, p) == pytest.approx(0.5 + 0.0 - 1)
    with pytest.warns(UndefinedMetricWarning, match="roc_auc is undefined"):
        assert math.isnan(roc_auc(y, p))


def test_one_class_all_correct_has_zero_tss():
    # Every sample right, but skill cannot be shown without both classes: 0 (documented) + 1 - 1 = 0.
    with pytest.warns(UndefinedMetricWarning):
        assert tss([0, 0], [0.1, 0.2]) == 0.0


def test_all_correct():
    y, p = [0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = evaluate(y, p)
    for name in ("tss", "accuracy", "precision", "recall", "specificity", "f1", "roc_auc"):
        assert out[name] == 1.0, name
    # Brier (.01 + .04 + .04 + .01) / 4 = .025; ECE bins 1, 3 (0.2 on an edge), 12, 13: (.1 + .2 + .2 + .1) / 4.
    assert out["brier"] == pytest.approx(0.025)
    assert out["ece"] == pytest.approx(0.15)


def test_all_wrong():
    y, p = [0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]  # tp 0, fp 2, tn 0, fn 2: every ratio defined
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = evaluate(y, p)
    assert out["tss"] == -1.0
    for name in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc"):
        assert out[name] == 0.0, name
    assert out["brier"] == pytest.approx((0.81 + 0.64 + 0.64 + 0.81) / 4)


# ---------------------------------------------------------------------------------------------------------------------
# Invariances over the whole registry


def test_registry_lists_every_metric():
    assert METRICS == {
        "tss": tss,
        "accuracy": accuracy,
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "f1": f1,
        "roc_auc": roc_auc,
        "brier": brier,
        "ece": ece,
    }
    assert METRICS == {**THRESHOLD_METRICS, **PROBABILITY_METRICS}


RNG = np.random.default_rng(20260)
Y_RAND = RNG.integers(0, 2, size=200)
P_RAND = np.round(RNG.random(200), 2)  # rounded: plenty of ties and values on thresholds


@pytest.mark.parametrize("name", sorted(METRICS))
def test_registry_functions_return_floats_in_range(name):
    value = METRICS[name](Y_RAND, P_RAND)
    assert type(value) is float
    low = -1.0 if name == "tss" else 0.0
    assert low <= value <= 1.0


@pytest.mark.parametrize("name", sorted(METRICS))
def test_sample_order_invariance(name):
    perm = np.random.default_rng(1).permutation(Y_RAND.size)
    assert same(METRICS[name](Y_RAND[perm], P_RAND[perm]), METRICS[name](Y_RAND, P_RAND))


@pytest.mark.parametrize("name", sorted(METRICS))
@pytest.mark.parametrize("dtype", [int, np.int8, bool, np.float32, np.float64])
def test_label_dtype_invariance(name, dtype):
    assert METRICS[name](Y_RAND.astype(dtype), P_RAND) == METRICS[name](Y_RAND, P_RAND)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_list_and_array_inputs_agree(name):
    assert METRICS[name](Y_RAND.tolist(), P_RAND.tolist()) == METRICS[name](Y_RAND, P_RAND)
    assert METRICS[name](tuple(Y_RAND.tolist()), P_RAND) == METRICS[name](Y_RAND, P_RAND)


@pytest.mark.parametrize("name", sorted(METRICS))
@pytest.mark.parametrize(("label", "prob"), [(1, 0.8), (1, 0.2), (0, 0.8), (0, 0.2)])
def test_single_sample(name, label, prob):
    # One sample is one class only: AUC is NaN with a warning, the rest return their documented values.
    if name == "roc_auc":
        with pytest.warns(UndefinedMetricWarning):
            assert math.isnan(METRICS[name]([label], [prob]))
        return
    value = quiet(METRICS[name], [label], [prob])
    assert type(value) is float and math.isfinite(value)
    # evaluate() reports what is undefined for one sample as NaN: the absent class's rate and TSS, precision
    # without a positive forecast (threshold 0.5), F1 with neither a positive nor a positive forecast.
    forecast = prob >= 0.5
    undefined = {"tss", "specificity" if label else "recall"}
    undefined |= {"precision"} if not forecast else set()
    undefined |= {"f1"} if not (label or forecast) else set()
    reported = quiet(evaluate, [label], [prob])[name]
    assert math.isnan(reported) if name in undefined else reported == value


@pytest.mark.parametrize("name", sorted(THRESHOLD_METRICS))
def test_threshold_metrics_agree_with_counts_and_identities(name):
    tp, fp, tn, fn = confusion_counts(Y_RAND, P_RAND, 0.37)
    direct = {
        "tss": tp / (tp + fn) + tn / (tn + fp) - 1,
        "accuracy": (tp + tn) / (tp + fp + tn + fn),
        "precision": tp / (tp + fp),
        "recall": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "f1": 2 * tp / (2 * tp + fp + fn),
    }
    assert THRESHOLD_METRICS[name](Y_RAND, P_RAND, 0.37) == pytest.approx(direct[name], abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 500))
    y = rng.integers(0, 2, size=n)
    y[:2] = [0, 1]  # both classes present
    p = rng.integers(0, 11, size=n) / 10  # 11 distinct values: heavy ties, including 0.0 and 1.0
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Input validation at the boundary


BAD_INPUTS = [
    ([1, 0, 1], [0.1, 0.2], "y_true and y_prob must have the same length, got 3 labels and 2 probabilities"),
    ([], [], "y_true must hold at least one sample"),
    ([1, 2, 0], [0.1, 0.2, 0.3], r"y_true must contain only the labels 0 and 1 .* e\.g\. \[2\]"),
    ([1, 0.5], [0.1, 0.2], r"y_true must contain only the labels 0 and 1 .* e\.g\. \[0\.5\]"),
    ([1, np.nan], [0.1, 0.2], "y_true must contain only the labels 0 and 1"),
    ([1, 0], [0.1, 1.2], r"y_prob must contain probabilities in \[0, 1\] with no NaN, got 1 value.* \[1\.2\]"),
    ([1, 0], [-0.1, 0.2], r"y_prob must contain probabilities in \[0, 1\].*\[-0\.1\]"),
    ([1, 0], [np.nan, 0.2], r"y_prob must contain probabilities in \[0, 1\] with no NaN.*\[nan\]"),
    ([[1, 0]], [[0.1, 0.2]], r"y_true must be a 1-D sequence of samples, got shape \(1, 2\)"),
    (["a", "b"], [0.1, 0.2], "y_true must be numeric"),
]

ENTRY_POINTS = {
    **METRICS,
    "confusion_counts": confusion_counts,
    "evaluate": evaluate,
    "threshold_table": threshold_table,
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(("y", "p", "message"), BAD_INPUTS)
def test_bad_inputs_rejected_with_message(entry, y, p, message):
    with pytest.raises(ValueError, match=message):
        ENTRY_POINTS[entry](y, p)


@pytest.mark.parametrize("entry", sorted({*THRESHOLD_METRICS, "confusion_counts", "evaluate"}))
@pytest.mark.parametrize("threshold", [-0.01, 1.01, float("nan"), float("inf"), "0.5", None, True])
def test_thresholds_validated(entry, threshold):
    with pytest.raises(ValueError, match=r"threshold must be a real number in \[0, 1\], got"):
        ENTRY_POINTS[entry]([1, 0], [0.6, 0.4], threshold)


def test_threshold_bounds_accepted():
    # t = 0 predicts everything positive, t = 1 only p == 1.0; both legal.
    assert confusion_counts([1, 0], [0.6, 0.0], 0.0) == Confusion(tp=1, fp=1, tn=0, fn=0)
    assert confusion_counts([1, 0], [1.0, 0.99], 1.0) == Confusion(tp=1, fp=0, tn=1, fn=0)
    assert confusion_counts([1, 0], [0.6, 0.4], np.float32(0.5)) == Confusion(tp=1, fp=0, tn=1, fn=0)


# ---------------------------------------------------------------------------------------------------------------------
# Threshold search


DESIGN = ThresholdConfig(grid="design", score="balanced")  # the design document's search


def test_design_grid_has_81_exact_points():
    grid = threshold_grid(DESIGN)
    assert grid.shape == (81,)
    assert grid.tolist() == [k / 100 for k in range(10, 91)]  # bit-exact literals 0.1, 0.11, ..., 0.9
    assert grid[19] == 0.29 and grid[0] == 0.1 and grid[-1] == 0.9


def test_grid_follows_config():
    coarse = ThresholdConfig(grid="design", start=0.2, stop=0.8, points=7)
    assert threshold_grid(coarse).tolist() == [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    assert threshold_grid(ThresholdConfig(grid="design", start=0.3, stop=0.3, points=1)).tolist() == [0.3]
    with pytest.raises(ValueError, match="grid 'validation' needs y_true and y_prob"):
        threshold_grid(ThresholdConfig())
    with pytest.raises(ValueError, match="cfg must be an everest.config.ThresholdConfig"):
        threshold_grid({"start": 0.1})


def naive_table(y, p, cfg):
    rows = []
    for t in threshold_grid(cfg):
        row = {"threshold": t, **confusion_counts(y, p, t)._asdict()}
        row.update({name: quiet(fn, y, p, t) for name, fn in THRESHOLD_METRICS.items()})
        row["balanced_score"] = sum(w * row[m] for m, w in cfg.weights.items())
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    "cfg",
    [DESIGN, ThresholdConfig(grid="design", start=0.05, stop=0.95, points=19, weights={"accuracy": 1.0, "tss": 0.5})],
)
@pytest.mark.parametrize("data", ["random", "one_class", "hand"])
def test_threshold_table_equals_naive_loop(cfg, data):
    y, p = {
        "random": (Y_RAND, P_RAND),  # P_RAND holds many values exactly on grid thresholds
        "one_class": (np.zeros(20, dtype=int), P_RAND[:20]),
        "hand": (Y, P),
    }[data]
    table = quiet(threshold_table, y, p, cfg)
    assert tuple(table.columns) == TABLE_COLUMNS
    assert len(table) == cfg.points
    pd.testing.assert_frame_equal(table, naive_table(y, p, cfg), check_dtype=False, rtol=1e-12, atol=1e-12)


def test_threshold_table_warns_once_with_count():
    # Positives at most 0.5: no predicted positives for thresholds 0.51 .. 0.90 (40 of 81).
    with pytest.warns(UndefinedMetricWarning, match="precision is undefined at 40 of 81 thresholds") as record:
        threshold_table([1, 0, 1], [0.5, 0.1, 0.3], DESIGN)
    assert len(record) == 1


def test_select_threshold_ties_to_lowest():
    # Perfect separation for every t in (0.3, 0.6]: the same counts give the same top score at 0.31 .. 0.60,
    # and the lowest of them is 0.31 (t = 0.30 still calls the negative at 0.3 positive).
    table = threshold_table([0, 0, 1, 1], [0.05, 0.3, 0.6, 0.95], DESIGN)
    top = table[table.balanced_score == table.balanced_score.max()]
    assert top.threshold.min() == 0.31 and top.threshold.max() == 0.6
    assert select_threshold(table, "balanced") == 0.31
    # Row order does not matter.
    assert select_threshold(table.iloc[::-1], "balanced") == 0.31


def test_select_threshold_hand_table():
    table = pd.DataFrame({"threshold": [0.2, 0.4, 0.3, 0.5], "balanced_score": [0.5, 0.7, 0.7, 0.1]})
    assert select_threshold(table, "balanced") == 0.3


def test_balanced_score_by_hand():
    # At t = 0.5 on the worked example: .4 * 5/12 + .2 * 2/3 + .15 * .6 + .15 * .75 + .1 * 2/3
    # = .166667 + .133333 + .09 + .1125 + .066667 = .569167
    expected = 0.4 * 5 / 12 + 0.2 * 2 / 3 + 0.15 * 0.6 + 0.15 * 0.75 + 0.1 * 2 / 3
    assert balanced_score(evaluate(Y, P, 0.5), ThresholdConfig().weights) == pytest.approx(expected)
    row = threshold_table(Y, P, DESIGN).set_index("threshold").loc[0.5]
    assert row.balanced_score == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"weights name metrics \['auc'\] that are not in values"):
        balanced_score({"tss": 0.5}, {"auc": 1.0})


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ([0.5], "table must be a pandas DataFrame"),
        (pd.DataFrame({"threshold": [0.5]}), r"missing \['balanced_score'\]"),
        (pd.DataFrame({"threshold": [], "balanced_score": []}), "at least one row"),
        (pd.DataFrame({"threshold": [0.5], "balanced_score": [np.nan]}), "must be finite"),
    ],
)
def test_select_threshold_validates(table, message):
    with pytest.raises(ValueError, match=message):
        select_threshold(table, "balanced")


def test_validation_grid_by_hand():
    # Positives at .3, .5, .6; each threshold sits midway to the next lower probability: .25, .45, .55.
    # TSS there: TPR 1 - FPR 1/3 = 2/3, TPR 2/3 - FPR 0 = 2/3, TPR 1/3 - 0 = 1/3; the tie goes to .25.
    y, p = [0, 0, 1, 0, 1, 1], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    table = threshold_table(y, p)
    assert table.threshold.to_numpy() == pytest.approx([0.25, 0.45, 0.55])
    assert table.tss.to_numpy() == pytest.approx([2 / 3, 2 / 3, 1 / 3])
    assert select_threshold(table, "tss") == pytest.approx(0.25)
    assert at_grid_edge(table, 0.25) and not at_grid_edge(table, 0.45)
    # Every positive is searched; a results folder shows `points` rows evenly spaced in rank, with the chosen one.
    rng = np.random.default_rng(1)
    yy, pp = rng.integers(0, 2, 2000), rng.random(2000)
    full = threshold_table(yy, pp)
    assert len(full) == np.unique(pp[yy == 1]).size and full.tss.max() == pytest.approx(max_tss(yy, pp))
    chosen = select_threshold(full, "tss")
    rows = thin_sweep(full, 11, chosen)
    assert len(rows) == 11 and rows[0] == 0 and rows[-1] == len(full) - 1
    assert chosen in full.threshold.to_numpy()[rows]
    assert thin_sweep(full.head(5), 11, full.threshold[0]).tolist() == [0, 1, 2, 3, 4]


def test_validation_grid_reaches_the_optimum_below_the_design_grid():
    # A model whose useful probabilities all lie below 0.10 (the measured failure on real data): the design
    # search is stuck at its floor 0.10 and flags it; the validation grid finds the exact best TSS.
    rng = np.random.default_rng(2)
    y = rng.random(5000) < 0.03
    p = np.where(y, rng.uniform(0.02, 0.09, 5000), rng.uniform(0.0, 0.05, 5000))
    design = quiet(threshold_table, y, p, DESIGN)
    t_design = select_threshold(design, "balanced")
    assert t_design == 0.1 and at_grid_edge(design, t_design)
    assert tss(y, p, t_design) == 0.0  # nothing forecast: no skill at all
    # Population optimum: threshold 0.05, TPR (0.09 - 0.05) / 0.07 = 4/7, FPR 0 -> TSS 0.571.
    every = threshold_table(y, p)  # one threshold per positive: exact
    t = select_threshold(every, "tss")
    assert tss(y, p, t) == pytest.approx(max_tss(y, p)) and tss(y, p, t) == pytest.approx(4 / 7, abs=0.06)
    assert best_threshold(y, p) == pytest.approx(t) and t == pytest.approx(0.05, abs=0.005)


def test_tss_threshold_of_a_calibrated_forecast_is_the_base_rate():
    # For calibrated probabilities TPR - FPR grows while p > base rate (the likelihood ratio exceeds 1 there),
    # so the TSS-optimal threshold is the base rate: here E[p] = 2/(2+18) = 0.1 for p ~ Beta(2, 18).
    rng = np.random.default_rng(3)
    p = rng.beta(2, 18, 400_000)
    y = rng.random(p.size) < p
    t = select_threshold(threshold_table(y, p), "tss")
    assert t == pytest.approx(0.1, abs=0.01)


def test_max_tss_is_the_best_tss_over_all_thresholds():
    # y = 0 0 1 0 1 1 with p = .1 .2 .3 .4 .5 .6: at t = .5, TPR 2/3, FPR 0 -> 0.667; at t = .3, TPR 1, FPR 1/3 -> 0.667
    from everest.scoring.metrics import max_tss

    y, p = [0, 0, 1, 0, 1, 1], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert max_tss(y, p) == pytest.approx(2 / 3)
    rng = np.random.default_rng(0)
    yy, pp = rng.integers(0, 2, 500), np.round(rng.random(500), 2)
    brute = max(tss(yy, pp, t) for t in np.unique(pp))
    assert max_tss(yy, pp) == pytest.approx(brute)
    assert max_tss([0, 1], [0.9, 0.1]) == 0.0  # inverted ranking: never below the trivial forecaster


def test_evaluate_reports_undefined_metrics_as_nan():
    """A test split without positives: tp 0, fp 1, tn 2, fn 0 at threshold 0.5 (hand-counted)."""
    with pytest.warns(UndefinedMetricWarning):
        out = evaluate([0, 0, 0], [0.9, 0.2, 0.1], 0.5)
    assert (out["tp"], out["fp"], out["tn"], out["fn"]) == (0, 1, 2, 0)
    for name in ("recall", "tss", "roc_auc"):  # no positives: undefined, never a number
        assert math.isnan(out[name]), name
    assert out["precision"] == 0.0 and out["f1"] == 0.0  # 0 / 1: a false alarm, defined
    assert out["specificity"] == pytest.approx(2 / 3) and out["accuracy"] == pytest.approx(2 / 3)
    assert shown(out["tss"]) == "undefined" and shown(out["specificity"]) == "0.667"
