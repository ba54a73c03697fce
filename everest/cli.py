"""The ``everest`` command (also ``python -m everest``): ``train``, ``baselines``, ``ensemble``, ``bundle``,
``predict``, ``data synth``, ``data import``, ``data check`` and ``results failure``.

``everest train`` trains one experiment, or several (``--array-index K K ...``, ``--seed S S ...``) as one
group on one device (:func:`everest.training.group.train_group`); a group's exit status is defined in
:func:`_train_group`.

Every command turns its known failures into one line on stderr and an exit status (``everest.errors``).
The options the project's command lines share (:data:`OPTIONS`: the selection, the folders, the cluster profile
and the run options) are declared once here, for these commands, both flows and ``cluster/plan.py``; the run
options become a configuration in :func:`everest.config.run_config`, as the flow and the batch planner do.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from everest.config import DEFAULT_SEEDS, PRESETS, EverestConfig, Experiment, Target, all_targets, run_config
from everest.errors import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_IO,
    EXIT_TIME_LIMIT,
    EXIT_USAGE,
    ConfigError,
    DataError,
    TimeLimitReached,
    TrainingDiverged,
)
from everest.scoring.metrics import shown

if TYPE_CHECKING:
    from everest.results import Identity

log = logging.getLogger("everest")


def setup_logging(level: int = logging.INFO) -> None:
    """Plain timestamped log lines on stderr for the ``everest`` loggers."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")


def run_guarded(fn: Callable[[], Any]) -> int:
    """Run a command; known failures become one clear line on stderr and a non-zero exit status.

    A command that returns an int (``everest train`` of a group) exits with it; otherwise 0.
    """
    setup_logging()
    try:
        status = fn()
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except TimeLimitReached as err:
        print(f"stopped: {err}", file=sys.stderr)
        return EXIT_TIME_LIMIT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:  # after the specific errors: a full disk or a permission problem, not a bug
        where = f" {err.filename}" if err.filename else ""
        print(f"error: cannot read or write{where}: {err.strerror or err}; files written before are intact "
              "(every output is written to a temporary file and renamed)", file=sys.stderr)
        return EXIT_IO
    return status if isinstance(status, int) else 0


def member_exit_status(err: BaseException) -> int:
    """The exit status of a group member's own failure, as if it had been trained alone."""
    return EXIT_DIVERGED if isinstance(err, TrainingDiverged) else EXIT_USAGE


# Several members failing alone in different ways: the group exits with the first of these present.
# Bad input or configuration first (nothing succeeds until it is fixed), then divergence.
MEMBER_EXIT_PRIORITY = (EXIT_USAGE, EXIT_DIVERGED)


# ---------------------------------------------------------------------- shared options
# Argument types: each value is checked as it is given, so a value that a later option overrides (a second
# --epochs, --targets given twice) is still refused when it is wrong.
def whole_number(text: str, ge: int | None = None, le: int | None = None) -> int:
    """An integer, at least ``ge`` and at most ``le`` when given (the bounds of a flow parameter's field)."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a whole number") from None
    if ge is not None and value < ge:
        raise argparse.ArgumentTypeError(f"Input should be greater than or equal to {ge} (got {value})")
    if le is not None and value > le:
        raise argparse.ArgumentTypeError(f"Input should be less than or equal to {le} (got {value})")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (``--epochs``, ``--trials``)."""
    return whole_number(text, ge=1)


def seed_number(text: str) -> int:
    """A seed: an integer >= 0."""
    try:
        value = int(text, 10)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: seeds are distinct non-negative integers")
    return value


