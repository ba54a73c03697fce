"""Hyper-parameter search on validation folds only: the search space, a trial's objective, the tuned recipe.

The objective of a recipe is the mean best validation score (``val_tss`` by default: TSS at the best
threshold, the trainer's early-stopping score) over ``folds`` region-disjoint folds of each target's
*training* file (:func:`everest.data.prepare_folds`); no ``testing_data_*`` file is ever opened, so a recipe
found here has not seen the test period. The search space is a YAML/TOML file of configuration keys
(``train.learning_rate: {low: 1.0e-4, high: 3.0e-3, log: true}``), validated as a whole before any trial
runs. The result is a configuration file that ``flows.production --config`` takes as is, carrying the
study's provenance (:class:`everest.config.TuningRecord`).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from everest import io
from everest.config import EverestConfig, Experiment, Target, TuningRecord
from everest.data.samples import prepare_folds
from everest.errors import ConfigError, describe_validation_error

METRICS = ("val_tss", "val_auc", "val_loss")  # what a trial can maximise (val_loss: its negative)


class ParamSpec(BaseModel):
    """One searched configuration key: a float or int range (``log`` for a log-uniform draw), or choices."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] | None = None

    @property
    def kind(self) -> Literal["int", "float", "categorical"]:
        return "categorical" if self.choices is not None else "int" if self.integer else "float"


class SearchSpace(BaseModel):
    """Searched keys (dotted configuration keys) and their ranges; :func:`load_search_space` validates it."""

    model_config = ConfigDict(frozen=True)

    params: dict[str, ParamSpec]

    def space_hash(self) -> str:
        """16 hex digits naming the space (sorted canonical JSON), recorded with every tuned recipe."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def problems(self, base: EverestConfig) -> list[str]:
        """Unknown keys and impossible ranges: every bound and choice must make a valid configuration on top
        of ``base``."""
        problems = []
        for key, spec in self.params.items():
            where = f"{key}"
            if spec.choices is not None:
                if spec.low is not None or spec.high is not None:
                    problems.append(f"{where}: give either choices or low/high, not both")
                if not spec.choices:
                    problems.append(f"{where}: choices is empty")
                values = list(spec.choices)
            else:
                if spec.low is None or spec.high is None:
                    problems.append(f"{where}: give low and high (or choices)")
                    continue
                if not (math.isfinite(spec.low) and math.isfinite(spec.high)) or spec.low >= spec.high:
                    problems.append(f"{where}: low ({spec.low}) must be below high ({spec.high})")
                    continue
                if spec.log and spec.low <= 0:
                    problems.append(f"{where}: a log range needs low > 0 (got {spec.low})")
                if spec.integer and (spec.low != int(spec.low) or spec.high != int(spec.high)):
                    problems.append(f"{where}: an integer range needs whole-number bounds")
                values = [int(spec.low), int(spec.high)] if spec.integer else [spec.low, spec.high]
            for value in values:
                try:
                    base.with_overrides({key: value})
                except ConfigError as err:
                    problems.append(f"{where}: {value!r} is not a valid value ({err})")
                    break
        return problems


def load_search_space(path: str | Path, base: EverestConfig) -> SearchSpace:
    """Read and validate a search-space file (a mapping of configuration keys to ranges or choices); every
    problem of every entry is reported in one :class:`ConfigError`."""
    data = io.load_mapping(path, "search space")
    if not data:
        raise ConfigError(f"search space {path} names no parameter")
    valid, problems = {}, []
    for key, raw in data.items():
        try:
            valid[key] = ParamSpec.model_validate(raw)
        except ValidationError as err:
            problems.append(describe_validation_error(err, str(key), list(ParamSpec.model_fields))
                            .removeprefix("invalid "))
    space = SearchSpace(params=valid)
    problems += space.problems(base)
    if problems:
        raise ConfigError(f"invalid search space {path} ({len(problems)} problem(s)): " + "; ".join(problems))
    return space


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """The trial's configuration overrides, drawn from an Optuna trial (TPE or any sampler).

    Choices that are not plain values (e.g. a loss schedule) are drawn by their position in the list."""
    values = {}
    for key, spec in space.params.items():
        if spec.kind == "categorical":
            choices = list(spec.choices)
            values[key] = (trial.suggest_categorical(key, choices) if all(map(_scalar, choices))
                           else choices[trial.suggest_categorical(key, list(range(len(choices))))])
        elif spec.kind == "int":
            values[key] = trial.suggest_int(key, int(spec.low), int(spec.high), log=spec.log)
        else:
            values[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.log)
    return values


def overrides_of(params: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    """A finished trial's parameters (as the study stores them) as configuration overrides."""
    out = {}
    for key, value in params.items():
        choices = space.params[key].choices
        out[key] = choices[value] if choices is not None and not all(map(_scalar, choices)) else value
    return out


