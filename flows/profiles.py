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

This module holds what every profile shares (the value checks, :class:`Profile`, the loader) and the one
machine :class:`LocalProfile`; the batch backends live in :mod:`flows.batch`, where :class:`BatchProfile` is
shared and :class:`PBSProfile` and :class:`SLURMProfile` only say how the per-job request is written
(``select=...`` versus ``--gres``/``--cpus-per-task``/``--mem``).
Job shape (what works with dask-jobqueue's adaptive scaling): one GPU and one single-threaded Dask worker per
job (``cores=1, processes=1``), the real request in the scheduler directives, and a ``GPU=1`` worker
resource that ``dask.annotate(resources={"GPU": 1})`` submissions consume.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from distributed import LocalCluster, Nanny
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

from everest.config import check_group_width
from everest.errors import ConfigError, describe_validation_error
from everest.io import load_mapping

__all__ = [
    "LocalProfile",
    "PinnedGPUNanny",
    "Profile",
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

CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]*")
_INTERFACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
# Paths that the job script passes to a command unquoted: no spaces, quotes or shell operators.
# `$VAR`/`${VAR}` stay possible (e.g. `$TMPDIR`, expanded on the compute node); `$(` and backticks not.
_SHELL_PATH = re.compile(r"[A-Za-z0-9_./~+@=,:${}-]+")
_LOCAL_PATH = re.compile(r"[A-Za-z0-9_./~+@=,:-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WALLTIME = re.compile(r"(\d+):(\d\d):(\d\d)")
ACTIVATES = re.compile(r"(^|[\s;&|])(source|\.)\s+\S*activate\b|\b(conda|mamba|micromamba)\s+activate\b")
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


def local_path(v: str) -> str:
    """A path written unquoted into a job script on this machine: no spaces, quotes, '$' or shell operators."""
    if not _LOCAL_PATH.fullmatch(v):
        raise ValueError("must be a path without spaces, quotes, newlines, '$' or shell operators")
    return v


def _one_line(v: str) -> str:
    if CONTROL_CHARS.search(v):
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
LocalPath = Annotated[str, AfterValidator(local_path)]
Line = Annotated[str, AfterValidator(_one_line)]
Directive = Annotated[str, AfterValidator(_directive)]
Walltime = Annotated[str, PlainValidator(_walltime)]
Memory = Annotated[str, PlainValidator(_memory)]


def _dashboard(v: str | None) -> str | None:
    if v is not None and not re.fullmatch(r"[A-Za-z0-9_.:\[\]-]*:\d+", v):
        raise ValueError("must be HOST:PORT (e.g. '127.0.0.1:8787'), ':PORT' for every interface, or null")
    return v


def _env_names(v: dict[str, str]) -> dict[str, str]:
    bad = [k for k in v if not _ENV_NAME.fullmatch(k)]
    if bad:
        raise ValueError(f"has invalid variable names {bad}: use letters, digits and _, not starting with a digit")
    for value in v.values():
        if CONTROL_CHARS.search(value):
            raise ValueError("values must be single lines without control characters")
    return v


def _pass_names(v: tuple[str, ...]) -> tuple[str, ...]:
    bad = [k for k in v if not _ENV_NAME.fullmatch(k)]
    if bad:
        raise ValueError(f"has invalid variable names {bad}: use letters, digits and _, not starting with a digit")
    return v


def memory_units(mem: str) -> tuple[int, str]:
    """A validated memory size (``"32G"``) as its number and unit letter."""
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
    experiments_per_gpu: Annotated[int, PlainValidator(check_group_width)] = 1
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
            n, unit = memory_units(self.memory_limit)
            kw["memory_limit"] = f"{n}{unit}iB"
        if ids:
            kw.update(worker_class=PinnedGPUNanny, gpu_ids=ids, resources={"GPU": 1}, env=self.worker_env())
        elif self.processes:
            # CPU workers must not pick up a GPU of this machine behind the scheduler's back.
            kw["env"] = {**self.worker_env(), "CUDA_VISIBLE_DEVICES": ""}
        return kw


def walltime_seconds(walltime: str) -> int:
    """A validated ``HH:MM:SS`` in seconds."""
    h, m, s = (int(part) for part in walltime.split(":"))
    return 3600 * h + 60 * m + s


def run_path(run_dir: Path | None, name: str) -> Path:
    """``run_dir/name`` (created), or a folder of this user's in the temporary directory without a run."""
    path = (Path(run_dir) if run_dir is not None else Path(tempfile.gettempdir()) / f"everest-{os.getuid()}") / name
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def memory_bytes(mem: str) -> int:
    """A validated memory size (``"32G"``, binary units) in bytes."""
    n, unit = memory_units(mem)
    return n * 1024 ** "KMGT".index(unit) * 1024


def profile_kinds() -> dict[str, type[Profile]]:
    """The profile class of each ``kind``. The batch kinds are imported here: :mod:`flows.batch` builds on this
    module."""
    from flows.batch import PBSProfile, SLURMProfile

    return {"local": LocalProfile, "pbs": PBSProfile, "slurm": SLURMProfile}


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
    kinds = profile_kinds()
    if kind not in kinds:
        raise ConfigError(f"invalid cluster profile {path}: kind: must be one of {sorted(kinds)} (got {kind!r})")
    return _build(kinds[kind], data, source=str(path))
