"""The ``everest`` command: ``data synth``, ``data check``, ``train`` and ``ensemble``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from everest.config import ConfigError

log = logging.getLogger("everest")

EXIT_USAGE = 2  # bad configuration, arguments or input data: nothing to retry
EXIT_DIVERGED = 3  # training diverged (NaN/inf loss)
EXIT_TIME_LIMIT = 4  # time limit or SIGTERM: checkpointed; rerun to resume
EXIT_IO = 5  # the file system refused a read or write (full disk, permissions, quota)


def setup_logging(level: int = logging.INFO) -> None:
    """Plain timestamped log lines on stderr for the ``everest`` loggers."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")


def run_guarded(fn: Callable[[], Any]) -> int:
    """Run a command; known failures become one clear line on stderr and a non-zero exit status."""
    from everest.data import DataError
    from everest.errors import TimeLimitReached, TrainingDiverged

    setup_logging()
    try:
        fn()
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
        return 130
    except OSError as err:  # after the specific errors: a full disk or a permission problem, not a bug
        where = f" {err.filename}" if err.filename else ""
        print(f"error: cannot read or write{where}: {err.strerror or err}; files written before are intact "
              "(every output is written to a temporary file and renamed)", file=sys.stderr)
        return EXIT_IO
    return 0


def _synth(args: argparse.Namespace) -> None:
    from everest import synthetic

    paths = synthetic.generate(args.out, size=args.size, seed=args.seed)
    print(f"wrote {len(paths)} SHARP tables ({args.size}, seed {args.seed}) and their truth sidecars to {args.out}")


def _check(args: argparse.Namespace) -> None:
    """Summarise the targets whose files the folder holds; a DataError (exit EXIT_USAGE) if one is not ok."""
    from everest.config import load_config
    from everest.datacheck import check_folder

    cfg = load_config(args.config, list(args.set))
    check_folder(args.dir, cfg.data, cfg.model.seq_len, args.targets)


def add_experiment_arguments(p: argparse.ArgumentParser) -> None:
    """``--flare_class``/``--time_window``/``--seed`` or ``--array-index``: which experiment."""
    p.add_argument("--flare_class", "--flare-class", choices=["C", "M", "M5"], help="flare class")
    p.add_argument("--time_window", "--time-window", choices=["24", "48", "72"], help="horizon in hours")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--array-index", type=int, help="1..45: target and seed from the design document's mapping")


def experiment_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~everest.config.Experiment` that :func:`add_experiment_arguments` options name."""
    from everest.config import Experiment, Target

    if args.array_index is not None:
        return Experiment.from_array_index(args.array_index)
    if args.flare_class and args.time_window:
        return Experiment(target=Target.parse(f"{args.flare_class}-{args.time_window}"), seed=args.seed)
    raise ConfigError("give --flare_class and --time_window (and --seed), or --array-index K in 1..45")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m everest.train`` and ``everest train``."""
    add_experiment_arguments(p)
    p.add_argument("--data-dir", default=os.environ.get("EVEREST_DATA_DIR", "data"), help="folder of the 18 CSVs")
    p.add_argument("--output-dir", default=os.environ.get("EVEREST_OUTPUT_DIR", "output"), help="output root")
    p.add_argument("--config", help="TOML or YAML configuration file")
    p.add_argument("--preset", default="production", choices=["production", "demo"],
                   help="training budget: production (design document) or demo (capped epochs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="configuration override, e.g. --set train.batch_size=256 (repeatable)")
    p.add_argument("--epochs", type=int, help="epoch cap (train.epochs)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (train.device)")
    p.add_argument("--force", action="store_true", help="retrain even if finished results exist")


def _train(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the arguments, build the configuration and train one experiment."""
    from everest.config import load_config
    from everest.train import ProductionTrainer

    overrides = list(args.set)
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.device is not None:
        overrides.append(f"train.device={args.device}")
    cfg = load_config(args.config, overrides, preset=args.preset)
    exp = experiment_from_args(args)
    trainer = ProductionTrainer(exp.target.flare_class, exp.target.horizon, exp.seed, config=cfg,
                                data_dir=args.data_dir, output_dir=args.output_dir, force=args.force)
    res = trainer.train()
    m = res["test_metrics"]
    print(f"{exp.name}: test TSS {m['tss']:.3f} (threshold {res['threshold']['selected']:.4g} from "
          f"{res['threshold']['source']}), ROC AUC {m['roc_auc']:.3f}, Brier {m['brier']:.4f}; "
          f"results in {trainer.results_dir}")
    return res


def train_main(argv: list[str] | None = None) -> int:
    """``python -m everest.train``: train one experiment."""
    p = argparse.ArgumentParser(prog="python -m everest.train", description="Train one EVEREST experiment.")
    add_train_arguments(p)
    return run_guarded(lambda: _train(p.parse_args(argv)))


def build_parser() -> argparse.ArgumentParser:
    from everest import __version__

    p = argparse.ArgumentParser(prog="everest", description="EVEREST production training.")
    p.add_argument("--version", action="version", version=f"everest {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="synthesise or inspect SHARP tables").add_subparsers(dest="data_cmd",
                                                                                         required=True)
    synth = data.add_parser("synth", help="write the 18 synthetic SHARP tables")
    synth.add_argument("--size", default="demo", help="tiny, demo, study or full (default demo)")
    synth.add_argument("--out", default="data", help="output folder (default data)")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(fn=_synth)
    check = data.add_parser("check", help="per-target samples, positives, regions and the Bayes ceiling")
    check.add_argument("dir", help="folder holding the CSVs (all 18, or those of some targets)")
    check.add_argument("--config", help="TOML or YAML configuration (data section)")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="configuration override, e.g. --set data.features='[\"USFLUX\",\"R_VALUE\"]' (repeatable)")
    check.add_argument("--targets", nargs="+", metavar="TARGET",
                       help="check only these targets, e.g. C-24 M-48 (then a missing file is an error)")
    check.set_defaults(fn=_check)

    train = sub.add_parser("train", help="train one experiment")
    add_train_arguments(train)
    train.set_defaults(fn=_train)

    from everest.ensemble import add_ensemble_arguments, run_ensemble

    ensemble = sub.add_parser("ensemble", help="build the seed ensembles of a run's finished experiments")
    add_ensemble_arguments(ensemble)
    ensemble.set_defaults(fn=run_ensemble)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
