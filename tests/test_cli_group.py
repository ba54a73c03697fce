"""``everest train`` with several experiments: one group, each member's own failure recorded, one exit status.

Every test runs the real command (``everest.cli.main``, in this process) on the tiny synthetic tables with a
tiny model on the CPU:

* a finished group exits 0 and prints one line per member, the line the single-experiment command prints;
* members that fail alone (a member whose checkpoint holds NaN weights diverges in epoch 2; a garbage or
  missing training table is a DataError) get their own ``failure.json`` (with the run's identity when the
  data files can be hashed) while the others finish, and the group exits with the member's status (2 for
  bad input, 3 for divergence, 2 when both happen);
* SIGTERM stops the whole group with status 4, every member checkpointed and no member failure records;
* one experiment is trained alone as before: its failure is the command's (``error:`` line, no record);
* an experiment listed twice is bad input; ``everest results failure`` records several members at once.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import ONE_THREAD, overrides, set_args

from everest import cli
from everest.config import Experiment, Target, run_config
from everest.data.tables import data_file
from everest.errors import EXIT_DIVERGED, EXIT_TIME_LIMIT, EXIT_USAGE, Preempted
from everest.training.group import train_group

GROUP = ["1", "2", "21"]  # everest_C_24h_seed0, everest_C_24h_seed1, everest_M_48h_seed0
NAMES = [Experiment.from_array_index(int(k)).name for k in GROUP]
SETTINGS = overrides(ONE_THREAD)  # the tiny model, one thread
RUN = [*set_args(SETTINGS), "--device", "cpu"]


def _train(argv: list[str], data_dir: Path, out: Path) -> tuple[int, str, str]:
    """Run ``everest train ARGV`` in this process; its exit status, stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = cli.main(["train", *argv, *RUN, "--data-dir", str(data_dir), "--output-dir", str(out)])
    return status, stdout.getvalue(), stderr.getvalue()


def _failure(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / "results" / name / "failure.json").read_text())


def _results(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / "results" / name / "results.json").read_text())


def test_experiment_options_name_a_group():
    parse = cli.build_parser().parse_args
    assert [e.array_index for e in cli.experiments_from_args(parse(["train", "--array-index", "1", "21"]))] == [1, 21]
    group = cli.experiments_from_args(parse(["train", "--flare_class", "M", "--time_window", "48", "--seed", "0", "7"]))
    assert [(str(e.target), e.seed) for e in group] == [("M-48", 0), ("M-48", 7)]
    assert cli.experiments_from_args(parse(["train", "--array-index", "41"])) == [Experiment.from_array_index(41)]
    # The other commands still take one experiment.
    with pytest.raises(SystemExit):
        parse(["baselines", "--array-index", "1", "2"])
    assert cli.experiment_from_args(parse(["baselines", "--array-index", "2"])) == Experiment.from_array_index(2)


# ---------------------------------------------------------------------- a group that finishes
@pytest.fixture(scope="module")
def finished_group(tiny_data, tmp_path_factory) -> tuple[Path, int, str, str]:
    """The three members trained for one epoch as one group: output root, exit status, stdout, stderr."""
    out = tmp_path_factory.mktemp("finished")
    return (out, *_train(["--array-index", *GROUP, "--epochs", "1"], tiny_data, out))


def test_all_members_finished_exit_0(finished_group, tiny_data):
    out, status, stdout, stderr = finished_group
    assert status == 0, stderr
    lines = stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == NAMES
    for name, line in zip(NAMES, lines, strict=True):
        res = _results(out, name)
        assert res["training"]["epochs_run"] == 1
        assert line.startswith(f"{name}: test TSS {res['test_metrics']['tss']:.3f} (threshold ")
        assert line.endswith(f"results in {out / 'results' / name}")
    assert not list(out.glob("results/*/failure.json")) and "FAILED" not in stderr
    # The single-experiment command on the same output finds each member finished (same identity) and
    # prints the very line the group printed for it.
    for k, line in zip(GROUP, lines, strict=True):
        alone, alone_out, alone_err = _train(["--array-index", k, "--epochs", "1"], tiny_data, out)
        assert alone == 0, alone_err
        assert alone_out.splitlines() == [line]


# ---------------------------------------------------------------------- members that fail alone
CONFIG = run_config(None, SETTINGS, epochs=2, device="cpu")  # what ``everest train ... --epochs 2`` builds


