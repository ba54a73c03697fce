"""The flow with ``experiments_per_gpu`` > 1: experiments trained in groups, one task per group, on a real
Prefect server and a real Dask LocalCluster, on tiny synthetic data. Caching, failures and reporting stay
per experiment."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner
from tables import copy_with_bad_c48, spoil_after_preflight
from test_flow import task_states
from tiny import overrides

from everest import results
from everest.config import EverestConfig, experiment_groups
from flows.production import ProductionParameters, make_flow
from flows.tasks import GroupJob

TINY = overrides("train.epochs=2")


def _profile(tmp_path: Path, width: int) -> str:
    path = tmp_path / f"width{width}.yaml"
    path.write_text(f"kind: local\ngpus: 0\nn_workers: 2\ntorch_threads: 1\nexperiments_per_gpu: {width}\n"
                    "dashboard_address: null\n")
    return str(path)


def _run(profile: str, threads: bool = False, **params) -> State:
    """A flow run on the profile's LocalCluster, or with ``threads`` on Prefect's thread pool (the grouping is
    the profile's either way; reruns that train little need no cluster)."""
    flow = make_flow(profile)
    if threads:
        flow = flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=2))
    return flow(**ProductionParameters(profile=profile, baselines=False, overrides=TINY, **params).flow_parameters(),
                return_state=True)


def _training(state: State) -> dict[str, str]:
    """Training task-run name -> final state name."""
    return {name: st for name, st in task_states(state).items() if name.startswith("train-")}


def _logs(state: State, *needles: str) -> str:
    """The flow run's log (its own lines and its tasks'), read back from the Prefect API once every one of
    ``needles`` has arrived (workers send their records in batches), or after 30 s."""
    fid = state.state_details.flow_run_id
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fid])))
            text = "\n".join(log.message for log in logs)
            if all(n in text for n in needles) or time.monotonic() > deadline:
                return text
            time.sleep(1)


def _stamps(results: Path) -> dict[str, int]:
    """Modification time of every experiment's results.json (rewritten only when the experiment trains)."""
    return {p.parent.name: p.stat().st_mtime_ns for p in results.glob("*/results.json")}


def test_groups_follow_the_array_index_order_and_are_keyed_by_their_members_identities(tmp_path):
    experiments = ProductionParameters().experiments  # all 45: C-24 seeds 0-4, C-48, ..., M5-72
    by_target = experiment_groups(experiments, 5)
    assert len(by_target) == 9 and all(len({e.target for e in g}) == 1 for g in by_target)
    assert [len(g) for g in experiment_groups(experiments, 45)] == [45]
    assert [len(g) for g in experiment_groups(experiments, 2)] == [2] * 22 + [1]
    cfg = EverestConfig()

    def job(group) -> GroupJob:
        ids = tuple(results.identity_for(e, cfg, {"f.csv": "0"}) for e in group)
        return GroupJob(experiments=group, identities=ids, config=cfg, data_dir=tmp_path, output_dir=tmp_path)

    one, pair, other = job(by_target[0][:1]), job(by_target[0][:2]), job(by_target[0][1:3])
    assert one.cache_key() == f"group1-{one.identities[0].key()}" and one.name == "everest_C_24h_seed0"
    assert pair.cache_key().startswith("group2-") and pair.cache_key() != other.cache_key()
    assert pair.name == "everest_C_24h_seed0..everest_C_24h_seed1"


