"""Experiment identity and results on disk (everest.results): finished or not, retrains move earlier results
aside, a failure never sits beside results, and the analysis reports what the folders say.

Identities and folders are written by hand where the rule is about files; the end-to-end cases train a tiny
model for one epoch and fail a rerun for real.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import ONE_THREAD, overrides, set_args

from everest import results as R
from everest.analysis import ProductionAnalyzer
from everest.config import EverestConfig, Experiment, Target

EXP = Experiment(target=Target.parse("M-24"), seed=0)
HASHES = {"training_data_M_24.csv": "a" * 64, "testing_data_M_24.csv": "b" * 64}
TINY = [*set_args(overrides(ONE_THREAD)), "--epochs", "1"]


def identity(**change) -> R.Identity:
    return R.identity_for(EXP, EverestConfig(), HASHES).model_copy(update=change)


def write_results(out: Path, ident: R.Identity, tss: float = 0.5) -> Path:
    """A finished experiment folder as the trainer leaves it (results.json recording ``ident``, a model)."""
    folder = R.experiment_dir(out, ident.experiment)
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model_weights.pt").write_bytes(b"weights")
    R.link_trained_model(out, EXP, folder / "model")
    (folder / "results.json").write_text(json.dumps({"experiment": {"name": ident.experiment},
                                                     "test_metrics": {"tss": tss},
                                                     "provenance": {**ident.provenance(), "device": "cpu"}}))
    return folder


def superseded(out: Path) -> list[Path]:
    return sorted((out / "results" / R.SUPERSEDED_DIR / EXP.name).iterdir())


# ---------------------------------------------------------------------- identity
def test_identity_key_is_the_cache_key_format_and_names_every_part():
    ident = identity()
    data = hashlib.sha256(json.dumps(HASHES, sort_keys=True).encode()).hexdigest()[:16]
    assert ident.key() == f"everest_M_24h_seed0-{EverestConfig().config_hash()}-{data}-{R.CODE_VERSION}"
    assert ident.key() == R.identity_for(EXP, EverestConfig(), dict(reversed(HASHES.items()))).key()
    for change in ({"config_hash": "0" * 16}, {"code_version": "other"}, {"experiment": "everest_M_24h_seed1"},
                   {"data_hashes": {**HASHES, "testing_data_M_24.csv": "c" * 64}}):
        assert identity(**change).key() != ident.key(), change


def test_identity_for_reads_the_code_version_at_call_time(monkeypatch):
    monkeypatch.setattr(R, "CODE_VERSION", "bumped")
    assert R.identity_for(EXP, EverestConfig(), HASHES).code_version == "bumped"


def test_results_without_a_code_version_record_no_identity():
    prov = identity().provenance()
    assert R.Identity.of_results({"experiment": {"name": EXP.name}, "provenance": prov}) == identity()
    del prov["code_version"]  # written by code older than the code version
    assert R.Identity.of_results({"experiment": {"name": EXP.name}, "provenance": prov}) is None
    assert R.Identity.of_results({}) is None


def test_experiment_names_parse_back():
    assert R.experiment_from_name("everest_M5_72h_seed3") == Experiment(target=Target.parse("M5-72"), seed=3)
    with pytest.raises(ValueError, match="invalid experiment name 'everest_X_1h_seed0'"):
        R.experiment_from_name("everest_X_1h_seed0")


# ---------------------------------------------------------------------- finished
def test_finished_only_with_the_same_identity_on_disk(tmp_path):
    folder = write_results(tmp_path, identity(), tss=0.7)
    assert R.finished(tmp_path, identity())["test_metrics"] == {"tss": 0.7}
    assert R.finished(tmp_path, identity(code_version="next")) is None
    assert R.finished(tmp_path, identity(config_hash="0" * 16)) is None
    (folder / "failure.json").write_text("{}")  # the latest attempt failed
    assert R.finished(tmp_path, identity()) is None
    (folder / "failure.json").unlink()
    (folder / "results.json").write_text("{not json")
    assert R.finished(tmp_path, identity()) is None


def test_deleted_results_folder_is_not_finished(tmp_path):
    folder = write_results(tmp_path, identity())
    assert R.finished(tmp_path, identity()) is not None
    shutil.rmtree(folder)
    assert R.finished(tmp_path, identity()) is None


# ---------------------------------------------------------------------- the results.json schema
def test_results_record_is_the_header_every_model_writes():
    """One header for EVEREST, a baseline and an ensemble: model, experiment block, provenance (identity last)."""
    ident = identity()
    res = R.results_record(ident, "everest", EXP.target, EXP.seed, {"test_metrics": {"tss": 0.5}}, {"device": "cpu"})
    assert list(res) == ["model", "experiment", "test_metrics", "provenance"] and res["model"] == "everest"
    assert res["experiment"] == {"name": EXP.name, "flare_class": "M", "horizon_hours": 24, "target": "M-24",
                                 "seed": 0, "model": "everest", "array_index": EXP.array_index}
    assert res["provenance"] == {**ident.provenance(), "device": "cpu"}
    assert R.Identity.of_results(res) == ident
    assert R.results_record(identity(experiment="everest_M_24h_seed7"), "logistic", EXP.target, 7,
                            {})["experiment"]["array_index"] is None  # only seeds 0-4 have an array index


def test_write_results_marks_finished_and_refuses_another_identity(tmp_path):
    ident = identity()
    (R.experiment_dir(tmp_path, EXP.name)).mkdir(parents=True)
    (R.experiment_dir(tmp_path, EXP.name) / R.FAILURE_FILE).write_text("{}")  # an earlier failed attempt
    res = R.results_record(ident, "everest", EXP.target, EXP.seed, {})
    with pytest.raises(ValueError, match="another identity"):
        R.write_results(tmp_path, identity(config_hash="0" * 16), res)
    R.write_results(tmp_path, ident, res)
    assert R.status(R.experiment_dir(tmp_path, EXP.name)) == "finished" and R.finished(tmp_path, ident) == res


def test_an_ensemble_identity_is_finished_by_its_own_file_and_members():
    """The ensemble's identity adds its version and a digest of its members; finished() reads ensemble.json."""
    member = identity()
    a = R.ensemble_identity_for("everest_M_24h_ensemble", member, "ensemble-1", {"s0": "1", "s1": "2"})
    assert a == R.ensemble_identity_for("everest_M_24h_ensemble", member.model_copy(update={"experiment": "x"}),
                                        "ensemble-1", {"s0": "1", "s1": "2"})  # members' run, not their names
    for other in (R.ensemble_identity_for("everest_M_24h_ensemble", member, "ensemble-1", {"s0": "1", "s1": "3"}),
                  R.ensemble_identity_for("everest_M_24h_ensemble", member, "ensemble-1", {"s0": "1"}),
                  R.ensemble_identity_for("everest_M_24h_ensemble", member, "ensemble-2", {"s0": "1", "s1": "2"}),
                  R.ensemble_identity_for("everest_M_24h_ensemble", identity(code_version="next"), "ensemble-1",
                                          {"s0": "1", "s1": "2"})):
        assert other != a and other.key() != a.key()
    res = R.results_record(a, "ensemble", EXP.target, None, {}, {"members_dir": "results"}, members=[0, 1])
    assert res["experiment"]["seed"] is None and "array_index" not in res["experiment"]
    assert R.EnsembleIdentity.of_results(res) == a and R.Identity.of_results(res) != a


