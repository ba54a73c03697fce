"""The Prefect flow ``everest-production`` against a real Prefect server, on tiny synthetic data.

Flow logic runs on Prefect's thread-pool runner; one run uses the real Dask LocalCluster profile.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.task_runners import ThreadPoolTaskRunner
from profiles_for_tests import for_test_machine
from tables import copy_with_bad_c48, spoil_after_preflight
from tiny import overrides

from flows.production import ProductionParameters, make_flow

pytestmark = pytest.mark.slow  # end-to-end flow runs and command-line processes of the flow

TINY = overrides("train.epochs=2")


def task_states(flow_state) -> dict[str, str]:
    """Task-run name -> final state name, read back from the Prefect API."""
    fid = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fid])))
    return {r.name: r.state.name for r in runs}


def _flow_run_name(flow_state) -> str:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_state.state_details.flow_run_id).name


def run_threads(**params):
    flow = make_flow("local").with_options(task_runner=ThreadPoolTaskRunner(max_workers=2))
    return flow(**ProductionParameters(**params).flow_parameters(), return_state=True)


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"targets": ["X-12"]}, "invalid target 'X-12'"),
        ({"targets": ["M-36"]}, "invalid target 'M-36'"),
        ({"targets": []}, "empty target list"),
        ({"targets": ["C-24", "C-24"]}, "duplicate targets"),
        ({"seeds": [0, 0]}, "distinct non-negative"),
        ({"seeds": [-1]}, "distinct non-negative"),
        ({"epochs": 0}, "greater than or equal to 1"),
        ({"targets": ["C-24; rm -rf ~"]}, "invalid target"),
    ],
)
def test_bad_parameters_are_refused_before_anything_runs(params, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[")):
        ProductionParameters(**params)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--targets", "X-12"], "invalid target 'X-12'"),
        (["--seeds", "0", "0"], "distinct non-negative"),
        (["--profile", "nope"], "nope"),
        (["--set", "train.batch_size=0"], "train.batch_size"),
    ],
)
def test_command_line_rejects_bad_input_with_exit_2(args, fragment, tmp_path):
    r = subprocess.run([sys.executable, "-m", "flows.production", *args, "--output-dir", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert fragment in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_failure_is_reported_and_rerun_retrains_only_it(prefect_server, tiny_data, tmp_path, monkeypatch):
    data = tmp_path / "data"
    bad, good_text = copy_with_bad_c48(tiny_data, data)  # a non-numeric TOTUSJH value
    spoil_after_preflight(monkeypatch, bad, good_text)
    out = tmp_path / "out"
    common = {"targets": ["M-24", "C-48"], "seeds": [0, 1], "data_dir": str(data), "output_dir": str(out),
              "overrides": TINY}

    first = run_threads(**common)
    assert first.is_failed()
    assert "2 of 4 experiments failed" in first.message and "4 of 8 baseline fits failed" in first.message
    for seed in (0, 1):
        failure = json.loads((out / "results" / f"everest_C_48h_seed{seed}" / "failure.json").read_text())
        assert failure["error_type"] == "DataError" and "oops" in failure["error"]
        assert (out / "results" / f"everest_M_24h_seed{seed}" / "results.json").is_file()
    report = (out / "analysis" / "production_training_report.md").read_text()
    assert "everest_C_48h_seed0" in report and "everest_C_48h_seed1" in report  # failures listed
    states = task_states(first)
    assert states["train-everest_M_24h_seed0"] == "Completed" and states["train-everest_C_48h_seed0"] == "Failed"

    bad.write_text(good_text)
    second = run_threads(**common)
    assert second.is_completed(), second.message
    states = task_states(second)
    assert states["train-everest_M_24h_seed0"] == "Cached" and states["train-everest_M_24h_seed1"] == "Cached"
    assert states["train-everest_C_48h_seed0"] == "Completed"
    assert not (out / "results" / "everest_C_48h_seed0" / "failure.json").exists()
    summary = json.loads((out / "analysis" / "flow_summary.json").read_text())
    assert summary["failed"] == [] and (summary["completed"], summary["baselines_fitted"]) == (4, 8)
    assert states["logistic-everest_M_24h_seed0"] == "Cached" and states["boosted-everest_C_48h_seed1"] == "Completed"
    assert (out / "baselines" / "boosted" / "results" / "everest_C_48h_seed1" / "results.json").is_file()

    forced = run_threads(**{**common, "targets": ["M-24"], "seeds": [0], "force": True})
    assert task_states(forced)["train-everest_M_24h_seed0"] == "Completed"  # --force retrains


def test_dask_local_cluster_end_to_end_with_artifacts(prefect_server, tiny_data, tmp_path):
    profile = tmp_path / "ci-local.yaml"
    profile.write_text("kind: local\ngpus: 0\nn_workers: 2\ntorch_threads: 1\ndashboard_address: null\n")
    out = tmp_path / "out"
    flow = make_flow(str(profile))
    state = flow(**ProductionParameters(targets=["M5-24"], seeds=[0, 1], data_dir=str(tiny_data),
                                        output_dir=str(out), profile=str(profile), overrides=TINY).flow_parameters(),
                 return_state=True)
    assert state.is_completed(), state.message
    assert set(task_states(state).values()) == {"Completed"}
    assert (out / "analysis" / "production_training_report.md").is_file()
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    run_key = "-" + _flow_run_name(state).lower()  # report keys name the flow run
    assert {f"everest-report{run_key}", f"everest-final-metrics{run_key}", "progress-everest-m5-24h-seed0"} <= keys



def test_missing_or_incomplete_data_folder_is_refused_and_never_filled(tiny_data, tmp_path):
    missing = tmp_path / "no-such-data"
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_data / "training_data_C_24.csv", partial)  # its testing table is missing
    for folder, fragment in ((missing, "does not exist"), (partial, "lacks 1 of the 2 tables")):
        r = subprocess.run([sys.executable, "-m", "flows.production", "--targets", "C-24", "--data-dir", str(folder),
                            "--output-dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and fragment in r.stderr and "testing_data_C_24.csv" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not missing.exists() and sorted(p.name for p in partial.iterdir()) == ["training_data_C_24.csv"]
    assert not (tmp_path / "o").exists()


def test_loopback_prefect_api_is_refused_for_a_batch_profile_before_qsub(tiny_data, tmp_path):
    """A compute node resolves 127.0.0.1 to itself: the run is refused in seconds, naming PREFECT_API_URL."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "qsub").write_text(f"#!/bin/sh\ntouch {tmp_path}/qsub-called\nexit 1\n")
    (fake / "qsub").chmod(0o755)
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api",
           "PATH": f"{fake}:{os.environ['PATH']}"}
    r = subprocess.run([sys.executable, "-m", "flows.production", "--profile", "pbs", "--targets", "C-24",
                        "--data-dir", str(tiny_data), "--output-dir", str(tmp_path / "o")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "PREFECT_API_URL" in r.stderr and "loopback" in r.stderr, r.stderr
    assert not (tmp_path / "qsub-called").exists() and not (tmp_path / "o").exists()


def test_results_on_disk_decide_cache_hits_and_failures_never_leave_stale_results(prefect_server, tiny_data,
                                                                                  tmp_path, monkeypatch):
    from everest import results

    out = tmp_path / "out"
    base = {"targets": ["C-24"], "seeds": [0], "data_dir": str(tiny_data), "output_dir": str(out), "overrides": TINY}
    folder = out / "results" / "everest_C_24h_seed0"
    assert run_threads(**base).is_completed()
    first = json.loads((folder / "results.json").read_text())

    again = run_threads(**base)  # finished, results on disk: a cache hit
    assert task_states(again)["train-everest_C_24h_seed0"] == "Cached"

    shutil.rmtree(folder)  # deleted results are not a cache hit: the experiment trains again
    rerun = run_threads(**base)
    assert task_states(rerun)["train-everest_C_24h_seed0"] == "Completed"
    assert (folder / "results.json").is_file()

    monkeypatch.setattr(results, "CODE_VERSION", "everest-test-bump")  # new code: retrain, not the old file
    bumped = run_threads(**base)
    assert task_states(bumped)["train-everest_C_24h_seed0"] == "Completed"
    now = json.loads((folder / "results.json").read_text())
    assert now["provenance"]["code_version"] == "everest-test-bump" != first["provenance"]["code_version"]

    diverged = run_threads(**{**base, "overrides": [*TINY, "train.learning_rate=1e30"]})
    assert diverged.is_failed()
    assert (folder / "failure.json").is_file() and not (folder / "results.json").exists()
    report = (out / "analysis" / "production_training_report.md").read_text()
    assert "0 of 1" in report and "1 failed" in report


def test_refused_worker_job_ends_the_run_failed_with_qsubs_words_mock_pbs_qsub(prefect_server, tiny_data, tmp_path,
                                                                                monkeypatch):
    """PBS Pro's reply to an unknown queue (mocked: PBS Pro cannot be installed here) ends the flow run
    Failed with qsub's own message, instead of waiting forever for workers that never come."""
    from flows.profiles import load_profile

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "qsub").write_text("#!/bin/sh\necho 'qsub: Unknown queue' >&2\nexit 170\n")
    (fake / "qsub").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    site = for_test_machine(load_profile("pbs"), gpus_per_job=0)
    params = ProductionParameters(targets=["C-24"], seeds=[0], data_dir=str(tiny_data),
                                  output_dir=str(tmp_path / "out"), profile="pbs", overrides=TINY)
    state = make_flow(site)(**params.flow_parameters(), return_state=True)
    assert state.is_failed()
    assert "qsub failed with exit status 170: qsub: Unknown queue" in state.message, state.message
    failure = json.loads((tmp_path / "out" / "results" / "everest_C_24h_seed0" / "failure.json").read_text())
    assert failure["error_type"] == "SubmissionFailed" and "Unknown queue" in failure["error"]