def _stop_after_epoch_one(report) -> None:
    if report.epoch == 1 and report.experiment == NAMES[-1]:
        os.kill(os.getpid(), signal.SIGTERM)  # recorded by the group's handler, acted on at the next step


@pytest.fixture(scope="module")
def checkpointed(tiny_data, tmp_path_factory) -> Path:
    """An output root where every member of the group checkpointed after epoch 1 of 2 (stopped by SIGTERM)."""
    out = tmp_path_factory.mktemp("checkpointed")
    with pytest.raises(Preempted):
        train_group([Experiment.from_array_index(int(k)) for k in GROUP], config=CONFIG, data_dir=tiny_data,
                    output_dir=out, progress=_stop_after_epoch_one)
    for name in NAMES:
        assert torch.load(out / "checkpoints" / f"{name}.pt", weights_only=True)["epoch"] == 1
    return out


@pytest.fixture(scope="module")
def broken_data(tiny_data, tmp_path_factory) -> Path:
    """The tiny tables with M-48's training table overwritten by a table that is not a SHARP table."""
    broken = tmp_path_factory.mktemp("broken") / "data"
    shutil.copytree(tiny_data, broken)
    data_file(broken, Target.parse("M-48"), "train").write_text("not,a,sharp,table\n")
    return broken


def _poison(checkpoint: Path) -> None:
    """NaN model weights (the rest of the checkpoint intact): the member diverges in its next epoch."""
    ck = torch.load(checkpoint, weights_only=True)
    ck["model"] = {k: torch.full_like(v, math.nan) for k, v in ck["model"].items()}
    torch.save(ck, checkpoint)


# case: (members whose checkpoint is poisoned, data folder, failed member -> (error type, message part), status)
CASES = {
    "diverged": ({"everest_M_48h_seed0"}, "tiny",
                 {"everest_M_48h_seed0": ("TrainingDiverged", "training loss is nan at epoch 2")}, EXIT_DIVERGED),
    "data": (set(), "broken", {"everest_M_48h_seed0": ("DataError", "training_data_M_48.csv")}, EXIT_USAGE),
    # Several kinds: bad input wins over divergence.
    "both": ({"everest_C_24h_seed1"}, "broken",
             {"everest_C_24h_seed1": ("TrainingDiverged", "training loss is nan at epoch 2"),
              "everest_M_48h_seed0": ("DataError", "training_data_M_48.csv")}, EXIT_USAGE),
}


@pytest.mark.parametrize("case", list(CASES))
def test_members_failing_alone_get_failure_json_and_the_status(case: str, checkpointed, tiny_data, broken_data,
                                                               tmp_path: Path):
    poisoned, data, failing, expected = CASES[case]
    out = tmp_path / "out"
    shutil.copytree(checkpointed, out)
    for name in poisoned:
        _poison(out / "checkpoints" / f"{name}.pt")
    data_dir = tiny_data if data == "tiny" else broken_data
    status, stdout, stderr = _train(["--array-index", *GROUP, "--epochs", "2"], data_dir, out)
    assert status == expected, stderr
    reported = {line.split(": FAILED: ")[0]: line.split(": FAILED: ")[1]
                for line in stderr.splitlines() if ": FAILED: " in line}
    assert reported.keys() == failing.keys()
    for name, (error_type, part) in failing.items():
        failure = _failure(out, name)
        assert failure["error_type"] == error_type
        message = reported[name].removeprefix(f"{error_type}: ").rsplit("; recorded in ", 1)[0]
        assert part in message
        assert failure["error"].startswith(f"{message} (exit status {2 if error_type == 'DataError' else 3}; "
                                           f"trained in a group of 3: {', '.join(NAMES)})")
        # The data files can be hashed (a garbage table too): the record names the run's identity.
        identity = failure["identity"]
        target = Experiment.from_array_index(int(GROUP[NAMES.index(name)])).target
        assert identity["experiment"] == name and identity["config_hash"] == CONFIG.config_hash()
        assert set(identity["data_hashes"]) == {data_file(data_dir, target, s).name for s in ("train", "test")}
        assert not (out / "results" / name / "results.json").exists()
    finished = [n for n in NAMES if n not in failing]
    assert [line.split(":")[0] for line in stdout.splitlines()] == finished
    for name in finished:  # the others continued from their checkpoints and finished as if alone
        assert _results(out, name)["training"]["resumed_after_epoch"] == 1
        assert not (out / "results" / name / "failure.json").exists()
    assert f"{len(failing)} of 3 experiments of the group failed; exit status {expected}" in stderr


