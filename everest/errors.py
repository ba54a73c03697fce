"""How a training run can stop short; each maps to its own exit status in ``everest.cli``.

Kept apart from the trainer so that the command line and the orchestrators can classify failures
without importing torch.
"""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the run stopped (an orchestrator may retry it)."""


class TimeLimitReached(RuntimeError):
    """``train.time_limit_minutes`` elapsed; the last finished epoch is checkpointed for a resume."""


class Preempted(TimeLimitReached):
    """SIGTERM (a batch job's walltime or a pre-emption) stopped training; progress is checkpointed."""
