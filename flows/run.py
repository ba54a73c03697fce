"""The run machinery both flows share: waiting for their tasks on Dask, and the command line around a flow run.

* Waiting: :func:`next_settled` and :func:`settle` return each task's result or error, and end the wait with the
  batch system's own words when no worker job can give a worker (:class:`SubmissionFailed`); :func:`release`
  lets go of a finished task's Dask future so that a worker retiring later never makes Dask run it again.
* The command line (:func:`run_command_line`): validate everything before anything starts, make sure a Prefect
  API exists (a private server otherwise), run the flow, and end a run alike on Ctrl-C, SIGTERM and SIGHUP.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import ValidationError

from everest.errors import (
    EXIT_INTERRUPTED,
    EXIT_SIGHUP,
    EXIT_SIGTERM,
    EXIT_USAGE,
    ConfigError,
    DataError,
    describe_validation_error,
)
from flows.parameters import FlowParameters
from flows.profiles import Profile, load_profile
from flows.terminal import TERMINAL, quiet_logs

Key = TypeVar("Key")
P = TypeVar("P", bound=FlowParameters)
# The signals that end a command-line run as Ctrl-C does, and its exit status then.
SIGNAL_EXITS = {signal.SIGTERM: EXIT_SIGTERM, signal.SIGHUP: EXIT_SIGHUP}


# ------------------------------------------------------------------------------------------ waiting for tasks
class SubmissionFailed(RuntimeError):
    """No worker job can give a Dask worker: the batch system refused one, says one can never start, or one ended
    (or outlived the profile's worker_start_deadline) before any worker connected; the message quotes the scheduler."""


def next_settled(pending: dict[Key, Any], poll_seconds: float = 1.0) -> tuple[Key, Any, Any, BaseException | None]:
    """The next task that ended, in completion order: (its key in ``pending``, future, result, error).

    With no worker connected, a refused submission or a worker job that cannot start or died (flows.jobwatch)
    ends every wait with the scheduler's words.
    """
    from flows.jobwatch import worker_job_failure

    while True:
        for key, fut in pending.items():
            if fut.wrapped_future.done():
                try:
                    return key, fut, fut.result(), None
                except Exception as err:  # noqa: BLE001 - handed to the caller, which records it
                    return key, fut, None, err
        if not workers_connected() and (failed := worker_job_failure()):
            key, fut = next(iter(pending.items()))
            return key, fut, None, SubmissionFailed(failed)
        time.sleep(poll_seconds)


def settle(fut: Any, poll_seconds: float = 2.0) -> Any:
    """Wait for one task's result; with no worker connected, a refused submission or a worker job that cannot
    start or died ends the wait with the scheduler's words.

    dask-jobqueue only logs a failed ``qsub``/``sbatch`` and waits for workers forever.
    """
    from flows.jobwatch import worker_job_failure

    while not fut.wrapped_future.done():
        fut.wait(timeout=poll_seconds)
        # One refusal among running jobs may be a per-user limit or a blip that adaptive scaling retries;
        # refusals with no worker at all will not go away.
        if not workers_connected() and (failed := worker_job_failure()):
            raise SubmissionFailed(failed)
    return fut.result()


def workers_connected() -> int:
    """Dask workers connected to the flow's cluster (0 when the flow runs without Dask).

    Called while waiting: until a first worker connects, it also lets a batch cluster look at its worker jobs
    (rate-limited, flows.jobwatch), which records a job that cannot start or died as a failure. Outside a flow
    run it uses the default Dask client, if any.
    """
    from distributed import default_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is not None:
        client = getattr(ctx.task_runner, "client", None)
    else:
        try:
            client = default_client()
        except ValueError:
            client = None
    if client is None:
        return 0
    cluster = getattr(client, "cluster", None)
    if (watch := getattr(cluster, "watch_worker_jobs", None)) is not None:
        watch()
    info = getattr(cluster, "scheduler_info", None)
    if isinstance(info, dict) and "workers" in info:  # the cluster's own copy: no round trip to the scheduler
        return len(info["workers"])
    return len(client.scheduler_info(n_workers=-1)["workers"])


def release(fut: Any, when_done: bool = False) -> None:
    """Drop the flow's hold on a Dask future, keeping its task's final Prefect state in ``fut``.

    While a client holds the future of a finished task, Dask keeps its result on the worker that ran it and
    computes the task again when that worker goes away (its lifetime or walltime, a scale-down): an experiment
    would train again, a baseline be refitted. ``when_done`` arranges the release for a future just submitted,
    as soon as its task ends (from Dask's callback thread); the future's ``result`` and ``wait`` then serve the
    kept state, under a lock, so the flow never reads a result while it is being released. A task that Dask
    itself gave up on (``KilledWorker``) keeps its future until the flow has read the error.
    """
    dask_future = getattr(fut, "wrapped_future", None)
    if getattr(dask_future, "release", None) is None:
        return  # not a Dask future
    if not when_done:
        with getattr(fut, "_everest_release_lock", contextlib.nullcontext()):
            dask_future.release()
        return
    import threading

    lock = threading.RLock()
    result, wait = fut.result, fut.wait

    def locked_result(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return result(*args, **kwargs)

    def locked_wait(timeout: float | None = None) -> None:
        with lock:
            if fut._final_state is None:
                wait(timeout)

    def on_done(_: Any) -> None:
        from prefect.states import State

        with lock:
            if fut._final_state is None and dask_future.status == "finished":
                with contextlib.suppress(Exception):  # its worker lost it meanwhile: the flow reads the outcome
                    state = dask_future.result()  # the final state: prefect-dask submits with return_type="state"
                    if isinstance(state, State):
                        fut._final_state = state
            if fut._final_state is not None:
                dask_future.release()

    fut._everest_release_lock = lock
    fut.result, fut.wait = locked_result, locked_wait
    dask_future.add_done_callback(on_done)


def bind_cluster_to_run(site: Profile, out: Path) -> None:
    """Give the flow's Dask cluster this run's output folder (job logs, TLS certificates, the file holding the
    Prefect API password), and make every task submitted from now on let go of its result on its worker as soon
    as it ends (:func:`release`), so that a worker retiring later never makes Dask run it again.

    DaskTaskRunner builds its cluster from ``cluster_kwargs`` at the first submission, after this.
    """
    from prefect.context import FlowRunContext
    from prefect_dask import DaskTaskRunner

    runner = FlowRunContext.get().task_runner
    if not isinstance(runner, DaskTaskRunner):
        return
    if type(runner) is DaskTaskRunner and runner.cluster_kwargs:
        runner.cluster_kwargs = site.cluster_kwargs(out.resolve())
    submit = runner.submit

    def submit_and_release_when_done(*args: Any, **kwargs: Any) -> Any:
        fut = submit(*args, **kwargs)
        release(fut, when_done=True)
        return fut

    runner.submit = submit_and_release_when_done  # this run's own copy of the task runner


def mark_crashed(task_run_id: Any, message: str) -> None:
    """Dask gave up on a task (KilledWorker): tell the Prefect API, which otherwise shows it Running."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        client.set_task_run_state(task_run_id, Crashed(message=message), force=True)


def lazy_variants(make: Callable[[str], Any], variants: dict[str, str], namespace: dict[str, Any]
                  ) -> Callable[[str], Any]:
    """A module ``__getattr__`` that builds each deployment entrypoint (the flow bound to one profile) on first
    use, so a broken site profile only affects its own deployment."""
    def getattr_(name: str) -> Any:
        if name in variants:
            namespace[name] = make(variants[name])
            return namespace[name]
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
    return getattr_


# ----------------------------------------------------------------------------------------------- command line
@dataclass(frozen=True)
class FlowCommand(Generic[P]):
    """What one flow's command line adds to :func:`run_command_line`: its parameters, its flow bound to a profile
    (``make_flow(site, profile_name)``), the checks that can refuse a run before anything starts, the plan
    printed first, the report of the ended run (its exit status) and what a rerun after an interruption keeps."""

    model: type[P]
    make_flow: Callable[[Profile, str], Any]
    preflight: Callable[[P, Profile, str | None], Any]
    plan: Callable[[P, Profile], str]
    report: Callable[[P, Any, str], int]
    resume_hint: str


def command_line(model: type[FlowParameters], prog: str, description: str) -> argparse.ArgumentParser:
    """A flow's argument parser: one option per parameter (:meth:`FlowParameters.add_arguments`), and --verbose."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    model.add_arguments(p)
    p.add_argument("--verbose", action="store_true",
                   help="show Prefect's and Dask's log lines too (by default: the run's own short lines)")
    return p


def run_command_line(args: argparse.Namespace, command: FlowCommand[Any]) -> int:
    """Validate everything, make sure a Prefect API exists, run the flow, report; returns the exit status.

    Ctrl-C, SIGTERM (``timeout``, a batch system) and SIGHUP (a closed login session) end a run alike: the
    worker jobs are deleted (the Dask cluster closes), the flow run is marked Cancelled with the reason, the
    private Prefect server stops, one line says so on stderr, and the exit status is 128 + the signal number.
    """
    from everest.cli import setup_logging

    setup_logging()
    quiet_logs(args.verbose)
    api_url = os.environ.get("PREFECT_API_URL")
    try:
        params = command.model.from_args(args)
        site = load_profile(params.profile)
        # Loading a profile imports dask_jobqueue (flows.batch), which replaces Ctrl-C's handler with sys.exit():
        # exit status 0 and a flow run left Crashed. Ctrl-C must interrupt: the run is marked Cancelled, status 130.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        command.preflight(params, site, api_url)
        host = None if api_url else site.reachable_host()
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as err:  # our validators' ConfigErrors arrive wrapped in it
        print(f"error: {describe_validation_error(err, 'parameters')}", file=sys.stderr)
        return EXIT_USAGE
    print(command.plan(params, site), flush=True)
    run_name = f"everest-{uuid.uuid4().hex[:12]}"
    state = _run_until_signalled(command, params, site, host or "127.0.0.1", run_name)
    if isinstance(state, int):
        return state
    TERMINAL.end_live()
    run_id = state.state_details.flow_run_id
    home = os.environ.get("PREFECT_HOME", "~/.prefect")
    browse = (f"run history: open {api_url.removesuffix('/api')}/runs/flow-run/{run_id}" if api_url else
              f"run history (the private server has stopped): `PREFECT_HOME={home} prefect server start`, "
              f"then open http://127.0.0.1:4200/runs/flow-run/{run_id}")
    return command.report(params, state, browse)


def _run_until_signalled(command: FlowCommand[Any], params: FlowParameters, site: Profile, host: str,
                         run_name: str) -> Any:
    """The flow run's final state, or the exit status of a run that Ctrl-C or a signal ended."""
    from prefect.exceptions import TerminationSignal

    from flows.server import prefect_api

    received: list[int] = []

    def terminate(signum: int, frame: Any) -> None:
        # From here on there is something to clean up: unwind like Ctrl-C. Once: a repeated signal (Prefect
        # re-sends SIGTERM to itself after its own handler) must not cut the cleanup short.
        if not received:
            received.append(signum)
            raise TerminationSignal(signal=signum)

    for sig in SIGNAL_EXITS:
        signal.signal(sig, terminate)
    state = None
    try:
        with prefect_api(host=host):
            # Built inside: batch job scripts must carry this run's PREFECT_API_URL.
            run = command.make_flow(site, params.profile).with_options(flow_run_name=run_name)
            try:
                state = run(**params.flow_parameters(), return_state=True)
            except (KeyboardInterrupt, TerminationSignal) as err:  # the cluster has closed: its jobs are deleted
                why, status = _ended_by(err)
                marked = "marked Cancelled" if _cancel_run(run_name, why) else "could not be marked Cancelled"
                with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
                    print(f"{why}: flow run {run_name} {marked}; rerun the same command to resume "
                          f"({command.resume_hint})", file=sys.stderr)
                return status  # leaving the block stops the private server
    except (KeyboardInterrupt, TerminationSignal) as err:  # while the server started or stopped
        why, status = _ended_by(err)
        with contextlib.suppress(OSError):
            print(f"{why}: {'no flow run began' if state is None else f'flow run {run_name} had ended'}; the "
                  "private Prefect server is stopped", file=sys.stderr)
        return status
    return state


def _ended_by(err: BaseException) -> tuple[str, int]:
    """Why the run ends early, and its exit status (128 + the signal number; Ctrl-C is SIGINT)."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted from the terminal (Ctrl-C)", EXIT_INTERRUPTED
    return f"terminated by {signal.Signals(err.signal).name}", SIGNAL_EXITS[err.signal]


def _cancel_run(name: str, message: str) -> bool:
    """Mark the named flow run Cancelled with ``message`` (Ctrl-C or a signal would otherwise leave it Running or
    Crashed on the server); False when the API could not be told (the run is ending: that must not stop it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.states import Cancelled

    try:
        with get_client(sync_client=True) as client:
            for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name]))):
                if not run.state or not (run.state.is_completed() or run.state.is_failed()):  # Running or Crashed
                    client.set_flow_run_state(run.id, Cancelled(message=message), force=True)
    except Exception as err:  # noqa: BLE001 - reported by the caller's message; the exit goes on
        logging.getLogger(__name__).warning("could not mark flow run %s Cancelled: %s", name, err)
        return False
    return True