def test_failure_records_no_identity_when_the_data_cannot_be_hashed(tiny_data, tmp_path: Path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    data_file(data, Target.parse("M-48"), "test").unlink()
    status, stdout, stderr = _train(["--flare_class", "M", "--time_window", "48", "--seed", "0", "1",
                                     "--epochs", "1"], data, tmp_path / "out")
    assert status == EXIT_USAGE, stderr
    for name in ("everest_M_48h_seed0", "everest_M_48h_seed1"):
        failure = _failure(tmp_path / "out", name)
        assert failure["error_type"] == "DataError" and "testing_data_M_48.csv" in failure["error"]
        assert failure["identity"] is None
    assert stdout == "" and "2 of 2 experiments of the group failed; exit status 2" in stderr


# ---------------------------------------------------------------------- a group stopped as a whole
def _sigterm_once_checkpointed(checkpoints: Path, done: threading.Event) -> None:
    deadline = time.monotonic() + 240
    while not done.is_set() and time.monotonic() < deadline:
        if any(checkpoints.glob("*.pt")):  # training is under way: the group's handler is installed
            os.kill(os.getpid(), signal.SIGTERM)
            return
        time.sleep(0.02)


def test_preempted_group_exits_4_without_member_records(tiny_data, tmp_path: Path):
    """SIGTERM stops the whole group: status 4 as for one experiment; the job script records the members."""
    out = tmp_path / "out"
    done = threading.Event()
    sender = threading.Thread(target=_sigterm_once_checkpointed, args=(out / "checkpoints", done), daemon=True)
    # A signal that came too late (the group already over) must fail this test, not end the test run.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    sender.start()
    try:
        status, stdout, stderr = _train(["--array-index", "1", "2", "--epochs", "50",
                                         "--set=train.early_stopping_patience=50"], tiny_data, out)
    finally:
        done.set()
        sender.join()
        signal.signal(signal.SIGTERM, previous)
    assert status == EXIT_TIME_LIMIT, stderr
    assert "stopped: stopped by SIGTERM" in stderr and stdout == "" and "FAILED" not in stderr
    for name in NAMES[:2]:  # every member checkpointed, none finished, none recorded as failed
        assert torch.load(out / "checkpoints" / f"{name}.pt", weights_only=True)["epoch"] >= 1
        assert not (out / "results" / name / "results.json").exists()
    assert not list(out.glob("results/*/failure.json"))


# ---------------------------------------------------------------------- one experiment, bad input, records
def test_one_experiment_is_trained_alone_as_before(tiny_data, tmp_path: Path):
    """One experiment does not go through the group: its failure is the command's, with no failure.json."""
    status, stdout, stderr = _train(["--array-index", "7", "--epochs", "1", "--set=train.learning_rate=1e30"],
                                    tiny_data, tmp_path / "out")
    assert status == EXIT_DIVERGED
    assert "error: everest_C_48h_seed1: training loss is nan at epoch 1" in stderr
    assert stdout == "" and "FAILED" not in stderr and "experiments of the group" not in stderr
    assert not list((tmp_path / "out").glob("results/*/failure.json"))


def test_an_experiment_listed_twice_is_bad_input(tiny_data, tmp_path: Path):
    status, _, stderr = _train(["--array-index", "3", "3"], tiny_data, tmp_path / "out")
    assert status == EXIT_USAGE
    assert "experiments listed twice: everest_C_24h_seed2" in stderr
    assert not (tmp_path / "out").exists()


def test_failure_record_of_several_members_at_once(tmp_path: Path):
    """``everest results failure --array-index K1 K2``: one process writes a record per member (the job script
    after a group stopped as a whole)."""
    assert cli.main(["results", "failure", "--output-dir", str(tmp_path / "out"), "--array-index", "1", "21",
                     "--status", "4", "--message", "stopped"]) == 0
    for name in ("everest_C_24h_seed0", "everest_M_48h_seed0"):
        assert {k: _failure(tmp_path / "out", name)[k] for k in ("error_type", "error")} == {
            "error_type": "ExitStatus4", "error": "stopped"}
