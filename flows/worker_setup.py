"""Dask worker preload (``--preload flows.worker_setup``): a worker that goes away hands its experiment back.

A batch system ends a job at its walltime with SIGTERM (PBS Pro, then SIGKILL after its kill delay;
SLURM after ``KillWait``), and a worker that reaches its ``--lifetime`` closes itself. Either way the
running experiment must checkpoint mid-epoch instead of losing the epoch. The trainer runs on a worker
thread, where it cannot catch signals, so this preload catches SIGTERM on the worker's main thread and
asks the trainer to stop (:func:`everest.stopping.request_stop`); once the checkpoint is on disk the
process exits, like SIGTERM's default action, and Dask gives the task to another worker (a restarted
one on a local cluster), which resumes from the checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from everest import stopping

log = logging.getLogger("everest")

# Longest wait for the running experiment to write its checkpoint (one batch and one file write).
CHECKPOINT_GRACE_SECONDS = 60.0
EXIT_STATUS_SIGTERM = 128 + signal.SIGTERM


def _stop_then_exit(worker: Any, reason: str) -> None:
    stopping.request_stop(reason)
    if worker.state.executing_count and not stopping.wait_checkpointed(CHECKPOINT_GRACE_SECONDS):
        log.error("worker %s: no checkpoint within %.0f s of %s; exiting anyway", worker.name,
                  CHECKPOINT_GRACE_SECONDS, reason)
    logging.shutdown()
    os._exit(EXIT_STATUS_SIGTERM)


def dask_setup(worker: Any) -> None:
    """Called by Dask in the worker process at start."""
    if threading.current_thread() is not threading.main_thread():
        return  # threads-only LocalCluster: the flow process keeps its own signal handling

    def on_sigterm(signum: int, frame: Any) -> None:
        log.warning("worker %s received SIGTERM: checkpointing the running experiment, then exiting", worker.name)
        threading.Thread(target=_stop_then_exit, args=(worker, "SIGTERM"), daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)


def dask_teardown(worker: Any) -> None:
    """Called by Dask when the worker closes (lifetime reached, retired, or shut down)."""
    if threading.current_thread() is threading.main_thread() and worker.state.executing_count:
        _stop_then_exit(worker, "worker shutdown")
