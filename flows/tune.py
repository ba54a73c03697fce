"""Prefect flow ``everest-tune``: an Optuna study of EVEREST recipes, one trial per task on the cluster profile; and
its command line, ``python -m flows.tune``.

Glue over :mod:`everest.training.tuning`: the flow asks the study (TPE, median pruning on the per-epoch
validation score) for a trial, submits it as a task to the profile's Dask cluster, keeps up to the
cluster's capacity in flight and tells the study each result. The study lives in a database the user keeps
(``<output>/tuning/study.db``, or any SQLAlchemy URL), so a crashed or repeated run continues it: finished
trials are kept, trials that were running are retried. Only the training files are read; the result is
``<output>/tuning/tuned_config.yaml`` for ``python -m flows.production --config``. Its parameters, waiting and
command line are built as ``everest-production``'s (:mod:`flows.parameters`, :mod:`flows.run`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

from prefect import flow, get_run_logger, task
from pydantic import BaseModel, ConfigDict, Field, field_validator

from everest.config import EverestConfig, Target, TargetName, TuningRecord, experiment_matrix, run_config
from everest.data.tables import data_file
from everest.errors import EXIT_FAILED, ConfigError, DataError
from everest.io import check_writable_dir
from everest.training import tuning
from flows.artifacts import publish_study
from flows.jobwatch import clear_submission_failures
from flows.parameters import DEMO_DATA_DIR, FlowParameters, flow_function
from flows.preflight import check_api_reachable
from flows.profiles import Profile, load_profile
from flows.run import FlowCommand, SubmissionFailed, command_line, lazy_variants, next_settled, run_command_line
from flows.terminal import TERMINAL

DEFAULT_SPACE = Path(__file__).resolve().parent.parent / "deployments" / "tuning" / "search_space.yaml"
STUDY = "everest-tune"


class TuneParameters(FlowParameters):
    """Parameters of a tuning run; validated before any trial runs."""

    cli_flags: ClassVar[dict[str, str]] = {"space_file": "--space"}

    targets: list[TargetName] = Field(default_factory=lambda: ["M-24"], description="targets whose training files "
                                      "the recipe is judged on, the mean over them (default M-24)")
    trials: int = Field(30, ge=1, description="trials the study should hold when done (finished ones of earlier "
                        "runs count)")
    folds: int = Field(3, ge=2, le=10, description="region-disjoint folds of each training file; each trial trains "
                       "once per fold")
    metric: Literal["val_tss", "val_auc", "val_loss"] = Field("val_tss", description="the validation score "
                                                              "maximised (val_tss: TSS at the best threshold)")
    space_file: str | None = Field(None, description="YAML/TOML search space; unset: "
                                   "deployments/tuning/search_space.yaml")
    data_dir: str | None = Field(None, description="folder holding the training_data_*.csv files; unset: the "
                                 f"embedded demo data ({DEMO_DATA_DIR}). Testing files are never read")
    output_dir: str = Field("output", description="the study database, the trials' folders and the tuned recipe go "
                            "to <output_dir>/tuning")
    storage: str | None = Field(None, description="SQLAlchemy URL of a shared study database; unset: SQLite in "
                                "<output_dir>/tuning")
    study: str = Field(STUDY, description="study name; a rerun with the same name continues the study")
    profile: str = Field("local", description="cluster profile: local, pbs, slurm or a YAML file (a deployment runs "
                         "on its own)")
    preset: Literal["production", "demo"] | None = Field(None, description="the budget trials start from: "
                                                         "production or demo; unset: demo for the embedded data")
    config_file: str | None = Field(None, description="configuration file the trials start from")
    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE configuration overrides the trials "
                                 "start from")
    epochs: int | None = Field(None, ge=1, description="epoch cap of the base configuration; unset: the preset's "
                               "(the space may search epochs)")
    seed: int = Field(0, ge=0, description="seed of the sampler, the folds and the trials' training")

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        if not isinstance(v, list | tuple):
            return v
        return [str(e.target) for e in experiment_matrix(v, [0])]

    @property
    def target_list(self) -> list[Target]:
        return [Target.parse(t) for t in self.targets]

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir or DEMO_DATA_DIR)

    @property
    def tuning_dir(self) -> Path:
        return Path(self.output_dir) / "tuning"

    @property
    def storage_url(self) -> str:
        """The study database: the given SQLAlchemy URL, else a SQLite file in the output folder."""
        return self.storage or f"sqlite:///{(self.tuning_dir / 'study.db').resolve()}"

    def base_config(self) -> EverestConfig:
        """The configuration each trial starts from (the trial's parameters are applied on top)."""
        preset = self.preset or ("demo" if self.data_dir is None else "production")
        return run_config(self.config_file, self.overrides, preset=preset, epochs=self.epochs)

    def search_space(self, base: EverestConfig) -> tuning.SearchSpace:
        return tuning.load_search_space(self.space_file or DEFAULT_SPACE, base)


class TrialJob(BaseModel):
    """What one trial task needs: its study and trial, its configuration, and the data it may read."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    number: int
    trial_id: int
    study: str
    storage: str
    config: EverestConfig
    targets: list[str]
    folds: int
    metric: str
    seed: int
    data_dir: Path
    work_dir: Path
    torch_threads: int | None = None


@task(name="tuning-trial", task_run_name="trial-{job.number}")
def run_trial(job: TrialJob) -> dict[str, Any]:
    """Cross-validate one recipe; report every epoch's score to the study, which may prune the trial."""
    import optuna
    import torch

    if job.torch_threads:
        torch.set_num_threads(job.torch_threads)
    logger = get_run_logger()
    study = optuna.load_study(study_name=job.study, storage=job.storage)
    trial = optuna.trial.Trial(study, job.trial_id)

    def report(step: int, value: float) -> bool:
        trial.report(value, step)
        return trial.should_prune()

    try:
        value = tuning.cross_validate(job.config, [Target.parse(t) for t in job.targets], job.data_dir,
                                      job.work_dir, job.folds, job.metric, job.seed, report,
                                      cache_dir=job.work_dir.parent / "cache")
    except tuning.Pruned as why:
        logger.info("trial %d: %s", job.number, why)
        return {"state": "pruned"}
    logger.info("trial %d: mean %s %.4f over %d folds", job.number, job.metric, value, job.folds)
    return {"state": "complete", "value": value}


def check_training_files(params: TuneParameters, base: EverestConfig) -> None:
    """Only the training files are needed (and read): each must exist, be valid and learnable on every fold."""
    from everest.data.check import check_training_folds

    missing = [str(data_file(params.data_path, t, "train")) for t in params.target_list
               if not data_file(params.data_path, t, "train").is_file()]
    if params.data_dir is None and missing:
        from everest.data import synthetic

        synthetic.generate(params.data_path, size="demo", seed=0)
    elif missing:
        raise DataError(f"training files not found: {missing} (tuning reads only the training files)")
    check_training_folds(params.data_path, params.target_list, base.data, base.model.seq_len, params.folds,
                         params.seed)


def preflight(params: TuneParameters, site: Profile, api_url: str | None) -> tuple[EverestConfig, tuning.SearchSpace]:
    """Everything that can refuse a study before a server starts or a trial runs: the configuration and
    search space, the output folder, the Prefect API's address, the batch system, the training tables. Returns
    the base configuration and the search space."""
    base = params.base_config()
    space = params.search_space(base)  # every problem of the space and the config at once
    check_writable_dir(params.output_dir, "output folder")
    check_api_reachable(site, api_url)
    site.check_site()
    check_training_files(params, base)
    return base, space


def _open_study(params: TuneParameters, space: tuning.SearchSpace, base: EverestConfig) -> Any:
    """Create the study, or load it and refuse one made with another space, configuration or objective."""
    import optuna

    params.tuning_dir.mkdir(parents=True, exist_ok=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    study = optuna.create_study(study_name=params.study, storage=params.storage_url, direction="maximize",
                                pruner=pruner, load_if_exists=True)
    # Seeded by the trials already held, so a continued study draws new points, and reproducibly.
    study.sampler = optuna.samplers.TPESampler(seed=params.seed + len(study.trials), constant_liar=True,
                                               multivariate=True)
    identity = {"space_hash": space.space_hash(), "config_hash": base.config_hash(), "targets": params.targets,
                "folds": params.folds, "metric": params.metric}
    known = {k: study.user_attrs[k] for k in identity if k in study.user_attrs}
    if known and known != identity:
        changed = sorted(k for k in identity if known.get(k) != identity[k])
        raise ConfigError(f"study {params.study!r} in {params.storage_url} was made with another {', '.join(changed)}; "
                          "give another --study name (or the same settings) to continue it")
    for key, value in identity.items():
        study.set_user_attr(key, value)
    # A crashed run left its running trials behind: close them and try their parameters again.
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params)  # not skip_if_exists: the failed trial itself holds these params
    return study


def run_tuning(params: TuneParameters, site: Profile) -> dict[str, Any]:
    """Body of the flow: validate everything, then ask, submit, tell until the study has its trials."""
    import optuna
    from prefect.settings import PREFECT_API_URL

    logger = get_run_logger()
    base, space = preflight(params, site, PREFECT_API_URL.value())
    clear_submission_failures()  # refusals and dead worker jobs of an earlier run in this process are not this one's
    study = _open_study(params, space, base)
    finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished_states))
    capacity = site.capacity()
    logger.info("study %s: %d of %d trials finished before this run; %d at a time", params.study, done,
                params.trials, capacity)
    in_flight: dict[int, Any] = {}
    failures = 0
    while done < params.trials and failures <= params.trials:
        while len(in_flight) < capacity and done + len(in_flight) < params.trials:
            trial = study.ask()
            config = base.with_overrides(tuning.suggest(trial, space))
            job = TrialJob(number=trial.number, trial_id=trial._trial_id, study=params.study,
                           storage=params.storage_url, config=config, targets=params.targets, folds=params.folds,
                           metric=params.metric, seed=params.seed, data_dir=params.data_path.resolve(),
                           work_dir=(params.tuning_dir / f"trial{trial.number}").resolve(), torch_threads=site.threads)
            in_flight[trial.number] = run_trial.submit(job)
        number, _, res, err = next_settled(in_flight)
        del in_flight[number]
        if isinstance(err, SubmissionFailed):
            raise err  # no worker job can start: no trial will run
        if err is not None:  # a failed trial is recorded in the study, the search goes on
            failures += 1
            study.tell(number, state=optuna.trial.TrialState.FAIL)
            logger.error("trial %d failed: %s: %s", number, type(err).__name__, err)
            continue
        if res["state"] == "pruned":
            study.tell(number, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(number, res["value"])
        done += 1
        TERMINAL.line(_trial_line(study, number), f"{done} of {params.trials} trials finished")
    return _finish(study, params, space, base)


def _trial_line(study: Any, number: int) -> str:
    trial = study.trials[number]
    value = "pruned" if trial.value is None else f"{trial.value:.4f}"
    return f"trial {number}: {value} (best {study.best_value:.4f}, trial {study.best_trial.number})"


def _finish(study: Any, params: TuneParameters, space: tuning.SearchSpace, base: EverestConfig) -> dict[str, Any]:
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(f"study {params.study}: no trial completed; see the failed trials' logs")
    best = study.best_trial
    finished = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                            optuna.trial.TrialState.PRUNED)))
    record = TuningRecord(study=params.study, storage=params.storage_url, targets=tuple(params.targets),
                          metric=params.metric, folds=params.folds, trials=finished, best_trial=best.number,
                          best_value=best.value, space_hash=space.space_hash())
    recipe = tuning.write_recipe(params.tuning_dir / "tuned_config.yaml", base,
                                 tuning.overrides_of(best.params, space), record)
    publish_study(study, record, recipe)
    return {"recipe": str(recipe), "best_value": best.value, "best_trial": best.number, "trials": finished,
            "best_params": tuning.overrides_of(best.params, space)}


