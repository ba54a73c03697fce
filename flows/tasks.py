"""The tasks of ``everest-production``, each a few lines around one function of ``everest``, and what they take.

Failure policy: a task's Python error is retried (``retries``) only when it is an infrastructure problem (CUDA out
of memory, a lost file system or node, a walltime/time limit: the retry resumes from the checkpoint); a diverged
run (:class:`everest.errors.TrainingDiverged`) or bad data/config is not retried, because it would fail again the
same way; in a group it fails that experiment alone (:class:`MembersFailed`).

Caching: a task's cache key is made of the :class:`everest.results.Identity` of each experiment it covers (see
:func:`experiment_cache_key`), never of the flow run, so reruns and retries reuse finished experiments.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from pydantic import BaseModel, ConfigDict, Field, model_validator

from everest import results
from everest.config import EverestConfig, Experiment, Target
from everest.errors import ConfigError, DataError
from everest.scoring import baselines
from everest.scoring.metrics import shown
from everest.training import stopping
from flows.artifacts import artifact_key
from flows.terminal import duration

RETRIES = 2
RETRY_DELAY_SECONDS = 10


class ExperimentJob(BaseModel):
    """What one baseline fit needs: the model, the experiment, its configuration and identity, the folders."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    experiment: Experiment
    config: EverestConfig
    identity: results.Identity
    data_dir: Path
    output_dir: Path

    @property
    def name(self) -> str:
        return self.experiment.name

    def cache_key(self) -> str:
        """Its identity's key."""
        return self.identity.key()


class GroupJob(BaseModel):
    """What one training task needs: its experiments (one, or a group trained together), their identities
    in the same order, the configuration and the run's folders."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    experiments: tuple[Experiment, ...] = Field(min_length=1)
    identities: tuple[results.Identity, ...]
    config: EverestConfig
    data_dir: Path
    output_dir: Path
    torch_threads: int | None = None

    @model_validator(mode="after")
    def _aligned(self) -> GroupJob:
        if [i.experiment for i in self.identities] != [e.name for e in self.experiments]:
            raise ValueError("identities must name the experiments, in the same order")
        return self

    @property
    def name(self) -> str:
        """Its task run is ``train-<name>``."""
        return group_name(self.experiments)

    def cache_key(self) -> str:
        """Made of the members' identity keys: one member's key as is, a group's digest of them all.

        The ``group<K>-`` prefix keeps these records apart from those of tasks that returned one summary.
        """
        keys = [i.key() for i in self.identities]
        digest = keys[0] if len(keys) == 1 else hashlib.sha256("\n".join(keys).encode()).hexdigest()[:32]
        return f"group{len(keys)}-{digest}"


def group_name(group: Sequence[Experiment]) -> str:
    """The experiment's name, or ``<first>..<last>`` for a group: task-run names and log lines."""
    return group[0].name if len(group) == 1 else f"{group[0].name}..{group[-1].name}"


def experiment_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key of finished work: the :class:`everest.results.Identity` of each experiment it covers.

    * experiment name: target and seed;
    * config hash: any change to model, loss, training, threshold or data settings invalidates;
    * data hash: the content of its two CSV files (a regenerated or edited file invalidates);
    * code version (``everest.results.CODE_VERSION``): bumped when the code's results change.
    The run id is deliberately absent, so reruns and UI retries reuse finished experiments. A cached
    result counts only while every result on disk matches (the flow refreshes the cache otherwise).
    """
    return parameters["job"].cache_key()


class MembersFailed(RuntimeError):
    """Experiments of a group that failed alone (diverged, bad data) while the others finished.

    ``failures`` maps each one's name to its error type and message, recorded as its own failure.
    """

    def __init__(self, failures: dict[str, tuple[str, str]]) -> None:
        super().__init__(failures)
        self.failures = failures

    def __str__(self) -> str:
        return "; ".join(f"{name}: {kind}: {text}" for name, (kind, text) in self.failures.items())


def member_error(exp: Experiment, err: BaseException | None) -> tuple[str, str]:
    """Error type and message recorded for an experiment that did not finish: its own when it failed alone
    in its group, else its task's (an infrastructure error, a lost worker, a refused batch job)."""
    if isinstance(err, MembersFailed) and exp.name in err.failures:
        return err.failures[exp.name]
    if err is None:
        return "RuntimeError", "its task ended without a result for it"
    return type(err).__name__, str(err)