def target_name(text: str) -> str:
    """A target such as ``M5-72``, in its canonical spelling."""
    try:
        return str(Target.parse(text))
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# The options the project's command lines share, declared once: the selection (--targets, --seeds), the folders
# (--data-dir, --output-dir), the cluster profile, and the run options that make a configuration (--config,
# --set, --preset, --epochs, --device). Keyed by the name a run's parameters use (``args.<name>``); a parser
# adds the ones it takes with :func:`add_option`, with the same flag, type and metavar everywhere, and may
# give the default and help that are its own (``everest train`` reads EVEREST_DATA_DIR; a flow's help is its
# parameter's description).
@dataclass(frozen=True)
class Option:
    """One shared option: its flags and the ``add_argument`` keywords (default, help, type, ...)."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any]


OPTIONS: dict[str, Option] = {
    "targets": Option(("--targets",), {"nargs": "+", "type": target_name, "metavar": "TARGET",
                                       "default": [str(t) for t in all_targets()],
                                       "help": "targets such as C-24 M-48 M5-72 (default: all 9)"}),
    "seeds": Option(("--seeds",), {"nargs": "+", "type": seed_number, "metavar": "SEED",
                                   "default": list(DEFAULT_SEEDS), "help": "seeds (default 0 1 2 3 4)"}),
    "data_dir": Option(("--data-dir",), {"metavar": "DIR", "default": "data",
                                         "help": "folder of the SHARP CSV tables (default data)"}),
    "output_dir": Option(("--output-dir",), {"metavar": "DIR", "default": "output",
                                             "help": "output root: results, models, logs (default output)"}),
    "profile": Option(("--profile",), {"default": "local",
                                       "help": "cluster profile: local, pbs, slurm or a YAML file (default local)"}),
    "config_file": Option(("--config",), {"metavar": "FILE", "help": "TOML or YAML configuration file"}),
    "overrides": Option(("--set",), {"action": "append", "default": [], "metavar": "KEY=VALUE",
                                     "help": "configuration override, e.g. --set train.batch_size=256 (repeatable)"}),
    "preset": Option(("--preset",), {"choices": sorted(PRESETS), "default": "production",
                                     "help": "training budget: production (the design document's recipe) or demo "
                                     "(the same recipe, capped epochs)"}),
    "epochs": Option(("--epochs",), {"type": positive_int, "metavar": "N", "help": "epoch cap (train.epochs)"}),
    "device": Option(("--device",), {"help": "auto, cpu, cuda, cuda:N or mps (train.device)"}),
}


def add_option(p: argparse.ArgumentParser, name: str, **changes: Any) -> argparse.Action:
    """Add the shared option ``name`` of :data:`OPTIONS` (``args.<name>`` holds its value); ``changes`` replace
    its keywords, e.g. ``default=`` or ``help=``."""
    option = OPTIONS[name]
    return p.add_argument(*option.flags, dest=name, **(option.kwargs | changes))


def add_experiment_arguments(p: argparse.ArgumentParser, *, several: bool = False) -> None:
    """``--flare_class``/``--time_window``/``--seed`` or ``--array-index``: which experiment.

    With ``several``, ``--seed`` and ``--array-index`` take one or more values (a group of experiments,
    :func:`experiments_from_args`).
    """
    p.add_argument("--flare_class", "--flare-class", choices=["C", "M", "M5"], help="flare class")
    p.add_argument("--time_window", "--time-window", choices=["24", "48", "72"], help="horizon in hours")
    if several:
        p.add_argument("--seed", type=int, nargs="+", default=[0], metavar="SEED",
                       help="random seed (default 0); several train that target's seeds as one group")
        p.add_argument("--array-index", type=int, nargs="+", metavar="K",
                       help="1..45: target and seed from the design document's mapping; several train those "
                       "experiments as one group")
    else:
        p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        p.add_argument("--array-index", type=int, help="1..45: target and seed from the design document's mapping")


def experiments_from_args(args: argparse.Namespace) -> list[Experiment]:
    """The experiments that :func:`add_experiment_arguments` options name (one or more values each)."""
    indices = args.array_index if isinstance(args.array_index, list) else [args.array_index]
    seeds = args.seed if isinstance(args.seed, list) else [args.seed]
    if indices != [None]:
        experiments = [Experiment.from_array_index(k) for k in indices]
    elif args.flare_class and args.time_window:
        target = Target.parse(f"{args.flare_class}-{args.time_window}")
        experiments = [Experiment(target=target, seed=s) for s in seeds]
    else:
        raise ConfigError("give --flare_class and --time_window (and --seed), or --array-index K in 1..45")
    if twice := sorted({e.name for e in experiments if experiments.count(e) > 1}):
        raise ConfigError(f"experiments listed twice: {', '.join(twice)}; list each once")
    return experiments


def experiment_from_args(args: argparse.Namespace) -> Experiment:
    """The one :class:`~everest.config.Experiment` that :func:`add_experiment_arguments` options name."""
    (exp,) = experiments_from_args(args)
    return exp


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` and repeatable ``--set KEY=VALUE``."""
    add_option(p, "config_file")
    add_option(p, "overrides")