def test_finished_reads_an_ensemble_from_ensemble_json(tmp_path):
    a = R.ensemble_identity_for("everest_M_24h_ensemble", identity(), "ensemble-1", {"s0": "1", "s1": "2"})
    res = R.results_record(a, "ensemble", EXP.target, None, {})
    assert R.finished(tmp_path, a) is None
    assert R.write_results(tmp_path, a, res).name == R.ENSEMBLE_FILE
    assert R.finished(tmp_path, a) == res
    assert R.finished(tmp_path, a.model_copy(update={"ensemble_identity": "0" * 16})) is None


# ---------------------------------------------------------------------- begin_attempt, record_failure
def test_begin_attempt_moves_results_of_another_identity_aside(tmp_path):
    write_results(tmp_path, identity(config_hash="0" * 16), tss=0.1)
    moved = R.begin_attempt(tmp_path, identity())
    assert moved == superseded(tmp_path)[0]
    assert json.loads((moved / "results.json").read_text())["test_metrics"]["tss"] == 0.1
    assert (moved / "model" / "model_weights.pt").is_file()
    assert not R.experiment_dir(tmp_path, EXP.name).exists()
    assert not (tmp_path / "trained_models" / EXP.name).is_symlink()  # no link to an earlier model


def test_begin_attempt_keeps_current_results_unless_forced(tmp_path):
    folder = write_results(tmp_path, identity())
    assert R.begin_attempt(tmp_path, identity()) is None and (folder / "results.json").is_file()
    assert R.begin_attempt(tmp_path, identity(), force=True) is not None
    assert not folder.exists() and len(superseded(tmp_path)) == 1


