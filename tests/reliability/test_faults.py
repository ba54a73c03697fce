"""Faults survived: nothing finished is lost or recomputed, interrupted work resumes, failures are reported.

Real processes, real files, a real Prefect server and real Dask workers; tiny synthetic data and a narrow
model keep each case to seconds.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.task_runners import ThreadPoolTaskRunner
from profiles_for_tests import for_test_machine
from tiny import overrides, set_args

from everest import io
from everest.config import EverestConfig, Experiment
from everest.training.train import ProductionTrainer
from flows.production import ProductionParameters, make_flow

pytestmark = pytest.mark.slow  # faults injected into real training runs, flows and worker processes

TINY = overrides()
SLOWER = ["model.embed_dim=32", "model.ff_dim=64", "model.num_blocks=2", "model.num_heads=2"]


def _task_runs(flow_run_id) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r for r in runs}


def _wait_for_checkpoint(path: Path, epochs: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if path.exists() and torch.load(path, weights_only=True)["epoch"] >= epochs:
                return
        except (EOFError, RuntimeError):  # caught between write and rename: cannot happen, but be patient
            pass
        time.sleep(0.1)
    pytest.fail(f"no checkpoint with {epochs} finished epochs at {path}")


def _worker_pids() -> list[int]:
    """Dask worker processes of a LocalCluster started by this process (multiprocessing spawn children)."""
    pids = []
    for child in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        for pid in child.read_text().split():
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"multiprocessing" in cmd and b"spawn_main" in cmd:
                pids.append(int(pid))
    return pids


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_dask_worker_killed_mid_training_resumes_from_its_checkpoint(sig, prefect_server, tiny_data, tmp_path):
    """SIGKILL: a lost node; the experiment resumes after its last finished epoch. SIGTERM: a walltime kill,
    delivered to the worker process while training runs on a worker thread; the experiment checkpoints
    inside the epoch first, and the restarted worker resumes it from that sample on."""
    profile = tmp_path / "one-worker.yaml"
    profile.write_text("kind: local\ngpus: 0\nn_workers: 1\ntorch_threads: 1\ndashboard_address: null\n")
    out = tmp_path / "out"
    params = ProductionParameters(targets=["M-24"], seeds=[0], data_dir=str(tiny_data), output_dir=str(out),
                                  profile=str(profile),
                                  overrides=[*SLOWER, "train.epochs=8", "train.early_stopping_patience=20"])
    result: dict = {}
    # copy_context: the thread must see the test server's settings (a context variable), not start its own
    runner = threading.Thread(target=contextvars.copy_context().run, args=(lambda: result.update(
        state=make_flow(str(profile))(**params.flow_parameters(), return_state=True)),))
    runner.start()
    checkpoint = out / "checkpoints" / "everest_M_24h_seed0.pt"
    _wait_for_checkpoint(checkpoint, 2)
    victims = _worker_pids()
    assert victims, "found no Dask worker process to kill"
    for pid in victims:
        os.kill(pid, getattr(signal, sig))
    if sig == "SIGTERM":
        partial, deadline = None, time.monotonic() + 30
        while partial is None and time.monotonic() < deadline:  # before the restarted worker rewrites it
            try:
                partial = torch.load(checkpoint, weights_only=True).get("partial")
            except (EOFError, RuntimeError, FileNotFoundError):
                pass
            time.sleep(0.02)
        assert partial is not None and partial["offset"] > 0, "SIGTERM did not checkpoint inside the epoch"
    runner.join(timeout=300)
    assert result["state"].is_completed(), result["state"].message
    res = json.loads((out / "results" / "everest_M_24h_seed0" / "results.json").read_text())
    assert res["training"]["resumed_after_epoch"] >= 2  # picked up from the checkpoint, not from epoch 0
    assert [h["epoch"] for h in res["history"]] == list(range(1, 9))


def test_ctrl_c_marks_the_flow_run_cancelled_and_a_rerun_resumes(prefect_server, tiny_data, tmp_path):
    """Ctrl-C in the terminal: the run ends Cancelled on the server (not Running forever), exit 130."""
    out = tmp_path / "out"
    (tmp_path / "one.yaml").write_text("kind: local\ngpus: 0\nn_workers: 1\ntorch_threads: 1\n"
                                       "dashboard_address: null\n")
    args = [sys.executable, "-m", "flows.production", "--targets", "M-24", "--seeds", "0", "--data-dir",
            str(tiny_data), "--output-dir", str(out), "--profile", str(tmp_path / "one.yaml"), "--epochs", "8",
            *[f"--set={o}" for o in [*SLOWER, "train.early_stopping_patience=20"]]]
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(out / "checkpoints" / "everest_M_24h_seed0.pt", 1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "marked Cancelled" in stderr
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs() if (r.parameters or {}).get("output_dir") == str(out)]
    assert [r.state.name for r in runs] == ["Cancelled"]


def _processes_with(marker: str) -> list[str]:
    """``pid: command line`` of live processes whose environment or command line holds ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie has ended; only its parent's wait is missing
            env, cmd = (proc / "environ").read_bytes(), (proc / "cmdline").read_bytes()
        except OSError:  # ended while we looked
            continue
        if marker.encode() in env or marker.encode() in cmd:
            found.append(f"{proc.name}: " + cmd.replace(b"\0", b" ").decode(errors="replace"))
    return found


