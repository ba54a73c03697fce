"""The flow across two machines: the flow and its scheduler on one host, a batch worker job on another.

Two network namespaces joined by a veth pair stand in for a login node and a compute node (CI runs as
root); each has its own loopback, so nothing bound to 127.0.0.1 on the first is reachable from the
second, as on a real cluster. Both see the same files, like a shared file system. PBS Pro cannot be
installed here: a mock ``qsub`` starts each job script on the second host, and a mock ``qdel`` ends it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from tiny import overrides, set_pairs

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="network namespaces need root and iproute2 (CI runs as root)"),
]

SUBNET = "10.213.7"
TINY = overrides()

MOCK_QSUB = """#!/usr/bin/env bash
# Mock of PBS Pro's qsub: run the job script on the compute host (network namespace {ns}).
set -euo pipefail
id=$(date +%s%N)
cp "$1" "{jobs}/$id.sh"   # dask-jobqueue deletes its script as soon as qsub returns
setsid ip netns exec {ns} bash "{jobs}/$id.sh" >"{jobs}/$id.log" 2>&1 < /dev/null &
echo $! > "{jobs}/$id.pid"
echo "$id.mockpbs"
"""

MOCK_QDEL = """#!/usr/bin/env bash
# Mock of PBS Pro's qdel: end the job's process group.
for id in "$@"; do
  pid=$(cat "{jobs}/${{id%%.*}}.pid" 2>/dev/null) || continue
  kill -TERM -- "-$pid" 2>/dev/null || true
done
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    """Namespaces ``<login>`` (SUBNET.1) and ``<compute>`` (SUBNET.2), each with interface ``ev0``."""
    login, compute = f"evlogin{os.getpid()}", f"evnode{os.getpid()}"
    _ip("netns", "add", login)
    _ip("netns", "add", compute)
    try:
        _ip("link", "add", "evl0", "type", "veth", "peer", "name", "evc0")
        for ns, end, addr in ((login, "evl0", f"{SUBNET}.1"), (compute, "evc0", f"{SUBNET}.2")):
            _ip("link", "set", end, "netns", ns)
            _ip("-n", ns, "link", "set", end, "name", "ev0")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "ev0")
            _ip("-n", ns, "link", "set", "ev0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield login, compute
    finally:
        for ns in (login, compute):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            subprocess.run(["kill", "-KILL", *pids], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_flow_on_login_host_trains_on_compute_host_mock_pbs_qsub(two_hosts, tiny_data, tmp_path):
    """Without PREFECT_API_URL the CLI starts a private Prefect server; the worker job on the second host
    must reach it, and the scheduler, over the cluster network (TLS), and train the experiment."""
    login, compute = two_hosts
    jobs, bin_dir, out = tmp_path / "jobs", tmp_path / "bin", tmp_path / "out"
    jobs.mkdir()
    bin_dir.mkdir()
    for name, text in (("qsub", MOCK_QSUB), ("qdel", MOCK_QDEL)):
        (bin_dir / name).write_text(text.format(ns=compute, jobs=jobs))
        (bin_dir / name).chmod(0o755)
    profile = tmp_path / "twohosts.yaml"
    profile.write_text(yaml.safe_dump({
        "kind": "pbs", "interface": "ev0", "queue": None, "gpus_per_job": 0, "job_cpus": 1, "job_memory": "2G",
        "walltime": "01:00:00", "python": sys.executable, "prologue": [], "maximum_jobs": 1, "torch_threads": 1,
        "dashboard_address": None, "death_timeout": 60, "log_directory": str(tmp_path / "logs"),
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PATH": f"{bin_dir}:{env['PATH']}", "PREFECT_HOME": str(tmp_path / "prefect-home")}
    cmd = ["ip", "netns", "exec", login, sys.executable, "-m", "flows.production", "--profile", str(profile),
           "--targets", "C-24", "--seeds", "0", "--epochs", "1", "--data-dir", str(tiny_data),
           "--output-dir", str(out), *set_pairs(TINY)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    job_logs = "\n".join(p.read_text()[-1500:] for p in sorted(jobs.glob("*.log")))
    assert run.returncode == 0, f"flow failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}\njob logs:\n{job_logs}"

    results = json.loads((out / "results" / "everest_C_24h_seed0" / "results.json").read_text())
    # The experiment trained in the worker job on the second host, which reached the private Prefect
    # server and the scheduler at the login host's cluster address, over TLS.
    assert results["provenance"]["batch_job_id"] is None  # the mock sets no PBS_JOBID
    scripts = [p.read_text() for p in jobs.glob("*.sh")]
    assert scripts, "qsub was never called"
    # The private server's password reaches the job through a file of the user's, never its script.
    password = (out / ".secrets" / "PREFECT_API_AUTH_STRING").read_text().strip()
    assert all(f"PREFECT_API_URL=http://{SUBNET}.1:" in s and "read -r PREFECT_API_AUTH_STRING" in s
               and password not in s for s in scripts)
    assert all(f"tls://{SUBNET}.1:" in s and "--tls-key" in s for s in scripts)
    assert "flow run ended Completed" in run.stdout
