"""``python -m everest.analysis``: analyse a results root into a report, CSVs and plots."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from everest.analysis.analyzer import ProductionAnalyzer
from everest.analysis.loading import AnalysisError
from everest.cli import add_option
from everest.config import ConfigError
from everest.errors import EXIT_FAILED, EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (defaults: output/results in, its parent folder out)."""
    p = argparse.ArgumentParser(prog="python -m everest.analysis", description=__doc__)
    p.add_argument("--results-dir", default="output/results", type=Path,
                   help="folder holding the everest_<class>_<horizon>h_seed<k> folders (default: output/results)")
    p.add_argument("--out", default=None, type=Path,
                   help="writes OUT/analysis and OUT/plots (default: the parent of --results-dir)")
    p.add_argument("--bootstrap", default=10_000, type=int, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", default=0, type=int, help="random seed of the bootstrap (default 0)")
    p.add_argument("--confidence", default=0.95, type=float, help="confidence level of intervals (default 0.95)")
    add_option(p, "targets", default=None, help="expected targets, e.g. C-24 M5-72 (default: all 9)")
    add_option(p, "seeds", default=None, help="expected seeds (default: 0 1 2 3 4)")
    p.add_argument("--baseline", default=None, type=Path,
                   help="a baseline results root to compare with (paired on seeds and test samples)")
    p.add_argument("--baseline-model", action="append", default=[], metavar="NAME=DIR",
                   help="a simple baseline's results root for the verdict (repeatable); every "
                        "OUT/baselines/<model>/results is found without it")
    p.add_argument("--no-plots", action="store_true", help="skip the figures")
    return p


def _name_dir(item: str) -> tuple[str, Path]:
    name, sep, folder = item.partition("=")
    if not sep or not name or not folder:
        raise ConfigError(f"--baseline-model takes NAME=DIR (e.g. logistic=output/baselines/logistic/results), "
                          f"got {item!r}")
    return name, Path(folder)


def main(argv: list[str] | None = None) -> int:
    """Run the analysis; exit 0 on success, 1 if nothing had finished, 2 on bad input."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        models = dict(_name_dir(item) for item in args.baseline_model)
        summary = ProductionAnalyzer(
            args.results_dir, args.out, targets=args.targets, seeds=args.seeds, n_bootstrap=args.bootstrap,
            seed=args.seed, confidence=args.confidence, baseline_dir=args.baseline, baseline_dirs=models,
            make_plots=not args.no_plots,
        ).run_complete_analysis()
    except (ConfigError, AnalysisError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    stale = f", {summary.n_stale} stale" if summary.n_stale else ""
    print(f"{summary.n_completed}/{summary.n_expected} experiments analysed ({summary.n_failed} failed, "
          f"{summary.n_missing} missing{stale}) in {summary.seconds:.1f} s; report: {summary.report}")
    return 0 if summary.n_completed else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