def test_groups_of_two_train_report_and_cache_each_experiment(prefect_server, tiny_data, tmp_path):
    out = tmp_path / "out"
    params = {"targets": ["M-24"], "seeds": [0, 1, 2], "data_dir": str(tiny_data), "output_dir": str(out)}
    names = [f"everest_M_24h_seed{s}" for s in (0, 1, 2)]

    first = _run(_profile(tmp_path, 2), **params)
    assert first.is_completed(), first.message
    # 3 experiments in groups of 2, seeds inner: two tasks.
    assert _training(first) == {"train-everest_M_24h_seed0..everest_M_24h_seed1": "Completed",
                                  "train-everest_M_24h_seed2": "Completed"}
    for name in names:  # where a one-experiment task puts them
        folder = out / "results" / name
        assert json.loads((folder / "results.json").read_text())["experiment"]["name"] == name
        assert (folder / "predictions.csv").is_file() and (folder / "model" / "model_weights.pt").is_file()
        assert (out / "trained_models" / name / "model_weights.pt").is_file()
        assert not (out / "checkpoints" / f"{name}.pt").exists()
    summary = json.loads((out / "analysis" / "flow_summary.json").read_text())
    assert (summary["completed"], summary["failed"]) == (3, [])
    assert sorted(r["experiment"] for r in summary["results"]) == names
    log = _logs(first, "3 of 3 finished", "everest_M_24h_seed1: epoch 2/2: loss")
    assert "3 of 3 finished" in log and "in 2 tasks of up to 2 experiments each" in log
    assert "everest_M_24h_seed1: epoch 2/2: loss" in log  # a group's epoch lines name their experiment
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {f"progress-everest-m-24h-seed{s}" for s in (0, 1, 2)} <= keys  # one progress card each
    stamps = _stamps(out / "results")

    again = _run(_profile(tmp_path, 2), threads=True, **params)  # the same groups: every task is a cache hit
    assert again.is_completed(), again.message
    assert set(_training(again).values()) == {"Cached"}
    assert _stamps(out / "results") == stamps

    # Another width: other tasks, the same finished experiments.
    wider = _run(_profile(tmp_path, 3), threads=True, **params)
    assert wider.is_completed(), wider.message
    assert _training(wider) == {"train-everest_M_24h_seed0..everest_M_24h_seed2": "Completed"}
    assert _stamps(out / "results") == stamps  # nothing retrained
    log = _logs(wider, "3 of 3 finished")
    assert all(f"{name}: test TSS" in log for name in names) and log.count(", cached (") == 3


def test_a_member_that_fails_alone_fails_only_itself_and_the_rerun_trains_only_it(prefect_server, tiny_data,
                                                                                   tmp_path, monkeypatch):
    data = tmp_path / "data"
    bad, good_text = copy_with_bad_c48(tiny_data, data)  # a non-numeric TOTUSJH value
    spoil_after_preflight(monkeypatch, bad, good_text)
    out = tmp_path / "out"
    params = {"targets": ["M-24", "C-48"], "seeds": [0], "data_dir": str(data), "output_dir": str(out)}
    profile = _profile(tmp_path, 2)
    task = "train-everest_C_48h_seed0..everest_M_24h_seed0"  # one group of both, in array-index order

    first = _run(profile, **params)
    assert first.is_failed()
    assert "1 of 2 experiments failed: everest_C_48h_seed0;" in first.message, first.message
    assert _training(first) == {task: "Failed"}
    failure = json.loads((out / "results" / "everest_C_48h_seed0" / "failure.json").read_text())
    assert failure["error_type"] == "DataError" and "oops" in failure["error"]  # its own error, not the group's
    assert (out / "results" / "everest_M_24h_seed0" / "results.json").is_file()
    assert not (out / "results" / "everest_M_24h_seed0" / "failure.json").exists()
    summary = json.loads((out / "analysis" / "flow_summary.json").read_text())
    assert (summary["completed"], summary["failed"]) == (1, ["everest_C_48h_seed0"])
    log = _logs(first, "2 of 2 finished", "everest_C_48h_seed0: FAILED")
    assert "everest_M_24h_seed0: test TSS" in log and "everest_C_48h_seed0: FAILED: DataError" in log
    assert "2 of 2 finished" in log
    with get_client(sync_client=True) as client:  # not retried: it would fail the same way
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[first.state_details.flow_run_id])))
    run = next(r for r in runs if r.name == task)
    assert run.run_count == 1
    report = (out / "analysis" / "production_training_report.md").read_text()
    assert "everest_C_48h_seed0" in report
    stamps = _stamps(out / "results")

    bad.write_text(good_text)
    second = _run(profile, threads=True, **params)  # the group runs again and trains only its unfinished member
    assert second.is_completed(), second.message
    assert _training(second) == {task: "Completed"}
    assert _stamps(out / "results")["everest_M_24h_seed0"] == stamps["everest_M_24h_seed0"]
    assert (out / "results" / "everest_C_48h_seed0" / "results.json").is_file()
    assert not (out / "results" / "everest_C_48h_seed0" / "failure.json").exists()
    log = _logs(second, "2 of 2 finished")
    assert "everest_M_24h_seed0: test TSS" in log and ", cached (" in log and "trained in" in log
