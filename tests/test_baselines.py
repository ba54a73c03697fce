"""Baselines: hand-checked window features, fitting on real (tiny) files, EVEREST's results layout read back by
the analysis, the validation-only threshold, reuse of finished results, determinism and the command line."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny import ONE_THREAD, overrides

from everest import cli
from everest.analysis import ProductionAnalyzer, load_results
from everest.config import ConfigError, EverestConfig, Experiment, Target
from everest.errors import DataError
from everest.results import experiment_dir
from everest.scoring import baselines as B
from everest.scoring import metrics as M
from everest.scoring import portable as P

M24 = Target.parse("M-24")
EXP0, EXP1 = Experiment(target=M24, seed=0), Experiment(target=M24, seed=1)
FILES = ("training_data_M_24.csv", "testing_data_M_24.csv")


def results_dir(out: Path, model: str, exp: Experiment = EXP0) -> Path:
    return experiment_dir(B.baseline_root(out, model), exp.name)


def copy_m24(src: Path, dst: Path, edit: dict[str, Callable[[pd.DataFrame], pd.DataFrame]] | None = None) -> Path:
    """Copy the M-24 tables (cells kept as written), applying ``edit[file name]`` to a table if given."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if edit and name in edit:
            table = pd.read_csv(src / name, dtype=str, keep_default_na=False)
            edit[name](table).to_csv(dst / name, index=False)
        else:
            shutil.copy(src / name, dst / name)
    return dst


