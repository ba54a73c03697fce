"""Several experiments trained at once as one vectorised model: the group.

:func:`train_group` trains K experiments (any mix of targets and seeds sharing one configuration) as a
single batched network on one device; each member keeps a solo run's semantics and outputs (its own
validation score, best weights, early stopping, checkpoint and result folder), so analysis, caching,
resume and the report do not know the difference. Finished members are skipped and a member that fails
alone (diverged, bad data) does not stop the others.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from everest.config import EverestConfig, Experiment
from everest.errors import ConfigError, DataError, TrainingDiverged
from everest.train import ProductionTrainer, ProgressCallback

log = logging.getLogger(__name__)

# A member's own failure, recorded for it alone; anything else (a signal, the time limit, an
# out-of-memory error) stops the whole group after every member has checkpointed.
MEMBER_ERRORS = (TrainingDiverged, DataError, ConfigError)


@dataclass(frozen=True)
class MemberResult:
    """One member's outcome: its ``results.json`` content, or the error that stopped it alone."""

    experiment: Experiment
    results: dict[str, Any] | None
    error: BaseException | None = None


def train_group(experiments: Sequence[Experiment], *, config: EverestConfig | None = None,
                data_dir: str | Path = "data", output_dir: str | Path = "output",
                cache_dir: str | Path | None = None, progress: ProgressCallback | None = None,
                force: bool = False) -> list[MemberResult]:
    """Train ``experiments`` as one group and return their outcomes in the same order."""
    if len({e.name for e in experiments}) != len(experiments):
        raise ConfigError(f"a group lists an experiment twice: {[e.name for e in experiments]}")
    out = []
    for exp in experiments:
        trainer = ProductionTrainer(exp, config=config, data_dir=data_dir, output_dir=output_dir,
                                    cache_dir=cache_dir, progress=progress, force=force)
        try:
            out.append(MemberResult(exp, trainer.train()))
        except MEMBER_ERRORS as err:
            log.error("%s: %s", exp.name, err)
            out.append(MemberResult(exp, None, err))
    return out
