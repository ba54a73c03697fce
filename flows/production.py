"""Prefect flow ``everest-production``: the 45 experiments fanned out on Dask, then analysis and report.

Thin glue over the library: each task calls one function of ``everest``. Deployment variants
(``everest-production/local``, ``/pbs``, ``/slurm``) are the same flow with another Dask task runner,
built from the cluster profiles in ``deployments/``.

Grouping: the profile's ``experiments_per_gpu`` is the group width. The experiments, in array-index
order (seeds inner), are cut into groups of that many, and each group is one task that trains them
together on one device (:func:`everest.training.group.train_group`). Caching, failures and reporting stay per
experiment: a group's cache key is made of its members' identities, finished members are skipped, and
every member gets its own result row, progress card and failure record. Width 1 is one task per experiment.

Failure policy: a task's Python error is retried (``retries``) only when it is an infrastructure
problem (CUDA out of memory, a lost file system or node, a walltime/time limit: the retry resumes from
the checkpoint); a diverged run (:class:`everest.errors.TrainingDiverged`) or bad data/config is not
retried, because it would fail again the same way; in a group it fails that experiment alone. A Dask
worker that dies is rescheduled by Dask; after ``distributed.scheduler.allowed-failures`` deaths the
task is marked Crashed. Every future is settled, the analysis and report run on whatever finished, and
the flow run ends Failed, after the report is written, when any experiment failed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import dask
from prefect import allow_failure, flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import TaskRunContext
from prefect.states import Completed, Failed
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from everest import io, results
from everest.cli import add_run_arguments, seed_number, target_name
from everest.config import (
    DEFAULT_SEEDS,
    PRESETS,
    EverestConfig,
    Experiment,
    Target,
    all_targets,
    experiment_matrix,
    run_config,
)
from everest.data.tables import data_file, file_hash
from everest.errors import EXIT_USAGE, ConfigError, DataError, describe_validation_error
from everest.scoring import baselines
from everest.scoring.metrics import shown
from everest.training import stopping
from flows import jobwatch
from flows.jobwatch import clear_submission_failures, worker_job_failure
from flows.profiles import Profile, load_profile
from flows.server import is_loopback

# The embedded default: synthetic tables made here when missing. No other folder is ever filled.
DEMO_DATA_DIR = "data/demo"
RETRIES = 2
RETRY_DELAY_SECONDS = 10
# The 9 targets as the deployment form's choices (a test checks them against everest.config.all_targets).
TargetName = Literal["C-24", "C-48", "C-72", "M-24", "M-48", "M-72", "M5-24", "M5-48", "M5-72"]


class ProductionParameters(BaseModel):
    """Parameters of a production run; validated before anything is submitted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    targets: list[str] = Field(default_factory=lambda: [str(t) for t in all_targets()],
                               description="targets such as C-24 or M5-72 (default: all 9)")
    seeds: list[int] = Field(default_factory=lambda: list(DEFAULT_SEEDS), description="seeds (default 0-4)")
    data_dir: str | None = Field(None, description="folder holding the SHARP CSV files of the targets; "
                                 f"none: the embedded demo (synthetic tables in {DEMO_DATA_DIR}, made if missing)")
    output_dir: str = Field("output", description="shared folder for results, models and the report")
    profile: str = Field("local", description="cluster profile: local, pbs, slurm or a YAML path")
    preset: Literal["production", "demo"] | None = Field(
        None, description="training budget: the design document's recipe, or 'demo' (same recipe, capped "
        "epochs); none: demo for the embedded demo data, production for a data_dir")
    config_file: str | None = Field(None, description="TOML/YAML configuration file")
    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE overrides, e.g. train.epochs=3")
    epochs: int | None = Field(None, ge=1, description="epoch cap (overrides train.epochs)")
    force: bool = Field(False, description="retrain experiments that already finished")
    baselines: bool = Field(True, description="also fit the simple baselines (logistic regression, gradient "
                            "boosting) on each experiment's windows, so the report can say whether EVEREST beats them")

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        return [str(t.target) for t in experiment_matrix(v, [0])]  # raises on unknown/duplicate/empty

    @model_validator(mode="after")
    def _matrix(self) -> ProductionParameters:
        experiment_matrix(self.targets, self.seeds)
        return self

    @property
    def experiments(self) -> list[Experiment]:
        """The run's experiments, targets x seeds in array-index order."""
        return experiment_matrix(self.targets, self.seeds)

    @property
    def target_list(self) -> list[Target]:
        """The run's targets, parsed, in array-index order."""
        return list(dict.fromkeys(e.target for e in self.experiments))

    @property
    def embedded_demo(self) -> bool:
        """No data folder given: the run uses (and may generate) the synthetic demo tables."""
        return self.data_dir is None

    @property
    def data_path(self) -> Path:
        """The folder the experiments read."""
        return Path(self.data_dir if self.data_dir is not None else DEMO_DATA_DIR)

    @property
    def effective_preset(self) -> str:
        """The named training budget: as given, else demo for the embedded demo and production otherwise."""
        return self.preset or ("demo" if self.embedded_demo else "production")

    def effective_config(self) -> EverestConfig:
        """The configuration every experiment of this run uses."""
        return run_config(self.config_file, self.overrides, preset=self.effective_preset, epochs=self.epochs)

    def flow_parameters(self) -> dict[str, Any]:
        """The flow's keyword arguments (its form in the UI has no empty values: "", 0 and "auto" mean unset)."""
        return {**self.model_dump(), "data_dir": self.data_dir or "", "preset": self.preset or "auto",
                "config_file": self.config_file or "", "epochs": self.epochs or 0}


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
        return _group_name(self.experiments)

    def cache_key(self) -> str:
        """Made of the members' identity keys: one member's key as is, a group's digest of them all.

        The ``group<K>-`` prefix keeps these records apart from those of tasks that returned one summary.
        """
        keys = [i.key() for i in self.identities]
        digest = keys[0] if len(keys) == 1 else hashlib.sha256("\n".join(keys).encode()).hexdigest()[:32]
        return f"group{len(keys)}-{digest}"


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
    logger = get_run_logger()
    max_epochs = job.config.train.epochs
    cards = {e.name: create_progress_artifact(progress=0.0, key=_artifact_key("progress", e.name),
                                              description=f"{e.name}: 0 of {max_epochs} epochs (0 %)")
             for e in job.experiments}
    grouped = len(job.experiments) > 1  # a group's log lines name their experiment

    def report(r: Any) -> None:
        pct = 100.0 * r.epoch / r.max_epochs
        logger.info("%sepoch %d/%d: loss %.4f, validation loss %.4f, validation TSS %.3f (best epoch %d)",
                    f"{r.experiment}: " if grouped else "", r.epoch, r.max_epochs, r.train_loss, r.val_loss,
                    r.val_tss, r.best_epoch)
        update_progress_artifact(cards[r.experiment], progress=pct,
                                 description=f"{r.experiment}: {r.epoch} of {r.max_epochs} epochs ({pct:.0f} %)")

    try:  # --force was applied by the flow, once: a rerun of this task resumes
        outcomes = train_group(job.experiments, config=job.config, data_dir=job.data_dir,
                               output_dir=job.output_dir, progress=report)
    except Preempted:
        if stopping.stop_reason():
            _hand_back_to_dask()
        raise
    rows, failed = [], {}
    for member in outcomes:
        name = member.experiment.name
        if member.error is not None:  # train_group returns each member's results or its own error
            failed[name] = member.error
            continue
        row = summarise_result(member.results)
        update_progress_artifact(cards[name], progress=100.0,
                                 description=f"{name}: finished after {row['epochs_run']} epochs (100 %)")
        logger.info("%s: test TSS %s, threshold %.3g, best epoch %d of %d, trained in %s", name, shown(row["tss"]),
                    row["threshold"], row["best_epoch"], row["epochs_run"], _duration(row["seconds"]))
        rows.append(row)
    if failed and not grouped:
        raise next(iter(failed.values()))
    if failed:
        raise MembersFailed({name: (type(err).__name__, str(err)) for name, err in failed.items()})
    return rows


