"""The flow on real batch schedulers: the ``slurm`` profile (SLURMCluster, fake GPU GRES) and the ``pbs``
profile (PBSCluster through Debian's slurm-wlm-torque ``qsub``/``qdel``) on the single-node SLURM that
``tests/cluster/slurm.sh up`` starts (CI does). PBS Pro itself cannot be installed here.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
from profiles_for_tests import for_test_machine
from tiny import overrides

from flows.production import ProductionParameters, make_flow
from flows.profiles import load_profile

pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(shutil.which("sinfo") is None, reason="no SLURM here (tests/cluster/slurm.sh up)")]

TINY = overrides("train.epochs=1")


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise TimeoutError in the test's (main) thread if ``what`` is not done in ``seconds``: a flow whose
    replacement worker job never gives a worker would otherwise wait, and hang the suite."""
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"{what} did not finish within {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_tiny_flow_runs_on_batch_jobs(kind, prefect_server, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # slurm-wlm-torque's qsub writes job logs into the submit directory
    site = for_test_machine(load_profile(kind), maximum_jobs=2)
    out = tmp_path / "out"
    params = ProductionParameters(targets=["M-24"], seeds=[0, 1], data_dir=str(tiny_data), output_dir=str(out),
                                  profile=kind, overrides=TINY)
    state = make_flow(site)(**params.flow_parameters(), return_state=True)
    assert state.is_completed(), state.message
    jobs, gpus = set(), set()
    for seed in (0, 1):
        prov = json.loads((out / "results" / f"everest_M_24h_seed{seed}" / "results.json").read_text())["provenance"]
        assert prov["batch_job_id"], "the experiment did not run inside a batch job"
        jobs.add(prov["batch_job_id"])
        gpus.add(prov["cuda_visible_devices"])
    if kind == "slurm":
        assert None not in gpus  # SLURM handed each job a (fake) GPU through --gres=gpu:1
    assert (out / "analysis" / "production_training_report.md").is_file()
    deadline = time.monotonic() + 60  # cancelled jobs pass through COMPLETING before they leave the queue
    while (left := subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip()) and \
            time.monotonic() < deadline:
        time.sleep(1)
    assert left == "", f"batch jobs left behind: {left}"


def test_worker_job_retires_before_its_walltime_and_the_next_job_resumes(prefect_server, tiny_data, tmp_path,
                                                                        monkeypatch):
    """A 1-minute SLURM job whose worker retires after ~19 s (walltime - margin - stagger): the running
    experiment is checkpointed and handed back, adaptive scaling submits a new job, which resumes it;
    the experiment outlives several jobs and finishes with its whole history."""
    monkeypatch.chdir(tmp_path)
    site = for_test_machine(load_profile("slurm"), maximum_jobs=1, walltime="00:01:00",
                            worker_lifetime_margin="00:00:40", worker_lifetime_stagger="00:00:01")
    out = tmp_path / "out"
    epochs = 120  # ~0.3 s each in a job here (~35 per 19 s job): about 4 jobs; 2 on a machine twice as fast
    params = ProductionParameters(
        targets=["M-24"], seeds=[0], data_dir=str(tiny_data), output_dir=str(out), profile="slurm",
        overrides=["model.embed_dim=32", "model.ff_dim=64", "model.num_blocks=2", "model.num_heads=2",
                   "train.batch_size=64", f"train.epochs={epochs}", f"train.early_stopping_patience={epochs}"])
    with deadline(900, "the flow over several worker jobs (about 3 minutes here)"):
        state = make_flow(site)(**params.flow_parameters(), return_state=True)
    assert state.is_completed(), state.message
    res = json.loads((out / "results" / "everest_M_24h_seed0" / "results.json").read_text())
    assert res["training"]["resumed_after_epoch"] >= 1  # the last job picked up a predecessor's checkpoint
    assert [h["epoch"] for h in res["history"]] == list(range(1, epochs + 1))
