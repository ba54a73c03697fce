"""The batch profiles on a real single-node SLURM (``tests/cluster/slurm.sh up``).

``slurm``: SLURMCluster jobs with ``--gres=gpu:1`` on two fake GPUs; each worker gets its own
CUDA_VISIBLE_DEVICES from SLURM. ``pbs``: PBSCluster jobs through slurm-wlm-torque's qsub/qdel
(CPU jobs: SLURM's #PBS emulation maps no GPUs; it also ignores log_directory and writes the job
logs into the submission directory). Skipped only where SLURM is not installed (no ``sinfo``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import dask
import pytest
from distributed import Client, wait
from profiles_for_tests import for_test_machine

from flows.batch import BatchProfile
from flows.profiles import load_profile

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(shutil.which("sinfo") is None, reason="SLURM is not installed (no sinfo on PATH)"),
]

SLURM_SH = Path(__file__).resolve().parent / "cluster" / "slurm.sh"


def _squeue(*args: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, timeout=20)
    return out.stdout.split()


@pytest.fixture(scope="module")
def slurm_node() -> None:
    """The single node answers and is usable; a stopped SLURM is a failure, not a skip."""
    state = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%t"], capture_output=True, text=True)
    if state.returncode or state.stdout.strip().rstrip("*~#") not in {"idle", "mix", "alloc"}:
        pytest.fail(
            f"SLURM is installed but not usable (sinfo: {state.stdout.strip() or state.stderr.strip()!r}); "
            f"start it with `{SLURM_SH} up`"
        )
    if stale := _squeue("-n", "everest-worker", "-o", "%i"):
        subprocess.run(["scancel", *stale], check=False)


@pytest.fixture(params=["slurm", "pbs"])
def batch_profile(request, slurm_node, tmp_path, monkeypatch) -> BatchProfile:
    """A shipped batch profile shrunk for this machine: lo interface, 1 core, 1 GB, 10 minutes."""
    monkeypatch.chdir(tmp_path)  # qsub (torque wrapper) drops the job logs into the working directory
    profile = for_test_machine(load_profile(request.param), log_directory=str(tmp_path / "logs"))
    assert isinstance(profile, BatchProfile)
    return profile


def _job_and_device():
    """A function that reports the SLURM job and GPU it runs under.

    Made in a closure so that it travels by value: batch workers cannot import this test module.
    """

    def view(*_: object) -> tuple[str | None, str | None]:
        time.sleep(0.1 if _ else 0)
        return os.environ.get("SLURM_JOB_ID"), os.environ.get("CUDA_VISIBLE_DEVICES")

    return view


def test_profile_runs_two_workers_as_batch_jobs(batch_profile: BatchProfile, tmp_path: Path):
    with batch_profile.make_cluster() as cluster, Client(cluster) as client:
        cluster.scale(2)
        client.wait_for_workers(2, timeout=45)
        view = client.run(_job_and_device())
        job_ids = sorted(job for job, _ in view.values())
        assert all(job_ids) and len(set(job_ids)) == 2, view
        assert set(job_ids) <= set(_squeue("-o", "%i"))

        if batch_profile.uses_gpus:
            # Each worker owns one of the two fake GPUs, as SLURM assigned them per job.
            assert sorted(cvd for _, cvd in view.values()) == ["0", "1"], view
            assert all(w["resources"] == {"GPU": 1} for w in client.scheduler_info()["workers"].values())
            with dask.annotate(resources={"GPU": 1}):
                futures = client.map(_job_and_device(), range(6), pure=False)
        else:
            futures = client.map(_job_and_device(), range(6), pure=False)
        wait(futures, timeout=30)  # a task that no worker can take fails here instead of hanging
        results = client.gather(futures)
        assert {job for job, _ in results} <= set(job_ids)
        assert set(results) <= set(view.values())  # a task sees its worker's job and device

    deadline = time.monotonic() + 15
    while (left := set(job_ids) & set(_squeue("-o", "%i"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"jobs still queued after close: {left}"

    if batch_profile.kind == "pbs":
        # The torque wrapper passes its own -e/-o: logs in the submission directory, log_directory unused.
        assert {p.suffix for p in tmp_path.glob("*.sh.o*")} == {f".o{j}" for j in job_ids}
    else:
        assert sorted(p.name for p in (tmp_path / "logs").glob("*.err")) == [
            f"everest-worker-{j}.err" for j in job_ids
        ]
