"""Prefect flow ``everest-tune``: an Optuna study of EVEREST recipes, one trial per task on the cluster profile.

Thin glue over :mod:`everest.training.tuning`: the flow asks the study (TPE, median pruning on the per-epoch
validation score) for a trial, submits it as a task to the profile's Dask cluster, keeps up to the
cluster's capacity in flight and tells the study each result. The study lives in a database the user keeps
(``<output>/tuning/study.db``, or any SQLAlchemy URL), so a crashed or repeated run continues it: finished
trials are kept, trials that were running are retried. Only the training files are read; the result is
``<output>/tuning/tuned_config.yaml`` for ``python -m flows.production --config``.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import signal
import sys
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from everest.cli import add_run_arguments, positive_int, seed_number, target_name
from everest.config import EverestConfig, Target, TuningRecord, experiment_matrix, run_config
from everest.data.tables import data_file
from everest.errors import EXIT_USAGE, ConfigError, DataError, describe_validation_error
from everest.io import check_writable_dir
from everest.training import tuning
from flows.jobwatch import clear_submission_failures
from flows.production import (
    DEMO_DATA_DIR,
    TERMINAL,
    SubmissionFailed,
    TargetName,
    lazy_variants,
    next_settled,
    quiet_logs,
)
from flows.profiles import Profile, load_profile

DEFAULT_SPACE = Path(__file__).resolve().parent.parent / "deployments" / "tuning" / "search_space.yaml"
STUDY = "everest-tune"


class TuneParameters(BaseModel):
    """Parameters of a tuning run; validated before any trial runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    targets: list[str] = Field(default_factory=lambda: ["M-24"])
    trials: int = Field(30, ge=1)
    folds: int = Field(3, ge=2, le=10)
    metric: Literal["val_tss", "val_auc", "val_loss"] = "val_tss"
    space_file: str | None = None
    data_dir: str | None = None
    output_dir: str = "output"
    storage: str | None = None
    study: str = STUDY
    profile: str = "local"
    preset: Literal["production", "demo"] | None = None
    config_file: str | None = None
    overrides: list[str] = Field(default_factory=list)
    epochs: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0)

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
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


def preflight(params: TuneParameters, site: Profile) -> tuple[EverestConfig, tuning.SearchSpace]:
    """Everything that can refuse a study before a server starts or a trial runs: the configuration and
    search space, the output folder, the batch system, the training tables. Returns the base configuration
    and the search space."""
    base = params.base_config()
    space = params.search_space(base)  # every problem of the space and the config at once
    check_writable_dir(params.output_dir, "output folder")
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

    logger = get_run_logger()
    base, space = preflight(params, site)
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
    publish_summary(study, record, recipe)
    return {"recipe": str(recipe), "best_value": best.value, "best_trial": best.number, "trials": finished,
            "best_params": tuning.overrides_of(best.params, space)}


def publish_summary(study: Any, record: TuningRecord, recipe: Path) -> None:
    """The study's artifact: the best trials, the optimisation history and the parameters' importance."""
    import optuna

    trials = sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
                    key=lambda t: t.value, reverse=True)
    rows = ["| trial | mean " + record.metric + " | " + " | ".join(trials[0].params) + " |",
            "|" + "---|" * (len(trials[0].params) + 2)]
    rows += [f"| {t.number} | {t.value:.4f} | " + " | ".join(_short(v) for v in t.params.values()) + " |"
             for t in trials[:10]]
    text = (f"# Tuning study {record.study}\n\n{record.trials} trials finished (complete or pruned) on "
            f"{', '.join(record.targets)}, {record.folds} region folds of the training files; best mean "
            f"{record.metric} {record.best_value:.4f} (trial {record.best_trial}); search space {record.space_hash}."
            f"\n\nRecipe: `{recipe}` (use it with `python -m flows.production --config {recipe}`).\n\n"
            "## Best trials\n\n" + "\n".join(rows) + "\n\n## Optimisation history\n\n"
            f"![history]({_png(_history_figure(study))})\n")
    importance = _importance_figure(study)
    if importance is not None:
        text += f"\n## Parameter importance\n\n![importance]({_png(importance)})\n"
    key = f"everest-tune-{record.study}".lower().replace("_", "-")
    create_markdown_artifact(markdown=text, key=key, description=f"study {record.study}: best {record.best_value:.4f}")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _history_figure(study: Any) -> Any:
    import optuna
    from matplotlib.figure import Figure

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    xs, ys = [t.number for t in done], [t.value for t in done]
    ax.plot(xs, ys, "o", label="trial")
    best = [max(ys[: i + 1]) for i in range(len(ys))]
    ax.step(xs, best, where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"mean {study.user_attrs.get('metric', 'score')}")
    ax.legend()
    fig.tight_layout()
    return fig


