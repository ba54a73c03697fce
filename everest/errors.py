"""Every failure the library raises on purpose, the exit status each maps to, and the one formatter of
validation errors.

Kept free of torch, pandas and the orchestration layer, so that the command line, the flow and the batch
scripts classify failures without importing the trainer.
"""

from __future__ import annotations

from typing import Any

EXIT_USAGE = 2  # bad configuration, arguments or input data: nothing to retry
EXIT_DIVERGED = 3  # training diverged (NaN/inf loss)
EXIT_TIME_LIMIT = 4  # time limit or SIGTERM: checkpointed; rerun to resume
EXIT_IO = 5  # the file system refused a read or write (full disk, permissions, quota)


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