def _hand_back_to_dask(grace_seconds: float = 600.0) -> None:
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


@task(name="analyse-results", log_prints=True)
def analyse(results_dir: str, out_dir: str, targets: list[str], seeds: list[int]) -> dict[str, Any]:
    """Statistics, plots and the markdown report over whatever experiments finished."""
    from everest.analysis import run_analysis

    return run_analysis(results_dir, out_dir, targets=targets, seeds=seeds)


def publish_artifacts(summary: dict[str, Any], rows: list[dict[str, Any]], failures: list[dict[str, Any]],
                      n_experiments: int) -> None:
    """The flow run's artifacts: the verdict against the baselines first, the test metrics, the report with
    its figures embedded (the UI cannot follow links to files). Keys name the run, so after a retry its
    latest report is the one the artifact's key shows; descriptions give the attempt and the count."""
    from prefect.context import FlowRunContext

    from everest.analysis import embed_figures

    run = FlowRunContext.get().flow_run
    suffix = _artifact_key("", run.name)
    n_done = sum(r["model"] == "everest" for r in rows)
    status = f"{n_done} of {n_experiments} experiments finished; attempt {run.run_count} of flow run {run.name}"
    verdict = summary.get("verdict_rows") or []
    if verdict:
        create_table_artifact(table=[{k: v for k, v in r.items() if k != "sentence"} for r in verdict],
                              key=f"everest-verdict{suffix}",
                              description=f"{status}. " + " ".join(r["sentence"] for r in verdict))
    if rows:
        create_table_artifact(table=[_rounded_row(r) for r in rows], key=f"everest-final-metrics{suffix}",
                              description=f"test metrics per experiment and baseline ({status})")
    report = Path(summary["report"]) if summary.get("report") else None
    text = embed_figures(report.read_text(), report.parent) if report and report.is_file() else "(no report)"
    if failures:
        text = "## Failed experiments\n\n" + "\n".join(f"* {f['experiment']}: {f['error_type']}: {f['error']}"
                                                        for f in failures) + "\n\n" + text
    create_markdown_artifact(markdown=text, key=f"everest-report{suffix}",
                             description=f"EVEREST production report ({status})")


