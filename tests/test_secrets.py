"""The Prefect API password never enters a batch job script; the jobs read it from a file only the user can read.

A batch system keeps each job's script readable long after submission (PBS ``printjob -s``, the mom's spool,
the server database; SLURM ``scontrol write batch_script``). The private server of a batch run requires a
per-run password (``PREFECT_API_AUTH_STRING``): it goes to ``<output>/.secrets/PREFECT_API_AUTH_STRING``
(mode 0600), and the script reads it with the shell builtin ``read``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml
from profiles_for_tests import for_test_machine
from tiny import overrides, set_args

from everest.errors import ConfigError
from flows.batch import BatchProfile
from flows.profiles import load_profile
from flows.server import write_private

SECRET = "everest:s3cr3t-Zq8w"  # what the private server's password looks like (token_urlsafe after the user)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def password(monkeypatch) -> str:
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", SECRET)
    monkeypatch.setenv("PREFECT_API_URL", "http://10.0.0.1:4200/api")
    return SECRET


@pytest.mark.parametrize("kind", ["pbs", "slurm"])
def test_job_script_of_a_real_cluster_reads_the_password_from_a_private_file(kind, password, tmp_path):
    profile = for_test_machine(load_profile(kind), log_directory=str(tmp_path / "logs"))
    assert isinstance(profile, BatchProfile)
    run_dir = tmp_path / "out"
    old_umask = os.umask(0)  # the most permissive: the file must still be private
    try:
        cluster = profile.make_cluster(run_dir)
    finally:
        os.umask(old_umask)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    secret_file = run_dir / ".secrets" / "PREFECT_API_AUTH_STRING"
    assert password not in script
    assert "export PREFECT_API_AUTH_STRING=" not in script
    assert f"IFS= read -r PREFECT_API_AUTH_STRING < {secret_file.absolute()}; export PREFECT_API_AUTH_STRING" \
        in script
    assert "export PREFECT_API_URL=http://10.0.0.1:4200/api" in script  # not a secret: still exported
    assert secret_file.read_text() == password + "\n"
    assert _mode(secret_file) == 0o600 and _mode(secret_file.parent) == 0o700
    assert [p.name for p in secret_file.parent.iterdir()] == ["PREFECT_API_AUTH_STRING"]  # no temporary left

    # The script's own line, run by bash, gives the worker the password.
    line = next(ln for ln in script.splitlines() if "read -r PREFECT_API_AUTH_STRING" in ln)
    got = subprocess.run(["bash", "-c", f'{line}\nprintf %s "$PREFECT_API_AUTH_STRING"'], capture_output=True,
                         text=True, env={"PATH": os.environ["PATH"]}, check=True)
    assert got.stdout == password


def test_rendered_job_script_and_batch_env_hold_no_password(password):
    profile = for_test_machine(load_profile("pbs"))
    assert password not in profile.job_script()
    assert "PREFECT_API_AUTH_STRING" not in profile.worker_env(secrets=False)
    assert profile.worker_env()["PREFECT_API_AUTH_STRING"] == password  # local worker processes: no script involved


def test_a_password_with_a_newline_is_refused_by_name_without_showing_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "one\ntwo")
    with pytest.raises(ConfigError, match="PREFECT_API_AUTH_STRING holds a newline") as err:
        for_test_machine(load_profile("slurm")).cluster_kwargs(tmp_path)
    assert "one" not in str(err.value)


def test_private_file_is_0600_from_creation_replaced_atomically(tmp_path):
    target = tmp_path / "secrets" / "TOKEN"
    old_umask = os.umask(0)
    try:
        write_private(target, "first\n")
        target.chmod(0o644)  # even an existing, readable file is replaced by a private one
        write_private(target, "second\n")
    finally:
        os.umask(old_umask)
    assert target.read_text() == "second\n"
    assert _mode(target) == 0o600 and _mode(target.parent) == 0o700
    assert [p.name for p in target.parent.iterdir()] == ["TOKEN"]


def _cluster_address() -> str | None:
    """An IPv4 address of this machine other than loopback (jobs on this node reach the server there)."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


@pytest.mark.cluster
@pytest.mark.skipif(shutil.which("sinfo") is None, reason="no SLURM here (tests/cluster/slurm.sh up)")
@pytest.mark.skipif(_cluster_address() is None, reason="this machine has no address besides loopback")
def test_slurm_worker_job_authenticates_to_the_private_server_with_the_password_file(tiny_data, tmp_path):
    """The command line's private server listens on a non-loopback address and so requires a password. The worker
    job starts with none of the flow's environment (``--export=NONE``): it can only authenticate through the file,
    and SLURM's stored copy of its script holds no password."""
    profile = tmp_path / "slurm-auth.yaml"
    profile.write_text(yaml.safe_dump({
        "kind": "slurm", "interface": "lo", "api_host": _cluster_address(), "queue": None, "gpus_per_job": 0,
        "job_cpus": 1, "job_memory": "1G", "walltime": "00:10:00", "python": sys.executable, "prologue": [],
        "maximum_jobs": 1, "torch_threads": 1, "dashboard_address": None, "death_timeout": 60,
        "log_directory": str(tmp_path / "logs"), "extra_directives": ["--export=NONE"],
        "worker_lifetime_margin": "00:01:00", "worker_lifetime_stagger": "00:00:10",
    }))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    run = subprocess.run([sys.executable, "-m", "flows.production", "--profile", str(profile), "--targets", "C-24",
                          "--seeds", "0", "--epochs", "1", "--no-baselines", "--data-dir", str(tiny_data),
                          "--output-dir", str(out), *set_args(overrides())],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((tmp_path / "logs").glob("*")))
    assert run.returncode == 0, f"{run.stdout[-2000:]}\n{run.stderr[-3000:]}\njob logs:\n{logs}"
    assert "flow run ended Completed" in run.stdout

    secret_file = out / ".secrets" / "PREFECT_API_AUTH_STRING"
    password = secret_file.read_text().strip()
    assert password.startswith("everest:") and _mode(secret_file) == 0o600
    job = json.loads((out / "results" / "everest_C_24h_seed0" / "results.json").read_text())["provenance"]
    assert job["batch_job_id"], "the experiment did not run in a batch job"
    stored = subprocess.run(["scontrol", "write", "batch_script", str(job["batch_job_id"]), "-"],
                            capture_output=True, text=True, timeout=30)
    assert stored.returncode == 0, stored.stderr
    assert "read -r PREFECT_API_AUTH_STRING" in stored.stdout
    assert password not in stored.stdout and password not in logs
