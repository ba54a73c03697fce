"""Every failure the library raises on purpose, the exit status each maps to, and the one formatter of
validation errors.

Kept free of torch, pandas and the orchestration layer, so that the command line, the flow and the batch
scripts classify failures without importing the trainer.
"""

from __future__ import annotations

from typing import Any

EXIT_FAILED = 1  # an unexpected error, or a flow run whose experiments did not all finish
EXIT_USAGE = 2  # bad configuration, arguments or input data: nothing to retry
EXIT_DIVERGED = 3  # training diverged (NaN/inf loss)
EXIT_TIME_LIMIT = 4  # time limit or SIGTERM: checkpointed; rerun to resume
EXIT_IO = 5  # the file system refused a read or write (full disk, permissions, quota)
EXIT_SIGHUP = 128 + 1  # the shell's convention: 128 + the signal's number
EXIT_INTERRUPTED = 128 + 2  # Ctrl-C (SIGINT)
EXIT_SIGKILL = 128 + 9
EXIT_SIGTERM = 128 + 15

# What every exit status of the project's commands (everest, python -m flows.production / flows.tune, the
# batch scripts) means and what to do about it: the one table the command lines and cluster/lib.sh describe
# statuses from (``python -m everest.errors STATUS``).
EXIT_STATUSES: dict[int, str] = {
    0: "finished",
    EXIT_FAILED: "failed: an unexpected error (its traceback is in the log), experiments of a flow run that did "
                 "not finish (the report and each failure.json name them), or an analysis with no finished "
                 "experiment",
    EXIT_USAGE: "bad input or configuration: fix it, then resubmit",
    EXIT_DIVERGED: "training diverged (NaN/inf loss)",
    EXIT_TIME_LIMIT: "stopped early (SIGTERM at the walltime or a pre-emption, or train.time_limit_minutes), progress "
                     "checkpointed: resubmit to resume",
    EXIT_IO: "the file system refused a read or write (disk full, quota or permissions): free space or fix the "
             "permissions, then resubmit to resume (files written before are intact)",
    EXIT_SIGHUP: "ended by SIGHUP (the terminal or login session closed): rerun to resume",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C): rerun to resume",
    EXIT_SIGKILL: "killed by SIGKILL (memory limit, or the scheduler's kill after the walltime): resubmit to resume "
                  "from the last epoch checkpoint",
    EXIT_SIGTERM: "ended by SIGTERM (walltime, qdel or scancel, timeout, or a closed session) before training "
                  "could checkpoint: resubmit to resume",
}


def describe_exit_status(status: int) -> str:
    """What an exit status means, from :data:`EXIT_STATUSES`; other signals by number, anything else a crash."""
    if status in EXIT_STATUSES:
        return EXIT_STATUSES[status]
    if 128 < status < 128 + 65:
        return f"killed by signal {status - 128}: resubmit to resume from the last epoch checkpoint"
    return f"crashed (exit status {status})"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names it, what is allowed and what was given."""


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file, the row/column and what was expected."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the run stopped (an orchestrator may retry it)."""


class TimeLimitReached(RuntimeError):
    """``train.time_limit_minutes`` elapsed; the last finished epoch is checkpointed for a resume."""


class Preempted(TimeLimitReached):
    """SIGTERM (a batch job's walltime or a pre-emption) stopped training; progress is checkpointed."""


def describe_validation_error(err: Any, what: str, allowed_keys: list[str] | None = None) -> str:
    """One line for a pydantic ``ValidationError``: ``invalid <what>: <key>: <problem> (got <value>); ...``.

    ``allowed_keys`` lists the keys an unknown top-level key is compared against. Our own validators'
    messages arrive prefixed with "Value error, ", which is dropped.
    """
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + (f"; allowed keys: {allowed_keys}" if allowed_keys and len(e["loc"]) == 1 else "")
        problems.append(f"{loc}: {msg} (got {e.get('input')!r})" if loc else msg)
    return f"invalid {what}: " + "; ".join(problems)


if __name__ == "__main__":  # python -m everest.errors STATUS: the meaning, for shell launchers
    import sys

    try:
        print(describe_exit_status(int(sys.argv[1])))
    except (IndexError, ValueError):
        print("usage: python -m everest.errors STATUS (an integer exit status)", file=sys.stderr)
        sys.exit(EXIT_USAGE)