def test_begin_attempt_moves_a_failure_only_when_it_is_of_another_identity(tmp_path):
    R.record_failure(tmp_path, EXP, "Preempted", "stopped by SIGTERM")  # identity unknown (a batch job)
    assert R.begin_attempt(tmp_path, identity()) is None
    R.record_failure(tmp_path, EXP, "Preempted", "stopped by SIGTERM", identity())
    assert R.begin_attempt(tmp_path, identity()) is None  # resuming the same experiment: the record stays
    assert R.status(R.experiment_dir(tmp_path, EXP.name)) == "failed"
    assert R.begin_attempt(tmp_path, identity(config_hash="0" * 16)) is not None
    assert R.status(R.experiment_dir(tmp_path, EXP.name)) == "none"


def test_record_failure_moves_results_aside_and_never_sits_beside_them(tmp_path):
    write_results(tmp_path, identity())
    long = "start " + "x" * 5000 + " log /tmp/train_1.log"
    rec = R.record_failure(tmp_path, EXP, "TrainingDiverged", long, identity())
    folder = R.experiment_dir(tmp_path, EXP.name)
    assert sorted(p.name for p in folder.iterdir()) == ["failure.json"]
    assert json.loads((folder / "failure.json").read_text()) == rec
    assert rec["error"].startswith("start ") and rec["error"].endswith("train_1.log") and len(rec["error"]) < 2100
    assert rec["identity"] == identity().model_dump() and (rec["target"], rec["seed"]) == ("M-24", 0)
    assert (superseded(tmp_path)[0] / "results.json").is_file()
    assert R.finished(tmp_path, identity()) is None
    R.clear_failure(tmp_path, EXP.name)
    assert R.status(folder) == "none"


# ---------------------------------------------------------------------- command line (used by cluster/lib.sh)
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "everest", "results", "failure", *args], capture_output=True,
                          text=True, timeout=60)


def test_cli_writes_the_failure_record(tmp_path):
    write_results(tmp_path, identity())
    r = _cli("--output-dir", str(tmp_path), "--array-index", "16", "--status", "137", "--message=-killed")
    assert r.returncode == 0, r.stderr
    rec = R.read_failure(R.experiment_dir(tmp_path, "everest_M_24h_seed0"))
    assert {k: rec[k] for k in ("experiment", "target", "seed", "error_type", "error", "identity")} == {
        "experiment": "everest_M_24h_seed0", "target": "M-24", "seed": 0, "error_type": "ExitStatus137",
        "error": "-killed", "identity": None}
    assert not (R.experiment_dir(tmp_path, EXP.name) / "results.json").exists()
    r = _cli("--output-dir", str(tmp_path), "--experiment", "everest_C_48h_seed7", "--status", "3", "--message", "m")
    assert r.returncode == 0 and R.read_failure(tmp_path / "results" / "everest_C_48h_seed7")["seed"] == 7


@pytest.mark.parametrize(("args", "message"), [
    (["--array-index", "46"], "expected an integer in 1..45"),
    (["--experiment", "nope"], "invalid experiment name 'nope'"),
])
def test_cli_rejects_an_unknown_experiment(tmp_path, args, message):
    r = _cli("--output-dir", str(tmp_path), *args, "--status", "1", "--message", "m")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------------- end to end: a failed rerun
def test_failed_rerun_with_a_new_config_is_reported_failed_not_finished(tiny_data, tmp_path):
    """Train, then rerun with another config that diverges, as a batch job does: the old results.json is moved
    aside, and the report counts the experiment as failed (not 'finished' with the old numbers)."""
    base = [sys.executable, "-m", "everest", "train", "--array-index", "16", "--data-dir", str(tiny_data),
            "--output-dir", str(tmp_path), *TINY]
    first = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    rerun = subprocess.run([*base, "--set=train.learning_rate=1e30"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 3, rerun.stderr  # diverged
    assert _cli("--output-dir", str(tmp_path), "--array-index", "16", "--status", "3",
                "--message", rerun.stderr[-500:]).returncode == 0
    folder = R.experiment_dir(tmp_path, EXP.name)
    assert not (folder / "results.json").exists() and (folder / "failure.json").is_file()
    (old,) = superseded(tmp_path)
    assert json.loads((old / "results.json").read_text())["provenance"]["code_version"] == R.CODE_VERSION

    summary = ProductionAnalyzer(tmp_path / "results", tmp_path, targets=["M-24"], seeds=[0], n_bootstrap=100,
                                 make_plots=False).run_complete_analysis()
    assert (summary.n_completed, summary.n_failed, summary.n_stale) == (0, 1, 0)
    assert "0 of 1 expected experiments finished; 1 failed" in Path(summary.report).read_text()
