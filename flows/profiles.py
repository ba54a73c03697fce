"""Cluster profiles: editable site files in ``deployments/`` that say where the Dask workers run.

A profile is a YAML file with a ``kind`` (``local``, ``pbs`` or ``slurm``) and the keys documented in
the shipped files. It is validated once, when loaded (:func:`load_profile`): unknown keys, malformed
walltimes or memory sizes, impossible job counts and values that could smuggle shell text into a job
script are all reported together as one :class:`~everest.config.ConfigError` naming the file and key.
Nothing is submitted before a profile has loaded cleanly.

A loaded :class:`Profile` is a frozen value that builds what the flow needs:

* :meth:`Profile.task_runner_kwargs` -> keyword arguments for ``prefect_dask.DaskTaskRunner``;
* :meth:`Profile.make_cluster` -> a started ``LocalCluster`` / ``PBSCluster`` / ``SLURMCluster``;
* :meth:`BatchProfile.job_script` -> the batch script text, rendered without a scheduler or a job.

The batch backends share :class:`BatchProfile`; :class:`PBSProfile` and :class:`SLURMProfile` only say
how the per-job request is written (``select=...`` versus ``--gres``/``--cpus-per-task``/``--mem``).
Job shape (what works with dask-jobqueue's adaptive scaling): one GPU and one single-threaded Dask worker per
job (``cores=1, processes=1``), the real request in the scheduler directives, and a ``GPU=1`` worker
resource that ``dask.annotate(resources={"GPU": 1})`` submissions consume.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from dask_jobqueue import PBSCluster, SLURMCluster
from dask_jobqueue.pbs import PBSJob
from dask_jobqueue.slurm import SLURMJob
from distributed import LocalCluster, Nanny
from distributed.core import Status
from distributed.security import Security
from distributed.utils import get_ip_interface
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from everest.errors import ConfigError, describe_validation_error
from everest.io import load_mapping
from flows import jobwatch
from flows.jobwatch import WatchesWorkerJobs
from flows.sitecheck import SINFO_NODE_FORMAT, JobRequest, pbs_node_problems, slurm_node_problems

__all__ = [
    "BatchProfile",
    "LocalProfile",
    "PBSProfile",
    "PinnedGPUNanny",
    "Profile",
    "SLURMProfile",
    "available_profiles",
    "load_profile",
    "profile_dirs",
]

PROFILE_DIR_ENV = "EVEREST_PROFILE_DIR"
# Placed where the scheduler address goes when a job script is rendered without a scheduler.
SCHEDULER_PLACEHOLDER = "<scheduler-protocol://address:port>"
# Always in every worker's environment: library log records reach the Prefect UI.
BASE_WORKER_ENV = {"PREFECT_LOGGING_EXTRA_LOGGERS": "everest"}
# Loaded by every worker process: SIGTERM or a closing worker checkpoints the running experiment.
WORKER_PRELOAD = "flows.worker_setup"
# The dashboard listens on the loopback interface unless a profile says otherwise (ssh -L to view it).
DEFAULT_DASHBOARD = "127.0.0.1:8787"
LOOPBACK_INTERFACES = ("lo", "lo0")
# Shell functions shared with the plain array scripts; everest_claim_gpu pins a job to a free GPU.
GPU_CLAIM_SCRIPT = Path(__file__).resolve().parent.parent / "cluster" / "lib.sh"


# --------------------------------------------------------------------------------------------------
# Value checks. Each raises ValueError with what is allowed; the loader adds the file, key and value.

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]*")
_INTERFACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
# Paths that the job script passes to a command unquoted: no spaces, quotes or shell operators.
# `$VAR`/`${VAR}` stay possible (e.g. `$TMPDIR`, expanded on the compute node); `$(` and backticks not.
_SHELL_PATH = re.compile(r"[A-Za-z0-9_./~+@=,:${}-]+")
_LOCAL_PATH = re.compile(r"[A-Za-z0-9_./~+@=,:-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WALLTIME = re.compile(r"(\d+):(\d\d):(\d\d)")
_ACTIVATES = re.compile(r"(^|[\s;&|])(source|\.)\s+\S*activate\b|\b(conda|mamba|micromamba)\s+activate\b")
_MEMORY = re.compile(r"\s*(\d+)\s*([KMGT])(?:I?B)?\s*", re.IGNORECASE)


def _token(v: str) -> str:
    if not _TOKEN.fullmatch(v):
        raise ValueError("must be one word of letters, digits and _.@+- (no spaces, newlines or shell characters)")
    return v


def _interface(v: str) -> str:
    if not _INTERFACE.fullmatch(v):
        raise ValueError("must be a network interface name such as 'ib0', 'eth0' or 'lo'")
    return v


def _shell_path(v: str) -> str:
    if not _SHELL_PATH.fullmatch(v):
        raise ValueError(
            "must be a path without spaces, quotes, newlines or shell operators ($VAR and ${VAR} are allowed)"
        )
    return v


def _local_path(v: str) -> str:
    if not _LOCAL_PATH.fullmatch(v):
        raise ValueError("must be a path without spaces, quotes, newlines, '$' or shell operators")
    return v


def _one_line(v: str) -> str:
    if _CONTROL.search(v):
        raise ValueError("must be a single line without newlines or control characters")
    if not v.strip():
        raise ValueError("must not be empty")
    return v


def _directive(v: str) -> str:
    _one_line(v)
    if v.lstrip().startswith("#"):
        raise ValueError("is written without its '#PBS'/'#SBATCH' prefix, e.g. '--constraint=a100'")
    return v


def _walltime(v: Any) -> str:
    """``HH:MM:SS``. YAML 1.1 reads an unquoted ``12:00:00`` as the integer 43200: accept it as seconds."""
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return f"{v // 3600:02d}:{v // 60 % 60:02d}:{v % 60:02d}"
    m = _WALLTIME.fullmatch(v.strip()) if isinstance(v, str) else None
    if not m or int(m.group(2)) >= 60 or int(m.group(3)) >= 60 or not any(int(g) for g in m.groups()):
        raise ValueError("must be a positive HH:MM:SS with minutes and seconds below 60, e.g. '12:00:00'")
    return f"{int(m.group(1)):02d}:{m.group(2)}:{m.group(3)}"


def _memory(v: Any) -> str:
    """A whole number of K/M/G/T (KB/KiB alike: PBS and SLURM both read units as binary) -> ``"32G"``."""
    m = _MEMORY.fullmatch(v) if isinstance(v, str) else None
    if not m or int(m.group(1)) <= 0:
        raise ValueError("must be a positive whole number with a unit K, M, G or T (binary, e.g. '32GB' or '32G')")
    return f"{int(m.group(1))}{m.group(2).upper()}"


def _auto_or(minimum: int):
    def check(v: Any) -> str | int:
        if v == "auto":
            return v
        if isinstance(v, int) and not isinstance(v, bool) and v >= minimum:
            return v
        raise ValueError(f"must be 'auto' or an integer >= {minimum}")

    return check


def _auto_or_memory(v: Any) -> str:
    return v if v == "auto" else _memory(v)


Token = Annotated[str, AfterValidator(_token)]
Interface = Annotated[str, AfterValidator(_interface)]
ShellPath = Annotated[str, AfterValidator(_shell_path)]
LocalPath = Annotated[str, AfterValidator(_local_path)]
Line = Annotated[str, AfterValidator(_one_line)]
Directive = Annotated[str, AfterValidator(_directive)]
Walltime = Annotated[str, PlainValidator(_walltime)]
Memory = Annotated[str, PlainValidator(_memory)]


MAX_EXPERIMENTS_PER_GPU = 45  # the whole study (9 targets x 5 seeds) as one group on one device


def _experiments_per_gpu(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_EXPERIMENTS_PER_GPU:
        raise ValueError(f"must be an integer in 1..{MAX_EXPERIMENTS_PER_GPU}: the number of experiments one task "
                         "trains together on one GPU or CPU worker (1: one task per experiment)")
    return k


def _dashboard(v: str | None) -> str | None:
    if v is not None and not re.fullmatch(r"[A-Za-z0-9_.:\[\]-]*:\d+", v):
        raise ValueError("must be HOST:PORT (e.g. '127.0.0.1:8787'), ':PORT' for every interface, or null")
    return v


def _env_names(v: dict[str, str]) -> dict[str, str]:
    bad = [k for k in v if not _ENV_NAME.fullmatch(k)]
    if bad:
        raise ValueError(f"has invalid variable names {bad}: use letters, digits and _, not starting with a digit")
    for value in v.values():
        if _CONTROL.search(value):
            raise ValueError("values must be single lines without control characters")
    return v


def _pass_names(v: tuple[str, ...]) -> tuple[str, ...]:
    bad = [k for k in v if not _ENV_NAME.fullmatch(k)]
    if bad:
        raise ValueError(f"has invalid variable names {bad}: use letters, digits and _, not starting with a digit")
    return v


def _memory_units(mem: str) -> tuple[int, str]:
    return int(mem[:-1]), mem[-1]


# --------------------------------------------------------------------------------------------------
# Profiles


class Profile(BaseModel):
    """What every profile has: where it came from, worker environment and threads.

    Subclasses fix ``kind`` and add their keys; :func:`load_profile` picks the class from ``kind``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str
    description: str = ""
    torch_threads: int | None = Field(None, ge=1)
    # The group width: the flow trains its experiments (targets x seeds, seeds inner) in groups of this
    # many, one task per group, each group one vectorised model (everest.training.group.train_group) in the single
    # worker process of its GPU, or of a CPU worker. 1: one task per experiment. Several processes on one
    # GPU measured 0.91x (benchmarks/RESULTS.md): a GPU has one worker process whatever the width.
    experiments_per_gpu: Annotated[int, PlainValidator(_experiments_per_gpu)] = 1
    env: Annotated[dict[str, str], AfterValidator(_env_names)] = Field(default_factory=dict)
    pass_env: Annotated[tuple[str, ...], AfterValidator(_pass_names)] = ("PREFECT_API_URL",
                                                                       "PREFECT_API_AUTH_STRING")
    dashboard_address: Annotated[str | None, AfterValidator(_dashboard)] = DEFAULT_DASHBOARD

    _source: str = PrivateAttr("<in memory>")

    @property
    def source(self) -> str:
        """The file this profile was loaded from (or ``<in memory>``)."""
        return self._source

    @property
    @abstractmethod
    def gpus_per_worker(self) -> int:
        """GPUs each Dask worker owns (0 or 1); submissions annotate ``resources={"GPU": 1}`` when 1."""

    @property
    def uses_gpus(self) -> bool:
        """Whether workers own GPUs, i.e. whether tasks must be annotated with the GPU resource."""
        return self.gpus_per_worker > 0

    @property
    def threads(self) -> int:
        """Intra-op threads for torch in one worker (``torch_threads``, else a per-kind default)."""
        return self.torch_threads or 1

    def worker_env(self, secrets: bool = True) -> dict[str, str]:
        """Environment of every worker: fixed entries, the file's ``env``, then ``pass_env`` values set here.

        ``secrets=False`` leaves out the Prefect API credentials among them (``flows.server.API_SECRETS``):
        batch jobs read those from a private file, never from their job script."""
        from flows.server import API_SECRETS

        t = str(self.threads)
        out = {**BASE_WORKER_ENV, "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, **self.env}
        out.update({k: os.environ[k] for k in self.pass_env if k in os.environ and (secrets or k not in API_SECRETS)})
        return out

    @abstractmethod
    def cluster_class(self) -> type:
        """The Dask cluster class this profile builds."""

    @abstractmethod
    def cluster_kwargs(self, run_dir: Path | None = None) -> dict[str, Any]:
        """Keyword arguments for :meth:`cluster_class`; ``run_dir`` is the run's shared output folder
        (batch job logs and TLS certificates go there; without it, the system's temporary folder)."""

    def adapt_kwargs(self) -> dict[str, Any] | None:
        """Arguments for ``cluster.adapt`` (None: fixed size)."""
        return None

    def task_runner_kwargs(self, run_dir: Path | None = None) -> dict[str, Any]:
        """Keyword arguments for ``prefect_dask.DaskTaskRunner(**kwargs)``."""
        out: dict[str, Any] = {"cluster_class": self.cluster_class(), "cluster_kwargs": self.cluster_kwargs(run_dir)}
        if (adapt := self.adapt_kwargs()) is not None:
            out["adapt_kwargs"] = adapt
        return out

    def make_cluster(self, run_dir: Path | None = None, **extra: Any):
        """Start this profile's cluster (a LocalCluster starts its workers; batch clusters start none).

        ``extra`` is passed to the constructor (e.g. ``asynchronous=True``). Adaptive scaling is left
        to the caller: ``cluster.adapt(**profile.adapt_kwargs())``, as DaskTaskRunner does.
        """
        return self.cluster_class()(**self.cluster_kwargs(run_dir), **extra)

    @property
    @abstractmethod
    def workers_on_this_host(self) -> bool:
        """Whether every worker runs on this machine, so that 127.0.0.1 reaches the flow from them."""

    @abstractmethod
    def reachable_host(self) -> str:
        """The address of this machine that every worker reaches (a private Prefect server listens there).

        Raises :class:`ConfigError` when the profile cannot tell (the message says what to set).
        """

    def check_site(self) -> None:
        """Check the batch system accepts this profile's jobs (queue, resources) before anything is
        submitted; raises :class:`ConfigError` quoting the batch system. Nothing to check locally."""

    def check_run_dir(self, run_dir: Path) -> None:
        """Refuse an output folder the worker jobs cannot use (:class:`ConfigError`); any works locally."""

    def with_overrides(self, **changes: Any) -> Profile:
        """A validated copy with some keys changed; errors are :class:`ConfigError` like a bad file."""
        data = self.model_dump(exclude_unset=False) | changes
        return _build(type(self), data, source=f"{self.source} (with overrides {sorted(changes)})")

    @abstractmethod
    def for_test_machine(self, **changes: Any) -> Profile:
        """A copy shrunk to run on one CI machine (loopback network, tiny jobs, no site modules)."""


class PinnedGPUNanny(Nanny):
    """A Nanny whose worker process sees one GPU: ``CUDA_VISIBLE_DEVICES`` = ``gpu_ids[name]``.

    LocalCluster names its workers 0..n-1 and restarts a dead worker under the same name, so each
    worker keeps its device: worker ``i`` gets ``gpu_ids[i % len(gpu_ids)]``, and ``n_workers =
    len(gpu_ids)`` gives each GPU one worker process. Torch then calls it ``cuda:0``.
    """

    def __init__(self, *args: Any, gpu_ids: Sequence[str], name: Any = None, env: dict | None = None, **kw: Any):
        device = str(gpu_ids[int(name) % len(gpu_ids)])
        super().__init__(*args, name=name, env={**(env or {}), "CUDA_VISIBLE_DEVICES": device}, **kw)


def _visible_gpus() -> list[str]:
    """Device ids usable here: ``CUDA_VISIBLE_DEVICES`` when set, else what ``nvidia-smi -L`` lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(listing.stdout.splitlines()) if line.startswith("GPU ")]


class LocalProfile(Profile):
    """One machine: one worker process per GPU with its device pinned, or N CPU workers."""

    kind: Literal["local"] = "local"
    gpus: Annotated[str | int, PlainValidator(_auto_or(0))] = "auto"
    n_workers: Annotated[str | int, PlainValidator(_auto_or(1))] = "auto"
    processes: bool = True
    memory_limit: Annotated[str, PlainValidator(_auto_or_memory)] = "auto"

    @model_validator(mode="after")
    def _pinning_needs_processes(self) -> LocalProfile:
        if not self.processes and self.gpus != 0:
            raise ValueError(
                f"gpus must be 0 when processes is false (got gpus={self.gpus!r}): a GPU is pinned per "
                "worker process through CUDA_VISIBLE_DEVICES"
            )
        return self

    def gpu_ids(self) -> list[str]:
        """Devices the workers get, one each: ``gpus`` first visible ones, or all for ``auto``."""
        if self.gpus == 0:
            return []
        visible = _visible_gpus()
        if self.gpus == "auto":
            return visible
        if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
            if self.gpus > len(visible):
                raise ConfigError(
                    f"cluster profile {self.source}: gpus is {self.gpus} but CUDA_VISIBLE_DEVICES "
                    f"lists {len(visible)} device(s) {visible}"
                )
            return visible[: self.gpus]
        # An explicit count without CUDA_VISIBLE_DEVICES is trusted (devices 0..N-1), as CUDA would.
        return [str(i) for i in range(self.gpus)]

    @property
    def gpus_per_worker(self) -> int:
        return 1 if self.gpu_ids() else 0

    def capacity(self) -> int:
        """How many tasks the cluster runs at once: its worker processes, one per GPU, else the CPU workers."""
        return len(self.gpu_ids()) or self.n_cpu_workers()

    def n_cpu_workers(self) -> int:
        """CPU workers: ``n_workers``, or for ``auto`` the usable cores divided by ``torch_threads``."""
        if self.n_workers != "auto":
            return int(self.n_workers)
        return max(1, len(os.sched_getaffinity(0)) // self.threads)

    def cluster_class(self) -> type:
        return LocalCluster

    @property
    def workers_on_this_host(self) -> bool:
        return True

    def reachable_host(self) -> str:
        return "127.0.0.1"

    def cluster_kwargs(self, run_dir: Path | None = None) -> dict[str, Any]:
        ids = self.gpu_ids()
        kw: dict[str, Any] = {
            "n_workers": self.capacity(),
            "threads_per_worker": 1,
            "processes": self.processes,
            # Scheduler and workers on loopback only: nothing of this run is reachable from the network.
            "host": "127.0.0.1",
            "dashboard_address": self.dashboard_address,
            "preload": [WORKER_PRELOAD],
        }
        if self.memory_limit != "auto":
            n, unit = _memory_units(self.memory_limit)
            kw["memory_limit"] = f"{n}{unit}iB"
        if ids:
            kw.update(worker_class=PinnedGPUNanny, gpu_ids=ids, resources={"GPU": 1}, env=self.worker_env())
        elif self.processes:
            # CPU workers must not pick up a GPU of this machine behind the scheduler's back.
            kw["env"] = {**self.worker_env(), "CUDA_VISIBLE_DEVICES": ""}
        return kw

    def for_test_machine(self, **changes: Any) -> Profile:
        return self.with_overrides(**({"n_workers": 2, "dashboard_address": "127.0.0.1:0", "torch_threads": 1}
                                      | changes))


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
        if self.worker_memory is not None and _bytes(self.worker_memory) > _bytes(self.job_memory):
            problems.append(f"worker_memory ({self.worker_memory}) must be <= job_memory ({self.job_memory})")
        activates = [line for line in self.prologue if _ACTIVATES.search(line)]
        if activates and self.python is None:
            problems.append(f"prologue line {activates[0]!r} activates an environment, but python is null, so the "
                            f"workers run the flow's interpreter {sys.executable}: set python to that "
                            "environment's interpreter, or drop the line")
        if self.lifetime_seconds() - _seconds(self.worker_lifetime_stagger) <= 0:
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
            _local_path(str(Path(run_dir).absolute()))
        except ValueError as err:
            raise ConfigError(f"output folder {run_dir} cannot go into batch job scripts: it {err}") from None

    def lifetime_seconds(self) -> int:
        """Mean worker lifetime: the walltime less the margin and one stagger (Dask adds +/- the stagger)."""
        return _seconds(self.walltime) - _seconds(self.worker_lifetime_margin) - _seconds(self.worker_lifetime_stagger)

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
            if _CONTROL.search(value):
                raise ConfigError(f"{name} holds a newline or control character: it cannot be passed to the "
                                  "worker jobs")
            path = _run_path(run_dir, ".secrets") / name
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
        n, unit = _memory_units(self.worker_memory or self.job_memory)
        logs = Path(self.log_directory).expanduser() if self.log_directory else _run_path(run_dir, "submissions")
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
                                  "--lifetime-stagger", f"{_seconds(self.worker_lifetime_stagger)}s"],
            "shebang": "#!/usr/bin/env bash",
            # Explicit values so that a user's ~/.config/dask/jobqueue.yaml cannot change the script.
            "job_directives_skip": [],
            "nanny": True,
            **self._request_kwargs(),
        }

    def cluster_kwargs(self, run_dir: Path | None = None) -> dict[str, Any]:
        deadline = _seconds(self.worker_start_deadline) if self.worker_start_deadline is not None else None
        # The prologue written for this run's folder, with its credential files (job_script() only renders).
        kw = {**self._job_kwargs(run_dir), "job_script_prologue": self.job_script_prologue(run_dir, write_secrets=True),
              "scheduler_options": {"dashboard_address": self.dashboard_address},
              # Read by the cluster's job watch (flows.jobwatch.WatchesWorkerJobs), not passed to the jobs.
              "worker_start_deadline": deadline, "profile_source": self.source}
        if self.tls:
            # The workers read the certificate from the shared output folder (mode 0600 files).
            kw["security"] = Security.temporary()
            kw["shared_temp_directory"] = str(_run_path(run_dir, ".dask-tls").absolute())
        return kw

    def adapt_kwargs(self) -> dict[str, Any]:
        return {"minimum_jobs": self.minimum_jobs, "maximum_jobs": self.maximum_jobs}

    def capacity(self) -> int:
        """How many tasks the cluster runs at once: its largest number of jobs (one worker each)."""
        return self.maximum_jobs

    def job_request(self) -> JobRequest:
        """What one worker job asks of one node (the site checks compare it with what the nodes offer)."""
        return JobRequest(cpus=self.job_cpus, memory_bytes=_bytes(self.job_memory), memory_text=self.job_memory,
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

    def for_test_machine(self, **changes: Any) -> Profile:
        tiny: dict[str, Any] = {
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
        return self.with_overrides(**(tiny | changes))


def _seconds(walltime: str) -> int:
    h, m, s = (int(part) for part in walltime.split(":"))
    return 3600 * h + 60 * m + s


def _run_path(run_dir: Path | None, name: str) -> Path:
    """``run_dir/name`` (created), or a folder of this user's in the temporary directory without a run."""
    path = (Path(run_dir) if run_dir is not None else Path(tempfile.gettempdir()) / f"everest-{os.getuid()}") / name
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _bytes(mem: str) -> int:
    n, unit = _memory_units(mem)
    return n * 1024 ** "KMGT".index(unit) * 1024


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
        n, unit = _memory_units(self.job_memory)
        spec = f"select=1:ncpus={self.job_cpus}:mem={n}{unit.lower()}b"
        if self.gpus_per_job:
            spec += f":ngpus={self.gpus_per_job}"
        if self.gpu_type:
            spec += f":gpu_type={self.gpu_type}"
        return spec

    def _request_kwargs(self) -> dict[str, Any]:
        return {"resource_spec": self.resource_spec(), "job_extra_directives": list(self.extra_directives)}

    def for_test_machine(self, **changes: Any) -> Profile:
        # CPU jobs by default: CI runs PBS scripts through SLURM's #PBS emulation (slurm-wlm-torque),
        # which maps no ngpus to a GPU and reads everything after `mem=` as the memory size.
        return super().for_test_machine(**({"gpus_per_job": 0} | changes))


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


PROFILE_KINDS: dict[str, type[Profile]] = {"local": LocalProfile, "pbs": PBSProfile, "slurm": SLURMProfile}


# --------------------------------------------------------------------------------------------------
# Loading


def profile_dirs() -> list[Path]:
    """Where profile names are looked up, in order: ``$EVEREST_PROFILE_DIR`` entries, then the
    ``deployments/`` folder next to the ``flows`` package (the project root in a checkout)."""
    dirs = [Path(p) for p in os.environ.get(PROFILE_DIR_ENV, "").split(os.pathsep) if p]
    dirs.append(Path(__file__).resolve().parent.parent / "deployments")
    return dirs


def available_profiles() -> list[str]:
    """Names that :func:`load_profile` resolves, from all of :func:`profile_dirs`."""
    return sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.yaml")})


def _resolve(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or text.endswith((".yaml", ".yml")):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"cluster profile file {path} does not exist")
        return path
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", text):
        raise ConfigError(f"invalid cluster profile name {text!r}: expected a name such as 'local' or a YAML path")
    for d in profile_dirs():
        if (d / f"{text}.yaml").is_file():
            return d / f"{text}.yaml"
    raise ConfigError(
        f"unknown cluster profile {text!r}: no {text}.yaml in {[str(d) for d in profile_dirs()]}; "
        f"available: {available_profiles()}"
    )


def _build(cls: type[Profile], data: dict[str, Any], source: str) -> Profile:
    try:
        profile = cls.model_validate(data)
    except ValidationError as err:
        problems = describe_validation_error(err, f"cluster profile {source}", sorted(cls.model_fields))
        raise ConfigError(problems) from None
    profile._source = source
    return profile


def load_profile(name_or_path: str | Path | Profile) -> Profile:
    """Load and validate a cluster profile: a name (``local``, ``pbs``, ``slurm``, ...) or a YAML path.

    Names resolve to ``<dir>/<name>.yaml`` over :func:`profile_dirs`. A :class:`Profile` is returned
    as is. Raises :class:`ConfigError` naming the file and every invalid key.
    """
    if isinstance(name_or_path, Profile):
        return name_or_path
    path = _resolve(name_or_path)
    data = load_mapping(path, "cluster profile")
    kind = data.get("kind")
    if kind not in PROFILE_KINDS:
        raise ConfigError(
            f"invalid cluster profile {path}: kind: must be one of {sorted(PROFILE_KINDS)} (got {kind!r})"
        )
    return _build(PROFILE_KINDS[kind], data, source=str(path))