def add_run_arguments(p: argparse.ArgumentParser, *, preset_default: str | None = "production",
                      device: bool = True) -> None:
    """The options that make a run's configuration: ``--config``, ``--set``, ``--preset``, ``--epochs`` and
    (``device``) ``--device``; :func:`config_from_args` reads them."""
    add_config_arguments(p)
    help_ = OPTIONS["preset"].kwargs["help"]
    add_option(p, "preset", default=preset_default, help=help_ + ("" if preset_default else "; default: demo for "
                                                                "the embedded demo data, production with --data-dir"))
    add_option(p, "epochs")
    if device:
        add_option(p, "device")


def config_from_args(args: argparse.Namespace) -> EverestConfig:
    """The configuration that :func:`add_run_arguments` (or :func:`add_config_arguments`) options name."""
    return run_config(args.config_file, args.overrides, preset=getattr(args, "preset", None) or "production",
                      epochs=getattr(args, "epochs", None), device=getattr(args, "device", None))


# ---------------------------------------------------------------------- commands
def _result_line(exp: Experiment, res: dict[str, Any], output_dir: str | Path) -> str:
    from everest.results import experiment_dir

    m = res["test_metrics"]
    return (f"{exp.name}: test TSS {shown(m['tss'])} (threshold {res['threshold']['selected']:.4g} from "
            f"{res['threshold']['source']}), ROC AUC {shown(m['roc_auc'])}, Brier {m['brier']:.4f}; "
            f"results in {experiment_dir(output_dir, exp.name)}")


def _train(args: argparse.Namespace) -> int:
    """One experiment (its failure is the command's), or several as one group (:func:`_train_group`)."""
    from everest.io import check_writable_dir
    from everest.training.train import ProductionTrainer

    cfg = config_from_args(args)
    experiments = experiments_from_args(args)
    check_writable_dir(args.output_dir, "output folder")
    if len(experiments) > 1:
        return _train_group(experiments, cfg, args)
    (exp,) = experiments
    trainer = ProductionTrainer(exp, config=cfg, data_dir=args.data_dir, output_dir=args.output_dir, force=args.force)
    print(_result_line(exp, trainer.train(), args.output_dir))
    return 0


def _member_identity(exp: Experiment, cfg: EverestConfig, data_dir: str | Path) -> Identity | None:
    """The identity a failed member was trained under, or None when its data files cannot be hashed."""
    from everest.data.tables import data_file, file_hash
    from everest.results import identity_for

    try:
        files = [data_file(Path(data_dir), exp.target, split) for split in ("train", "test")]
        return identity_for(exp, cfg, {f.name: file_hash(f) for f in files})
    except OSError:
        return None