def _importance_figure(study: Any) -> Any:
    import optuna
    from matplotlib.figure import Figure

    try:
        importance = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):  # too few trials, or no parameter varied
        return None
    fig = Figure(figsize=(6, 0.4 * len(importance) + 1))
    ax = fig.subplots()
    names = list(importance)[::-1]
    ax.barh(names, [importance[n] for n in names])
    ax.set_xlabel("importance (fANOVA)")
    fig.tight_layout()
    return fig


def make_flow(profile: str | Profile, name: str | None = None) -> Any:
    """The flow ``everest-tune`` bound to one cluster profile's Dask task runner."""
    from prefect_dask import DaskTaskRunner

    site = load_profile(profile)
    profile_name = name or (profile if isinstance(profile, str) else site.kind)

    def everest_tune(
        targets: list[TargetName] = ["M-24"],  # noqa: B006 - Prefect reads the default from the signature
        trials: int = 30,
        folds: int = 3,
        metric: Literal["val_tss", "val_auc", "val_loss"] = "val_tss",
        space_file: str = "",
        data_dir: str = "",
        output_dir: str = "output",
        storage: str = "",
        study: str = STUDY,
        profile: str = profile_name,
        preset: Literal["auto", "production", "demo"] = "auto",
        config_file: str = "",
        overrides: list[str] = [],  # noqa: B006
        epochs: int = 0,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Search EVEREST recipes on validation folds of the training files; write the best as a config file.

        Args:
            targets: targets whose training files the recipe is judged on (mean over them).
            trials: trials the study should hold when done (finished ones of earlier runs count).
            folds: region-disjoint folds of each training file; each trial trains once per fold.
            metric: the validation score maximised (val_tss: TSS at the best threshold).
            space_file: YAML/TOML search space; empty: deployments/tuning/search_space.yaml.
            data_dir: folder holding the training_data_*.csv files; empty: the embedded demo data. Testing
                files are never read.
            output_dir: the study database, the trials' folders and the tuned recipe go to <output_dir>/tuning.
            storage: SQLAlchemy URL of a shared study database; empty: SQLite in <output_dir>/tuning.
            study: study name; a rerun with the same name continues the study.
            profile: the cluster profile this deployment runs on (local, pbs or slurm).
            preset: the budget trials start from: production, demo, or auto (demo for the embedded data).
            config_file: configuration file the trials start from; empty: none.
            overrides: KEY=VALUE configuration overrides the trials start from.
            epochs: epoch cap of the base configuration; 0: the preset's (the space may search epochs).
            seed: seed of the sampler, the folds and the trials' training.
        """
        if profile != profile_name:
            raise ConfigError(f"profile {profile!r} requested, but this flow runs on profile {profile_name!r}")
        params = TuneParameters(targets=targets, trials=trials, folds=folds, metric=metric,
                                space_file=space_file or None, data_dir=data_dir or None, output_dir=output_dir,
                                storage=storage or None, study=study, profile=profile,
                                preset=None if preset == "auto" else preset, config_file=config_file or None,
                                overrides=overrides, epochs=epochs or None, seed=seed)
        return run_tuning(params, site)

    return flow(everest_tune, name="everest-tune", task_runner=DaskTaskRunner(**site.task_runner_kwargs()))


_VARIANTS = {"tune_local": "local", "tune_pbs": "pbs", "tune_slurm": "slurm"}


# Deployment entrypoints flows.tune:tune_{local,pbs,slurm}.
__getattr__ = lazy_variants(make_flow, _VARIANTS, globals())


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flows.tune", description="Tune an EVEREST recipe on validation "
                                "folds of the training files (flow everest-tune); the test files are never read.")
    p.add_argument("--targets", nargs="+", type=target_name, default=["M-24"], metavar="TARGET",
                   help="targets (default M-24)")
    p.add_argument("--trials", type=positive_int, default=30, help="trials the study should hold (default 30)")
    p.add_argument("--folds", type=int, default=3, help="region folds per training file (default 3)")
    p.add_argument("--metric", default="val_tss", choices=list(tuning.METRICS), help="score maximised")
    p.add_argument("--space", help="search-space file (default deployments/tuning/search_space.yaml)")
    p.add_argument("--data-dir", help=f"folder of the training files (default: the embedded demo in {DEMO_DATA_DIR})")
    p.add_argument("--output-dir", default="output", help="the study and the recipe go to OUTPUT/tuning")
    p.add_argument("--storage", help="SQLAlchemy URL of the study database (default SQLite in OUTPUT/tuning)")
    p.add_argument("--study", default=STUDY, help=f"study name; the same name continues it (default {STUDY})")
    p.add_argument("--profile", default="local", help="cluster profile: local, pbs, slurm or a YAML file")
    p.add_argument("--seed", type=seed_number, default=0, help="seed of the sampler, folds and training (default 0)")
    add_run_arguments(p, preset_default=None, device=False)
    p.add_argument("--verbose", action="store_true", help="show Prefect's and Dask's log lines too")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command line: validate, make sure a Prefect API exists, run the study, print the recipe."""
    from everest.cli import setup_logging
    from flows.server import prefect_api

    args = _parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    setup_logging()
    quiet_logs(args.verbose)
    if not args.verbose:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        params = TuneParameters(targets=args.targets, trials=args.trials, folds=args.folds, metric=args.metric,
                                space_file=args.space, data_dir=args.data_dir, output_dir=args.output_dir,
                                storage=args.storage, study=args.study, profile=args.profile, preset=args.preset,
                                config_file=args.config, overrides=args.overrides, epochs=args.epochs, seed=args.seed)
        site = load_profile(args.profile)
        preflight(params, site)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as err:
        print(f"error: {describe_validation_error(err, 'parameters')}", file=sys.stderr)
        return EXIT_USAGE
    print(f"everest-tune: study {params.study} ({params.storage_url}), {params.trials} trials on "
          f"{', '.join(params.targets)} x {params.folds} folds, maximising {params.metric}; profile {site.kind}",
          flush=True)
    host = None if os.environ.get("PREFECT_API_URL") else site.reachable_host()
    with prefect_api(host=host or "127.0.0.1"):
        state = make_flow(site, name=args.profile)(**_flow_kwargs(params), return_state=True)
    TERMINAL.end_live()
    if not state.is_completed():
        print(f"tuning ended {state.name}: {state.message}", file=sys.stderr)
        return 1
    res = state.result()
    print(f"best mean {params.metric} {res['best_value']:.4f} (trial {res['best_trial']} of {res['trials']}): "
          f"{res['best_params']}")
    print(f"recipe: {res['recipe']}  (python -m flows.production --config {res['recipe']})")
    return 0


def _flow_kwargs(params: TuneParameters) -> dict[str, Any]:
    return {**params.model_dump(), "space_file": params.space_file or "", "data_dir": params.data_dir or "",
            "storage": params.storage or "", "preset": params.preset or "auto",
            "config_file": params.config_file or "", "epochs": params.epochs or 0}


if __name__ == "__main__":
    from flows.tune import main as _main

    sys.exit(_main())
