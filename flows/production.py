"""Prefect flow ``everest-production``: the 45 experiments fanned out on Dask, then the seed ensembles, the analysis
and the report; and its command line, ``python -m flows.production``.

Here: the run's parameters (:class:`ProductionParameters`, which generate the command line, the flow's signature
and the deployment form: :mod:`flows.parameters`) and the flow's body. Elsewhere: the tasks (:mod:`flows.tasks`),
the checks before anything starts (:mod:`flows.preflight`), the waiting and command line shared with
``everest-tune`` (:mod:`flows.run`), the terminal (:mod:`flows.terminal`), the UI's artifacts (:mod:`flows.artifacts`).
Deployments ``everest-production/local``, ``/pbs``, ``/slurm`` are this flow on another cluster profile's runner.

Grouping: the profile's ``experiments_per_gpu`` is the group width; the experiments, seeds inner, are cut into
groups of that many (:func:`everest.config.experiment_groups`), one task each, trained together on one device.
Caching, failures and reporting stay per experiment. Every future is settled (a worker that died is rescheduled by
Dask, then marked Crashed), the ensembles, analysis and report run on whatever finished, and the flow run ends
Failed, after the report is written, when any experiment failed.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import dask
from prefect import allow_failure, flow, get_run_logger
from prefect.states import Completed, Failed
from pydantic import Field, field_validator, model_validator

from everest import io, results
from everest.config import (
    DEFAULT_SEEDS,
    PRESETS,
    EverestConfig,
    Experiment,
    Target,
    TargetName,
    all_targets,
    experiment_groups,
    experiment_matrix,
    run_config,
)
from everest.data.tables import data_file
from everest.errors import EXIT_FAILED, ConfigError
from everest.scoring import baselines
from flows import preflight
from flows.artifacts import publish_artifacts
from flows.jobwatch import clear_submission_failures, worker_job_failure
from flows.parameters import DEMO_DATA_DIR, FlowParameters, flow_function
from flows.profiles import Profile, load_profile
from flows.run import (
    FlowCommand,
    bind_cluster_to_run,
    command_line,
    lazy_variants,
    mark_crashed,
    next_settled,
    release,
    run_command_line,
    settle,
)
from flows.tasks import (
    RETRIES,
    RETRY_DELAY_SECONDS,
    ExperimentJob,
    GroupJob,
    analyse,
    api_unreachable,
    build_seed_ensembles,
    bundle_models,
    fit_baseline,
    group_name,
    member_error,
    summarise_result,
    train_experiments,
)
from flows.terminal import RunProgress, announce_run, print_summary


class ProductionParameters(FlowParameters):
    """Parameters of a production run; validated before anything is submitted."""

    cli_flags: ClassVar[dict[str, str]] = {"baselines": "--no-baselines"}

    targets: list[TargetName] | None = Field(
        None, description="flare class and horizon of each forecast to train, e.g. C-24 M5-72 (default: every "
        "target whose tables the data folder holds; all 9 for the embedded demo)")
    seeds: list[int] = Field(default_factory=lambda: list(DEFAULT_SEEDS),
                             description="random seeds; each target is trained once per seed (default 0-4: 45 "
                             "experiments)")
    data_dir: str | None = Field(None, description="folder holding the targets' SHARP tables (training_data_C_24.csv, "
                                 "...), on the file system the workers share; unset: the embedded demo (synthetic "
                                 f"tables in {DEMO_DATA_DIR}, made if missing; one machine only)")
    output_dir: str = Field("output", description="folder for results, models, the analysis and the report; a rerun "
                            "keeps what finished")
    profile: str = Field("local", description="cluster profile: local, pbs, slurm or a YAML file (a deployment runs "
                         "on its own)")
    preset: Literal["production", "demo"] | None = Field(
        None, description="training budget: production (the design's recipe, 120 epochs) or demo (the same recipe, "
        "6 epochs); unset: demo for the embedded demo data, production for a data_dir")
    config_file: str | None = Field(None, description="TOML or YAML configuration file (a path on the workers' file "
                                    "system)")
    overrides: list[str] = Field(default_factory=list, description="configuration overrides KEY=VALUE applied last, "
                                 "e.g. train.batch_size=256")
    epochs: int | None = Field(None, ge=1, description="epoch cap (train.epochs); unset: the preset's")
    force: bool = Field(False, description="retrain experiments that already finished with this configuration and "
                        "data")
    baselines: bool = Field(True, description="fit the simple baselines (logistic regression, gradient boosting) on "
                            "each experiment's windows beside EVEREST, so the report says whether EVEREST beats them "
                            "(--no-baselines: skip them)")

    @model_validator(mode="before")
    @classmethod
    def _targets_in_folder(cls, data: Any) -> Any:
        """Unset targets: those of which the data folder holds a table, so a folder of some targets (an import of
        published tables) runs as it is; all 9 for the demo, or when the folder holds none. A target with one of
        its two tables stays in, so the preflight names the missing one."""
        if isinstance(data, dict) and data.get("targets") is None:
            folder = data.get("data_dir")
            held = [] if folder is None else [
                str(t) for t in all_targets()
                if any(data_file(Path(folder), t, split).is_file() for split in ("train", "test"))]
            data = {**data, "targets": held or [str(t) for t in all_targets()]}
        return data

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        if not isinstance(v, list | tuple):
            return v
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

    def baseline_models(self) -> tuple[str, ...]:
        """The baselines the run fits beside EVEREST (none when switched off)."""
        return baselines.BASELINES if self.baselines else ()


def run_production(params: ProductionParameters, site: Profile) -> Any:
    """Body of the flow: check, fan out, settle every future, build the ensembles, analyse, report.

    One run at a time per output directory: a second run on the same directory is refused (lock file).
    """
    from prefect.settings import PREFECT_API_URL

    cfg = preflight.preflight(params, site, PREFECT_API_URL.value())
    try:
        with io.exclusive_lock(Path(params.output_dir) / ".everest.lock", f"output directory {params.output_dir}"):
            return ProductionRun(params, site, cfg).run()
    except io.LockedError as err:
        raise ConfigError(str(err)) from None


class ProductionRun:
    """One flow run under its output folder's lock: the submissions, what each settled to, the final state."""

    def __init__(self, params: ProductionParameters, site: Profile, cfg: EverestConfig) -> None:
        self.params, self.site, self.cfg = params, site, cfg
        self.logger = get_run_logger()
        self.out = Path(params.output_dir)
        self.experiments = params.experiments
        self.rows: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.base_failures: list[dict[str, Any]] = []
        self.settled: list[Any] = []  # final states of every training and baseline task, for the graph

    def run(self) -> Any:
        """Submit every group (the long tasks first) and every baseline fit, settle them, then report."""
        announce_run()
        self._prepare()
        groups = experiment_groups(self.experiments, self.site.experiments_per_gpu)
        self.logger.info("%d experiments (%s; seeds %s)%s, config %s, on profile %s", len(self.experiments),
                         ", ".join(self.params.targets), self.params.seeds,
                         _grouping(len(groups), self.site.experiments_per_gpu), self.cfg.config_hash(),
                         self.params.profile)
        bind_cluster_to_run(self.site, self.out)
        clear_submission_failures()
        pending = {group: self._submit(group) for group in groups}
        fits = [(f"{model} {exp.name}", self._submit_baseline(exp, model)) for exp in self.experiments
                for model in self.params.baseline_models()]
        self._settle_groups(pending, RunProgress(len(self.experiments), self.logger))
        self._settle_baselines(fits)
        return self._finish(len(fits))

    def _prepare(self) -> None:
        """Generate the embedded demo's tables if missing, hash the data, name each experiment's identity, apply
        --force (once, here: a task that reruns must resume, not start over) and note what finished before."""
        if self.params.embedded_demo and not preflight.demo_tables_present(self.params.data_path):
            from everest.data import synthetic

            self.logger.info("embedded demo: generating synthetic SHARP tables in %s", self.params.data_path)
            synthetic.generate(self.params.data_path, size="demo", seed=0)
            preflight.check_tables(self.params, self.cfg)
        self.hashes = preflight.data_hashes(self.params.data_path, self.params.target_list)
        self.identities = {e: results.identity_for(e, self.cfg, self.hashes[e.target]) for e in self.experiments}
        if self.params.force:
            for exp in self.experiments:
                results.supersede(self.out, exp.name)
                results.experiment_dirs(self.out, exp)[2].unlink(missing_ok=True)  # its checkpoint
                for model in self.params.baseline_models():
                    results.supersede(baselines.baseline_root(self.out, model), exp.name)
        # Finished before this run (with this identity): reported as cached, skipped by the task that holds them.
        self.done_before = {e for e in self.experiments if results.finished(self.out, self.identities[e]) is not None}
        storage = self.out / ".prefect-results"
        storage.mkdir(parents=True, exist_ok=True)
        self.trainer = train_experiments.with_options(result_storage=storage)
        self.fitter = fit_baseline.with_options(result_storage=storage)
        self.folders = {"config": self.cfg, "data_dir": self.params.data_path.resolve(),
                        "output_dir": self.out.resolve()}

    def _submit(self, group: tuple[Experiment, ...]) -> Any:
        job = GroupJob(experiments=group, identities=tuple(self.identities[e] for e in group),
                       torch_threads=self.site.threads, **self.folders)
        # A cached summary stands only while every member's results are on disk with its identity
        # (deleted, superseded or rewritten by another configuration: the task runs and trains those).
        fresh = not self.done_before.issuperset(group)
        with dask.annotate(resources={"GPU": 1}) if self.site.uses_gpus else contextlib.nullcontext():
            return self.trainer.with_options(refresh_cache=fresh or None).submit(job)

    def _submit_baseline(self, exp: Experiment, model: str) -> Any:
        identity = baselines.baseline_identity(exp, baselines.DEFAULTS[model], self.cfg, self.hashes[exp.target])
        job = ExperimentJob(model=model, experiment=exp, identity=identity, **self.folders)
        fresh = results.finished(baselines.baseline_root(self.out, model), identity) is None
        return self.fitter.with_options(refresh_cache=fresh or None).submit(job)

    def _settle_groups(self, pending: dict[tuple[Experiment, ...], Any], progress: RunProgress) -> None:
        """Each group's outcome as it ends; a task whose worker could not reach the Prefect API is resubmitted."""
        attempts = dict.fromkeys(pending, 0)
        while pending:
            group, fut, summaries, err = next_settled(pending)
            if err is not None and attempts[group] < RETRIES and api_unreachable(err):  # the task never started
                attempts[group] += 1
                self.logger.warning("%s: the worker could not reach the Prefect API (%s); resubmitting in %d s",
                                    group_name(group), err, RETRY_DELAY_SECONDS)
                release(fut)
                time.sleep(RETRY_DELAY_SECONDS)
                pending[group] = self._submit(group)
                continue
            if err is not None and type(err).__name__ == "KilledWorker":
                mark_crashed(fut.task_run_id, f"Dask gave up after repeated worker deaths: {err}")
            self._record(group, fut.state.is_completed() and fut.state.name == "Cached", summaries, err, progress)
            self.settled.append(fut.state)
            del pending[group]
            release(fut)

    def _record(self, group: tuple[Experiment, ...], cached: bool, summaries: list[dict[str, Any]] | None,
                err: BaseException | None, progress: RunProgress) -> None:
        """Each member's result row, or its failure record (its own error, or its task's)."""
        by_name = {row["experiment"]: row for row in summaries or []}
        for exp in group:
            row = by_name.get(exp.name)
            if row is None and (done := results.finished(self.out, self.identities[exp])) is not None:
                row = summarise_result(done)  # finished before its group-mate failed, or earlier (cluster/ jobs)
            if row is not None:
                self.rows.append(row)
                progress.finished(exp.name, row, cached=cached or exp in self.done_before)
                continue
            error_type, message = member_error(exp, err)
            self.failures.append(results.record_failure(self.out, exp, error_type, message, self.identities[exp]))
            progress.failed(exp.name, f"{error_type}: {message}")

    def _settle_baselines(self, fits: list[tuple[str, Any]]) -> None:
        for name, fut in fits:  # each wrote its own failure.json; the report lists it
            try:
                self.rows.append(settle(fut))
            except Exception as err:  # noqa: BLE001 - recorded, reported, and fails the run like an experiment
                self.logger.error("baseline %s failed: %s: %s", name, type(err).__name__, err)
                self.base_failures.append({"experiment": name, "error_type": type(err).__name__, "error": str(err)})
            self.settled.append(fut.state)
            release(fut)

    def _finish(self, n_fits: int) -> Any:
        """The ensembles, the analysis and the artifacts over whatever finished; the run's final state."""
        results_dir, waited = str(self.out / "results"), [allow_failure(s) for s in self.settled if s.is_final()]
        # Both wait on every training and baseline task (the run graph shows it), failed ones included.
        built = build_seed_ensembles(results_dir, str(self.out), self.params.targets, wait_for=waited,
                                     return_state=True)
        summary = analyse(results_dir, str(self.out), self.params.targets, self.params.seeds, wait_for=waited)
        bundle = bundle_models(str(self.out), self.params.targets)
        n_everest = sum(r["model"] == "everest" for r in self.rows)
        failed = self.failures + self.base_failures
        result = {"completed": n_everest, "baselines_fitted": len(self.rows) - n_everest,
                  "failed": [f["experiment"] for f in failed], "report": summary.get("report"), "bundle": bundle,
                  "plots": str(self.out / "plots"), "results": self.rows}
        io.write_json(self.out / "analysis" / "flow_summary.json", result)
        publish_artifacts(summary, self.rows, failed, len(self.experiments))
        if not (failed or built.is_failed()):
            return Completed(message=f"{n_everest} experiments (+{len(self.rows) - n_everest} baseline fits); "
                             f"report: {summary.get('report')}", data=result)
        failure = worker_job_failure()  # a refused submission or a worker job that cannot start or died
        parts = [f"{len(self.failures)} of {len(self.experiments)} experiments failed"
                 + (f": {', '.join(f['experiment'] for f in self.failures)}" if self.failures else "")]
        if self.base_failures:
            parts.append(f"{len(self.base_failures)} of {n_fits} baseline fits failed: "
                         + ", ".join(f["experiment"] for f in self.base_failures))
        if built.is_failed():
            parts.append(f"building the seed ensembles failed: {built.message}")
        # A message, no data: a Failed state carrying a result makes Prefect log a TypeError traceback.
        return Failed(message=f"{f'{failure}; ' if failure else ''}{'; '.join(parts)}; report: {summary.get('report')}")