def _train_group(experiments: list[Experiment], cfg: EverestConfig, args: argparse.Namespace) -> int:
    """Train several experiments as one group and return the group's exit status.

    0 when every member finished. A member that failed alone gets its ``failure.json`` (error type and
    message, as the flow records them) and the status is its own (:func:`member_exit_status`); with
    several kinds, the first of :data:`MEMBER_EXIT_PRIORITY`. Anything else (time limit, SIGTERM, a
    crash) propagates for the whole group, after every member checkpointed, as for one experiment.
    """
    from everest.results import FAILURE_FILE, experiment_dir, record_failure
    from everest.training.group import train_group

    outcomes = train_group(experiments, config=cfg, data_dir=args.data_dir, output_dir=args.output_dir,
                           force=args.force)
    names = ", ".join(e.name for e in experiments)
    failed: list[int] = []
    for out in outcomes:
        if out.error is None:
            print(_result_line(out.experiment, out.results, args.output_dir))
            continue
        err = out.error
        status = member_exit_status(err)
        failed.append(status)
        record_failure(args.output_dir, out.experiment, type(err).__name__,
                       f"{err} (exit status {status}; trained in a group of {len(experiments)}: {names})",
                       _member_identity(out.experiment, cfg, args.data_dir))
        where = experiment_dir(args.output_dir, out.experiment.name) / FAILURE_FILE
        print(f"{out.experiment.name}: FAILED: {type(err).__name__}: {err}; recorded in {where}", file=sys.stderr)
    if not failed:
        return 0
    status = next(s for s in MEMBER_EXIT_PRIORITY if s in failed)
    print(f"error: {len(failed)} of {len(outcomes)} experiments of the group failed; exit status {status}",
          file=sys.stderr)
    return status


def _baselines(args: argparse.Namespace) -> None:
    from everest.results import experiment_dir
    from everest.scoring.baselines import BASELINES, baseline_root, fit_baseline

    experiment = experiment_from_args(args)
    cfg = config_from_args(args)
    for model in BASELINES if args.model == "all" else (args.model,):
        res = fit_baseline(model, experiment, cfg, args.data_dir, args.output_dir, force=args.force)
        m = res["test_metrics"]
        print(f"{model} {experiment.name}: test TSS {shown(m['tss'])} (threshold {res['threshold']['selected']:.4g}), "
              f"ROC AUC {shown(m['roc_auc'])}, Brier {m['brier']:.4f}, fitted in {res['training']['seconds']:.2f} s; "
              f"results in {experiment_dir(baseline_root(args.output_dir, model), experiment.name)}")


def _ensemble(args: argparse.Namespace) -> None:
    """Build the ensembles asked for and print one line each; no ensemble at all is an error."""
    from everest.results import experiment_dir
    from everest.scoring.ensemble import EnsembleError, build_ensembles, ensemble_root

    results_dir = Path(args.results_dir) if args.results_dir else Path(args.output_dir) / "results"
    targets = [Target.parse(t) for t in args.targets] if args.targets else None
    built = build_ensembles(results_dir, args.output_dir, targets)
    for t, res in built.items():
        if isinstance(res, dict):
            m = res["test_metrics"]
            print(f"{t}: ensemble of seeds {res['experiment']['members']}: test TSS {shown(m['tss'])} "
                  f"(threshold {res['threshold']['selected']:.4g}), Brier {m['brier']:.4f} (raw {m['brier_raw']:.4f})"
                  f"; results in {experiment_dir(ensemble_root(args.output_dir), res['experiment']['name'])}")
        elif targets:
            print(f"{t}: not built: {res}")
    if not any(isinstance(r, dict) for r in built.values()):
        raise EnsembleError(f"no ensemble could be built from {results_dir}: no target has two finished seeds of "
                            "one configuration" if not targets else
                            f"no ensemble could be built from {results_dir}")


def _bundle(args: argparse.Namespace) -> None:
    """Bundle a study's ensembles (every target that has one, or those asked for) into one verified folder."""
    from everest.serving.bundle import write_bundle

    summary = write_bundle(args.output_dir, args.out, [Target.parse(t) for t in args.targets] if args.targets
                           else None)
    for t in summary.targets:
        print(f"bundled {t}")
    for t, why in summary.skipped.items():
        print(f"{t}: left out: {why}")
    print(f"bundle: {summary.path} (forecast with `everest predict --bundle {summary.path} --input TABLE.csv`)")