def api_unreachable(err: BaseException) -> bool:
    """A connection error to the Prefect API (a restarting server, a network blip, a wrong address)."""
    import httpx

    return isinstance(err, httpx.TransportError) or "Failed to reach API" in str(err)


def is_infrastructure_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: retry infrastructure failures, never a diverged run or bad input."""
    from everest.errors import TimeLimitReached, TrainingDiverged

    try:
        state.result()
    except (TrainingDiverged, ConfigError, DataError, MembersFailed):
        return False
    except TimeLimitReached:
        return True
    except Exception as err:  # noqa: BLE001 - classifying, not swallowing: the state keeps the error
        text = f"{type(err).__name__}: {err}".lower()
        return (isinstance(err, OSError | MemoryError) or api_unreachable(err)
                or "out of memory" in text or "cuda" in text)
    return False


class EpochProgress:
    """A task's progress card per experiment (epochs done) and a log line per epoch; a group's lines name their
    experiment."""

    def __init__(self, experiments: Sequence[Experiment], max_epochs: int) -> None:
        self.logger = get_run_logger()
        self.grouped = len(experiments) > 1
        self.cards = {e.name: create_progress_artifact(progress=0.0, key=artifact_key("progress", e.name),
                                                       description=f"{e.name}: 0 of {max_epochs} epochs (0 %)")
                      for e in experiments}

    def epoch(self, r: Any) -> None:
        """One finished epoch (an :class:`everest.training.loop.EpochReport`)."""
        pct = 100.0 * r.epoch / r.max_epochs
        self.logger.info("%sepoch %d/%d: loss %.4f, validation loss %.4f, validation TSS %.3f (best epoch %d)",
                         f"{r.experiment}: " if self.grouped else "", r.epoch, r.max_epochs, r.train_loss,
                         r.val_loss, r.val_tss, r.best_epoch)
        update_progress_artifact(self.cards[r.experiment], progress=pct,
                                 description=f"{r.experiment}: {r.epoch} of {r.max_epochs} epochs ({pct:.0f} %)")

    def finished(self, name: str, row: dict[str, Any]) -> None:
        """An experiment finished: its card full, its test result in the log."""
        update_progress_artifact(self.cards[name], progress=100.0,
                                 description=f"{name}: finished after {row['epochs_run']} epochs (100 %)")
        self.logger.info("%s: test TSS %s, threshold %.3g, best epoch %d of %d, trained in %s", name,
                         shown(row["tss"]), row["threshold"], row["best_epoch"], row["epochs_run"],
                         duration(row["seconds"]))


@task(name="train-experiments", task_run_name="train-{job.name}", retries=RETRIES,
      retry_delay_seconds=RETRY_DELAY_SECONDS, retry_condition_fn=is_infrastructure_error,
      cache_key_fn=experiment_cache_key, persist_result=True, result_serializer="json", log_prints=True)
def train_experiments(job: GroupJob) -> list[dict[str, Any]]:
    """Train (or resume) one experiment or one group on one device; return each one's small JSON summary.

    Finished experiments are skipped. An experiment that fails alone fails the task after the others
    finished: with its own error for a single experiment, else :class:`MembersFailed` naming each one.
    """
    import torch

    from everest.errors import Preempted
    from everest.training.group import train_group

    if job.torch_threads:
        torch.set_num_threads(job.torch_threads)
    progress = EpochProgress(job.experiments, job.config.train.epochs)
    try:  # --force was applied by the flow, once: a rerun of this task resumes
        outcomes = train_group(job.experiments, config=job.config, data_dir=job.data_dir,
                               output_dir=job.output_dir, progress=progress.epoch)
    except Preempted:
        if stopping.stop_reason():
            hand_back_to_dask()
        raise
    return group_summaries(outcomes, progress)


def group_summaries(outcomes: Sequence[Any], progress: EpochProgress) -> list[dict[str, Any]]:
    """Each finished member's summary; raises, after the others are reported, for members that failed alone."""
    rows, failed = [], {}
    for member in outcomes:
        if member.error is not None:  # train_group returns each member's results or its own error
            failed[member.experiment.name] = member.error
            continue
        rows.append(summarise_result(member.results))
        progress.finished(member.experiment.name, rows[-1])
    if failed and len(outcomes) == 1:
        raise next(iter(failed.values()))
    if failed:
        raise MembersFailed({name: (type(err).__name__, str(err)) for name, err in failed.items()})
    return rows