def _grouping(n_groups: int, width: int) -> str:
    """How the experiments are grouped into tasks, for the plan and the log (nothing at width 1)."""
    return "" if width == 1 else f" in {n_groups} tasks of up to {width} experiments each"


def make_flow(profile: str | Profile, name: str | None = None) -> Any:
    """The flow ``everest-production`` bound to one cluster profile's Dask task runner.

    ``profile`` is a profile name, a YAML path or a :class:`~flows.profiles.Profile` (tests shrink the site
    profiles to their machine); ``name`` is what the ``profile`` parameter must say (default: the name given, or
    the profile's kind), and its default in the deployment form.
    """
    from prefect_dask import DaskTaskRunner

    site = load_profile(profile)
    profile_name = name or (profile if isinstance(profile, str) else site.kind)

    def body(params: ProductionParameters) -> Any:
        if params.profile != profile_name:
            raise ConfigError(f"profile {params.profile!r} requested, but this flow runs on profile {profile_name!r}; "
                              f"run the deployment everest-production/{params.profile} instead")
        return run_production(params, site)

    fn = flow_function(ProductionParameters, body, "everest_production", "Train the EVEREST experiment matrix on "
                       "Dask, then build the seed ensembles, analyse and report.", profile=profile_name)
    return flow(fn, name="everest-production", log_prints=True, task_runner=DaskTaskRunner(**site.task_runner_kwargs()))