class Pruned(Exception):  # noqa: N818 - a decision, not an error
    """The search stopped a trial early (its intermediate scores trail the other trials')."""


def cross_validate(config: EverestConfig, targets: list[Target], data_dir: str | Path, work_dir: str | Path,
                   folds: int = 3, metric: str = "val_tss", seed: int = 0,
                   report: Callable[[int, float], bool] | None = None, cache_dir: Path | None = None) -> float:
    """Mean best validation score of ``config`` over ``folds`` region folds of each target's training file.

    ``report(step, value)`` receives every epoch's score (steps count epochs over folds and targets); when
    it returns True the trial is pruned (:class:`Pruned`). ``val_loss`` is negated so higher is better.
    A fold trains in ``work_dir/fold<i>`` (its checkpoint), removed when the fold is done.
    """
    from everest.training.train import ProductionTrainer

    if metric not in METRICS:
        raise ConfigError(f"unknown tuning metric {metric!r}; choose one of {list(METRICS)}")
    scores, step = [], 0
    fold_config = config.with_overrides({"train.early_stopping_metric": metric})
    for target in targets:
        fold_sets, _ = prepare_folds(data_dir, target, seed, config.data, config.model.seq_len, folds,
                                     cache_dir=cache_dir)
        for i, (train, val) in enumerate(fold_sets):
            fold_dir = Path(work_dir) / f"{target.file_suffix}-fold{i}"
            trainer = ProductionTrainer(Experiment(target=target, seed=seed), config=fold_config, data_dir=data_dir,
                                        output_dir=fold_dir)
            fit = trainer.fit(train, val)
            shutil.rmtree(fold_dir, ignore_errors=True)
            values = [-h[metric] if metric == "val_loss" else h[metric] for h in fit.history]
            for value in values:
                step += 1
                if report is not None and report(step, value):
                    raise Pruned(f"pruned at step {step} ({target}, fold {i + 1} of {folds})")
            finite = [v for v in values if math.isfinite(v)]
            scores.append(max(finite) if finite else float("nan"))
    return float(sum(scores) / len(scores))


def write_recipe(path: str | Path, base: EverestConfig, params: dict[str, Any], record: TuningRecord) -> Path:
    """The tuned recipe as a configuration file for ``--config``: the whole configuration (so no preset can
    change it) with the best parameters applied, and the study's provenance under ``tuning``."""
    tuned = base.with_overrides(params).model_copy(update={"tuning": record})
    EverestConfig.model_validate(tuned.model_dump(mode="json"))  # it loads back as written
    text = (f"# EVEREST recipe tuned on validation folds by study {record.study!r} ({record.trials} trials; best "
            f"mean {record.metric} {record.best_value:.4f} over {record.folds} folds of {', '.join(record.targets)}).\n"
            "# Use it with: python -m flows.production --config THIS_FILE\n"
            + yaml.safe_dump(tuned.model_dump(mode="json"), sort_keys=False))
    return io.write_text(path, text)
