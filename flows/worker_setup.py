"""Dask worker preload (``--preload flows.worker_setup``): a worker that goes away hands its experiment back.

A batch system ends a job at its walltime with SIGTERM (PBS Pro, then SIGKILL after its kill delay;
SLURM after ``KillWait``), and a worker that reaches its ``--lifetime`` closes itself. Either way the
running experiment must checkpoint mid-epoch instead of losing the epoch. The trainer runs on a worker
thread, where it cannot catch signals, so this preload catches SIGTERM (and SIGHUP, a closed terminal of a
local run) on the worker's main thread and asks the trainer to stop (:func:`everest.training.stopping.request_stop`);
once the checkpoint is on disk the process exits, like SIGTERM's default action, and Dask gives the task to
another worker (a restarted one on a local cluster), which resumes from the checkpoint.

Only a task function that is really running (Dask's ``active_threads``) is waited for, and only until it has
checkpointed or ended; an idle worker closes at once. Dask's count of executing tasks is no guide once the
worker closes: the close cancels its bookkeeping of the running task, so a task that ends meanwhile (an
experiment that had just finished, a baseline fit) stays counted, and a wait for a checkpoint that such a
task never writes lasted the whole grace period. A task that is not training is let finish, so that its
results are on disk and its rerun on another worker only reads them.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from everest.errors import EXIT_SIGTERM
from everest.training import stopping

log = logging.getLogger("everest")

# Longest wait for the running task: a training loop's checkpoint (one batch and one file write), or the end of
# a task that is not training.
CHECKPOINT_GRACE_SECONDS = 60.0
_POLL_SECONDS = 0.05


def task_running(worker: Any) -> bool:
    """Whether a task function is running in one of the worker's threads now (Dask tracks their threads)."""
    with worker.active_threads_lock:
        return bool(worker.active_threads)


def _stop_then_exit(worker: Any, reason: str, status: int = EXIT_SIGTERM) -> None:
    """Ask training to checkpoint, wait until the running task is checkpointed (or ended), then exit."""
    stopping.request_stop(reason)
    started = time.monotonic()
    # A stopped trainer marks its checkpoint, then its task waits for this exit (it never ends by itself).
    while task_running(worker) and not stopping.wait_checkpointed(_POLL_SECONDS):
        if time.monotonic() - started > CHECKPOINT_GRACE_SECONDS:
            log.error("worker %s: its task neither checkpointed nor ended within %.0f s of %s; exiting anyway",
                      worker.name, CHECKPOINT_GRACE_SECONDS, reason)
            break
    logging.shutdown()
    os._exit(status)


def dask_setup(worker: Any) -> None:
    """Called by Dask in the worker process at start."""
    if threading.current_thread() is not threading.main_thread():
        return  # threads-only LocalCluster: the flow process keeps its own signal handling

    def on_signal(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        log.warning("worker %s received %s: checkpointing the running experiment, then exiting", worker.name, name)
        threading.Thread(target=_stop_then_exit, args=(worker, name, 128 + signum), daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


def dask_teardown(worker: Any) -> None:
    """Called by Dask when the worker closes (lifetime reached, retired, or shut down): an idle worker just
    closes; one running a task hands it back as on SIGTERM."""
    if threading.current_thread() is threading.main_thread() and task_running(worker):
        _stop_then_exit(worker, "worker shutdown")