# Deployment entrypoints flows.production:everest_{local,pbs,slurm}.
__getattr__ = lazy_variants(make_flow, {"everest_local": "local", "everest_pbs": "pbs", "everest_slurm": "slurm"},
                            globals())


def _plan(params: ProductionParameters, site: Profile) -> str:
    """What the run will do, in one line (and where the user's own data would go)."""
    n = len(params.experiments)
    fits = n * len(params.baseline_models())
    seeds = ", ".join(map(str, params.seeds))
    data = (f"synthetic demo tables in {DEMO_DATA_DIR} (made if missing)" if params.embedded_demo
            else str(params.data_path))
    budget = ", ".join(PRESETS[params.effective_preset]) or "the design recipe"
    width = site.experiments_per_gpu
    return (f"everest-production: {n} experiments ({', '.join(params.targets)} x seeds {seeds})"
            f"{_grouping(math.ceil(n / width), width)}"
            f"{f' + {fits} baseline fits' if fits else ''} on profile {site.kind} ({site.source}); data: {data}; "
            f"preset {params.effective_preset} ({budget}{f', epochs {params.epochs}' if params.epochs else ''}); "
            f"output: {params.output_dir}" + ("\ngive --data-dir for your SHARP tables" if params.embedded_demo
                                             else ""))


def _report(params: ProductionParameters, state: Any, browse: str) -> int:
    """The ended run on the terminal (:func:`flows.terminal.print_summary`); its exit status."""
    print_summary(state, Path(params.output_dir), browse)
    return 0 if state.is_completed() else EXIT_FAILED


COMMAND = FlowCommand(model=ProductionParameters, make_flow=lambda site, name: make_flow(site, name=name),
                      preflight=preflight.preflight, plan=_plan, report=_report,
                      resume_hint="finished experiments are kept, running ones resume from their checkpoints")


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.production``: check everything, run the flow (:func:`flows.run.run_command_line`)."""
    parser = command_line(ProductionParameters, "python -m flows.production",
                          "Run the EVEREST production study (flow everest-production).")
    return run_command_line(parser.parse_args(argv), COMMAND)


if __name__ == "__main__":
    # Run the installed module's flow, not a __main__ copy: batch workers must import the tasks by name.
    from flows.production import main as _main

    sys.exit(_main())