def _predict(args: argparse.Namespace) -> None:
    """Forecast from a bundle; a table on the terminal, most probable first, or a CSV/JSON file."""
    from everest.serving.forecaster import Forecaster, check_output, read_input, terminal_table, write_forecasts

    out = check_output(args.out) if args.out else None  # before any work
    forecaster = Forecaster.load(args.bundle)
    forecasts = forecaster.predict(read_input(args.input), args.targets, args.all_times, args.model)
    if out is None:
        print(terminal_table(forecasts))
        return
    write_forecasts(forecasts, out, {"bundle": str(args.bundle), "input": str(args.input), "model": args.model})
    print(f"{len(forecasts)} forecast(s) of {len(forecasts[['noaa_ar', 'harpnum']].drop_duplicates())} region(s) x "
          f"{forecasts['target'].nunique()} target(s) written to {out}")


def _synth(args: argparse.Namespace) -> None:
    from everest.data import synthetic

    paths = synthetic.generate(args.out, size=args.size, seed=args.seed)
    print(f"wrote {len(paths)} SHARP tables ({args.size}, seed {args.seed}) and their truth sidecars to {args.out}")


def _import(args: argparse.Namespace) -> None:
    from everest.data.published import import_published, summary_text

    print(summary_text(import_published(args.source, args.src, args.out, args.fold, args.window)))


def _check(args: argparse.Namespace) -> None:
    """Summarise the targets whose files the folder holds; a DataError (exit EXIT_USAGE) if one is not ok."""
    from everest.data.check import check_folder

    cfg = config_from_args(args)
    check_folder(args.dir, cfg.data, cfg.model.seq_len, args.targets)


def _failure(args: argparse.Namespace) -> None:
    """Record a failed batch sub-job (``cluster/lib.sh`` calls this when training exits non-zero), one
    ``failure.json`` per experiment (a group's members at once)."""
    from everest.results import experiment_from_name, record_failure

    experiments = ([Experiment.from_array_index(k) for k in args.array_index] if args.array_index is not None
                   else [experiment_from_name(args.experiment)])
    for exp in experiments:
        record_failure(args.output_dir, exp, f"ExitStatus{args.status}", args.message)


