"""Dask worker preload (``--preload flows.worker_setup``): a worker that goes away hands its experiment back.

A batch system ends a job at its walltime with SIGTERM (PBS Pro, then SIGKILL after its kill delay;
SLURM after ``KillWait``), and a worker that reaches its ``--lifetime`` closes itself. Either way the
running experiment must checkpoint mid-epoch instead of losing the epoch. The trainer runs on a worker
thread, where it cannot catch signals, so this preload catches SIGTERM on the worker's main thread,
asks the trainer to stop (:func:`everest.stopping.request_stop`) and closes the worker; Dask then gives
the task to another worker, which resumes from the checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from everest import stopping

log = logging.getLogger("everest")


def dask_setup(worker: Any) -> None:
    """Called by Dask in the worker process at start."""
    if threading.current_thread() is not threading.main_thread():
        return  # threads-only LocalCluster: the flow process keeps its own signal handling

    def on_sigterm(signum: int, frame: Any) -> None:
        log.warning("worker %s received SIGTERM: checkpointing the running experiment and closing", worker.name)
        stopping.request_stop("SIGTERM")
        # The nanny (when there is one) restarts or ends the process; the task goes to another worker.
        worker.loop.add_callback(worker.close, reason="SIGTERM", nanny=False)

    signal.signal(signal.SIGTERM, on_sigterm)


def dask_teardown(worker: Any) -> None:
    """Called by Dask when the worker closes (lifetime reached, retired, or shut down)."""
    stopping.request_stop("worker shutdown")