def make_flow(profile: str | Profile, name: str | None = None) -> Any:
    """The flow ``everest-tune`` bound to one cluster profile's Dask task runner (``name``: as in
    :func:`flows.production.make_flow`)."""
    from prefect_dask import DaskTaskRunner

    site = load_profile(profile)
    profile_name = name or (profile if isinstance(profile, str) else site.kind)

    def body(params: TuneParameters) -> dict[str, Any]:
        if params.profile != profile_name:
            raise ConfigError(f"profile {params.profile!r} requested, but this flow runs on profile {profile_name!r}")
        return run_tuning(params, site)

    fn = flow_function(TuneParameters, body, "everest_tune", "Search EVEREST recipes on validation folds of the "
                       "training files; write the best as a config file.", profile=profile_name)
    return flow(fn, name="everest-tune", task_runner=DaskTaskRunner(**site.task_runner_kwargs()))


# Deployment entrypoints flows.tune:tune_{local,pbs,slurm}.
__getattr__ = lazy_variants(make_flow, {"tune_local": "local", "tune_pbs": "pbs", "tune_slurm": "slurm"}, globals())


def _plan(params: TuneParameters, site: Profile) -> str:
    return (f"everest-tune: study {params.study} ({params.storage_url}), {params.trials} trials on "
            f"{', '.join(params.targets)} x {params.folds} folds, maximising {params.metric}; profile {site.kind}")


def _report(params: TuneParameters, state: Any, browse: str) -> int:
    """The best recipe found, or why the study ended; the exit status."""
    if not state.is_completed():
        print(f"tuning ended {state.name}: {state.message}", file=sys.stderr)
        return EXIT_FAILED
    res = state.result()
    print(f"best mean {params.metric} {res['best_value']:.4f} (trial {res['best_trial']} of {res['trials']}): "
          f"{res['best_params']}")
    print(f"recipe: {res['recipe']}  (python -m flows.production --config {res['recipe']})")
    return 0


COMMAND = FlowCommand(model=TuneParameters, make_flow=lambda site, name: make_flow(site, name=name),
                      preflight=preflight, plan=_plan, report=_report,
                      resume_hint="finished trials are kept, running ones are tried again")


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.tune``: check everything, run the study, print the recipe (:func:`flows.run.run_command_line`).
    """
    parser = command_line(TuneParameters, "python -m flows.tune", "Tune an EVEREST recipe on validation folds of "
                          "the training files (flow everest-tune); the test files are never read.")
    args = parser.parse_args(argv)
    if not args.verbose:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    return run_command_line(args, COMMAND)


if __name__ == "__main__":
    from flows.tune import main as _main

    sys.exit(_main())
