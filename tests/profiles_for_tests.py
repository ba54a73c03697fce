"""Cluster profiles shrunk to run on one test machine: loopback network, tiny jobs, no site modules."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from flows.batch import BatchProfile, PBSProfile
from flows.profiles import LocalProfile, Profile

# A batch profile on this machine: workers on loopback, one-core 1 GB jobs of 10 minutes, at most two, the
# test's interpreter, logs in the temporary folder, short worker lifetimes.
TINY_BATCH: dict[str, Any] = {
    "interface": "lo",
    "queue": None,
    "account": None,
    "gpu_type": None,
    "job_cpus": 1,
    "job_memory": "1G",
    "worker_memory": None,
    "torch_threads": 1,
    "walltime": "00:10:00",
    "minimum_jobs": 0,
    "maximum_jobs": 2,
    "prologue": (),
    "python": sys.executable,
    "local_directory": None,
    "log_directory": str(Path(tempfile.gettempdir()) / "everest-dask-logs"),
    "dashboard_address": "127.0.0.1:0",
    "death_timeout": 60,
    "worker_lifetime_margin": "00:01:00",
    "worker_lifetime_stagger": "00:00:10",
}


def for_test_machine(profile: Profile, **changes: Any) -> Profile:
    """A validated copy of ``profile`` shrunk to this machine, with ``changes`` applied last."""
    if isinstance(profile, LocalProfile):
        return profile.with_overrides(**({"n_workers": 2, "dashboard_address": "127.0.0.1:0", "torch_threads": 1}
                                         | changes))
    if not isinstance(profile, BatchProfile):
        raise TypeError(f"no test-machine shape for {type(profile).__name__}")
    tiny = dict(TINY_BATCH)
    if isinstance(profile, PBSProfile):
        # CPU jobs by default: CI runs PBS scripts through SLURM's #PBS emulation (slurm-wlm-torque),
        # which maps no ngpus to a GPU and reads everything after `mem=` as the memory size.
        tiny["gpus_per_job"] = 0
    return profile.with_overrides(**(tiny | changes))
