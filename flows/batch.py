"""Batch-system cluster profiles: PBS Pro / OpenPBS and SLURM, one Dask worker per batch job.

:class:`BatchProfile` holds what both schedulers share (walltime, job size, adaptive ``minimum_jobs..maximum_jobs``,
the worker's environment and lifetime, TLS, the job script); :class:`PBSProfile` and :class:`SLURMProfile` only
say how the per-job request is written and how the site is checked before anything is submitted. The Dask
clusters they build record a refused submission, and watch their jobs until a worker connects
(:mod:`flows.jobwatch`), so the flow ends a run with the batch system's own words instead of waiting for ever.
Profiles are loaded and validated by :func:`flows.profiles.load_profile`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Literal

from dask_jobqueue import PBSCluster, SLURMCluster
from dask_jobqueue.pbs import PBSJob
from dask_jobqueue.slurm import SLURMJob
from distributed.core import Status
from distributed.security import Security
from distributed.utils import get_ip_interface
from pydantic import Field, model_validator

from everest.errors import ConfigError
from flows import jobwatch
from flows.jobwatch import WatchesWorkerJobs
from flows.profiles import (
    ACTIVATES,
    CONTROL_CHARS,
    GPU_CLAIM_SCRIPT,
    LOOPBACK_INTERFACES,
    SCHEDULER_PLACEHOLDER,
    WORKER_PRELOAD,
    Directive,
    Interface,
    Line,
    LocalPath,
    Memory,
    Profile,
    ShellPath,
    Token,
    Walltime,
    local_path,
    memory_bytes,
    memory_units,
    run_path,
    walltime_seconds,
)
from flows.sitecheck import SINFO_NODE_FORMAT, JobRequest, pbs_node_problems, slurm_node_problems

__all__ = ["BatchProfile", "EverestPBSCluster", "EverestSLURMCluster", "PBSProfile", "SLURMProfile"]


class BatchProfile(Profile):
    """Keys shared by batch schedulers: one Dask worker per job, adaptive ``minimum_jobs..maximum_jobs``.

    Subclasses set ``cluster_cls`` and write the per-job request in :meth:`_request_kwargs`.
    """

    cluster_cls: ClassVar[type]

    queue: Token | None = None
    account: Token | None = None
    walltime: Walltime = "12:00:00"
    job_cpus: int = Field(4, ge=1)
    job_memory: Memory = "32G"
    worker_memory: Memory | None = None
    gpus_per_job: int = Field(1, ge=0, le=1)
    gpu_type: Token | None = None
    minimum_jobs: int = Field(0, ge=0)
    maximum_jobs: int = Field(45, ge=1)
    interface: Interface | None = None
    python: ShellPath | None = None
    prologue: tuple[Line, ...] = ()
    log_directory: LocalPath | None = None
    local_directory: ShellPath | None = None
    job_name: Token = "everest-worker"
    death_timeout: int = Field(120, ge=1)
    extra_directives: tuple[Directive, ...] = ()
    # A worker stops taking experiments and hands its running one back (checkpointed) this long before
    # its job's walltime; workers of one batch spread their exits over +/- the stagger.
    worker_lifetime_margin: Walltime = "00:10:00"
    worker_lifetime_stagger: Walltime = "00:05:00"
    # Dask traffic over TLS with a certificate made for this run (only this run's jobs can connect).
    tls: bool = True
    # Address of this machine that the compute nodes reach (the private Prefect server listens there);
    # null = the address of `interface` here.
    api_host: Token | None = None
    # While no Dask worker has connected, a worker job still queued (or running without its worker) this long after
    # its submission ends the run with the scheduler's reason; null = wait for ever. Jobs the scheduler says can
    # never run, and jobs that end before their worker connects, end the run at once (flows.jobwatch).
    worker_start_deadline: Walltime | None = "00:30:00"

    @model_validator(mode="after")
    def _consistent(self) -> BatchProfile:
        problems = []
        if self.minimum_jobs > self.maximum_jobs:
            problems.append(f"minimum_jobs ({self.minimum_jobs}) must be <= maximum_jobs ({self.maximum_jobs})")
        if self.gpu_type is not None and self.gpus_per_job == 0:
            problems.append(f"gpu_type ({self.gpu_type!r}) needs gpus_per_job: 1")
        if self.torch_threads is not None and self.torch_threads > self.job_cpus:
            problems.append(f"torch_threads ({self.torch_threads}) must be <= job_cpus ({self.job_cpus})")
        if self.worker_memory is not None and memory_bytes(self.worker_memory) > memory_bytes(self.job_memory):
            problems.append(f"worker_memory ({self.worker_memory}) must be <= job_memory ({self.job_memory})")
        activates = [line for line in self.prologue if ACTIVATES.search(line)]
        if activates and self.python is None:
            problems.append(f"prologue line {activates[0]!r} activates an environment, but python is null, so the "
                            f"workers run the flow's interpreter {sys.executable}: set python to that "
                            "environment's interpreter, or drop the line")
        if self.lifetime_seconds() - walltime_seconds(self.worker_lifetime_stagger) <= 0:
            problems.append(f"walltime ({self.walltime}) must exceed worker_lifetime_margin "
                            f"({self.worker_lifetime_margin}) plus twice worker_lifetime_stagger "
                            f"({self.worker_lifetime_stagger})")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def gpus_per_worker(self) -> int:
        return self.gpus_per_job

    @property
    def threads(self) -> int:
        return self.torch_threads or self.job_cpus

    def cluster_class(self) -> type:
        return self.cluster_cls

    def check_run_dir(self, run_dir: Path) -> None:
        """The output folder is written into the job scripts unquoted (job logs, TLS files): plain paths only."""
        try:
            local_path(str(Path(run_dir).absolute()))
        except ValueError as err:
            raise ConfigError(f"output folder {run_dir} cannot go into batch job scripts: it {err}") from None

    def lifetime_seconds(self) -> int:
        """Mean worker lifetime: the walltime less the margin and one stagger (Dask adds +/- the stagger)."""
        return (walltime_seconds(self.walltime) - walltime_seconds(self.worker_lifetime_margin)
                - walltime_seconds(self.worker_lifetime_stagger))

    @property
    def workers_on_this_host(self) -> bool:
        return self.interface in LOOPBACK_INTERFACES

    def reachable_host(self) -> str:
        if self.api_host is not None:
            return self.api_host
        if self.interface is None:
            raise ConfigError(
                f"cluster profile {self.source}: set `interface` (the network the compute nodes reach this "
                "machine on, e.g. ib0) or `api_host`, or export PREFECT_API_URL with the address of a Prefect "
                "server the compute nodes can reach"
            )
        try:
            return get_ip_interface(self.interface)
        except ValueError as err:
            raise ConfigError(f"cluster profile {self.source}: interface {self.interface!r} has no IPv4 address on "
                              f"this machine ({err}); set `interface` or `api_host`") from None

    @abstractmethod
    def _request_kwargs(self) -> dict[str, Any]:
        """The scheduler-specific part of the job request (directives for CPUs, memory, GPU)."""

    def job_script_prologue(self, run_dir: Path | None = None, write_secrets: bool = False) -> list[str]:
        """Site lines (``module load``), the worker's environment first on PATH, the GPU claim, then the
        worker exports.

        PBS Pro does not pass the submitting shell's environment to a job: the interpreter's folder
        goes first on PATH so that the job's commands and the worker use the flow's environment. A GPU
        job on a node whose batch system sets no ``CUDA_VISIBLE_DEVICES`` (PBS Pro without its cgroup
        hook) claims a free GPU of the node (``everest_claim_gpu`` of ``cluster/lib.sh``, shared with
        the array scripts), so that jobs sharing a node do not all train on GPU 0.

        The Prefect API credentials among ``pass_env`` (the private server's password) stay out of the
        script, which the batch system keeps readable (PBS ``printjob -s``, the mom's spool, the server
        database): the job reads each from ``<run_dir>/.secrets/<NAME>`` (mode 0600), which
        ``write_secrets`` (re)writes with the value set here.
        """
        from flows.server import API_SECRETS, write_private

        exports = [f"export {k}={shlex.quote(v)}" for k, v in self.worker_env(secrets=False).items()]
        for name in (k for k in self.pass_env if k in API_SECRETS and k in os.environ):
            value = os.environ[name]
            if CONTROL_CHARS.search(value):
                raise ConfigError(f"{name} holds a newline or control character: it cannot be passed to the "
                                  "worker jobs")
            path = run_path(run_dir, ".secrets") / name
            if write_secrets:
                write_private(path, value + "\n")
            # `read` is a shell builtin: the value appears in no command line and not in the script.
            exports.append(f"IFS= read -r {name} < {shlex.quote(str(path.absolute()))}; export {name}")
        python = Path(self.python or sys.executable)
        env = [] if "$" in str(python) else [f"export PATH={shlex.quote(str(python.parent))}:\"$PATH\""]
        claim = []
        if self.gpus_per_job and GPU_CLAIM_SCRIPT.is_file():  # absent outside a checkout of the project
            claim = [f"source {shlex.quote(str(GPU_CLAIM_SCRIPT))} && everest_claim_gpu"]
        # At walltime the batch system signals every process of the job: the shell must outlive the
        # worker, which checkpoints its experiment (within the dask worker's 10 s close) before exiting.
        return [*self.prologue, *env, *claim, *exports, "trap : TERM INT"]

    def _job_kwargs(self, run_dir: Path | None = None) -> dict[str, Any]:
        n, unit = memory_units(self.worker_memory or self.job_memory)
        logs = Path(self.log_directory).expanduser() if self.log_directory else run_path(run_dir, "submissions")
        return {
            # One single-threaded worker process per job, which runs one task (a group of experiments_per_gpu
            # experiments) at a time; adaptive scaling requests one job per task waiting.
            "processes": 1,
            "cores": 1,
            "memory": f"{n}{unit}iB",
            "walltime": self.walltime,
            "queue": self.queue,
            "account": self.account,
            "interface": self.interface,
            "python": self.python or sys.executable,
            "job_name": self.job_name,
            # Absolute, so the directives do not depend on where the scheduler starts the job.
            "log_directory": str(logs.absolute()),
            "local_directory": self.local_directory,
            "death_timeout": self.death_timeout,
            "job_script_prologue": self.job_script_prologue(),
            "worker_extra_args": [*(["--resources", "GPU=1"] if self.gpus_per_job else []),
                                  "--preload", WORKER_PRELOAD,
                                  "--lifetime", f"{self.lifetime_seconds()}s",
                                  "--lifetime-stagger", f"{walltime_seconds(self.worker_lifetime_stagger)}s"],
            "shebang": "#!/usr/bin/env bash",
            # Explicit values so that a user's ~/.config/dask/jobqueue.yaml cannot change the script.
            "job_directives_skip": [],
            "nanny": True,
            **self._request_kwargs(),
        }

    def cluster_kwargs(self, run_dir: Path | None = None) -> dict[str, Any]:
        deadline = walltime_seconds(self.worker_start_deadline) if self.worker_start_deadline is not None else None
        # The prologue written for this run's folder, with its credential files (job_script() only renders).
        kw = {**self._job_kwargs(run_dir), "job_script_prologue": self.job_script_prologue(run_dir, write_secrets=True),
              "scheduler_options": {"dashboard_address": self.dashboard_address},
              # Read by the cluster's job watch (flows.jobwatch.WatchesWorkerJobs), not passed to the jobs.
              "worker_start_deadline": deadline, "profile_source": self.source}
        if self.tls:
            # The workers read the certificate from the shared output folder (mode 0600 files).
            kw["security"] = Security.temporary()
            kw["shared_temp_directory"] = str(run_path(run_dir, ".dask-tls").absolute())
        return kw

    def adapt_kwargs(self) -> dict[str, Any]:
        return {"minimum_jobs": self.minimum_jobs, "maximum_jobs": self.maximum_jobs}

    def capacity(self) -> int:
        """How many tasks the cluster runs at once: its largest number of jobs (one worker each)."""
        return self.maximum_jobs

    def job_request(self) -> JobRequest:
        """What one worker job asks of one node (the site checks compare it with what the nodes offer)."""
        return JobRequest(cpus=self.job_cpus, memory_bytes=memory_bytes(self.job_memory), memory_text=self.job_memory,
                          gpus=self.gpus_per_job, gpu_type=self.gpu_type)

    def job_script(self) -> str:
        """The batch script one worker job runs, rendered without starting a scheduler or submitting.

        It is built by the cluster's own job class (what ``cluster.job_script()`` uses), with a
        placeholder scheduler address; so it renders on a login node whose ``interface`` (e.g.
        ``ib0``) is absent. Like dask-jobqueue, this creates ``log_directory`` if it is missing.
        """
        job_cls = self.cluster_class().job_cls
        kw = self._job_kwargs()
        if self.tls:  # the run writes its certificate files to <output>/.dask-tls/
            kw |= {"protocol": "tls://", "security": Security(
                **{f"tls_{k}": f"<output>/.dask-tls/{k}" for k in ("ca_file", "worker_cert", "worker_key")})}
        return job_cls(SCHEDULER_PLACEHOLDER, name="dummy-name", **kw).job_script()


# --------------------------------------------------------------------------------------------------
# Submission failures. dask-jobqueue logs a failed qsub/sbatch and keeps waiting for workers that never
# come; the flow instead ends the run with the batch system's own message. The clusters live in the flow
# process, so their job objects report to flows.jobwatch (submission_failures) and the flow polls; the
# clusters also watch their submitted jobs until a worker connects (jobs that cannot start or died).


def _run_site_command(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ConfigError(f"cannot run `{shlex.join(cmd)}` to check the batch system: {err}") from None


def _first_lines(text: str, n: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[:n] if line.strip())


class _RecordsSubmissionFailures:
    """Job mix-in: a failed submission is recorded with the submit command's own stderr, then re-raised; a
    submitted job notes when (``submitted_at``), and one the cluster closes says so (``closing``), for the watch."""

    submitted_at: float | None = None
    closing: bool = False

    async def start(self) -> None:
        try:
            await super().start()  # type: ignore[misc]
        except Exception as err:  # noqa: BLE001 - recorded for the flow, then re-raised to dask-jobqueue
            text = str(err)
            status = re.search(r"Exit code: (-?\d+)", text)
            stderr = text.partition("stderr:")[2].strip() or text.strip()
            command = self.submit_command.split()[0]  # type: ignore[attr-defined]
            jobwatch.record_refusal(
                f"{command} failed{f' with exit status {status.group(1)}' if status else ''}: {_first_lines(stderr)}")
            self.status = Status.failed  # type: ignore[attr-defined] # else closing the cluster asserts on it
            raise
        self.submitted_at = time.monotonic()

    async def close(self) -> None:
        self.closing = True  # cancelled by the cluster itself: not a job that died
        await super().close()  # type: ignore[misc]
        self.status = Status.closed  # type: ignore[attr-defined] # as ProcessInterface.close would


class _PBSJob(_RecordsSubmissionFailures, PBSJob):
    pass


class _SLURMJob(_RecordsSubmissionFailures, SLURMJob):
    pass


class EverestPBSCluster(WatchesWorkerJobs, PBSCluster):
    """PBSCluster whose failed job submissions, and jobs that cannot start or die before their worker connects
    (``qstat -x -f``), reach :func:`flows.jobwatch.submission_failures`."""

    job_cls = _PBSJob
    batch_system = "PBS"


class EverestSLURMCluster(WatchesWorkerJobs, SLURMCluster):
    """SLURMCluster whose failed job submissions, and jobs that cannot start or die before their worker connects
    (``squeue``, ``scontrol show job``), reach :func:`flows.jobwatch.submission_failures`."""

    job_cls = _SLURMJob
    batch_system = "SLURM"


class PBSProfile(BatchProfile):
    """PBS Pro / OpenPBS: the request is one ``-l select=1:ncpus=..:mem=..:ngpus=..[:gpu_type=..]``."""

    kind: Literal["pbs"] = "pbs"
    cluster_cls: ClassVar[type] = EverestPBSCluster

    def check_site(self) -> None:
        """The queue exists (``qstat -Q``), the nodes define ``ngpus``/``gpu_type``, and some node offers what a
        job asks (``pbsnodes -a`` values: ncpus, mem, ngpus, gpu_type): else PBS queues it for ever."""
        _require_command("qsub", self)
        if self.queue:
            res = _run_site_command(["qstat", "-Q", self.queue])
            if res.returncode:
                raise ConfigError(f"cluster profile {self.source}: queue {self.queue!r} is refused by the PBS server "
                                  f"(qstat -Q {self.queue}: {_first_lines(res.stderr or res.stdout)}); "
                                  "set `queue` to one that `qstat -Q` lists")
        wanted = (["ngpus"] if self.gpus_per_job else []) + (["gpu_type"] if self.gpu_type else [])
        if not wanted and shutil.which("pbsnodes") is None:
            return  # nothing to compare with here: the job watch still reports a job that can never run
        nodes = _run_site_command(["pbsnodes", "-a"])
        if nodes.returncode:
            return  # the listing may be restricted to admins: the job watch still reports a job that cannot run
        missing = [r for r in wanted if f"resources_available.{r}" not in nodes.stdout]
        if missing:
            raise ConfigError(
                f"cluster profile {self.source}: no PBS node offers the resource(s) {missing} that the jobs "
                f"request ({self.resource_spec()}); ask the site admin to define them (qmgr -c \"create "
                "resource ngpus type=long, flag=nh\" and `ngpus` on the scheduler's resources: line), or set "
                "gpus_per_job: 0 / gpu_type: null"
            )
        if problems := pbs_node_problems(nodes.stdout, self.job_request(), self.resource_spec()):
            raise ConfigError(f"cluster profile {self.source}: no PBS node can run a worker job (pbsnodes -a): "
                              f"{'; '.join(problems)}; lower the request in the profile or ask the site admin")

    def resource_spec(self) -> str:
        """``select=1:ncpus=4:mem=32gb:ngpus=1`` (PBS writes binary units as kb/mb/gb/tb)."""
        n, unit = memory_units(self.job_memory)
        spec = f"select=1:ncpus={self.job_cpus}:mem={n}{unit.lower()}b"
        if self.gpus_per_job:
            spec += f":ngpus={self.gpus_per_job}"
        if self.gpu_type:
            spec += f":gpu_type={self.gpu_type}"
        return spec

    def _request_kwargs(self) -> dict[str, Any]:
        return {"resource_spec": self.resource_spec(), "job_extra_directives": list(self.extra_directives)}


class SLURMProfile(BatchProfile):
    """SLURM: ``--cpus-per-task``, ``--mem`` and ``--gres=gpu[:TYPE]:1``; ``partition`` is ``queue``."""

    kind: Literal["slurm"] = "slurm"
    cluster_cls: ClassVar[type] = EverestSLURMCluster

    def check_site(self) -> None:
        """The partition exists (``sinfo -p``), offers the requested GPUs (its GRES), and some node of it has the
        CPUs, memory (MB) and GPUs a job asks (``sinfo -N -o "%N|%c|%m|%G|%P"``)."""
        _require_command("sbatch", self)
        where = ["-p", self.queue] if self.queue else []
        res = _run_site_command(["sinfo", "-h", *where, "-o", "%P %G"])
        if res.returncode or not res.stdout.strip():
            raise ConfigError(f"cluster profile {self.source}: SLURM has no partition {self.queue!r} (sinfo "
                              f"{shlex.join(where)}: {_first_lines(res.stderr) or 'nothing listed'}); set `partition`")
        if self.gpus_per_job:
            gpu = f"gpu:{self.gpu_type}" if self.gpu_type else "gpu"
            if gpu not in res.stdout:
                raise ConfigError(f"cluster profile {self.source}: partition {self.queue or '(default)'} offers no "
                                  f"GRES {gpu} (sinfo: {_first_lines(res.stdout)}); set gpu_type or gpus_per_job")
        nodes = _run_site_command(["sinfo", "-h", "-N", *where, "-o", SINFO_NODE_FORMAT])
        if nodes.returncode == 0 and (problems := slurm_node_problems(nodes.stdout, self.job_request(), self.queue)):
            raise ConfigError(f"cluster profile {self.source}: no node of SLURM partition {self.queue or '(default)'} "
                              f"can run a worker job (sinfo -N {shlex.join(where)}): {'; '.join(problems)}; lower "
                              "the request in the profile or choose another partition")

    @model_validator(mode="before")
    @classmethod
    def _partition_is_queue(cls, data: Any) -> Any:
        if isinstance(data, dict) and "partition" in data:
            if data.get("queue") is not None:
                raise ValueError("give partition or queue, not both (they are the same SLURM option -p)")
            data = {k: v for k, v in data.items() if k != "partition"} | {"queue": data["partition"]}
        return data

    def _request_kwargs(self) -> dict[str, Any]:
        gres = [f"--gres=gpu:{self.gpu_type + ':' if self.gpu_type else ''}{self.gpus_per_job}"]
        return {
            "job_cpu": self.job_cpus,
            "job_mem": self.job_memory,
            "job_extra_directives": (gres if self.gpus_per_job else []) + list(self.extra_directives),
        }


def _require_command(name: str, profile: Profile) -> None:
    if shutil.which(name) is None:
        raise ConfigError(f"cluster profile {profile.source} submits with `{name}`, which is not on PATH here; "
                          "run on a login node of the cluster (or load its batch-system module)")
