"""The deployed flow: a real ``prefect server`` + process work pool + ``prefect deploy`` + ``prefect worker``.

``prefect deployment run everest-production/local`` on tiny data: one experiment fails on a bad data file,
the run ends Failed with the report written; after fixing the file, ``prefect flow-run retry`` reruns only
the failed experiments (the finished ones come back Cached) and the analysis.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from tables import spoil_once_checked
from tiny import overrides

from everest.data import synthetic

ROOT = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]
TINY = overrides("train.epochs=1")


def _cli(args: list[str], env: dict[str, str]) -> str:
    r = subprocess.run([*PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"prefect {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _wait_terminal(flow_run_id: uuid.UUID, timeout: float = 420, not_before: float = 0.0):
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(flow_run_id)
            if run.state.is_final() and run.state.timestamp.timestamp() > not_before:
                return run
            time.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} did not finish in {timeout} s (state {run.state.name})")


def _latest_task_states(flow_run_id: uuid.UUID) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    latest: dict[str, tuple] = {}
    for r in runs:
        key = r.state.timestamp
        if r.name not in latest or key > latest[r.name][0]:
            latest[r.name] = (key, r.state.name)
    return {name: state for name, (_, state) in latest.items()}


def test_deployment_run_then_retry_reruns_only_failures(prefect_server, tmp_path):
    data = tmp_path / "data"
    synthetic.generate(data, size="tiny", seed=0)
    bad = data / "training_data_C_48.csv"
    good = bad.read_text()
    lines = good.splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[6], "not-a-number", 1)
    out = tmp_path / "out"
    spoil_once_checked(out, bad, "\n".join(lines) + "\n")  # corrupt once the run has checked it: its task fails

    env = {**os.environ, "PREFECT_API_URL": prefect_server, "EVEREST_PROJECT_DIR": str(ROOT),
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
    _cli(["work-pool", "create", "everest", "--type", "process", "--overwrite"], env)
    deployed = _cli(["deploy", "--all", "--no-prompt"], env)
    for name in ("everest-production/local", "everest-production/pbs", "everest-production/slurm",
                 "everest-forecast/local"):
        assert name in deployed
    with get_client(sync_client=True) as client:  # the forecast's schedule is written, but paused
        (schedule,) = client.read_deployment_by_name("everest-forecast/local").schedules
    assert not schedule.active and schedule.schedule.interval.total_seconds() == 720
    worker = subprocess.Popen([*PREFECT, "worker", "start", "--pool", "everest", "--limit", "1"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        params = {"targets": ["M-24", "C-48"], "seeds": [0], "data_dir": str(data), "output_dir": str(out),
                  "overrides": TINY}
        started = _cli(["deployment", "run", "everest-production/local", "--params", json.dumps(params)], env)
        flow_run_id = uuid.UUID(next(w for w in started.split() if w.count("-") == 4 and len(w) == 36))
        first = _wait_terminal(flow_run_id)
        assert first.state.is_failed(), first.state
        assert "1 of 2 experiments failed" in first.state.message
        assert (out / "results" / "everest_M_24h_seed0" / "results.json").is_file()
        assert json.loads((out / "results" / "everest_C_48h_seed0" / "failure.json").read_text())["error_type"] \
            == "DataError"
        assert "everest_C_48h_seed0" in (out / "analysis" / "production_training_report.md").read_text()
        states = _latest_task_states(flow_run_id)
        assert states["train-everest_M_24h_seed0"] == "Completed"
        assert states["train-everest_C_48h_seed0"] == "Failed"

        bad.write_text(good)
        t_retry = time.time()
        _cli(["flow-run", "retry", str(flow_run_id)], env)
        second = _wait_terminal(flow_run_id, not_before=t_retry)
        assert second.state.is_completed(), second.state
        states = _latest_task_states(flow_run_id)
        assert states["train-everest_M_24h_seed0"] == "Cached"  # finished work is not redone
        assert states["train-everest_C_48h_seed0"] == "Completed"
        assert (out / "results" / "everest_C_48h_seed0" / "results.json").is_file()
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts()
        keys = {a.key for a in artifacts}
        # Keys name the flow run (a retried run's latest report is its key's latest version).
        run_name = second.name.lower()
        assert {"everest-report", "everest-final-metrics"} <= {k.removesuffix(f"-{run_name}") for k in keys if k}
        reports = [a.description for a in artifacts if a.key == f"everest-report-{run_name}"]
        assert any("2 of 2 experiments finished; attempt 2" in d for d in reports), reports
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=30)
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize("entrypoint", ["flows.production:everest_local", "flows.production:everest_pbs",
                                        "flows.production:everest_slurm"])
def test_deployment_entrypoints_load_as_modules(entrypoint):
    from prefect.flows import load_flow_from_entrypoint

    flow = load_flow_from_entrypoint(entrypoint)
    assert flow.name == "everest-production"
    assert {"targets", "seeds", "data_dir", "output_dir", "profile", "force"} <= set(flow.parameters.properties)


def test_deployment_form_offers_the_command_lines_defaults():
    """The form and the command line come from one parameter model: the form's defaults are the command line's (the
    embedded demo on the demo preset, all 45 experiments), the targets a choice of the 9, nothing required (a run
    with some parameters keeps the others), and a parameter that may be unset an empty input, not a null choice."""
    from prefect.flows import load_flow_from_entrypoint

    from everest.config import all_targets
    from flows.production import ProductionParameters
    from flows.run import command_line

    parser = command_line(ProductionParameters, "python -m flows.production", "")
    cli = ProductionParameters.from_args(parser.parse_args([])).flow_parameters()
    for variant in ("local", "pbs", "slurm"):
        schema = load_flow_from_entrypoint(f"flows.production:everest_{variant}").parameters.model_dump()
        props = schema["properties"]
        assert schema["required"] == [], variant
        for name, prop in props.items():
            assert prop.get("description"), f"{variant}: parameter {name} has no description"
            assert "anyOf" not in prop, f"{variant}: parameter {name} offers a null choice: {prop}"
        assert props["targets"]["items"]["enum"] == [str(t) for t in all_targets()]
        defaults = {name: prop.get("default") for name, prop in props.items()}
        # Targets left empty: those the data folder holds, resolved when the run validates its parameters
        # (all 9 for the embedded demo), as on the command line.
        assert cli["targets"] == [str(t) for t in all_targets()]
        assert defaults == {**cli, "targets": None, "profile": variant}, variant
