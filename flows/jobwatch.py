"""Worker jobs that will never give a Dask worker: found while waiting, reported in the scheduler's own words.

dask-jobqueue submits worker jobs and waits for their workers for ever: a job the scheduler keeps queued because
no node can run it, or a job that exits before its worker connects (a broken prologue, a ``python`` missing on the
node), leaves a run waiting in silence. The flow's batch clusters (:class:`WatchesWorkerJobs`) therefore look at
their own jobs while no Dask worker has ever connected, every :data:`POLL_SECONDS`, and record a verdict that ends
the run's waits (:func:`worker_job_failure`, the path refused submissions take too):

(a) **can never start**, at once: PBS's ``comment`` starting ``Can Never Run``, or a PBS job held by the system or
    an operator; SLURM pending reasons that do not clear without someone changing the job or the site:
    ``PartitionDown``, ``PartitionInactive``, ``PartitionNodeLimit``, ``PartitionTimeLimit``, ``PartitionConfig``,
    ``BadConstraints``, ``InvalidAccount``, ``InvalidQOS``, ``AccountNotAllowed``, ``DependencyNeverSatisfied``,
    ``JobHeldAdmin``, per-job or per-node QOS/association limits (``QOSMax...PerJob``, ``AssocMax...PerNode``,
    ``QOSMin...``), ``launch failed requeued held``, and ``ReqNodeNotAvail`` when every node of the job's
    partition is down, drained, failed or invalid. (Reasons such as ``Priority``, ``Resources``, per-user or
    group limits, ``BeginTime``, ``JobHeldUser`` or a reservation clear by themselves: they wait for the deadline.)
(b) **ended before its worker connected**, at once: its exit status (PBS ``Exit_status``, SLURM ``ExitCode``) and
    the last lines of its error file (else its output file).
(c) **no worker by the deadline** (the profile's ``worker_start_deadline``, from the job's submission): a job still
    queued ends the run with its pending reason; a running one with the tail of its error file.

Until then each round logs one line saying what the jobs wait for. A query command that fails is logged and the
wait goes on. Jobs the cluster itself closes (adaptive scaling, shutdown) are not watched.
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "POLL_SECONDS",
    "JobStatus",
    "WatchesWorkerJobs",
    "clear_submission_failures",
    "parse_qstat_f",
    "pbs_status",
    "record_refusal",
    "slurm_status",
    "submission_failures",
    "worker_job_failure",
]

LOG = logging.getLogger("everest.jobwatch")
# Also called with each "still waiting" line (a command-line run's terminal shows it; the log always has it).
WAITING_LINES: list[Callable[[str], None]] = []

POLL_SECONDS = 20.0  # between two rounds of scheduler queries (tests lower it)
LOG_SECONDS = 60.0  # an unchanged "still waiting" line is repeated this often
COMMAND_TIMEOUT = 30.0
TAIL_LINES = 5

# --------------------------------------------------------------------------------------------------
# Failures that end a run's waits: refused submissions (the submit command's words) and verdicts on jobs.

_failures: list[tuple[str, bool]] = []  # (message, is a verdict on a submitted job)


def record_refusal(message: str) -> None:
    """A worker-job submission the batch system refused (``qsub failed with exit status 170: ...``)."""
    _failures.append((message, False))


def submission_failures() -> list[str]:
    """Messages of refused worker-job submissions and of jobs that cannot start or died, since the last clear."""
    return [message for message, _ in _failures]


def clear_submission_failures() -> None:
    """Forget earlier failures (at the start of a run)."""
    _failures.clear()


def worker_job_failure() -> str | None:
    """The latest failure as the sentence that ends a wait, or None."""
    if not _failures:
        return None
    message, verdict = _failures[-1]
    return message if verdict else f"the batch system refused the worker job: {message}"


# --------------------------------------------------------------------------------------------------
# What the scheduler says about one job


@dataclass
class JobStatus:
    """One worker job as its scheduler describes it."""

    job_id: str
    phase: str  # "queued", "running", "ended" or "unknown" (the scheduler does not know it)
    says: str  # the scheduler's words, e.g. 'job_state = Q, comment = "Not Running: ..."'
    never: bool = False  # the scheduler will never start it
    exit: str | None = None  # its exit status in the scheduler's words: "Exit_status = 1", "ExitCode 3:0"
    files: list[Path] = field(default_factory=list)  # its error file, then its output file, where known


class QueryFailed(RuntimeError):
    """A scheduler query command failed; the message quotes it."""


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise QueryFailed(f"`{shlex.join(cmd)}`: {err}") from None


def _first_lines(text: str, n: int = 3) -> str:
    return " | ".join([line.strip() for line in text.splitlines() if line.strip()][:n])


# PBS Pro / OpenPBS (and Torque-style qstat): `qstat -x -f <ids>`

_QSTAT_ATTR = re.compile(r"^(?: {4}|\t)([A-Za-z_][\w.]*) = (.*)$")
_PBS_ENDED = {"F", "X", "C"}  # finished (PBS Pro history), expired sub-job, completed (Torque)


def parse_qstat_f(text: str) -> dict[str, dict[str, str]]:
    """``qstat -f`` output -> {numeric job id: {attribute: value}}; wrapped values (continued on lines that start
    with a tab) are joined back."""
    jobs: dict[str, dict[str, str]] = {}
    attrs: dict[str, str] | None = None
    last = ""
    for line in text.splitlines():
        if line.startswith("Job Id:"):
            full = line.partition(":")[2].strip()
            attrs = jobs.setdefault(re.match(r"\d*", full).group() or full, {"Job Id": full})
            last = ""
        elif attrs is not None and (m := _QSTAT_ATTR.match(line)):
            last = m.group(1)
            attrs[last] = m.group(2).strip()
        elif attrs is not None and last and line.startswith("\t"):
            attrs[last] += line[1:].rstrip("\n")
    return jobs


def _local_path(path: str) -> Path:
    """``host:/path`` (PBS's Error_Path) -> ``/path``."""
    return Path(path.split(":", 1)[1] if re.match(r"[^/:]+:/", path) else path)


def _pbs_files(job: Any, attrs: dict[str, str]) -> list[Path]:
    """The job's error and output files: PBS's Error_Path/Output_Path (a folder gets ``<job id>.ER``/``.OU``),
    then what ``-e/-o <log_directory>/`` or a Torque-style qsub (``<script>.e<id>`` here) leaves."""
    full, num = attrs.get("Job Id", str(job.job_id)), str(job.job_id)
    found: list[Path] = []
    for key, suffix, letter in (("Error_Path", "ER", "e"), ("Output_Path", "OU", "o")):
        dirs = [Path(d) for d in (getattr(job, "log_directory", None), ".") if d]
        if key in attrs:
            path = _local_path(attrs[key])
            if path.is_dir():
                dirs.insert(0, path)
            else:
                found.append(path)
        for d in dirs:
            found += [*d.glob(f"{full}.{suffix}"), *d.glob(f"{num}.*{suffix}"), *d.glob(f"*.{letter}{num}")]
    return found


def pbs_status(jobs: Sequence[Any]) -> dict[str, JobStatus]:
    """What ``qstat -x -f`` (finished jobs too; ``qstat -f`` where ``-x`` is unknown) says about each job."""
    ids = [str(j.job_id) for j in jobs]
    cmd = ["qstat", "-x", "-f", *ids]
    res = _run(cmd)
    blocks = parse_qstat_f(res.stdout)
    if not blocks and res.returncode and "Unknown Job Id" not in res.stderr:  # e.g. a qstat without -x
        cmd = ["qstat", "-f", *ids]
        res = _run(cmd)
        blocks = parse_qstat_f(res.stdout)
    gone = res.returncode in (35, 153) or "Unknown Job Id" in res.stderr or "Job has finished" in res.stderr
    if not blocks and res.returncode and not gone:
        raise QueryFailed(f"`{shlex.join(cmd)}` exited {res.returncode}: {_first_lines(res.stderr or res.stdout)}")
    out = {}
    for job in jobs:
        attrs = blocks.get(str(job.job_id))
        if attrs is None:
            out[str(job.job_id)] = _gone(job, _pbs_files(job, {}), f"unknown to `{shlex.join(cmd[:-len(ids)])}`")
            continue
        state, comment = attrs.get("job_state", "?"), attrs.get("comment", "")
        says = f"job_state = {state}" + (f', comment = "{comment}"' if comment else "")
        exit_status = f"Exit_status = {attrs['Exit_status']}" if "Exit_status" in attrs else None
        held_by_site = state == "H" and attrs.get("Hold_Types", "s") not in ("u", "n")
        never = comment.startswith("Can Never Run") or held_by_site
        if state in _PBS_ENDED or (state == "E" and exit_status is not None):
            phase = "ended"
        elif state in ("Q", "H", "W", "T", "M"):
            phase = "queued"
        else:
            phase = "running"
        out[str(job.job_id)] = JobStatus(str(job.job_id), phase, says, never, exit_status, _pbs_files(job, attrs))
    return out


def _gone(job: Any, files: list[Path], says: str) -> JobStatus:
    """A job the scheduler no longer lists: ended if it left a log file, else unknown (e.g. a mocked qsub)."""
    existing = [f for f in files if f.is_file()]
    return JobStatus(str(job.job_id), "ended" if existing else "unknown", says, files=existing)


# SLURM: `squeue --all -t all -j <ids>`, then `scontrol show job` / `sacct` for ended jobs

_SLURM_NEVER = {"AccountNotAllowed", "BadConstraints", "DependencyNeverSatisfied", "InvalidAccount", "InvalidQOS",
                "JobHeldAdmin", "PartitionConfig", "PartitionDown", "PartitionInactive", "PartitionNodeLimit",
                "PartitionTimeLimit"}
_SLURM_NEVER_LIMIT = re.compile(r"(QOS|Assoc)(Max\w*Per(Job|Node)\w*|Min\w*)")
_SLURM_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED"}
_SLURM_RUNNING = {"RUNNING", "CONFIGURING", "RESIZING", "SIGNALING", "STAGE_OUT"}
_NODE_OUT_OF_SERVICE = {"down", "drain", "drained", "draining", "drng", "fail", "failing", "failg", "inval"}


def _slurm_never(reason: str, partition: str) -> bool:
    word = reason.split(",")[0].strip()
    if word in _SLURM_NEVER or _SLURM_NEVER_LIMIT.fullmatch(word) or reason.startswith("launch failed"):
        return True
    if word == "ReqNodeNotAvail" and partition:
        # Never, when no node of the partition is in service (drained, down, failed): someone must act.
        res = _run(["sinfo", "--all", "-h", "-N", "-p", partition, "-o", "%t"])
        states = {s.strip().rstrip("*~#!%$@^-+") for s in res.stdout.split()}
        return res.returncode == 0 and bool(states) and states <= _NODE_OUT_OF_SERVICE
    return False


def _slurm_job_details(job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` fields (JobState, Reason, ExitCode, StdErr, StdOut); {} once SLURM forgot the job."""
    res = _run(["scontrol", "--all", "show", "job", "-o", job_id])
    if res.returncode:
        return {}
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", res.stdout))


def _slurm_sacct(job_id: str) -> tuple[str, str] | None:
    """(State, ExitCode) from accounting, where the site keeps it."""
    try:
        res = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode"])
    except QueryFailed:
        return None
    state, sep, code = _first_lines(res.stdout, 1).partition("|")
    return (state, code) if res.returncode == 0 and sep else None


def _slurm_files(job: Any, details: dict[str, str]) -> list[Path]:
    name = getattr(job, "job_name", None) or "worker"
    found = []
    for key, ext in (("StdErr", "err"), ("StdOut", "out")):
        if details.get(key):
            path = details[key].replace("%j", str(job.job_id)).replace("%J", str(job.job_id)).replace("%x", name)
            found.append(Path(path))
        if getattr(job, "log_directory", None):
            found.append(Path(job.log_directory) / f"{name}-{job.job_id}.{ext}")
    return found


def slurm_status(jobs: Sequence[Any]) -> dict[str, JobStatus]:
    """What ``squeue`` (and for ended jobs ``scontrol show job`` or ``sacct``) says about each job."""
    ids = [str(j.job_id) for j in jobs]
    cmd = ["squeue", "--all", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r|%P"]
    res = _run(cmd)
    if res.returncode and "Invalid job id" not in res.stderr:
        raise QueryFailed(f"`{shlex.join(cmd)}` exited {res.returncode}: {_first_lines(res.stderr or res.stdout)}")
    rows = {parts[0]: parts for line in res.stdout.splitlines() if len(parts := line.strip().split("|")) == 4}
    out = {}
    for job in jobs:
        jid = str(job.job_id)
        if jid in rows:
            _, state, reason, partition = rows[jid]
            says = f"state {state}" + (f", reason {reason}" if reason and reason != "None" else "")
            if state in _SLURM_QUEUED:
                out[jid] = JobStatus(jid, "queued", says, _slurm_never(reason, partition))
                continue
            if state in _SLURM_RUNNING:
                out[jid] = JobStatus(jid, "running", says)
                continue
        details = _slurm_job_details(jid)
        if details:
            reason = details.get("Reason", "None")
            says = f"state {details.get('JobState', '?')}" + (f", reason {reason}" if reason != "None" else "")
            code = f"ExitCode {details['ExitCode']}" if details.get("ExitCode") else None
            out[jid] = JobStatus(jid, "ended", says, exit=code, files=_slurm_files(job, details))
        elif (acct := _slurm_sacct(jid)) is not None:
            out[jid] = JobStatus(jid, "ended", f"state {acct[0]} (sacct)", exit=f"ExitCode {acct[1]}",
                                 files=_slurm_files(job, {}))
        else:
            out[jid] = _gone(job, _slurm_files(job, {}), "unknown to squeue and scontrol")
    return out


# --------------------------------------------------------------------------------------------------
# Verdicts


def tail(paths: Sequence[Path], n: int = TAIL_LINES) -> tuple[Path, str] | None:
    """The first of ``paths`` with text, and its last ``n`` non-empty lines joined by `` | `` (each cut to 200)."""
    for path in paths:
        try:
            with open(path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 65536))
                text = f.read().decode(errors="replace")
        except OSError:
            continue
        lines = [line.strip()[:200] for line in text.splitlines() if line.strip()]
        if lines:
            return path, " | ".join(lines[-n:])
    return None


def _tail_phrase(status: JobStatus) -> str:
    found = tail(status.files)
    if found is None:
        where = f" ({status.files[0]})" if status.files else ""
        return f"; its error file{where} is empty or missing"
    return f"; last lines of {found[0]}: {found[1]}"


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


@dataclass
class _WatchState:
    started: float = field(default_factory=time.monotonic)
    last_query: float = 0.0
    last_log: float = -1e9
    last_line: str = ""
    done: bool = False


def _logger() -> Any:
    """The flow run's logger where there is one (its lines reach the run's log and the UI), else ``everest``'s."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow or task run
        return LOG


class WatchesWorkerJobs:
    """Cluster mix-in for dask-jobqueue clusters: watches the worker jobs until the first worker connects.

    ``batch_system`` (``"PBS"``/``"SLURM"``) picks the queries. ``worker_start_deadline`` (seconds, None = wait
    for ever) and ``profile_source`` (named in messages) come from the profile's cluster keyword arguments.
    """

    batch_system: str = ""
    worker_seen: bool = False

    def __init__(self, *args: Any, worker_start_deadline: float | None = None,
                 profile_source: str = "<in memory>", **kwargs: Any) -> None:
        self.worker_start_deadline = worker_start_deadline
        self.profile_source = profile_source
        self._watch = _WatchState()
        super().__init__(*args, **kwargs)

    def _update_worker_status(self, op: str, msg: Any) -> None:
        # Called on the cluster's event loop for each worker the scheduler adds: seen once is enough.
        if op == "add" and isinstance(msg, dict) and msg.get("workers"):
            self.worker_seen = True
        super()._update_worker_status(op, msg)  # type: ignore[misc]

    def _watched_jobs(self) -> list[Any]:
        for _ in range(3):  # the cluster's loop thread may change the dict meanwhile
            try:
                jobs = list(self.workers.values())  # type: ignore[attr-defined]
                break
            except RuntimeError:
                continue
        else:
            return []
        return [j for j in jobs if getattr(j, "job_id", None) and not getattr(j, "closing", False)
                and getattr(j, "submitted_at", None) is not None]

    def watch_worker_jobs(self) -> str | None:
        """One round of watching, if due: records and returns a verdict (see the module), else None.

        Cheap when not due (a clock read) or once a worker has connected; call it as often as you like.
        """
        state = self._watch
        now = time.monotonic()
        if self.worker_seen or state.done or now - state.last_query < POLL_SECONDS:
            return None
        state.last_query = now
        jobs = self._watched_jobs()
        if not jobs:
            return None
        try:
            statuses = (pbs_status if self.batch_system == "PBS" else slurm_status)(jobs)
            error = ""
        except Exception as err:  # noqa: BLE001 - a failing query never ends the run by itself
            statuses, error = {}, str(err)
        if self.worker_seen:  # a worker arrived while the scheduler was asked
            return None
        verdict = self._verdict(jobs, statuses, error, now)
        if verdict is not None:
            state.done = True
            _failures.append((verdict, True))
            _logger().error("%s", verdict)
            return verdict
        self._log_waiting(jobs, statuses, error, now)
        return None

    def _verdict(self, jobs: list[Any], statuses: dict[str, JobStatus], error: str, now: float) -> str | None:
        system, src = self.batch_system, self.profile_source
        for job in jobs:
            st = statuses.get(str(job.job_id))
            if st is not None and st.never:
                return (f"worker job {st.job_id} can never start: {system} says {st.says}; change the request "
                        f"(queue, job_cpus, job_memory, gpus_per_job, gpu_type, walltime) in cluster profile {src} "
                        "or ask the site admin")
        for job in jobs:
            st = statuses.get(str(job.job_id))
            if st is not None and st.phase == "ended":
                status = f", {st.exit}" if st.exit is not None else ""
                return (f"worker job {st.job_id} ended before its Dask worker connected: {system} {st.says}"
                        f"{status}{_tail_phrase(st)}")
        deadline = self.worker_start_deadline
        if deadline is None:
            return None
        for job in jobs:
            if now - job.submitted_at < deadline:
                continue
            st = statuses.get(str(job.job_id))
            within = f"within {_hms(deadline)} (worker_start_deadline of cluster profile {src})"
            if st is None:
                return f"no Dask worker connected from worker job {job.job_id} {within}; {system} query: {error}"
            if st.phase == "queued":
                return f"worker job {st.job_id} is still queued after {_hms(deadline)} (worker_start_deadline of " \
                       f"cluster profile {src}), no Dask worker has connected: {system} says {st.says}"
            if st.phase == "running":
                return (f"worker job {st.job_id} runs but its Dask worker has not connected {within} (check the "
                        f"profile's interface and that the compute nodes reach this machine){_tail_phrase(st)}")
            return f"worker job {st.job_id} is {st.says} and no Dask worker has connected {within}"
        return None

    def _log_waiting(self, jobs: list[Any], statuses: dict[str, JobStatus], error: str, now: float) -> None:
        state = self._watch
        if error:
            line = f"cannot ask {self.batch_system} about the worker jobs ({error}); still waiting for a Dask worker"
        else:
            shown = [f"job {j.job_id} {statuses[str(j.job_id)].phase} ({statuses[str(j.job_id)].says})"
                     for j in jobs[:3] if str(j.job_id) in statuses]
            more = f"; and {len(jobs) - 3} more" if len(jobs) > 3 else ""
            limit = (f"; the run ends if none has connected {_hms(self.worker_start_deadline)} after a job's "
                     "submission (worker_start_deadline)" if self.worker_start_deadline is not None else "")
            line = f"no Dask worker connected yet; {self.batch_system} worker jobs: {'; '.join(shown)}{more}{limit}"
        if line != state.last_line or now - state.last_log >= LOG_SECONDS:
            state.last_line, state.last_log = line, now
            text = f"{line} (waiting {_hms(now - state.started)})"
            (_logger().warning if error else _logger().info)("%s", text)
            for show in WAITING_LINES:
                show(text)
