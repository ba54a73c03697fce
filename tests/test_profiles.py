"""Cluster profiles: shipped files load, job scripts render as the schedulers expect, bad files fail
clearly and all at once, and the local profile builds a real LocalCluster."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import dask
import pytest
import yaml
from distributed import Client
from prefect_dask import DaskTaskRunner
from profiles_for_tests import for_test_machine

from everest.config import ConfigError
from flows.batch import PBSProfile, SLURMProfile
from flows.profiles import (
    SCHEDULER_PLACEHOLDER,
    LocalProfile,
    Profile,
    available_profiles,
    load_profile,
    profile_dirs,
)

DEPLOYMENTS = Path(__file__).resolve().parent.parent / "deployments"


def shipped(name: str) -> dict:
    return yaml.safe_load((DEPLOYMENTS / f"{name}.yaml").read_text())


@pytest.fixture
def write_profile(tmp_path: Path):
    """Write a shipped profile with some keys changed (None deletes a key) and return its path."""

    def _write(base: str, changes: dict | None = None, name: str = "site.yaml") -> Path:
        data = shipped(base)
        for key, value in (changes or {}).items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return _write


@pytest.fixture(autouse=True)
def _no_site_env(monkeypatch):
    monkeypatch.delenv("EVEREST_PROFILE_DIR", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)


def test_shipped_profiles_load_with_their_documented_shape():
    assert {"local", "pbs", "slurm"} <= set(available_profiles())
    local, pbs, slurm = (load_profile(n) for n in ("local", "pbs", "slurm"))
    assert isinstance(local, LocalProfile) and isinstance(pbs, PBSProfile) and isinstance(slurm, SLURMProfile)
    for p in (pbs, slurm):
        assert p.walltime == "12:00:00" and p.gpus_per_worker == 1 and p.uses_gpus
        assert p.adapt_kwargs() == {"minimum_jobs": 0, "maximum_jobs": 45}
        kw = p.cluster_kwargs()
        # Workers retire 10 min +/- 5 min before the 12 h walltime: lifetime 12h - 10m - 5m = 42,300 s.
        assert (kw["cores"], kw["processes"], kw["worker_extra_args"]) == (
            1, 1, ["--resources", "GPU=1", "--preload", "flows.worker_setup",
                   "--lifetime", "42300s", "--lifetime-stagger", "300s"])
        # TLS with a per-run certificate by default; the dashboard on loopback only.
        assert kw["security"].require_encryption and "BEGIN CERTIFICATE" in kw["security"].tls_ca_file
        assert kw["scheduler_options"]["dashboard_address"] == "127.0.0.1:8787"
    assert pbs.resource_spec() == "select=1:ncpus=4:mem=32gb:ngpus=1"
    assert slurm.queue == "gpu"  # written as `partition` in the file
    assert pbs.source == str(DEPLOYMENTS / "pbs.yaml")


def test_every_shipped_key_is_documented_by_a_comment():
    for name in ("local", "pbs", "slurm"):
        lines = (DEPLOYMENTS / f"{name}.yaml").read_text().splitlines()
        for i, line in enumerate(lines):
            if line and not line.startswith((" ", "#")):
                assert lines[i - 1].startswith("#") or lines[i - 2].startswith("#"), f"{name}.yaml: {line}"


def test_pbs_job_script_has_the_site_request(tmp_path):
    profile = load_profile("pbs").with_overrides(
        account="proj123", python="/opt/everest/bin/python", log_directory=str(tmp_path / "logs")
    )
    script = profile.job_script()
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    for directive in (
        "#PBS -N everest-worker",
        "#PBS -q gpu",
        "#PBS -A proj123",
        "#PBS -l select=1:ncpus=4:mem=32gb:ngpus=1",
        "#PBS -l walltime=12:00:00",
        f"#PBS -e {tmp_path / 'logs'}/",
    ):
        assert directive in lines
    # The worker's own environment goes first on PATH: PBS Pro does not pass the submitting shell's.
    prologue = ["module load cuda", 'export PATH=/opt/everest/bin:"$PATH"',
                "export PREFECT_LOGGING_EXTRA_LOGGERS=everest", "export OMP_NUM_THREADS=4"]
    assert all(line in lines for line in prologue)
    assert lines.index(prologue[0]) < lines.index(prologue[1]) < lines.index(prologue[2])
    worker = lines[-1]
    assert worker.startswith(f"/opt/everest/bin/python -m distributed.cli.dask_worker {SCHEDULER_PLACEHOLDER}")
    assert "--nthreads 1" in worker and "--resources GPU=1" in worker and "--interface ib0" in worker
    assert "--memory-limit 32.00GiB" in worker and '--local-directory ${TMPDIR:-/tmp}' in worker
    assert "--protocol tls:// --tls-ca-file <output>/.dask-tls/ca_file" in worker
    assert "--tls-key <output>/.dask-tls/worker_key" in worker


def test_pbs_gpu_type_and_cpu_jobs():
    assert load_profile("pbs").with_overrides(gpu_type="L40S").resource_spec() == (
        "select=1:ncpus=4:mem=32gb:ngpus=1:gpu_type=L40S"
    )
    cpu = load_profile("pbs").with_overrides(gpus_per_job=0, log_directory=None)
    assert not cpu.uses_gpus
    script = cpu.job_script()
    assert "#PBS -l select=1:ncpus=4:mem=32gb\n" in script and "--resources" not in script


def test_slurm_job_script_has_the_site_request(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://10.0.0.1:4200/api")
    profile = load_profile("slurm").with_overrides(account="proj123", log_directory=str(tmp_path))
    lines = profile.job_script().splitlines()
    for directive in (
        "#SBATCH -J everest-worker",
        "#SBATCH -p gpu",
        "#SBATCH -A proj123",
        "#SBATCH -n 1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=32G",
        "#SBATCH -t 12:00:00",
        "#SBATCH --gres=gpu:1",
        f"#SBATCH -o {tmp_path}/everest-worker-%J.out",
    ):
        assert directive in lines
    assert "export PREFECT_API_URL=http://10.0.0.1:4200/api" in lines  # pass_env
    assert "--resources GPU=1" in lines[-1]
    typed = profile.with_overrides(gpu_type="a100", extra_directives=["--constraint=a100&nvlink"]).job_script()
    assert "#SBATCH --gres=gpu:a100:1\n#SBATCH --constraint=a100&nvlink\n" in typed


def test_job_script_is_what_the_cluster_submits(tmp_path):
    """The rendered script equals the dask_jobqueue cluster's own, but for the scheduler address."""
    for name in ("pbs", "slurm"):
        profile = for_test_machine(load_profile(name), log_directory=str(tmp_path))
        with profile.make_cluster() as cluster:  # starts a scheduler on lo, submits nothing
            real = cluster.job_script()
            address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")  # TLS by default, on the test machine's loopback
        # The run's certificate files have random names; the rendered script names their folder only.
        real = re.sub(r"(--tls-[a-z-]+) \S+/\.dask-jobqueue\.worker\.(\w+)\.\w+", r"\1 <output>/.dask-tls/\2", real)
        rendered = profile.job_script().replace(SCHEDULER_PLACEHOLDER, address)
        assert real == re.sub(r"<output>/\.dask-tls/worker_(\w+)", r"<output>/.dask-tls/\1", rendered)


