"""A process-wide request to stop training at the next batch, with a checkpoint.

The trainer stops on SIGTERM/SIGINT when it runs on the main thread. Inside a Dask worker it runs
on a worker thread where it cannot install signal handlers; the worker's launcher (a signal handler
or its shutdown hook) calls :func:`request_stop` instead, the trainer checkpoints mid-epoch, calls
:func:`mark_checkpointed` and raises :class:`everest.errors.Preempted` just as it does for a signal.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

_requested = threading.Event()
_checkpointed = threading.Event()
_reason: list[str] = []


def request_stop(reason: str) -> None:
    """Ask every training loop of this process to checkpoint and stop; ``reason`` names the cause."""
    if not _requested.is_set():
        _reason.append(reason)
        _requested.set()


def stop_reason() -> str | None:
    """Why a stop was requested (e.g. ``"SIGTERM"``), or None when none was."""
    return _reason[0] if _requested.is_set() else None


def mark_checkpointed() -> None:
    """Called by a training loop that stopped on request once its state is safely on disk."""
    _checkpointed.set()


def wait_checkpointed(timeout: float) -> bool:
    """Wait until a stopped training loop has checkpointed; False after ``timeout`` seconds."""
    return _checkpointed.wait(timeout)



class StopOnSignal:
    """Record SIGTERM/SIGINT instead of dying, so training can checkpoint mid-epoch and exit cleanly.

    Signal handlers can only be installed from the main thread; on another thread (a Dask worker)
    the launcher forwards its signals through :func:`request_stop`.
    """

    def __init__(self) -> None:
        self._signal: str | None = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> str | None:
        """The signal or reason that asked training to stop, if any."""
        return self._signal or stop_reason()

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self._signal = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