def build_parser() -> argparse.ArgumentParser:
    from everest import __version__

    p = argparse.ArgumentParser(prog="everest", description="EVEREST production training.")
    p.add_argument("--version", action="version", version=f"everest {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    data_dir = os.environ.get("EVEREST_DATA_DIR", "data")
    output_dir = os.environ.get("EVEREST_OUTPUT_DIR", "output")

    train = sub.add_parser("train", help="train one experiment, or several as one group (one batched model)")
    add_experiment_arguments(train, several=True)
    add_option(train, "data_dir", default=data_dir, help="folder of the SHARP CSV tables (default $EVEREST_DATA_DIR "
               "or data)")
    add_option(train, "output_dir", default=output_dir, help="output root (default $EVEREST_OUTPUT_DIR or output)")
    add_run_arguments(train)
    train.add_argument("--force", action="store_true", help="retrain even if finished results exist")
    train.set_defaults(fn=_train)

    from everest.scoring.baselines import BASELINES

    base = sub.add_parser("baselines", help="fit simple baselines on the windows EVEREST sees, in its results "
                          "layout under <output-dir>/baselines/<model>/results")
    base.add_argument("--model", default="all", choices=[*BASELINES, "all"], help="baseline to fit (default all)")
    add_experiment_arguments(base)
    add_option(base, "data_dir")
    add_option(base, "output_dir")
    add_config_arguments(base)  # the experiment's data and threshold sections
    base.add_argument("--force", action="store_true", help="refit even if finished results exist")
    base.set_defaults(fn=_baselines)

    ensemble = sub.add_parser("ensemble", help="build the seed ensembles of a run's finished experiments")
    add_option(ensemble, "output_dir", help="the run's output root (default output)")
    ensemble.add_argument("--results-dir", help="EVEREST results root (default <output-dir>/results)")
    add_option(ensemble, "targets", default=None, help="targets to build (default every target with finished seeds)")
    ensemble.set_defaults(fn=_ensemble)

    bundle = sub.add_parser("bundle", help="bundle a study's trained ensembles, baselines and findings into one "
                            "verified folder (default <output-dir>/bundle)")
    add_option(bundle, "output_dir", help="the study's output root (default output)")
    bundle.add_argument("--out", help="bundle folder (default <output-dir>/bundle; an older bundle there is replaced)")
    add_option(bundle, "targets", default=None, help="targets to bundle (default every target with an ensemble)")
    bundle.set_defaults(fn=_bundle)

    predict = sub.add_parser("predict", help="forecast from a bundle for SHARP records in the tables' layout")
    predict.add_argument("--bundle", required=True, help="bundle folder (everest bundle)")
    predict.add_argument("--input", required=True, help="CSV table of SHARP records (the label column optional)")
    add_option(predict, "targets", default=None, help="targets to forecast (default every target in the bundle)")
    predict.add_argument("--all-times", action="store_true",
                         help="a forecast for every record (default: each region's latest record)")
    predict.add_argument("--model", default="ensemble", choices=["ensemble", "baseline", "best"],
                         help="the seed ensemble (default), the bundled baseline, or best: the one with the higher "
                         "validation TSS in the study")
    predict.add_argument("--out", help="write FILE.csv or FILE.json (default: a table on the terminal)")
    predict.set_defaults(fn=_predict)

    data = sub.add_parser("data", help="synthesise or inspect SHARP tables").add_subparsers(dest="data_cmd",
                                                                                         required=True)
    synth = data.add_parser("synth", help="write the 18 synthetic SHARP tables")
    synth.add_argument("--size", default="demo", help="tiny, demo, study or full (default demo)")
    synth.add_argument("--out", default="data", help="output folder (default data)")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(fn=_synth)
    imp = data.add_parser("import", help="turn published fold tables (Sun et al. 2022: SMARP or SHARP) into one "
                          "data folder per test fold")
    imp.add_argument("source", choices=["smarp", "sharp"], help="which tables: smarp (smarp_0.csv ..) or sharp")
    imp.add_argument("src", help="folder holding the fold tables")
    imp.add_argument("--out", required=True, help="output folder: fold_K/ for each test fold K")
    imp.add_argument("--fold", type=int, nargs="+", metavar="K", help="test fold(s) to write (default: every fold)")
    imp.add_argument("--window", type=int, metavar="N", help="records per window (model.seq_len, written to "
                     "everest.yaml; default the model's 10): a gap gets up to N-1 padding rows")
    imp.set_defaults(fn=_import)
    check = data.add_parser("check", help="per-target samples, positives, regions and the Bayes ceiling")
    check.add_argument("dir", help="folder holding the CSVs (all 18, or those of some targets)")
    add_config_arguments(check)  # the data section
    add_option(check, "targets", default=None,
               help="check only these targets, e.g. C-24 M-48 (then a missing file is an error)")
    check.set_defaults(fn=_check)

    results = sub.add_parser("results", help="experiment results on disk").add_subparsers(dest="results_cmd",
                                                                                        required=True)
    fail = results.add_parser("failure", help="write results/<experiment>/failure.json for a failed attempt")
    add_option(fail, "output_dir", default=None, required=True, help="output root (holds results/)")
    which = fail.add_mutually_exclusive_group(required=True)
    which.add_argument("--array-index", type=int, nargs="+", metavar="K",
                       help="1..45: the experiment(s) of these array indices")
    which.add_argument("--experiment", help="experiment name, e.g. everest_M5_72h_seed0")
    fail.add_argument("--status", required=True, type=int, help="the training's exit status")
    fail.add_argument("--message", required=True, help="what happened (clipped to 2000 characters)")
    fail.set_defaults(fn=_failure)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