def _rounded_row(row: dict[str, Any]) -> dict[str, Any]:
    """Numbers to 4 decimals for display (the files keep full precision)."""
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def _artifact_key(kind: str, name: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{kind}-{name}".lower())


def _data_hashes(data_dir: Path, targets: list[Target]) -> dict[Target, dict[str, str]]:
    """Content hash of every data file the run needs, per target; names each missing file."""
    out, missing = {}, []
    for t in targets:
        files = [data_file(data_dir, t, s) for s in ("train", "test")]
        missing += [str(f) for f in files if not f.is_file()]
        if not missing:
            out[t] = {f.name: file_hash(f) for f in files}
    if missing:
        raise DataError(f"data files not found: {missing} (generate demo data with `everest data synth "
                        f"--size demo --out {data_dir}` or point --data-dir at the SHARP tables)")
    return out


def _mark_crashed(task_run_id: Any, message: str) -> None:
    """Dask gave up on a task (KilledWorker): tell the Prefect API, which otherwise shows it Running."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        client.set_task_run_state(task_run_id, Crashed(message=message), force=True)


def check_data_dir(params: ProductionParameters) -> None:
    """Refuse a data folder that is missing or lacks a table the targets need, naming what is expected.

    Only the embedded demo (no data folder given) may be generated; any other folder is read as it is,
    so a typo or an unmounted file system never turns into training on synthetic data.
    """
    if params.embedded_demo:
        return
    folder = params.data_path
    expected = [data_file(folder, t, split) for t in params.target_list for split in ("train", "test")]
    names = ", ".join(f.name for f in expected)
    if not folder.is_dir():
        raise DataError(f"data folder {_shown(folder)} does not exist; expected the SHARP tables {names} there")
    missing = [f.name for f in expected if not f.is_file()]
    if missing:
        raise DataError(f"data folder {_shown(folder)} lacks {len(missing)} of the {len(expected)} tables the "
                        f"targets need: {', '.join(missing)}")


def _shown(folder: Path) -> str:
    """A folder as given, plus its absolute path when relative (a relative path resolves per machine)."""
    return str(folder) if folder.is_absolute() else f"{folder} ({folder.absolute()})"


def check_api_reachable(site: Profile, api_url: str | None) -> None:
    """Refuse a Prefect API on a loopback address when the workers run on other machines.

    A batch job on a compute node resolves 127.0.0.1 to itself: every task would fail to reach the API.
    """
    host = urlsplit(api_url).hostname if api_url else None
    if host and not site.workers_on_this_host and is_loopback(host):
        raise ConfigError(
            f"PREFECT_API_URL={api_url} is a loopback address, which the compute nodes of cluster profile "
            f"{site.source} cannot reach: set PREFECT_API_URL to the server's address on the cluster network "
            "(e.g. http://<login node>:4200/api), or unset it and the run starts a private server on the "
            "profile's interface"
        )


def preflight(params: ProductionParameters, site: Profile, api_url: str | None) -> EverestConfig:
    """Everything that can refuse a run before a server starts or a job is submitted, cheapest first: the
    parameters, the output folder, the address, the batch system (queue, resources and their values), then
    every table the experiments read. Returns the run's configuration."""
    cfg = params.effective_config()
    check_data_dir(params)
    if params.embedded_demo and not site.workers_on_this_host:
        raise ConfigError(f"cluster profile {site.source} runs workers on other machines: give a data folder on "
                          "the shared file system (--data-dir / data_dir); the embedded demo runs on one machine")
    out = Path(params.output_dir)
    io.check_writable_dir(out, "output folder")
    check_api_reachable(site, api_url)
    site.check_run_dir(out)
    site.check_site()
    check_tables(params, cfg)
    return cfg


def check_tables(params: ProductionParameters, cfg: EverestConfig) -> None:
    """Read and validate every table of the run's experiments with the reader training uses (columns, values,
    labels, enough positives), once per content; the embedded demo's tables are checked once generated."""
    from everest.data.check import check_experiments

    if params.embedded_demo and not demo_tables_present(params):
        return
    check_experiments(params.data_path, params.experiments, cfg.data, cfg.model.seq_len,
                      cache_dir=Path(params.output_dir) / "cache")


def demo_tables_present(params: ProductionParameters) -> bool:
    """Whether the embedded demo's 18 tables exist (else the flow generates them)."""
    return all(data_file(params.data_path, t, s).is_file() for t in all_targets() for s in ("train", "test"))


def run_production(params: ProductionParameters, site: Profile) -> Any:
    """Body of the flow: validate, fan out, settle every future, analyse, report.

    One run at a time per output directory: a second run on the same directory is refused (lock file).
    """
    from prefect.settings import PREFECT_API_URL

    cfg = preflight(params, site, PREFECT_API_URL.value())
    try:
        with io.exclusive_lock(Path(params.output_dir) / ".everest.lock", f"output directory {params.output_dir}"):
            return _run_locked(params, site, cfg)
    except io.LockedError as err:
        raise ConfigError(str(err)) from None


def _announce_run() -> None:
    """On a command-line run's terminal: where to watch this run in the Prefect UI while it lasts."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_UI_URL

    run = FlowRunContext.get().flow_run
    if PREFECT_UI_URL.value():
        TERMINAL.line(f"flow run {run.name}: watch it at {PREFECT_UI_URL.value()}/runs/flow-run/{run.id}")


def _bind_cluster_to_run(site: Profile, out: Path) -> None:
    """Give the flow's Dask cluster this run's output folder (job logs, TLS certificates, the file holding the
    Prefect API password), and make every task submitted from now on let go of its result on its worker as soon
    as it ends (:func:`_release`), so that a worker retiring later never makes Dask run it again.

    DaskTaskRunner builds its cluster from ``cluster_kwargs`` at the first submission, after this.
    """
    from prefect.context import FlowRunContext
    from prefect_dask import DaskTaskRunner

    runner = FlowRunContext.get().task_runner
    if not isinstance(runner, DaskTaskRunner):
        return
    if type(runner) is DaskTaskRunner and runner.cluster_kwargs:
        runner.cluster_kwargs = site.cluster_kwargs(out.resolve())
    submit = runner.submit

    def submit_and_release_when_done(*args: Any, **kwargs: Any) -> Any:
        fut = submit(*args, **kwargs)
        _release(fut, when_done=True)
        return fut

    runner.submit = submit_and_release_when_done  # this run's own copy of the task runner


def _run_locked(params: ProductionParameters, site: Profile, cfg: EverestConfig) -> Any:
    logger = get_run_logger()
    _announce_run()
    experiments = params.experiments
    data_dir, out = params.data_path, Path(params.output_dir)
    if params.embedded_demo and not demo_tables_present(params):
        from everest.data import synthetic

        logger.info("embedded demo: generating synthetic SHARP tables in %s", data_dir)
        synthetic.generate(data_dir, size="demo", seed=0)
        check_tables(params, cfg)
    hashes = _data_hashes(data_dir, params.target_list)
    results_dir = out / "results"
    storage = out / ".prefect-results"
    storage.mkdir(parents=True, exist_ok=True)
    trainer_task = train_experiments.with_options(result_storage=storage)
    baseline_task = fit_baseline.with_options(result_storage=storage)
    groups = experiment_groups(experiments, site.experiments_per_gpu)
    logger.info("%d experiments (%s; seeds %s)%s, config %s, on profile %s", len(experiments),
                ", ".join(params.targets), params.seeds, _grouping(len(groups), site.experiments_per_gpu),
                cfg.config_hash(), params.profile)

    _bind_cluster_to_run(site, out)
    clear_submission_failures()
    identities = {exp: results.identity_for(exp, cfg, hashes[exp.target]) for exp in experiments}
    models = baseline_models(params)
    if params.force:  # once, here: a task that reruns (resume, retry, another worker) must not start over
        for exp in experiments:
            results.supersede(out, exp.name)
            results.experiment_dirs(out, exp)[2].unlink(missing_ok=True)  # its checkpoint
            for model in models:
                results.supersede(baselines.baseline_root(out, model), exp.name)

    folders = {"config": cfg, "data_dir": data_dir.resolve(), "output_dir": out.resolve()}
    # Finished before this run (with this identity): reported as cached, skipped by the task that holds them.
    done_before = {exp for exp in experiments if results.finished(out, identities[exp]) is not None}

    def submit(group: tuple[Experiment, ...]) -> Any:
        job = GroupJob(experiments=group, identities=tuple(identities[e] for e in group),
                       torch_threads=site.threads, **folders)
        # A cached summary stands only while every member's results are on disk with its identity
        # (deleted, superseded or rewritten by another configuration: the task runs and trains those).
        fresh = not done_before.issuperset(group)
        with dask.annotate(resources={"GPU": 1}) if site.uses_gpus else contextlib.nullcontext():
            return trainer_task.with_options(refresh_cache=fresh or None).submit(job)

    def submit_baseline(exp: Experiment, model: str) -> Any:
        identity = baselines.baseline_identity(exp, baselines.DEFAULTS[model], cfg, hashes[exp.target])
        job = ExperimentJob(model=model, experiment=exp, identity=identity, **folders)
        fresh = results.finished(baselines.baseline_root(out, model), identity) is None
        return baseline_task.with_options(refresh_cache=fresh or None).submit(job)

    progress = RunProgress(len(experiments), logger)
    pending = {group: submit(group) for group in groups}  # the long tasks first; baselines take seconds
    baseline_futures = [(f"{model} {exp.name}", submit_baseline(exp, model)) for exp in experiments
                        for model in models]
    rows, failures, base_failures, settled = [], [], [], []
    attempts = dict.fromkeys(groups, 0)
    while pending:
        group, fut, summaries, err = next_settled(pending)
        if err is not None and attempts[group] < RETRIES and api_unreachable(err):
            # The task never started: its worker could not reach the Prefect API. Try again later.
            attempts[group] += 1
            logger.warning("%s: the worker could not reach the Prefect API (%s); resubmitting in %d s",
                           _group_name(group), err, RETRY_DELAY_SECONDS)
            _release(fut)
            time.sleep(RETRY_DELAY_SECONDS)
            pending[group] = submit(group)
            continue
        if err is not None and type(err).__name__ == "KilledWorker":
            _mark_crashed(fut.task_run_id, f"Dask gave up after repeated worker deaths: {err}")
        cached = fut.state.is_completed() and fut.state.name == "Cached"
        by_name = {row["experiment"]: row for row in summaries or []}
        for exp in group:
            row = by_name.get(exp.name)
            if row is None and (done := results.finished(out, identities[exp])) is not None:
                row = summarise_result(done)  # finished before its group-mate failed, or earlier (cluster/ jobs)
            if row is not None:
                rows.append(row)
                progress.finished(exp.name, row, cached=cached or exp in done_before)
                continue
            error_type, message = member_error(exp, err)
            failures.append(results.record_failure(out, exp, error_type, message, identities[exp]))
            progress.failed(exp.name, f"{error_type}: {message}")
        settled.append(fut.state)
        del pending[group]
        _release(fut)
    for name, fut in baseline_futures:  # each wrote its own failure.json; the report lists it
        try:
            rows.append(_settle(fut))
        except Exception as err:  # noqa: BLE001 - recorded, reported, and fails the run like an experiment
            logger.error("baseline %s failed: %s: %s", name, type(err).__name__, err)
            base_failures.append({"experiment": name, "error_type": type(err).__name__, "error": str(err)})
        settled.append(fut.state)
        _release(fut)

    # The analysis waits on every training and baseline task (the run graph shows it), failed ones included.
    summary = analyse(str(results_dir), str(out), params.targets, params.seeds,
                      wait_for=[allow_failure(state) for state in settled if state.is_final()])
    n_everest = sum(r["model"] == "everest" for r in rows)
    result = {"completed": n_everest, "baselines_fitted": len(rows) - n_everest,
              "failed": [f["experiment"] for f in failures + base_failures], "report": summary.get("report"),
              "plots": str(out / "plots"), "results": rows}
    io.write_json(out / "analysis" / "flow_summary.json", result)
    publish_artifacts(summary, rows, failures + base_failures, len(experiments))
    if failures or base_failures:
        failure = worker_job_failure()  # a refused submission or a worker job that cannot start or died
        cause = f"{failure}; " if failure else ""
        baseline_part = (f"; {len(base_failures)} of {len(baseline_futures)} baseline fits failed: "
                         f"{', '.join(f['experiment'] for f in base_failures)}" if base_failures else "")
        # A message, no data: a Failed state carrying a result makes Prefect log a TypeError traceback.
        return Failed(message=f"{cause}{len(failures)} of {len(experiments)} experiments failed"
                      f"{': ' + ', '.join(f['experiment'] for f in failures) if failures else ''}{baseline_part}; "
                      f"report: {summary.get('report')}")
    return Completed(message=f"{n_everest} experiments (+{len(rows) - n_everest} baseline fits); "
                     f"report: {summary.get('report')}", data=result)


def experiment_groups(experiments: Sequence[Experiment], width: int) -> list[tuple[Experiment, ...]]:
    """``experiments`` in order, cut into groups of ``width`` (the last may be smaller): one task each."""
    return [tuple(experiments[i:i + width]) for i in range(0, len(experiments), width)]


def _group_name(group: Sequence[Experiment]) -> str:
    """The experiment's name, or ``<first>..<last>`` for a group: task-run names and log lines."""
    return group[0].name if len(group) == 1 else f"{group[0].name}..{group[-1].name}"


def _grouping(n_groups: int, width: int) -> str:
    """How the experiments are grouped into tasks, for the plan and the log (nothing at width 1)."""
    return "" if width == 1 else f" in {n_groups} tasks of up to {width} experiments each"


def member_error(exp: Experiment, err: BaseException | None) -> tuple[str, str]:
    """Error type and message recorded for an experiment that did not finish: its own when it failed alone
    in its group, else its task's (an infrastructure error, a lost worker, a refused batch job)."""
    if isinstance(err, MembersFailed) and exp.name in err.failures:
        return err.failures[exp.name]
    if err is None:
        return "RuntimeError", "its task ended without a result for it"
    return type(err).__name__, str(err)


class Terminal:
    """What a command-line run prints: its own short lines, while Prefect's and Dask's logs stay in the
    run's log (``--verbose`` shows those instead). Inactive in deployment runs: the log says it all."""

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
        if self.active and self._live:
            sys.stdout.write("\n")
            self._live = False


TERMINAL = Terminal()
jobwatch.WAITING_LINES.append(TERMINAL.line)  # while no worker has connected, what the worker jobs wait for


class RunProgress:
    """One line per finished experiment (name, TSS, threshold, time, cached or trained), with "k of N
    finished, ETA", in the flow run's log and on a command-line run's terminal."""

    def __init__(self, total: int, logger: Any) -> None:
        self.total, self.done, self.logger = total, 0, logger
        self.started = time.monotonic()
        self.trained = 0

    def finished(self, name: str, row: dict[str, Any], cached: bool) -> None:
        self.trained += not cached
        how = "cached" if cached else f"trained in {_duration(row.get('seconds'))}"
        self._report(f"{name}: test TSS {shown(row['tss'])}, threshold {row['threshold']:.3g}, {how}")

    def failed(self, name: str, error: str) -> None:
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
        return f", about {_duration(per * left)} left"


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 10:
        return f"{seconds:.1f} s"
    seconds = round(seconds)
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min {seconds % 60:02d} s"


def baseline_models(params: ProductionParameters) -> tuple[str, ...]:
    """The baselines a run fits beside EVEREST (none when switched off)."""
    return baselines.BASELINES if params.baselines else ()


def _release(fut: Any, when_done: bool = False) -> None:
    """Drop the flow's hold on a Dask future, keeping its task's final Prefect state in ``fut``.

    While a client holds the future of a finished task, Dask keeps its result on the worker that ran it and
    computes the task again when that worker goes away (its lifetime or walltime, a scale-down): an experiment
    would train again, a baseline be refitted. ``when_done`` arranges the release for a future just submitted,
    as soon as its task ends (from Dask's callback thread); the future's ``result`` and ``wait`` then serve the
    kept state, under a lock, so the flow never reads a result while it is being released. A task that Dask
    itself gave up on (``KilledWorker``) keeps its future until the flow has read the error.
    """
    dask_future = getattr(fut, "wrapped_future", None)
    if getattr(dask_future, "release", None) is None:
        return  # not a Dask future
    if not when_done:
        with getattr(fut, "_everest_release_lock", contextlib.nullcontext()):
            dask_future.release()
        return
    import threading

    lock = threading.RLock()
    result, wait = fut.result, fut.wait

    def locked_result(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return result(*args, **kwargs)

    def locked_wait(timeout: float | None = None) -> None:
        with lock:
            if fut._final_state is None:
                wait(timeout)

    def on_done(_: Any) -> None:
        from prefect.states import State

        with lock:
            if fut._final_state is None and dask_future.status == "finished":
                with contextlib.suppress(Exception):  # its worker lost it meanwhile: the flow reads the outcome
                    state = dask_future.result()  # the final state: prefect-dask submits with return_type="state"
                    if isinstance(state, State):
                        fut._final_state = state
            if fut._final_state is not None:
                dask_future.release()

    fut._everest_release_lock = lock
    fut.result, fut.wait = locked_result, locked_wait
    dask_future.add_done_callback(on_done)


Key = TypeVar("Key")


class SubmissionFailed(RuntimeError):
    """No worker job can give a Dask worker: the batch system refused one, says one can never start, or one ended
    (or outlived the profile's worker_start_deadline) before any worker connected; the message quotes the scheduler."""


def next_settled(pending: dict[Key, Any], poll_seconds: float = 1.0) -> tuple[Key, Any, Any, BaseException | None]:
    """The next task that ended, in completion order: (its key in ``pending``, future, result, error).

    With no worker connected, a refused submission or a worker job that cannot start or died (flows.jobwatch)
    ends every wait with the scheduler's words.
    """
    from flows.jobwatch import worker_job_failure

    while True:
        for key, fut in pending.items():
            if fut.wrapped_future.done():
                try:
                    return key, fut, fut.result(), None
                except Exception as err:  # noqa: BLE001 - handed to the caller, which records it
                    return key, fut, None, err
        if not _workers_connected() and (failed := worker_job_failure()):
            key, fut = next(iter(pending.items()))
            return key, fut, None, SubmissionFailed(failed)
        time.sleep(poll_seconds)


def _settle(fut: Any, poll_seconds: float = 2.0) -> Any:
    """Wait for one experiment's result; with no worker connected, a refused submission or a worker job that
    cannot start or died ends the wait with the scheduler's words.

    dask-jobqueue only logs a failed ``qsub``/``sbatch`` and waits for workers forever.
    """
    from flows.jobwatch import worker_job_failure

    while not fut.wrapped_future.done():
        fut.wait(timeout=poll_seconds)
        # One refusal among running jobs may be a per-user limit or a blip that adaptive scaling retries;
        # refusals with no worker at all will not go away.
        if not _workers_connected() and (failed := worker_job_failure()):
            raise SubmissionFailed(failed)
    return fut.result()


def _workers_connected() -> int:
    """Dask workers connected to the flow's cluster (0 when the flow runs without Dask).

    Called while waiting: until a first worker connects, it also lets a batch cluster look at its worker jobs
    (rate-limited, flows.jobwatch), which records a job that cannot start or died as a failure. Outside a flow
    run it uses the default Dask client, if any.
    """
    from distributed import default_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is not None:
        client = getattr(ctx.task_runner, "client", None)
    else:
        try:
            client = default_client()
        except ValueError:
            client = None
    if client is None:
        return 0
    cluster = getattr(client, "cluster", None)
    if (watch := getattr(cluster, "watch_worker_jobs", None)) is not None:
        watch()
    info = getattr(cluster, "scheduler_info", None)
    if isinstance(info, dict) and "workers" in info:  # the cluster's own copy: no round trip to the scheduler
        return len(info["workers"])
    return len(client.scheduler_info(n_workers=-1)["workers"])


def make_flow(profile: str | Profile, name: str | None = None) -> Any:
    """The flow ``everest-production`` bound to one cluster profile's Dask task runner.

    ``profile`` is a profile name, a YAML path or a :class:`~flows.profiles.Profile` (tests shrink the
    site profiles with ``for_test_machine``); ``name`` is what the ``profile`` parameter must say (default:
    the name given, or the profile's kind). Parameters are flat, not one nested object, because
    deployment parameters merge shallowly.
    """
    from prefect_dask import DaskTaskRunner

    site = load_profile(profile)
    profile_name = name or (profile if isinstance(profile, str) else site.kind)
    defaults = ProductionParameters(profile=profile_name)

    def everest_production(
        targets: list[TargetName] = defaults.targets,
        seeds: list[int] = defaults.seeds,
        data_dir: str = "",
        output_dir: str = defaults.output_dir,
        profile: str = profile_name,
        preset: Literal["auto", "production", "demo"] = "auto",
        config_file: str = "",
        overrides: list[str] = defaults.overrides,
        epochs: int = 0,
        force: bool = False,
        baselines: bool = True,
    ) -> Any:
        """Train the EVEREST experiment matrix on Dask, then analyse and report.

        Args:
            targets: flare class and horizon of each forecast to train (default: all 9).
            seeds: random seeds; each target is trained once per seed (default 0-4: 45 experiments).
            data_dir: folder holding the targets' SHARP tables (training_data_C_24.csv, ...), on the file
                system the workers share; empty: the embedded synthetic demo data (one machine only).
            output_dir: folder for results, models, the analysis and the report; a rerun keeps what finished.
            profile: the cluster profile this deployment runs on (local, pbs or slurm); fixed per deployment.
            preset: training budget. production: the design's recipe (120 epochs); demo: the same recipe with
                6 epochs; auto: demo for the embedded demo data, production for a data_dir.
            config_file: TOML or YAML configuration file (path on the workers' file system); empty: none.
            overrides: configuration overrides KEY=VALUE applied last, e.g. train.batch_size=256.
            epochs: epoch cap (train.epochs); 0: the preset's.
            force: retrain experiments that already finished with this configuration and data.
            baselines: also fit logistic regression and gradient boosting on each experiment's windows, so
                the report says whether EVEREST beats them.
        """
        if profile != profile_name:
            raise ConfigError(f"profile {profile!r} requested, but this flow runs on profile {profile_name!r}; "
                              f"run the deployment everest-production/{profile} instead")
        params = ProductionParameters(targets=targets, seeds=seeds, data_dir=data_dir or None, output_dir=output_dir,
                                      profile=profile, preset=None if preset == "auto" else preset,
                                      config_file=config_file or None, overrides=overrides, epochs=epochs or None,
                                      force=force, baselines=baselines)
        return run_production(params, site)

    return flow(everest_production, name="everest-production", log_prints=True,
                task_runner=DaskTaskRunner(**site.task_runner_kwargs()))


_VARIANTS = {"everest_local": "local", "everest_pbs": "pbs", "everest_slurm": "slurm"}


def lazy_variants(make: Callable[[str], Any], variants: dict[str, str], namespace: dict[str, Any]
                  ) -> Callable[[str], Any]:
    """A module ``__getattr__`` that builds each deployment entrypoint (the flow bound to one profile) on first
    use, so a broken site profile only affects its own deployment."""
    def getattr_(name: str) -> Any:
        if name in variants:
            namespace[name] = make(variants[name])
            return namespace[name]
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
    return getattr_


# Deployment entrypoints flows.production:everest_{local,pbs,slurm}.
__getattr__ = lazy_variants(make_flow, _VARIANTS, globals())


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flows.production",
                                description="Run the EVEREST production study (flow everest-production).")
    p.add_argument("--targets", nargs="+", type=target_name, default=[str(t) for t in all_targets()],
                   metavar="TARGET", help="targets such as C-24 M-48 (default: all 9)")
    p.add_argument("--seeds", nargs="+", type=seed_number, default=list(DEFAULT_SEEDS), metavar="SEED",
                   help="seeds (default 0 1 2 3 4)")
    p.add_argument("--profile", default="local", help="cluster profile: local, pbs, slurm or a YAML file")
    p.add_argument("--data-dir", help=f"folder of the targets' SHARP CSVs (default: the embedded demo, synthetic "
                   f"tables in {DEMO_DATA_DIR}, made when missing; a given folder must hold its tables)")
    p.add_argument("--output-dir", default="output", help="shared output folder")
    add_run_arguments(p, preset_default=None, device=False)
    p.add_argument("--force", action="store_true", help="retrain experiments that already finished")
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="do not fit the simple baselines (logistic regression, gradient boosting) beside EVEREST")
    p.add_argument("--verbose", action="store_true",
                   help="show Prefect's and Dask's log lines too (by default: one line per finished experiment)")
    return p.parse_args(argv)


