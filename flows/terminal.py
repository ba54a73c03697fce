"""What a command-line run shows on its terminal: its own short lines, while Prefect's and Dask's log lines stay
in the flow run's log (``--verbose`` shows them instead). Deployment runs print nothing here: their log says it
all."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import dask

from everest.scoring.metrics import shown
from flows import jobwatch


class Terminal:
    """The run's own lines on stdout, a live status line kept last on a terminal; inactive until
    :func:`quiet_logs` switches it on for a command-line run."""

    def __init__(self) -> None:
        self.active = False
        self._live = False  # a status line is on screen, to be overwritten

    def line(self, text: str, status: str = "") -> None:
        """Print ``text``; on a terminal, keep ``status`` as a live last line, else append it."""
        if not self.active:
            return
        # sys.stdout, not print(): the flow's log_prints turns print() into log records.
        if sys.stdout.isatty():
            sys.stdout.write(f"\r\033[K{text}\n{status}")
            self._live = bool(status)
        else:
            sys.stdout.write(f"{text}  ({status})\n" if status else f"{text}\n")
        sys.stdout.flush()

    def end_live(self) -> None:
        """End the live status line, so that what follows starts on a line of its own."""
        if self.active and self._live:
            sys.stdout.write("\n")
            self._live = False


TERMINAL = Terminal()
jobwatch.WAITING_LINES.append(TERMINAL.line)  # while no worker has connected, what the worker jobs wait for


def quiet_logs(verbose: bool) -> None:
    """Keep the terminal to the run's own lines: Prefect's console lines and Dask's log lines (here and in
    worker processes, which read the environment) stay out unless ``verbose``. Everything still reaches the
    flow run's log in the Prefect UI."""
    from prefect.logging.handlers import PrefectConsoleHandler

    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "info" if verbose else "error")
    dask.config.refresh()
    logging.getLogger("distributed").setLevel(os.environ["DASK_LOGGING__DISTRIBUTED"].upper())
    if verbose:
        return
    # Failures too: the run prints each failed experiment's error in one line, and the log keeps the rest.
    os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "CRITICAL"
    for name in ("", "prefect", "uvicorn", "fastapi"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.setLevel(logging.CRITICAL)
    TERMINAL.active = True


class RunProgress:
    """One line per finished experiment (name, TSS, threshold, time, cached or trained), with "k of N
    finished, ETA", in the flow run's log and on a command-line run's terminal."""

    def __init__(self, total: int, logger: Any) -> None:
        self.total, self.done, self.logger = total, 0, logger
        self.started = time.monotonic()
        self.trained = 0

    def finished(self, name: str, row: dict[str, Any], cached: bool) -> None:
        """An experiment finished (``cached``: before this run, or in an earlier attempt)."""
        self.trained += not cached
        how = "cached" if cached else f"trained in {duration(row.get('seconds'))}"
        self._report(f"{name}: test TSS {shown(row['tss'])}, threshold {row['threshold']:.3g}, {how}")

    def failed(self, name: str, error: str) -> None:
        """An experiment failed with ``error`` (its type and message)."""
        self._report(f"{name}: FAILED: {error}", error=True)

    def _report(self, text: str, error: bool = False) -> None:
        self.done += 1
        status = f"{self.done} of {self.total} finished" + self._eta()
        (self.logger.error if error else self.logger.info)("%s (%s)", text, status)
        TERMINAL.line(f"[{self.done}/{self.total}] {text}", status)

    def _eta(self) -> str:
        left = self.total - self.done
        if not left or not self.trained:
            return ""
        per = (time.monotonic() - self.started) / self.trained
        return f", about {duration(per * left)} left"


def duration(seconds: float | None) -> str:
    """A time span for people: ``4.2 s``, ``87 s``, ``3 min 05 s``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 10:
        return f"{seconds:.1f} s"
    seconds = round(seconds)
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min {seconds % 60:02d} s"


def announce_run() -> None:
    """Inside a flow run: where to watch it in the Prefect UI while it lasts."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_UI_URL

    run = FlowRunContext.get().flow_run
    if PREFECT_UI_URL.value():
        TERMINAL.line(f"flow run {run.name}: watch it at {PREFECT_UI_URL.value()}/runs/flow-run/{run.id}")


def print_summary(state: Any, out: Path, browse: str) -> None:
    """An ended production run: each experiment's test metrics, the failures, the counts, where the report and
    plots are, and ``browse`` (where to see the run's history)."""
    data = state.result(raise_on_failure=False) if state.is_completed() else None
    summary_file = out / "analysis" / "flow_summary.json"
    if data is None and summary_file.is_file():
        data = json.loads(summary_file.read_text())
    if not isinstance(data, dict):
        print(f"flow run ended {state.name}: {state.message}")
        return
    rows = data.get("results", [])
    if rows:
        import pandas as pd

        table = pd.DataFrame(rows)
        table = table[table.model == "everest"][["experiment", "tss", "roc_auc", "brier", "threshold", "epochs_run"]]
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="undefined"))
    for name in data.get("failed", []):
        print(f"FAILED: {name}")
    print(f"flow run ended {state.name}: {data.get('completed', len(rows))} experiments finished "
          f"(+{data.get('baselines_fitted', 0)} baseline fits), {len(data.get('failed', []))} failed")
    print(f"report: {data.get('report')}")
    print(f"plots:  {data.get('plots', out / 'plots')}")
    if data.get("bundle"):  # the trained ensembles, ready for `everest predict` (or why there is no bundle)
        print(f"bundle: {data['bundle']}")
    print(browse)