def stamp(path: Path) -> tuple[int, int]:
    """(inode, mtime): a rewrite renames a new file over the old one, so the inode changes too."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


@pytest.fixture(scope="module")
def fitted(tiny_data, tmp_path_factory) -> Path:
    """Output root with logistic M-24 seeds 0 and 1 and boosted M-24 seed 0, fitted on the tiny tables."""
    out = tmp_path_factory.mktemp("baselines-out")
    for exp in (EXP0, EXP1):
        B.fit_baseline("logistic", exp, EverestConfig(), tiny_data, out)
    B.fit_baseline("boosted", EXP0, EverestConfig(), tiny_data, out)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Features


def test_window_features_by_hand():
    x = np.array([
        [[0, 0], [0, 0], [1, 10], [4, 30]],  # front padding, then two real steps
        [[0, 0], [0, 0], [0, 0], [5, -1]],  # one real step: no deltas
        [[1, 1], [2, 4], [0, 0], [7, 9]],  # a padding row inside: "previous real" skips it
    ], dtype=np.float32)
    valid = np.array([[0, 0, 1, 1], [0, 0, 0, 1], [1, 1, 0, 1]], dtype=bool)
    expected = np.array([
        [4, 30, 3, 20, 3, 20, 2],
        [5, -1, 0, 0, 0, 0, 1],
        [7, 9, 5, 5, 6, 8, 3],
    ], dtype=np.float32)
    np.testing.assert_array_equal(P.window_features(x, valid), expected)
    np.testing.assert_array_equal(P.last_step(x, valid), x[:, -1])
    assert B.DEFAULTS["logistic"].features(x, valid).shape == (3, 2)
    assert B.DEFAULTS["boosted"].features(x, valid).shape == (3, 7)


# ---------------------------------------------------------------------------------------------------------------------
# Fitting and the results layout


def test_logistic_separates_separable_features(tiny_data, tmp_path):
    def separable(table: pd.DataFrame) -> pd.DataFrame:
        table["R_VALUE"] = np.where(table["Flare"] == "P", "4.0", "1.0")  # one feature decides the label
        return table

    data = copy_m24(tiny_data, tmp_path / "data", {f: separable for f in FILES})
    res = B.fit_baseline("logistic", EXP0, EverestConfig(), data, tmp_path / "out")
    assert res["test_metrics"]["tss"] == 1.0
    assert res["validation_metrics"]["tss"] == 1.0
    assert res["data"]["synthetic"] is False  # copied tables without the generator's truth sidecar


def test_results_json_has_the_trainers_schema(fitted):
    res = json.loads((results_dir(fitted, "boosted") / "results.json").read_text())
    assert res["model"] == "boosted"
    assert res["experiment"] == {"name": "everest_M_24h_seed0", "flare_class": "M", "horizon_hours": 24,
                                 "target": "M-24", "seed": 0, "model": "boosted", "array_index": 16}
    assert set(res["threshold"]) == {"source", "grid", "score", "selected", "validation", "oracle_test", "selected_raw",
                                     "validation_raw", "oracle_test_raw", "at_grid_edge", "grid_points", "grid_min",
                                     "grid_max", "note"}
    assert {"tss", "roc_auc", "brier", "ece", "latency_ms", "latency_single_ms"} <= set(res["test_metrics"])
    assert res["test_metrics"]["latency_ms"] > 0
    assert res["training"]["epochs_run"] == 1 and res["training"]["stop_reason"] == "fitted"
    assert res["training"]["best_epoch"] is None and res["history"] == []
    assert res["training"]["n_parameters"] > 0
    assert res["data"]["n_features"] == 3 * 9 + 1 and res["data"]["synthetic"] is True
    assert res["config"]["baseline"]["model"] == "boosted"
    assert res["provenance"]["code_version"].endswith(B.BASELINE_VERSION)
    for name in ("results.json", "predictions.csv", "threshold_optimization.csv", "final_metrics.csv"):
        assert (results_dir(fitted, "boosted") / name).is_file(), name


def test_test_metrics_recompute_from_predictions(fitted):
    folder = results_dir(fitted, "logistic")
    res = load_results(folder.parent, targets=["M-24"], seeds=[0, 1]).completed[0].results
    pred = pd.read_csv(folder / "predictions.csv")
    thr = res["threshold"]["selected_raw"]  # decisions are made on the raw scores
    np.testing.assert_array_equal(pred["y_pred"], (pred["y_prob_raw"] >= thr).astype(int))
    again = M.evaluate(pred["y_true"].to_numpy(), pred["y_prob_raw"].to_numpy(), thr)
    calibrated = {"brier": M.brier(pred["y_true"], pred["y_prob"]), "ece": M.ece(pred["y_true"], pred["y_prob"])}
    again.update(calibrated, brier_raw=again["brier"], ece_raw=again["ece"])
    for k, v in again.items():
        assert res["test_metrics"][k] == pytest.approx(v, rel=1e-12, nan_ok=True), k
    # The recorded threshold is the search's choice on the validation sweep written beside it.
    sweep = pd.read_csv(folder / "threshold_optimization.csv")
    val = sweep[[c for c in sweep if c.startswith("val_")]].rename(columns=lambda c: c[4:])
    assert M.select_threshold(val.assign(threshold=sweep["threshold"])) == thr == res["threshold"]["validation_raw"]
    final = pd.read_csv(folder / "final_metrics.csv").iloc[0]
    assert final["model"] == "logistic" and final["tss"] == pytest.approx(res["test_metrics"]["tss"])


def test_threshold_is_chosen_on_validation_only(tiny_data, fitted, tmp_path):
    def flip(table: pd.DataFrame) -> pd.DataFrame:
        table["Flare"] = table["Flare"].map({"N": "P", "P": "N"}).fillna(table["Flare"])
        return table

    data = copy_m24(tiny_data, tmp_path / "data", {"testing_data_M_24.csv": flip})
    flipped = B.fit_baseline("logistic", EXP0, EverestConfig(), data, tmp_path / "out")
    original = load_results(results_dir(fitted, "logistic").parent, ["M-24"], [0]).completed[0].results
    assert flipped["threshold"]["selected"] == original["threshold"]["selected"]
    assert flipped["test_metrics"]["tss"] == pytest.approx(-original["test_metrics"]["tss"])  # same forecasts


def test_analysis_reads_a_baseline_root_unchanged(fitted, tmp_path):
    root = B.baseline_root(fitted, "logistic") / "results"
    rs = load_results(root, targets=["M-24"], seeds=[0, 1])
    assert [r.name for r in rs.analysed] == [EXP0.name, EXP1.name] and not rs.stale and not rs.failed
    summary = ProductionAnalyzer(root, tmp_path / "A", targets=["M-24"], seeds=[0, 1],
                                 n_bootstrap=200).run_complete_analysis()
    assert (summary.n_completed, summary.n_failed, summary.n_missing) == (2, 0, 0)
    assert Path(summary.report).is_file() and summary.plots
    # One baseline against another: paired on seed 0's identical test samples.
    cmp = ProductionAnalyzer(B.baseline_root(fitted, "boosted") / "results", tmp_path / "C", targets=["M-24"],
                             seeds=[0], n_bootstrap=200, baseline_dir=root, make_plots=False).baseline_comparisons
    assert len(cmp) == 1 and np.isfinite(cmp["p_value"].iloc[0]) and cmp["n_pairs"].iloc[0] == 1


def test_everest_compares_with_a_baseline_on_the_same_windows(tiny_data, tmp_path):
    from everest.training.train import ProductionTrainer

    cfg = EverestConfig().with_overrides(overrides("train.epochs=1", ONE_THREAD, "train.device=cpu"))
    everest = ProductionTrainer(Experiment.of("M-24", 0), config=cfg, data_dir=tiny_data, output_dir=tmp_path).train()
    base = B.fit_baseline("logistic", EXP0, cfg, tiny_data, tmp_path)  # the same config, output root and cache
    for k in ("n_train", "n_train_positive", "n_val", "n_val_positive", "n_test", "n_test_positive", "scaler"):
        assert base["data"][k] == everest["data"][k], k
    ours = pd.read_csv(results_dir(tmp_path, "logistic") / "predictions.csv")
    theirs = pd.read_csv(experiment_dir(tmp_path, EXP0.name) / "predictions.csv")
    keys = ["y_true", "noaa_ar", "row", "time"]
    pd.testing.assert_frame_equal(ours[keys], theirs[keys])
    cmp = ProductionAnalyzer(tmp_path / "results", tmp_path / "A", targets=["M-24"], seeds=[0], n_bootstrap=200,
                             baseline_dir=B.baseline_root(tmp_path, "logistic") / "results",
                             make_plots=False).baseline_comparisons
    assert len(cmp) == 1 and np.isfinite(cmp["p_value"].iloc[0]) and "note" not in cmp
    # The default analysis of the output root finds the baseline and opens its report with the verdict.
    summary = ProductionAnalyzer(tmp_path / "results", targets=["M-24"], seeds=[0], n_bootstrap=200,
                                 make_plots=False).run_complete_analysis()
    [row] = summary.verdict
    assert summary.baselines == {"logistic": str(B.baseline_root(tmp_path, "logistic") / "results")}
    assert row["best_baseline"] == "logistic" and row["n_pairs"] == 1 and row["note"] == ""
    assert row["verdict"] in ("beats", "ties", "trails")
    assert row["sentence"].startswith(f"M-24: EVEREST {row['verdict']} the best baseline (logistic)")
    assert row["everest_tss"] == pytest.approx(everest["test_metrics"]["tss"])
    assert row["tss_logistic"] == pytest.approx(base["test_metrics"]["tss"])
    assert row["val_tss_logistic"] == pytest.approx(base["validation_metrics"]["tss"])
    assert Path(summary.report).read_text().split("\n## ")[1].startswith("Verdict: EVEREST against simple baselines")


# ---------------------------------------------------------------------------------------------------------------------
# Reuse, refits, determinism, failures


def test_rerun_skips_and_force_or_a_new_identity_refits(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = B.fit_baseline("logistic", EXP0, EverestConfig(), tiny_data, out)
    path = results_dir(out, "logistic") / "results.json"
    before = stamp(path)
    assert B.fit_baseline("logistic", EXP0, EverestConfig(), tiny_data, out) == first
    assert stamp(path) == before
    B.fit_baseline("logistic", EXP0, EverestConfig(), tiny_data, out, force=True)
    assert stamp(path) != before
    superseded = B.baseline_root(out, "logistic") / "results" / ".superseded" / EXP0.name
    assert len(list(superseded.iterdir())) == 1
    before = stamp(path)
    weaker = B.fit_baseline("logistic", EXP0, EverestConfig(), tiny_data, out, params=B.LogisticConfig(C=0.01))
    assert stamp(path) != before and weaker["provenance"]["config_hash"] != first["provenance"]["config_hash"]
    before = stamp(path)
    threshold = EverestConfig().with_overrides(["threshold.points=41"])
    B.fit_baseline("logistic", EXP0, threshold, tiny_data, out, params=B.LogisticConfig(C=0.01))
    assert stamp(path) != before  # the threshold search is part of the identity
    before = stamp(path)
    B.fit_baseline("logistic", EXP0, threshold.with_overrides(["train.epochs=3"]), tiny_data, out,
                   params=B.LogisticConfig(C=0.01))
    assert stamp(path) == before  # EVEREST's training settings are not
    monkeypatch.setattr(B, "BASELINE_VERSION", "baselines-test")
    bumped = B.fit_baseline("logistic", EXP0, threshold, tiny_data, out, params=B.LogisticConfig(C=0.01))
    assert stamp(path) != before and bumped["provenance"]["code_version"].endswith("baselines-test")
    assert len(list(superseded.iterdir())) == 4


@pytest.mark.parametrize("model", B.BASELINES)
def test_same_seed_gives_identical_predictions(tiny_data, tmp_path, model):
    for run in ("a", "b"):
        B.fit_baseline(model, EXP1, EverestConfig(), tiny_data, tmp_path / run)
    a, b = (results_dir(tmp_path / run, model, EXP1) / "predictions.csv" for run in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()


def test_one_class_training_data_fails_with_a_record(tiny_data, tmp_path):
    def flaring(table: pd.DataFrame) -> pd.DataFrame:
        table["Flare"] = table["Flare"].replace("N", "P")
        return table

    data = copy_m24(tiny_data, tmp_path / "data", {"training_data_M_24.csv": flaring})
    with pytest.raises(DataError, match="one class only"):
        B.fit_baseline("boosted", EXP0, EverestConfig(), data, tmp_path / "out")
    rs = load_results(B.baseline_root(tmp_path / "out", "boosted") / "results", ["M-24"], [0])
    assert [f.error_type for f in rs.failed] == ["DataError"]


def test_training_data_without_positives_is_refused_before_anything_is_written(tiny_data, tmp_path):
    def quiet(table: pd.DataFrame) -> pd.DataFrame:
        table["Flare"] = table["Flare"].replace("P", "N")
        return table

    data = copy_m24(tiny_data, tmp_path / "data", {"training_data_M_24.csv": quiet})
    with pytest.raises(DataError, match="training_data_M_24.csv: no positive samples"):
        B.fit_baseline("boosted", EXP0, EverestConfig(), data, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_model_and_mismatched_params_are_refused(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="valid models: logistic, boosted"):
        B.fit_baseline("forest", EXP0, EverestConfig(), tiny_data, tmp_path)
    with pytest.raises(ConfigError, match="not 'logistic'"):
        B.fit_baseline("logistic", EXP0, EverestConfig(), tiny_data, tmp_path, params=B.BoostedConfig())


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def test_command_line_fits_all_models(tiny_data, tmp_path, capsys):
    argv = ["baselines", "--array-index", "16", "--data-dir", str(tiny_data), "--output-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["logistic", f"{EXP0.name}:"], ["boosted", f"{EXP0.name}:"]]
    assert all((results_dir(tmp_path, m) / "results.json").is_file() for m in B.BASELINES)


@pytest.mark.parametrize("argv, message", [
    (["--flare_class", "M"], "give --flare_class and --time_window"),
    (["--flare_class", "M", "--time_window", "24", "--data-dir", "/nonexistent"], "data file not found"),
    (["--array-index", "46"], "invalid array index"),
])
def test_command_line_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert cli.main(["baselines", *argv, "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