def parameters_from_args(args: argparse.Namespace) -> ProductionParameters:
    """The run's parameters from the command line (validated: a ValidationError names what is wrong)."""
    return ProductionParameters(targets=args.targets, seeds=args.seeds, data_dir=args.data_dir,
                                output_dir=args.output_dir, profile=args.profile, preset=args.preset,
                                config_file=args.config, overrides=args.overrides, epochs=args.epochs,
                                force=args.force, baselines=args.baselines)


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


def _plan_line(params: ProductionParameters, site: Profile) -> str:
    """What the run will do, in one line."""
    n = len(params.experiments)
    fits = n * len(baseline_models(params))
    seeds = ", ".join(map(str, params.seeds))
    data = (f"synthetic demo tables in {DEMO_DATA_DIR} (made if missing)" if params.embedded_demo
            else str(params.data_path))
    budget = ", ".join(PRESETS[params.effective_preset]) or "the design recipe"
    width = site.experiments_per_gpu
    return (f"everest-production: {n} experiments ({', '.join(params.targets)} x seeds {seeds})"
            f"{_grouping(math.ceil(n / width), width)}"
            f"{f' + {fits} baseline fits' if fits else ''} on profile {site.kind} ({site.source}); data: {data}; "
            f"preset {params.effective_preset} ({budget}"
            f"{f', epochs {params.epochs}' if params.epochs else ''}); output: {params.output_dir}")


