"""The seed ensemble (everest.scoring.ensemble): built from members' result files on disk, scored like any model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from everest import io
from everest.config import EverestConfig, Experiment, Target
from everest.results import experiment_dir
from everest.scoring.ensemble import (
    EnsembleError,
    build_ensemble,
    build_ensembles,
    ensemble_name,
    ensemble_root,
    read_ensembles,
)
from everest.scoring.forecast import Predictions, final_metrics_row, score_forecast, write_forecast

REPO = Path(__file__).resolve().parents[1]
TARGET = Target.parse("M-24")
CFG = EverestConfig()


def _split(rng: np.random.Generator, n: int, first_region: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    region = first_region + np.arange(n) // 10  # 10 samples per region
    truth = rng.beta(1, 6, n)
    y = (rng.random(n) < truth).astype(np.int8)
    return y, truth, region


def _predictions(y: np.ndarray, prob: np.ndarray, region: np.ndarray) -> Predictions:
    t = np.datetime64("2015-01-01T00:00:00") + np.arange(len(y)).astype("timedelta64[h]")
    return Predictions(y, prob, region, np.arange(len(y)), t.astype("datetime64[s]"))


def write_member(results_dir: Path, seed: int, val: Predictions, test: Predictions, config_hash: str = "c0") -> dict:
    """A finished EVEREST experiment as the trainer leaves it: results.json plus the prediction files."""
    scored = score_forecast(val, test, CFG)
    exp = Experiment(target=TARGET, seed=seed)
    res = {"experiment": {"name": exp.name, "target": str(TARGET), "seed": seed}, **scored.sections,
           "data": {"n_val": len(val.y)}, "config": CFG.model_dump(mode="json"),
           "provenance": {"config_hash": config_hash, "code_version": "v", "data_hashes": {"f": "h"}}}
    folder = results_dir / exp.name
    write_forecast(folder, scored, val, test, final_metrics_row(res))
    io.write_json(folder / "results.json", res)
    return res


@pytest.fixture
def splits():
    rng = np.random.default_rng(0)
    return _split(rng, 2000, 100), _split(rng, 1500, 900)


def _noisy(truth: np.ndarray, seed: int) -> np.ndarray:
    z = np.log(truth / (1 - truth)) + np.random.default_rng(seed).normal(0, 0.8, truth.size)
    return 1 / (1 + np.exp(-z))


def test_identical_members_equal_the_member(tmp_path, splits):
    (yv, tv, rv), (yt, tt, rt) = splits
    val, test = _predictions(yv, _noisy(tv, 1), rv), _predictions(yt, _noisy(tt, 2), rt)
    member = None
    for seed in (0, 1, 2):
        member = write_member(tmp_path / "results", seed, val, test)
    ens = build_ensemble(tmp_path / "results", TARGET, tmp_path)
    assert ens["experiment"]["members"] == [0, 1, 2]
    # (p + p + p) / 3 may differ from p in the last bit, hence the relative tolerance
    for key in ("threshold", "test_metrics", "validation_metrics", "oracle_test_metrics", "calibration"):
        assert _flat(ens[key]) == pytest.approx(_flat(member[key]), rel=1e-9), key
    folder = experiment_dir(ensemble_root(tmp_path), ensemble_name(TARGET))
    a = pd.read_csv(folder / "predictions.csv")
    b = pd.read_csv(tmp_path / "results" / "everest_M_24h_seed0" / "predictions.csv")
    pd.testing.assert_frame_equal(a, b, rtol=1e-9)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def test_ensemble_averages_raw_probabilities_and_is_scored_on_validation(tmp_path, splits):
    (yv, tv, rv), (yt, tt, rt) = splits
    members = {s: (_noisy(tv, 10 + s), _noisy(tt, 20 + s)) for s in (0, 1)}
    for s, (pv, pt) in members.items():
        write_member(tmp_path / "results", s, _predictions(yv, pv, rv), _predictions(yt, pt, rt))
    ens = build_ensemble(tmp_path / "results", TARGET, tmp_path)
    folder = experiment_dir(ensemble_root(tmp_path), ensemble_name(TARGET))
    pred = pd.read_csv(folder / "predictions.csv")
    np.testing.assert_allclose(pred.y_prob_raw, (members[0][1] + members[1][1]) / 2, rtol=1e-12)
    # the same scoring path as any model, from the averaged forecasts alone
    mean_val = _predictions(yv, (members[0][0] + members[1][0]) / 2, rv)
    mean_test = _predictions(yt, (members[0][1] + members[1][1]) / 2, rt)
    again = score_forecast(mean_val, mean_test, CFG)
    assert ens["threshold"]["selected"] == again.threshold
    assert ens["test_metrics"]["tss"] == pytest.approx(again.sections["test_metrics"]["tss"])
    # averaging independent noise makes a better forecast than its members (noise variance halves)
    member_auc = [json.loads((tmp_path / "results" / f"everest_M_24h_seed{s}" / "results.json").read_text())
                  ["test_metrics"]["roc_auc"] for s in (0, 1)]
    assert ens["test_metrics"]["roc_auc"] > max(member_auc)
    # the threshold and calibration never see the test labels: flipping them changes scores, not the choices
    flipped = _predictions(1 - yt, mean_test.prob, rt)
    other = score_forecast(mean_val, flipped, CFG)
    assert other.threshold == again.threshold and other.calibrator == again.calibrator


def test_members_with_different_validation_splits_are_refused(tmp_path, splits):
    (yv, tv, rv), (yt, tt, rt) = splits
    write_member(tmp_path / "results", 0, _predictions(yv, tv, rv), _predictions(yt, tt, rt))
    write_member(tmp_path / "results", 1, _predictions(yv, tv, rv + 5000), _predictions(yt, tt, rt))
    with pytest.raises(EnsembleError, match="different validation samples.*split_seed"):
        build_ensemble(tmp_path / "results", TARGET, tmp_path)


def test_one_configuration_is_averaged_others_are_listed(tmp_path, splits):
    (yv, tv, rv), (yt, tt, rt) = splits
    val, test = _predictions(yv, tv, rv), _predictions(yt, tt, rt)
    write_member(tmp_path / "results", 0, val, test)
    with pytest.raises(EnsembleError, match="1 finished seed.*at least two"):
        build_ensemble(tmp_path / "results", TARGET, tmp_path)
    write_member(tmp_path / "results", 1, val, test)
    write_member(tmp_path / "results", 2, val, test, config_hash="other")
    ens = build_ensemble(tmp_path / "results", TARGET, tmp_path)
    assert ens["experiment"]["members"] == [0, 1] and ens["excluded"] == ["everest_M_24h_seed2"]


def test_rebuilt_only_when_members_change(tmp_path, splits):
    (yv, tv, rv), (yt, tt, rt) = splits
    val, test = _predictions(yv, tv, rv), _predictions(yt, tt, rt)
    for s in (0, 1):
        write_member(tmp_path / "results", s, val, test)
    build_ensemble(tmp_path / "results", TARGET, tmp_path)
    done = experiment_dir(ensemble_root(tmp_path), ensemble_name(TARGET)) / "ensemble.json"
    stamp = done.stat().st_mtime_ns
    build_ensemble(tmp_path / "results", TARGET, tmp_path)
    assert done.stat().st_mtime_ns == stamp
    write_member(tmp_path / "results", 2, val, test)
    assert build_ensemble(tmp_path / "results", TARGET, tmp_path)["experiment"]["members"] == [0, 1, 2]


def test_command_line(tmp_path, splits):
    (yv, tv, rv), (yt, tt, rt) = splits
    for s in (0, 1):
        write_member(tmp_path / "results", s, _predictions(yv, tv, rv), _predictions(yt, tt, rt))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "everest.cli", "ensemble", *args], capture_output=True,
                              text=True, cwd=REPO, timeout=120)

    ok = run("--output-dir", str(tmp_path))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("M-24: ensemble of seeds [0, 1]: test TSS ") and "Brier" in ok.stdout
    empty = run("--output-dir", str(tmp_path / "nothing"))
    assert empty.returncode == 2 and "no ensemble could be built" in empty.stderr
    asked = run("--output-dir", str(tmp_path), "--targets", "C-24")
    assert asked.returncode == 2 and "C-24: not built: C-24: no finished seed" in asked.stdout


def test_an_ensemble_built_by_earlier_code_is_current(tmp_path, splits):
    """The identity digest is the one ensemble.json recorded before EnsembleIdentity: no rebuild after the move."""
    import hashlib

    (yv, tv, rv), (yt, tt, rt) = splits
    for s in (0, 1):
        write_member(tmp_path / "results", s, _predictions(yv, tv, rv), _predictions(yt, tt, rt))
    ens = build_ensemble(tmp_path / "results", TARGET, tmp_path)
    folders = [tmp_path / "results" / f"everest_M_24h_seed{s}" for s in (0, 1)]
    content = [hashlib.sha256(b"".join((f / n).read_bytes() for n in ("results.json", "val_predictions.csv",
                                                                     "predictions.csv"))).hexdigest() for f in folders]
    key = json.dumps(["c0", "v", {"f": "h"}], sort_keys=True)
    earlier = hashlib.sha256(json.dumps(["ensemble-1", key, [f.name for f in folders], content]).encode()).hexdigest()
    assert ens["provenance"]["ensemble_identity"] == earlier[:16]


def test_the_analysis_reads_ensembles_and_never_builds_them(tmp_path, splits):
    """Alone, the analysis writes nothing under ensemble/ and says the ensemble was not built; built first, it is
    read; a member rewritten since makes it out of date, never silently rebuilt."""
    from everest.analysis import ProductionAnalyzer

    (yv, tv, rv), (yt, tt, rt) = splits
    for s in (0, 1):
        write_member(tmp_path / "results", s, _predictions(yv, _noisy(tv, s), rv), _predictions(yt, _noisy(tt, s), rt))

    def analyse() -> pd.Series:
        ProductionAnalyzer(tmp_path / "results", targets=["M-24"], seeds=[0, 1], n_bootstrap=100,
                           make_plots=False).run_complete_analysis()
        return pd.read_csv(tmp_path / "analysis" / "ensemble.csv").set_index("target").loc["M-24"]

    row = analyse()
    assert not ensemble_root(tmp_path).exists()
    assert row["note"].startswith("not built: `everest ensemble --output-dir ")
    assert "No ensemble: M-24: not built" in (tmp_path / "analysis" / "production_training_report.md").read_text()
    assert build_ensembles(tmp_path / "results", tmp_path, [TARGET])["M-24"]["experiment"]["members"] == [0, 1]
    row = analyse()
    assert row["members"] == 2 and pd.isna(row["note"])
    done = experiment_dir(ensemble_root(tmp_path), ensemble_name(TARGET)) / "ensemble.json"
    stamp = done.stat().st_mtime_ns
    write_member(tmp_path / "results", 1, _predictions(yv, _noisy(tv, 5), rv), _predictions(yt, _noisy(tt, 5), rt))
    assert analyse()["note"].startswith("out of date") and done.stat().st_mtime_ns == stamp
    assert isinstance(read_ensembles(tmp_path / "results", tmp_path, [TARGET])["M-24"], str)
    write_member(tmp_path / "results", 1, _predictions(yv, tv, rv + 5000), _predictions(yt, tt, rt))
    assert "different validation samples" in analyse()["note"]  # the reason it cannot be built, not "not built"


def test_the_analysis_leaves_out_an_ensemble_of_stale_results(tmp_path, splits):
    """M-24's seeds are of another configuration than the run's (C-24's five seeds): the analysis leaves them out
    as stale, and their ensemble too."""
    from test_analysis import write_experiment

    from everest.analysis import ProductionAnalyzer

    (yv, tv, rv), (yt, tt, rt) = splits
    for s in (0, 1):
        write_member(tmp_path / "results", s, _predictions(yv, tv, rv), _predictions(yt, tt, rt), config_hash="old")
    for s in range(5):
        write_experiment(tmp_path / "results", "C-24", s, metrics={"tss": 0.5}, config_hash="c0", code_version="v")
    assert isinstance(build_ensembles(tmp_path / "results", tmp_path, [TARGET])["M-24"], dict)
    a = ProductionAnalyzer(tmp_path / "results", targets=["C-24", "M-24"], n_bootstrap=100, make_plots=False)
    assert a.ensembles["M-24"] == ("built from results this analysis leaves out as stale (everest_M_24h_seed0, "
                                   "everest_M_24h_seed1)")