def hand_back_to_dask(grace_seconds: float = 600.0) -> None:
    """This worker is going away (SIGTERM, walltime, lifetime) and the experiment is checkpointed: wait
    for the process to end instead of reporting a failure, so that Dask gives the task to another worker,
    which resumes it. Returns only if the worker outlives ``grace_seconds``."""
    time.sleep(grace_seconds)


@task(name="fit-baseline", task_run_name="{job.model}-{job.name}", retries=RETRIES,
      retry_delay_seconds=RETRY_DELAY_SECONDS, retry_condition_fn=is_infrastructure_error,
      cache_key_fn=experiment_cache_key, persist_result=True, result_serializer="json")
def fit_baseline(job: ExperimentJob) -> dict[str, Any]:
    """Fit one simple baseline on one experiment's windows (seconds on a CPU) and summarise it."""
    return summarise_result(baselines.fit_baseline(job.model, job.experiment, job.config, job.data_dir,
                                                   job.output_dir))


def summarise_result(res: dict[str, Any]) -> dict[str, Any]:
    """The few numbers the flow needs from ``results.json``."""
    m = res["test_metrics"]
    return {"model": res["experiment"].get("model", "everest"), "experiment": res["experiment"]["name"],
            "target": res["experiment"]["target"],
            "seed": res["experiment"]["seed"], "threshold": res["threshold"]["selected"],
            **{k: m[k] for k in ("tss", "f1", "precision", "recall", "roc_auc", "brier", "ece")},
            "best_epoch": res["training"]["best_epoch"], "epochs_run": res["training"]["epochs_run"],
            "seconds": res["training"].get("seconds")}


@task(name="build-ensembles", log_prints=True)
def build_seed_ensembles(results_dir: str, out_dir: str, targets: list[str]) -> dict[str, str]:
    """Average each target's finished seeds into its ensemble (rebuilt only when its members changed), before the
    analysis reads them; returns, per target, "built" or why there is none."""
    from everest.scoring.ensemble import build_ensembles

    built = build_ensembles(results_dir, out_dir, [Target.parse(t) for t in targets])
    return {t: res if isinstance(res, str) else "built" for t, res in built.items()}


@task(name="analyse-results", log_prints=True)
def analyse(results_dir: str, out_dir: str, targets: list[str], seeds: list[int]) -> dict[str, Any]:
    """Statistics, plots and the markdown report over whatever experiments finished."""
    from everest.analysis import run_analysis

    return run_analysis(results_dir, out_dir, targets=targets, seeds=seeds)


@task(name="bundle-models", log_prints=True)
def bundle_models(out_dir: str, targets: list[str]) -> str:
    """After the analysis, whose verdict it carries: bundle every target's seed ensemble (``everest bundle``);
    returns the bundle's folder, or why there is none (no target has an ensemble)."""
    from everest.serving.bundle import BundleError, write_bundle

    try:
        return str(write_bundle(out_dir, targets=[Target.parse(t) for t in targets]).path)
    except BundleError as err:
        return f"no bundle: {err}"