def _print_summary(state: Any, out: Path, browse: str) -> None:
    TERMINAL.end_live()
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
    print(browse)


def _cancel_run(name: str, message: str) -> bool:
    """Mark the named flow run Cancelled with ``message`` (Ctrl-C or a signal would otherwise leave it Running or
    Crashed on the server); False when the API could not be told (the run is ending: that must not stop it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.states import Cancelled

    try:
        with get_client(sync_client=True) as client:
            for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name]))):
                if not run.state or not (run.state.is_completed() or run.state.is_failed()):  # Running or Crashed
                    client.set_flow_run_state(run.id, Cancelled(message=message), force=True)
    except Exception as err:  # noqa: BLE001 - reported by the caller's message; the exit goes on
        logging.getLogger(__name__).warning("could not mark flow run %s Cancelled: %s", name, err)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """Command line: validate everything, make sure a Prefect API exists, run the flow, summarise.

    Ctrl-C, SIGTERM (``timeout``, a batch system) and SIGHUP (a closed login session) end a run alike: the
    worker jobs are deleted (the Dask cluster closes), the flow run is marked Cancelled with the reason, the
    private Prefect server stops, one line says so on stderr, and the exit status is 128 + the signal number.
    """
    import uuid

    from prefect.exceptions import TerminationSignal

    from everest.cli import setup_logging
    from flows.server import prefect_api

    args = _parse_args(argv)
    # Importing dask_jobqueue (flows.profiles) replaces Ctrl-C's handler with sys.exit(): exit status 0 and
    # a flow run left Crashed. Ctrl-C must interrupt, so the run is marked Cancelled and the status is 130.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    setup_logging()
    quiet_logs(args.verbose)
    api_url = os.environ.get("PREFECT_API_URL")
    try:
        params = parameters_from_args(args)
        site = load_profile(args.profile)
        preflight(params, site, api_url)
        host = None if api_url else site.reachable_host()
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as err:  # our validators' ConfigErrors arrive wrapped in it
        print(f"error: {describe_validation_error(err, 'parameters')}", file=sys.stderr)
        return EXIT_USAGE
    print(_plan_line(params, site), flush=True)
    if params.embedded_demo:
        print("give --data-dir for your SHARP tables", flush=True)
    run_name = f"everest-{uuid.uuid4().hex[:12]}"

    def ended_by(err: BaseException) -> tuple[str, int]:
        """Why the run ends early, and its exit status (128 + the signal number; Ctrl-C is SIGINT)."""
        if isinstance(err, KeyboardInterrupt):
            return "interrupted from the terminal (Ctrl-C)", 128 + signal.SIGINT
        return f"terminated by {signal.Signals(err.signal).name}", 128 + err.signal

    received: list[int] = []

    def terminate(signum: int, frame: Any) -> None:
        # From here on there is something to clean up: unwind like Ctrl-C. Once: a repeated signal (Prefect
        # re-sends SIGTERM to itself after its own handler) must not cut the cleanup short.
        if not received:
            received.append(signum)
            raise TerminationSignal(signal=signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, terminate)
    state = None
    try:
        with prefect_api(host=host or "127.0.0.1"):
            # Built inside: batch job scripts must carry this run's PREFECT_API_URL.
            run = make_flow(site, name=args.profile).with_options(flow_run_name=run_name)
            try:
                state = run(**params.flow_parameters(), return_state=True)
            except (KeyboardInterrupt, TerminationSignal) as err:  # the cluster has closed: its jobs are deleted
                why, status = ended_by(err)
                marked = "marked Cancelled" if _cancel_run(run_name, why) else "could not be marked Cancelled"
                with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
                    print(f"{why}: flow run {run_name} {marked}; rerun the same command to resume (finished "
                          "experiments are kept, running ones resume from their checkpoints)", file=sys.stderr)
                return status  # leaving the block stops the private server
    except (KeyboardInterrupt, TerminationSignal) as err:  # while the server started or stopped
        why, status = ended_by(err)
        with contextlib.suppress(OSError):
            print(f"{why}: {'no flow run began' if state is None else f'flow run {run_name} had ended'}; the "
                  "private Prefect server is stopped", file=sys.stderr)
        return status
    run_id = state.state_details.flow_run_id
    home = os.environ.get("PREFECT_HOME", "~/.prefect")
    browse = (f"run history: open {api_url.removesuffix('/api')}/runs/flow-run/{run_id}" if api_url else
              f"run history (the private server has stopped): `PREFECT_HOME={home} prefect server start`, "
              f"then open http://127.0.0.1:4200/runs/flow-run/{run_id}")
    _print_summary(state, Path(args.output_dir), browse)
    if not state.is_completed():
        return 1
    return 0


if __name__ == "__main__":
    # Run the installed module's flow, not a __main__ copy: batch workers must import the tasks by name.
    from flows.production import main as _main

    sys.exit(_main())