def test_walltime_forms_and_quoting(write_profile):
    # Unquoted in YAML, 12:00:00 arrives as 43200 seconds.
    path = write_profile("pbs")
    path.write_text(path.read_text().replace("walltime: '12:00:00'", "walltime: 12:00:00"))
    assert yaml.safe_load(path.read_text())["walltime"] == 43200
    assert load_profile(path).walltime == "12:00:00"
    assert load_profile("slurm").with_overrides(walltime="120:00:00").walltime == "120:00:00"


_INJECTION = "q; rm -rf ~"


@pytest.mark.parametrize(
    ("base", "changes", "fragments"),
    [
        ("pbs", {"queue_name": "gpu"}, ["queue_name: unknown key", "allowed keys", "'queue'"]),
        ("pbs", {"walltime": "25:99:00"}, ["walltime:", "HH:MM:SS", "'25:99:00'"]),
        ("slurm", {"walltime": "1 day"}, ["walltime:", "HH:MM:SS"]),
        ("pbs", {"walltime": "00:00:00"}, ["walltime:", "positive"]),
        ("pbs", {"job_memory": "32 gigs"}, ["job_memory:", "unit K, M, G or T", "'32 gigs'"]),
        ("slurm", {"job_memory": "1.5GB"}, ["job_memory:", "whole number"]),
        ("pbs", {"worker_memory": "64GB"}, ["worker_memory (64G) must be <= job_memory (32G)"]),
        ("pbs", {"maximum_jobs": -1}, ["maximum_jobs:", "greater than or equal to 1", "-1"]),
        ("pbs", {"minimum_jobs": -2}, ["minimum_jobs:", "greater than or equal to 0"]),
        ("slurm", {"minimum_jobs": 5, "maximum_jobs": 2}, ["minimum_jobs (5) must be <= maximum_jobs (2)"]),
        ("pbs", {"job_cpus": 0}, ["job_cpus:", "greater than or equal to 1"]),
        ("pbs", {"gpus_per_job": 2}, ["gpus_per_job:", "less than or equal to 1"]),
        ("pbs", {"queue": _INJECTION}, ["queue:", "one word", repr(_INJECTION)]),
        ("slurm", {"partition": "gpu\n#SBATCH --uid=0"}, ["queue:", "one word"]),
        ("pbs", {"account": "$(whoami)"}, ["account:", "one word"]),
        ("pbs", {"gpu_type": "L40S:ngpus=8"}, ["gpu_type:", "one word"]),
        ("slurm", {"extra_directives": ["--qos=x\nrm -rf ~"]}, ["extra_directives.0:", "single line"]),
        ("slurm", {"extra_directives": ["#SBATCH --qos=x"]}, ["extra_directives.0:", "without its"]),
        ("pbs", {"prologue": ["module load cuda\nrm -rf ~"]}, ["prologue.0:", "single line"]),
        ("pbs", {"python": "python; rm -rf ~"}, ["python:", "shell operators"]),
        ("pbs", {"local_directory": "`rm -rf ~`"}, ["local_directory:", "shell operators"]),
        ("pbs", {"log_directory": "/scratch/$USER"}, ["log_directory:", "'$'"]),
        ("pbs", {"interface": "ib0 --evil"}, ["interface:", "network interface"]),
        ("pbs", {"env": {"BAD-NAME": "1"}}, ["env:", "invalid variable names ['BAD-NAME']"]),
        ("pbs", {"env": {"OK": "a\nb"}}, ["env:", "single lines"]),
        ("pbs", {"pass_env": ["1X"]}, ["pass_env:", "invalid variable names"]),
        ("slurm", {"queue": "gpu"}, ["partition or queue, not both"]),
        ("pbs", {"kind": "sge"}, ["kind: must be one of ['local', 'pbs', 'slurm']", "'sge'"]),
        ("pbs", {"kind": None}, ["kind: must be one of", "None"]),
        ("local", {"gpus": -1}, ["gpus:", "'auto' or an integer >= 0"]),
        ("local", {"gpus": "all"}, ["gpus:", "'auto' or an integer >= 0", "'all'"]),
        ("local", {"n_workers": 0}, ["n_workers:", "'auto' or an integer >= 1"]),
        ("local", {"processes": False, "gpus": 2}, ["gpus must be 0 when processes is false"]),
        ("local", {"memory_limit": "lots"}, ["memory_limit:", "unit"]),
        ("local", {"torch_threads": 0}, ["torch_threads:", "greater than or equal to 1"]),
        ("local", {"queue": "gpu"}, ["queue: unknown key"]),
    ],
)
def test_bad_profiles_are_refused_naming_file_and_key(write_profile, base, changes, fragments):
    path = write_profile(base, changes)
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    message = str(err.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_all_errors_are_reported_at_once(write_profile):
    path = write_profile("pbs", {"walltime": "25:99:00", "job_memory": "lots", "maximum_jobs": -1, "colour": "red"})
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    for key in ("walltime:", "job_memory:", "maximum_jobs:", "colour: unknown key"):
        assert key in str(err.value)


@pytest.mark.parametrize(
    ("arg", "fragments"),
    [
        ("nosuch", ["unknown cluster profile 'nosuch'", "available: ['local', 'pbs', 'slurm']"]),
        ("../etc/passwd", ["does not exist"]),
        ("bad name!", ["invalid cluster profile name"]),
        ("/nonexistent/site.yaml", ["cluster profile file /nonexistent/site.yaml does not exist"]),
    ],
)
def test_unknown_profiles_are_refused(arg, fragments):
    with pytest.raises(ConfigError) as err:
        load_profile(arg)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_unparsable_and_duplicate_keys(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("kind: pbs\nqueue: a\nqueue: b\n")
    with pytest.raises(ConfigError, match=r"duplicate keys \['queue'\]"):
        load_profile(dup)
    listing = tmp_path / "list.yaml"
    listing.write_text("- kind: pbs\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_profile(listing)


def test_overrides_are_validated_too():
    with pytest.raises(ConfigError, match=r"with overrides \['walltime'\]\): walltime:"):
        load_profile("pbs").with_overrides(walltime="25:99:00")


def test_names_resolve_from_elsewhere_and_from_the_site_dir(tmp_path, monkeypatch, write_profile):
    monkeypatch.chdir(tmp_path)
    assert load_profile("slurm").source == str(DEPLOYMENTS / "slurm.yaml")
    site = tmp_path / "site-profiles"
    site.mkdir()
    write_profile("pbs", {"queue": "workq"}, name="site-profiles/pbs.yaml")
    monkeypatch.setenv("EVEREST_PROFILE_DIR", str(site))
    assert profile_dirs()[0] == site
    assert load_profile("pbs").queue == "workq"  # the site directory comes first
    assert load_profile("local").source == str(DEPLOYMENTS / "local.yaml")  # then the project's
    assert load_profile(load_profile("local")).kind == "local"


def test_task_runner_kwargs_build_a_dask_task_runner():
    for name in ("local", "pbs", "slurm"):
        runner = DaskTaskRunner(**load_profile(name).task_runner_kwargs())
        assert runner.cluster_class is load_profile(name).cluster_class()


def test_local_gpu_ids_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert LocalProfile(gpus="auto").gpu_ids() == ["3", "5"]
    assert LocalProfile(gpus=1).gpu_ids() == ["3"]
    with pytest.raises(ConfigError, match="gpus is 4 but CUDA_VISIBLE_DEVICES lists 2"):
        LocalProfile(gpus=4).gpu_ids()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert LocalProfile(gpus="auto").gpu_ids() == [] and not LocalProfile(gpus="auto").uses_gpus
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert LocalProfile(gpus=2).gpu_ids() == ["0", "1"]


def _worker_view() -> tuple[str | None, str | None]:
    return os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("OMP_NUM_THREADS")


@pytest.mark.parametrize(
    ("changes", "gpus"),
    [({"gpus": 2, "torch_threads": 1}, ["0", "1"]), ({"gpus": 0, "n_workers": 2, "torch_threads": 1}, [])],
    ids=["one-worker-per-gpu", "cpu-workers"],
)
def test_local_profile_builds_a_real_local_cluster(monkeypatch, changes, gpus):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    profile: Profile = for_test_machine(load_profile("local"), **changes)
    assert profile.uses_gpus == bool(gpus)
    with profile.make_cluster() as cluster, Client(cluster) as client:
        workers = client.scheduler_info()["workers"].values()
        assert len(workers) == 2
        assert all(w["nthreads"] == 1 for w in workers)
        assert [w["resources"] for w in workers] == [{"GPU": 1}] * 2 if gpus else [{}] * 2
        seen = client.run(_worker_view).values()
        assert sorted(cvd for cvd, _ in seen) == (gpus or ["", ""])
        assert {threads for _, threads in seen} == {"1"}
        if gpus:
            with dask.annotate(resources={"GPU": 1}):
                futures = client.map(lambda i: os.environ["CUDA_VISIBLE_DEVICES"], range(4), pure=False)
            assert set(client.gather(futures)) <= set(gpus)


def test_experiments_per_gpu_is_the_group_width_with_one_worker_process_per_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    local = load_profile("local").with_overrides(gpus=2, experiments_per_gpu=3)
    assert local.cluster_kwargs()["n_workers"] == local.capacity() == 2  # one worker process per GPU
    cpu = load_profile("local").with_overrides(gpus=0, n_workers=3, experiments_per_gpu=5)
    assert cpu.cluster_kwargs()["n_workers"] == cpu.capacity() == 3  # the width does not multiply workers
    pbs = load_profile("pbs").with_overrides(experiments_per_gpu=45)  # the whole study: no longer <= job_cpus
    kwargs = pbs.cluster_kwargs()
    assert (kwargs["processes"], kwargs["cores"]) == (1, 1) and pbs.capacity() == pbs.maximum_jobs
    script = pbs.job_script()
    assert "--nworkers" not in script and "ngpus=1" in script and "--resources GPU=1" in script
    assert load_profile("slurm").with_overrides(experiments_per_gpu=9, job_cpus=1).cluster_kwargs()["processes"] == 1
    for bad in (0, 46):
        with pytest.raises(ConfigError, match=rf"experiments_per_gpu: must be an integer in 1\.\.45: .*\(got {bad}\)"):
            load_profile("slurm").with_overrides(experiments_per_gpu=bad)


def test_batch_scheduler_speaks_tls_only_to_holders_of_the_run_certificate(tmp_path):
    from distributed.security import Security

    profile = for_test_machine(load_profile("pbs"), gpus_per_job=0)
    with profile.make_cluster(run_dir=tmp_path) as cluster:
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        with Client(cluster, timeout="20s") as client:  # the flow's client: the cluster's own certificate
            assert client.scheduler_info()["address"] == cluster.scheduler_address
        with pytest.raises((OSError, TypeError)):  # a plain client on the same port is refused
            Client(cluster.scheduler_address.replace("tls://", "tcp://"), timeout="3s")
        with pytest.raises((OSError, TypeError)):  # and so is a TLS client with another certificate
            Client(cluster.scheduler_address, security=Security.temporary(), timeout="3s")
    # The worker's copies of the certificate and key are readable by the user only.
    files = list((tmp_path / ".dask-tls").glob(".dask-jobqueue.worker.*"))
    assert files and all(f.stat().st_mode & 0o077 == 0 for f in files)


def test_local_cluster_listens_on_loopback_only():
    with for_test_machine(load_profile("local"), n_workers=1).make_cluster() as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        assert all(w["host"] == "127.0.0.1" for w in cluster.scheduler_info["workers"].values())


def _fake_commands(tmp_path, monkeypatch, **scripts: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_pbs_site_check_names_an_unknown_queue_and_undefined_gpu_resources_mock_pbs(tmp_path, monkeypatch):
    """Canned replies of PBS Pro's qstat and pbsnodes (PBS Pro itself cannot be installed here)."""
    _fake_commands(tmp_path, monkeypatch, qsub="exit 0",
                   qstat='[ "$2" = gpu ] && exit 0; echo "qstat: Unknown queue destination $2" >&2; exit 170',
                   pbsnodes='echo "node1"; echo "     resources_available.ncpus = 64"')
    profile = load_profile("pbs")
    with pytest.raises(ConfigError, match=r"queue 'gpux' is refused .*qstat: Unknown queue destination gpux"):
        profile.with_overrides(queue="gpux").check_site()
    with pytest.raises(ConfigError, match=r"no PBS node offers the resource\(s\) \['ngpus'\].*create resource ngpus"):
        profile.check_site()
    profile.with_overrides(gpus_per_job=0).check_site()  # queue known, no GPU resource asked: fine


@pytest.mark.cluster
@pytest.mark.skipif(shutil.which("sinfo") is None, reason="SLURM is not installed (tests/cluster/slurm.sh up)")
def test_slurm_site_check_against_the_real_scheduler():
    profile = load_profile("slurm")
    with pytest.raises(ConfigError, match="SLURM has no partition 'nosuch'"):
        profile.with_overrides(queue="nosuch").check_site()
    # The CI node's partition offers gres gpu:2 (and a job of 1 CPU and 1 GB fits its node).
    profile.with_overrides(queue="debug", job_cpus=1, job_memory="1G").check_site()
    with pytest.raises(ConfigError, match="offers no GRES gpu:h100"):
        profile.with_overrides(queue="debug", gpu_type="h100").check_site()