def _flow_runs_in_database(home: Path) -> list[tuple[str, str, str]]:
    """(name, state name, state message) of every flow run in a stopped private server's database."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(home / "prefect.db")) as db:
        return db.execute("SELECT flow_run.name, flow_run.state_name, flow_run_state.message FROM flow_run "
                          "JOIN flow_run_state ON flow_run_state.id = flow_run.state_id").fetchall()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_cancels_the_run_stops_its_server_and_workers_and_a_rerun_resumes(sig, tiny_data, tmp_path):
    """``timeout``, a batch system (SIGTERM) or a closed login session (SIGHUP) ends a command-line run like
    Ctrl-C: exit 128 + signal, the run Cancelled with the reason, its private Prefect server and Dask workers
    gone; the same command then resumes the interrupted experiment from its checkpoint."""
    out, home = tmp_path / "out", tmp_path / "prefect-home"
    (tmp_path / "one.yaml").write_text("kind: local\ngpus: 0\nn_workers: 1\ntorch_threads: 1\n"
                                       "dashboard_address: null\n")
    args = [sys.executable, "-m", "flows.production", "--targets", "M-24", "--seeds", "0", "--data-dir",
            str(tiny_data), "--output-dir", str(out), "--profile", str(tmp_path / "one.yaml"), "--epochs", "12",
            "--no-baselines", *set_args([*SLOWER, "train.early_stopping_patience=20"])]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")} | {"PREFECT_HOME": str(home)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = out / "checkpoints" / "everest_M_24h_seed0.pt"
    try:
        _wait_for_checkpoint(checkpoint, 1)
        proc.send_signal(getattr(signal, sig))
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + getattr(signal, sig), stderr[-3000:]
    message = [line for line in stderr.splitlines() if line.startswith(f"terminated by {sig}")]
    assert len(message) == 1 and "marked Cancelled; rerun the same command to resume" in message[0], stderr[-3000:]
    deadline, left = time.monotonic() + 15, _processes_with(str(home))
    while left and time.monotonic() < deadline:  # the server and the workers have been told to go: give them a moment
        time.sleep(0.2)
        left = _processes_with(str(home))
    assert not left, f"processes of the run left behind: {left}"
    assert [(state, msg) for _, state, msg in _flow_runs_in_database(home)] == [("Cancelled", f"terminated by {sig}")]
    assert not (out / "results" / "everest_M_24h_seed0" / "results.json").exists()

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    res = json.loads((out / "results" / "everest_M_24h_seed0" / "results.json").read_text())
    assert res["training"]["resumed_after_epoch"] >= 1  # picked up from the checkpoint, not from epoch 0
    assert [h["epoch"] for h in res["history"]] == list(range(1, 13))
    assert sorted(state for _, state, _ in _flow_runs_in_database(home)) == ["Cancelled", "Completed"]
    assert not _processes_with(str(home))


def test_flow_process_killed_mid_study_then_rerun_finishes_only_what_was_missing(prefect_server, tiny_data,
                                                                                 tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "flows.production", "--targets", "M-24", "--seeds", "0", "1", "2",
            "--data-dir", str(tiny_data), "--output-dir", str(out), "--profile", str(tmp_path / "one.yaml"),
            "--epochs", "6", *[f"--set={o}" for o in [*SLOWER, "train.early_stopping_patience=20"]]]
    (tmp_path / "one.yaml").write_text("kind: local\ngpus: 0\nn_workers: 1\ntorch_threads: 1\n"
                                       "dashboard_address: null\n")
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = out / "results" / "everest_M_24h_seed0" / "results.json"
    deadline = time.monotonic() + 300
    while not first.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.exists(), "the first experiment never finished"
    running = [p for p in (out / "checkpoints").glob("*.pt")]
    while not running and time.monotonic() < deadline:
        time.sleep(0.1)
        running = list((out / "checkpoints").glob("*.pt"))
    _wait_for_checkpoint(running[0], 1)
    os.killpg(proc.pid, signal.SIGKILL)  # the flow process and its Dask workers, like a lost login node
    proc.wait()
    finished_at = first.stat().st_mtime_ns
    interrupted = running[0].stem

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert first.stat().st_mtime_ns == finished_at  # not retrained, not rewritten
    resumed = json.loads((out / "results" / interrupted / "results.json").read_text())
    assert resumed["training"]["resumed_after_epoch"] >= 1
    assert "everest_M_24h_seed0" in rerun.stdout
    assert "3 experiments finished (+6 baseline fits), 0 failed" in rerun.stdout


@pytest.mark.parametrize("doing", ["nothing", "a task that is not training"])
def test_worker_reaching_its_lifetime_exits_within_seconds_not_after_the_checkpoint_grace(doing):
    """Idle, a worker at its lifetime closes at once; running a task that is not training (a baseline fit, an
    experiment writing its results) it waits for that task to end, not a 60 s grace for a checkpoint that never
    comes."""
    from distributed import Client, LocalCluster

    from flows.worker_setup import CHECKPOINT_GRACE_SECONDS

    lifetime, task_seconds = 3.0, 6.0
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      preload=["flows.worker_setup"], lifetime=f"{lifetime}s", lifetime_restart=False,
                      host="127.0.0.1") as cluster, Client(cluster) as client:
        started = time.monotonic()
        (pid,) = client.run(os.getpid).values()
        busy = doing != "nothing"
        if busy:
            client.submit(time.sleep, task_seconds, pure=False)
        while Path(f"/proc/{pid}").exists() and time.monotonic() - started < CHECKPOINT_GRACE_SECONDS + 30:
            time.sleep(0.05)
        took = time.monotonic() - started
    assert took < (task_seconds if busy else lifetime) + 5, f"the worker took {took:.1f} s to exit"
    assert not busy or took > task_seconds - 0.5  # it let the task finish


def _log_seconds(line: str) -> float | None:
    """Time of day in seconds of a job log line (Dask's ``2026-12-05 04:08:52,557 - ...``, Prefect's
    ``04:08:52.557 | ...``), None for other lines."""
    import re

    if m := re.match(r"\d{4}-\d\d-\d\d (\d\d):(\d\d):(\d\d),(\d{3}) - ", line) or \
            re.match(r"(\d\d):(\d\d):(\d\d)\.(\d{3}) \| ", line):
        h, mi, sec, ms = (int(g) for g in m.groups())
        return 3600 * h + 60 * mi + sec + ms / 1000
    return None


@pytest.mark.cluster
@pytest.mark.skipif(not shutil.which("sinfo"), reason="no SLURM here (tests/cluster/slurm.sh up)")
def test_batch_workers_retiring_at_their_lifetime_never_rerun_finished_work_and_leave_within_seconds(
        prefect_server, tiny_data, tmp_path, monkeypatch):
    """Two SLURM jobs whose workers retire after ~29 s: a short experiment and the baseline fits finish early on
    one, which then idles to its lifetime holding their results; a three times longer experiment spans both
    jobs' lifetimes and is handed back. No finished task runs again (every epoch and every task is logged
    once), and every worker reaching its lifetime has left its job within seconds."""
    import re
    from collections import Counter

    from everest.data import synthetic
    from flows.profiles import load_profile

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    synthetic.generate(tmp_path / "bigger", size="demo", seed=0)  # three times the windows of "tiny"
    for split in ("training", "testing"):
        shutil.copy(tmp_path / "bigger" / f"{split}_data_M_48.csv", data)
    logs = tmp_path / "logs"
    site = for_test_machine(load_profile("slurm"), minimum_jobs=2, maximum_jobs=2, walltime="00:01:30",
                            worker_lifetime_margin="00:01:00", worker_lifetime_stagger="00:00:01",
                            log_directory=str(logs))
    epochs, out = 24, tmp_path / "out"
    params = ProductionParameters(targets=["M-24", "M-48"], seeds=[0], data_dir=str(data), output_dir=str(out),
                                  profile="slurm", overrides=[*SLOWER, "train.batch_size=64", f"train.epochs={epochs}",
                                                              f"train.early_stopping_patience={epochs}"])
    state = make_flow(site)(**params.flow_parameters(), return_state=True)
    assert state.is_completed(), state.message

    lines = {p.name: p.read_text().splitlines() for p in sorted(logs.glob("*.err"))}
    logged = Counter(m.groups() for text in lines.values() for line in text
                     if (m := re.search(r"Task run '([^']+)' - (epoch \d+|Finished in state)", line)))
    runs = {task for task, _ in logged}
    assert {"train-everest_M_24h_seed0", "train-everest_M_48h_seed0", "logistic-everest_M_24h_seed0",
            "boosted-everest_M_48h_seed0"} <= runs, sorted(runs)
    again = {k: n for k, n in logged.items() if n > 1}
    assert not again, f"ran again: {again}"
    for name in ("M_24h", "M_48h"):
        res = json.loads((out / "results" / f"everest_{name}_seed0" / "results.json").read_text())
        assert [h["epoch"] for h in res["history"]] == list(range(1, epochs + 1))
    assert json.loads((out / "results" / "everest_M_48h_seed0" / "results.json").read_text()
                      )["training"]["resumed_after_epoch"] >= 1  # handed back at a lifetime, resumed by a new job

    retired = 0
    for job, text in lines.items():
        closing = [_log_seconds(ln) for ln in text if "Closing worker gracefully" in ln and "lifetime" in ln]
        ended = [_log_seconds(ln) for ln in text if "End worker" in ln or "Nanny at" in ln and "closed" in ln]
        if closing and ended:
            retired += 1
            assert ended[-1] - closing[0] < 10, f"{job}: left {ended[-1] - closing[0]:.1f} s after its lifetime"
        assert not any("exiting anyway" in ln for ln in text), job
    assert retired >= 2, f"fewer than two workers reached their lifetime: {sorted(lines)}"


def test_walltime_sigterm_then_sigkill_checkpoints_and_the_retry_resumes(tiny_data, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "everest", "train", "--flare_class", "M", "--time_window", "24", "--data-dir",
            str(tiny_data), "--output-dir", str(out), "--epochs", "8", "--set=train.early_stopping_patience=20",
            *[f"--set={o}" for o in SLOWER]]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = out / "checkpoints" / "everest_M_24h_seed0.pt"
    _wait_for_checkpoint(ckpt, 1)
    proc.send_signal(signal.SIGTERM)  # the batch system's warning ...
    try:
        proc.wait(timeout=10)  # ... and its grace period before SIGKILL
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the trainer did not stop within the grace period")
    assert proc.returncode == 4, proc.stderr.read()
    saved = torch.load(ckpt, weights_only=True)
    assert saved["partial"] is not None
    retry = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert retry.returncode == 0, retry.stderr
    res = json.loads((out / "results" / "everest_M_24h_seed0" / "results.json").read_text())
    assert res["training"]["resumed_after_epoch"] == saved["epoch"]


def _trainer(data: Path, out: Path, *extra: str) -> ProductionTrainer:
    cfg = EverestConfig().with_overrides([*TINY, "train.epochs=2", *extra])
    return ProductionTrainer(Experiment.of("M-24", 0), config=cfg, data_dir=data, output_dir=out)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupted_checkpoint_is_detected_and_training_restarts_cleanly(damage, tiny_data, tmp_path, caplog):
    trainer = _trainer(tiny_data, tmp_path)
    trainer.checkpoint_path.parent.mkdir(parents=True)
    reference = _trainer(tiny_data, tmp_path / "ref").train()
    if damage == "truncated":
        good = tmp_path / "good.pt"
        torch.save({"epoch": 1, "model": {}}, good)
        trainer.checkpoint_path.write_bytes(good.read_bytes()[:40])
    else:
        trainer.checkpoint_path.write_bytes(os.urandom(300))
    res = trainer.train()
    assert "cannot load checkpoint" in caplog.text
    assert res["training"]["resumed_after_epoch"] == 0
    assert res["test_metrics"]["tss"] == reference["test_metrics"]["tss"]  # a clean restart, same result


def test_corrupted_results_file_means_the_experiment_is_redone(tiny_data, tmp_path, caplog):
    first = _trainer(tiny_data, tmp_path).train()
    results = tmp_path / "results" / "everest_M_24h_seed0" / "results.json"
    results.write_text(results.read_text()[:100])  # half a file, as a crash without atomic writes would leave
    again = _trainer(tiny_data, tmp_path).train()
    assert "unreadable" in caplog.text
    assert json.loads(results.read_text())["test_metrics"]["tss"] == again["test_metrics"]["tss"] == \
        first["test_metrics"]["tss"]


def test_corrupted_sample_cache_is_rebuilt(tiny_data, tmp_path, caplog):
    _trainer(tiny_data, tmp_path).train()
    for cache in (tmp_path / "cache").glob("*.npz"):
        cache.write_bytes(b"PK\x03\x04 not really a zip")
    res = _trainer(tiny_data, tmp_path / "second", "train.epochs=1").train()
    assert res["training"]["epochs_run"] == 1


def test_a_crash_while_writing_never_leaves_half_a_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    io.write_json(target, {"ok": 1})

    def crash(self, *args, **kwargs):
        Path.write_bytes(self, b'{"ok": 2, "half')  # the new content gets half written, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        io.write_json(target, {"ok": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary left behind


def test_diverging_run_fails_clearly_is_not_retried_and_is_reported(prefect_server, tiny_data, tmp_path):
    out = tmp_path / "out"
    flow = make_flow("local").with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))
    params = ProductionParameters(targets=["M-24"], seeds=[0], data_dir=str(tiny_data), output_dir=str(out),
                                  overrides=[*TINY, "train.epochs=3", "train.learning_rate=1e30"])
    state = flow(**params.flow_parameters(), return_state=True)
    assert state.is_failed()
    failure = json.loads((out / "results" / "everest_M_24h_seed0" / "failure.json").read_text())
    assert failure["error_type"] == "TrainingDiverged" and "training loss is nan" in failure["error"].lower()
    run = _task_runs(state.state_details.flow_run_id)["train-everest_M_24h_seed0"]
    assert run.run_count == 1  # diverging again on retry would only burn GPU hours: not retried
    assert "everest_M_24h_seed0" in (out / "analysis" / "production_training_report.md").read_text()


def test_two_flows_on_one_output_directory_cannot_interleave(prefect_server, tiny_data, tmp_path):
    out = tmp_path / "out"
    flow = make_flow("local").with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))
    params = ProductionParameters(targets=["M-24"], seeds=[0], data_dir=str(tiny_data), output_dir=str(out),
                                  overrides=[*TINY, "train.epochs=1"])
    with io.exclusive_lock(out / ".everest.lock", "test holder"):  # stands for a first run in progress
        state = flow(**params.flow_parameters(), return_state=True)
    assert state.is_failed()
    assert "is in use by pid" in state.message and str(os.getpid()) in state.message
    assert not (out / "results").exists()
    assert flow(**params.flow_parameters(), return_state=True).is_completed()  # free again afterwards


def test_disk_full_while_writing_results_is_a_clear_error_and_earlier_results_survive(tiny_data, tmp_path):
    out = tmp_path / "out"
    earlier = _trainer(tiny_data, out).train()
    kept = (out / "results" / "everest_M_24h_seed0" / "results.json").read_bytes()
    limit = 64 * 1024  # a file-size limit stands for a full disk: writes past it fail with EFBIG

    def cap() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run([sys.executable, "-m", "everest", "train", "--flare_class", "M", "--time_window", "24",
                        "--seed", "1", "--data-dir", str(tiny_data), "--output-dir", str(out),
                        *set_args(TINY), "--epochs", "1"], preexec_fn=cap,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 5, r.stderr
    assert "File too large" in r.stderr and "Traceback" not in r.stderr
    assert (out / "results" / "everest_M_24h_seed0" / "results.json").read_bytes() == kept
    assert earlier["test_metrics"]["tss"] == json.loads(kept)["test_metrics"]["tss"]
    assert not (out / "results" / "everest_M_24h_seed1" / "results.json").exists()
    assert not list(out.rglob("*.tmp")), "a temporary file was left behind"
