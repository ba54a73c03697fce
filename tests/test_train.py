"""The single-experiment trainer, end to end on tiny synthetic data (real files, real training, CPU).

A narrow model (``TINY``) keeps each run to seconds; the training logic under test is the production one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny import BATCH_256, ONE_THREAD, overrides, set_args

from everest import results
from everest.config import EverestConfig, Experiment, Target
from everest.data import synthetic
from everest.data.samples import prepare_experiment
from everest.scoring.calibration import fit_calibrator
from everest.scoring.inference import load_calibrator, load_model
from everest.scoring.metrics import best_threshold, evaluate, max_tss
from everest.training.train import ProductionTrainer, TrainingDiverged

pytestmark = pytest.mark.slow  # real training runs, killed and resumed, and command-line processes

TINY = overrides(BATCH_256, ONE_THREAD)


def tiny_config(*extra: str) -> EverestConfig:
    return EverestConfig().with_overrides([*TINY, *extra])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-data")
    synthetic.generate(out, size="tiny", seed=0)
    return out


def _train(data_dir: Path, out: Path, cfg: EverestConfig, progress=None, cls="M", seed=0) -> dict:
    return ProductionTrainer(Experiment.of(f"{cls}-24", seed), config=cfg, data_dir=data_dir, output_dir=out,
                             progress=progress).train()


def test_layout_and_contents(data_dir, tmp_path):
    res = _train(data_dir, tmp_path, tiny_config("train.epochs=3"))
    rd = tmp_path / "results" / "everest_M_24h_seed0"
    for name in ("results.json", "training_history.csv", "threshold_optimization.csv", "final_metrics.csv",
                 "predictions.csv"):
        assert (rd / name).stat().st_size > 0
    thr = pd.read_csv(rd / "threshold_optimization.csv")
    # every distinct validation-positive score was searched; the sweep shows 81 of them (design count)
    val_pred = pd.read_csv(rd / "val_predictions.csv")
    assert val_pred.y_prob_raw[val_pred.y_true == 1].nunique() == res["threshold"]["grid_points"]
    assert len(thr) == min(81, res["threshold"]["grid_points"])
    assert {"threshold", "threshold_calibrated", "val_tss", "test_tss", "val_balanced_score"} <= set(thr.columns)
    hist = pd.read_csv(rd / "training_history.csv")
    assert list(hist.epoch) == [1, 2, 3]
    assert {"train_loss", "focal", "evidential", "evt", "precursor", "val_loss", "val_tss", "val_auc", "lr",
            "seconds", "samples_per_s"} <= set(hist.columns)
    pred = pd.read_csv(rd / "predictions.csv")
    assert {"y_true", "y_prob", "y_pred", "aleatoric", "epistemic", "noaa_ar"} <= set(pred.columns)
    # the recorded test metrics are recomputable from predictions.csv at the validation-chosen threshold
    t = res["threshold"]["selected_raw"]
    assert res["threshold"]["source"] == "validation" and t == res["threshold"]["validation_raw"]
    assert t == thr.threshold[thr.val_tss.idxmax()]  # the best validation TSS (ties: the first, lowest)
    again = evaluate(pred.y_true, pred.y_prob_raw, t)
    assert again["tss"] == pytest.approx(res["test_metrics"]["tss"])
    assert (pred.y_pred == (pred.y_prob_raw >= t)).all()
    # the oracle threshold is that of the highest test TSS over all thresholds, and labelled as such
    assert res["threshold"]["oracle_test_raw"] == best_threshold(pred.y_true, pred.y_prob_raw)
    assert res["oracle_test_metrics"]["tss"] == pytest.approx(max_tss(pred.y_true, pred.y_prob_raw))
    assert "oracle" in res["threshold"]["note"]
    # probabilities are calibrated on validation (Platt by default); the raw ones are kept beside them
    assert res["calibration"]["method"] == "platt" and len(val_pred) == res["data"]["n_val"]
    cal = fit_calibrator(val_pred.y_true, val_pred.y_prob_raw, "platt")
    np.testing.assert_allclose(cal.apply(pred.y_prob_raw), pred.y_prob, rtol=1e-9)
    prov = res["provenance"]
    assert prov["config_hash"] == tiny_config("train.epochs=3").config_hash()
    assert set(prov["data_hashes"]) == {"training_data_M_24.csv", "testing_data_M_24.csv"}
    assert prov["torch"] == torch.__version__ and prov["device"] == "cpu"
    assert res["test_metrics"]["latency_ms"] > 0 and res["test_metrics"]["latency_single_ms"] > 0
    # the saved model reloads with weights_only and reproduces the predictions
    md = tmp_path / "trained_models" / "everest_M_24h_seed0"
    assert md.is_symlink() and md.resolve() == (rd / "model").resolve()  # the design path, linked
    assert {p.name for p in md.iterdir()} == {"model_weights.pt", "scaler.json", "config.json", "calibration.json",
                                              "MODEL_CARD.md"}
    model, cfg, scaler = load_model(md)
    data = prepare_experiment(data_dir, Target.parse("M-24"), 0, cfg.data, cfg.model.seq_len)
    with torch.no_grad():
        p = torch.sigmoid(model(torch.from_numpy(data.test.x), torch.from_numpy(data.test.valid)).logits).numpy()
    np.testing.assert_allclose(p, pred.y_prob_raw, atol=1e-6)
    np.testing.assert_allclose(load_calibrator(md).apply(p), pred.y_prob, atol=1e-5)
    assert scaler["method"] == "log_standard"
    assert not (tmp_path / "checkpoints" / "everest_M_24h_seed0.pt").exists()


def test_same_seed_gives_identical_metrics_and_predictions(data_dir, tmp_path):
    cfg = tiny_config("train.epochs=2")
    a = _train(data_dir, tmp_path / "a", cfg)
    b = _train(data_dir, tmp_path / "b", cfg)
    drop = ("latency_ms", "latency_single_ms")
    strip = {k: v for k, v in a["test_metrics"].items() if k not in drop}
    assert strip == {k: v for k, v in b["test_metrics"].items() if k not in drop}
    name = "results/everest_M_24h_seed0/predictions.csv"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    c = _train(data_dir, tmp_path / "c", cfg, seed=1)
    assert c["test_metrics"]["roc_auc"] != a["test_metrics"]["roc_auc"]


def test_restores_the_best_epoch_not_the_last(data_dir, tmp_path):
    # lr high enough that validation quality moves around, patience 2: training stops after a worse epoch
    cfg = tiny_config("train.epochs=30", "train.early_stopping_patience=2", "train.early_stopping_metric=val_loss",
                      "train.learning_rate=0.01")
    res = _train(data_dir, tmp_path, cfg)
    hist = res["history"]
    best = res["training"]["best_epoch"]
    assert best < len(hist) and res["training"]["stop_reason"].startswith("early_stopping")
    assert len(hist) - best == 2
    best_loss = min(h["val_loss"] for h in hist)
    assert hist[best - 1]["val_loss"] == best_loss and hist[-1]["val_loss"] > best_loss
    # the saved weights reproduce the best epoch's validation loss, not the last epoch's
    model, cfg2, _ = load_model(tmp_path / "trained_models" / "everest_M_24h_seed0")
    data = prepare_experiment(data_dir, Target.parse("M-24"), 0, cfg2.data, cfg2.model.seq_len)
    with torch.no_grad():
        p = torch.sigmoid(model(torch.from_numpy(data.val.x), torch.from_numpy(data.val.valid)).logits).double().numpy()
    y = data.val.y
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    loss = -np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc))
    assert loss == pytest.approx(best_loss, rel=1e-5)
    assert loss != pytest.approx(hist[-1]["val_loss"], rel=1e-5)


RESUME_ARGS = set_args(TINY) + ["--flare_class", "M", "--time_window", "24", "--seed", "0",
                                "--epochs", "6", "--set=train.early_stopping_patience=20"]


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory) -> dict:
    """An uninterrupted 6-epoch run to compare interrupted-and-resumed runs with."""
    out = tmp_path_factory.mktemp("reference")
    ref = subprocess.run([sys.executable, "-m", "everest", "train", *RESUME_ARGS, "--data-dir", str(data_dir),
                          "--output-dir", str(out)], capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    return json.loads((out / "results" / "everest_M_24h_seed0" / "results.json").read_text())


def _interrupt(data_dir: Path, out: Path, sig: int) -> tuple[int, dict]:
    """Start a run, wait for its first checkpoint, send ``sig``; return its exit status and last checkpoint."""
    ckpt = out / "checkpoints" / "everest_M_24h_seed0.pt"
    proc = subprocess.Popen([sys.executable, "-m", "everest", "train", *RESUME_ARGS, "--data-dir", str(data_dir),
                             "--output-dir", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let it get into a later epoch
    os.kill(proc.pid, sig)
    proc.wait()
    return proc.returncode, torch.load(ckpt, weights_only=True)


def _resume_and_compare(data_dir: Path, out: Path, reference: dict, done_before: int) -> dict:
    seen: list[int] = []
    res = _train(data_dir, out, EverestConfig().with_overrides([*TINY, "train.epochs=6",
                                                                "train.early_stopping_patience=20"]),
                 progress=lambda r: seen.append(r.epoch))
    assert seen[0] == done_before + 1  # continued, not restarted
    assert res["training"]["resumed_after_epoch"] == done_before
    drop = ("latency_ms", "latency_single_ms")
    assert {k: v for k, v in res["test_metrics"].items() if k not in drop} == \
        {k: v for k, v in reference["test_metrics"].items() if k not in drop}
    assert [h["val_loss"] for h in res["history"]] == [h["val_loss"] for h in reference["history"]]
    return res


def test_killed_run_resumes_from_its_checkpoint_and_matches(data_dir, tmp_path, reference_run):
    status, ckpt = _interrupt(data_dir, tmp_path, signal.SIGKILL)
    assert status == -signal.SIGKILL, "the run finished before it could be killed"
    assert 1 <= ckpt["epoch"] < 6 and ckpt["partial"] is None
    _resume_and_compare(data_dir, tmp_path, reference_run, ckpt["epoch"])


def test_sigterm_checkpoints_mid_epoch_and_the_rerun_matches(data_dir, tmp_path, reference_run):
    status, ckpt = _interrupt(data_dir, tmp_path, signal.SIGTERM)
    assert status == 4, "SIGTERM should end the run with the 'rerun resumes' status"
    assert ckpt["partial"] is not None and ckpt["partial"]["offset"] >= 0
    _resume_and_compare(data_dir, tmp_path, reference_run, ckpt["epoch"])


def test_finished_experiment_is_skipped_unless_forced(data_dir, tmp_path):
    cfg = tiny_config("train.epochs=1")
    first = _train(data_dir, tmp_path, cfg)
    calls: list[int] = []
    again = _train(data_dir, tmp_path, cfg, progress=lambda r: calls.append(r.epoch))
    assert calls == [] and again == json.loads(json.dumps(first))
    changed = _train(data_dir, tmp_path, tiny_config("train.epochs=2"), progress=lambda r: calls.append(r.epoch))
    assert calls == [1, 2] and changed["training"]["epochs_run"] == 2


def test_code_version_bump_retrains_and_moves_the_old_results_aside(data_dir, tmp_path, monkeypatch):
    cfg = tiny_config("train.epochs=1")
    first = _train(data_dir, tmp_path, cfg)
    assert first["provenance"]["code_version"] == results.CODE_VERSION
    monkeypatch.setattr(results, "CODE_VERSION", "everest-test-bump")
    calls: list[int] = []
    again = _train(data_dir, tmp_path, cfg, progress=lambda r: calls.append(r.epoch))
    assert calls == [1] and again["provenance"]["code_version"] == "everest-test-bump"
    (old,) = (tmp_path / "results" / ".superseded" / "everest_M_24h_seed0").iterdir()
    assert json.loads((old / "results.json").read_text())["provenance"]["code_version"] == first["provenance"][
        "code_version"]
    assert (tmp_path / "trained_models" / "everest_M_24h_seed0" / "model_weights.pt").is_file()


def test_run_control_change_reuses_the_finished_results(data_dir, tmp_path):
    first = _train(data_dir, tmp_path, tiny_config("train.epochs=1"))
    calls: list[int] = []
    again = _train(data_dir, tmp_path, tiny_config("train.epochs=1", "train.eval_batch_size=64",
                                                   "train.time_limit_minutes=60", "train.device=cpu"),
                   progress=lambda r: calls.append(r.epoch))
    assert calls == [] and again == json.loads(json.dumps(first))


def test_non_finite_loss_stops_with_a_clear_error(data_dir, tmp_path):
    cfg = tiny_config("train.epochs=3", "train.learning_rate=1e30")
    with pytest.raises(TrainingDiverged, match="training loss is nan|training loss is inf"):
        _train(data_dir, tmp_path, cfg)
    assert not (tmp_path / "results" / "everest_M_24h_seed0" / "results.json").exists()


def test_cli_array_index_and_errors(data_dir, tmp_path):
    base = [sys.executable, "-m", "everest", "train", "--data-dir", str(data_dir), "--output-dir", str(tmp_path)]
    ok = subprocess.run([*base, "--array-index", "16", "--epochs", "1", *set_args(TINY)],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "everest_M_24h_seed0: test TSS" in ok.stdout
    for bad, frag in [(["--array-index", "46"], "expected an integer in 1..45"),
                      (["--flare_class", "M"], "give --flare_class and --time_window"),
                      (["--array-index", "1", "--set", "train.batch_size=0"], "train.batch_size"),
                      (["--array-index", "1", "--set", "train.nope=1"], "unknown configuration key")]:
        r = subprocess.run([*base, *bad], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and frag in r.stderr, (bad, r.stderr)
        assert "Traceback" not in r.stderr


def test_results_say_whether_the_tables_are_synthetic(data_dir, tmp_path):
    """Generated tables carry their truth sidecars; a copy of the same tables without them reads as real data,
    and the report of synthetic results says so at the top."""
    from everest.analysis import ProductionAnalyzer

    cfg = tiny_config("train.epochs=1")
    assert _train(data_dir, tmp_path / "a", cfg)["data"]["synthetic"] is True
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("training_data_M_24.csv", "testing_data_M_24.csv"):
        (plain / name).write_bytes((data_dir / name).read_bytes())
    assert _train(plain, tmp_path / "b", cfg)["data"]["synthetic"] is False
    report = ProductionAnalyzer(tmp_path / "a" / "results", tmp_path / "a", targets=["M-24"], seeds=[0],
                                make_plots=False).run_complete_analysis().report
    assert "Synthetic data: 1 of 1 finished experiments" in Path(report).read_text()
