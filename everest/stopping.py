"""A process-wide request to stop training at the next batch, with a checkpoint.

The trainer stops on SIGTERM/SIGINT when it runs on the main thread. Inside a Dask worker it runs
on a worker thread where it cannot install signal handlers; the worker's launcher (a signal handler
or its shutdown hook) calls :func:`request_stop` instead, the trainer checkpoints mid-epoch, calls
:func:`mark_checkpointed` and raises :class:`everest.errors.Preempted` just as it does for a signal.
"""

from __future__ import annotations

import threading

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

