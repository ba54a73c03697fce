"""Validate a batch submission and list the experiments it trains (used by the submit_jobs.sh scripts).

Prints one line per experiment, ``<array index 1..45><TAB><experiment name><TAB><sub-job>``, in array-index
order (target-major, seeds inner); prints nothing when every selected experiment has already finished and
``--unfinished`` was given. ``--group-width W`` (default 1, at most 45) trains W experiments per sub-job as one
group: the list is cut into groups of W (:func:`everest.config.experiment_groups`, as the flow cuts its tasks),
so there are ``ceil(n / W)`` sub-jobs and sub-job k (1-based) trains positions ``(k-1)*W .. k*W-1``.
``--slot K --group-width W`` prints the experiment indices of sub-job K of the whole study instead (an array
submitted by hand, without an index list), or nothing after the last group.
Every problem with the values is reported at once on stderr, and the exit status is then 2 (nothing may
be submitted); a malformed option (``--epochs abc``) stops argument parsing first, also with status 2. The
tables of the selected experiments are read and validated as the trainer reads them (a table without
positives, or too few to choose a threshold on, is refused here rather than in a job).

The selection is the grid ``--targets`` x ``--seeds`` (default: all 9 targets x seeds 0-4), narrowed
by ``--indices`` (which must lie inside the grid) and, with ``--unfinished``, by dropping experiments
whose results under ``--output-dir`` are finished with this configuration, data and code version.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import Any

from everest import results
from everest.cli import add_option, add_run_arguments, config_from_args, seed_number, target_name
from everest.config import (
    DEFAULT_SEEDS,
    N_EXPERIMENTS,
    Experiment,
    Target,
    check_group_width,
    experiment_groups,
    experiment_matrix,
)
from everest.data.check import check_experiments
from everest.data.tables import data_file, file_hash
from everest.errors import EXIT_USAGE, ConfigError, DataError


def collecting(check: Callable[[str], Any], option: str, errors: list[str]) -> Callable[[str], Any]:
    """An argument type that checks each value with ``check`` (the shared option's own type) but records a bad
    one in ``errors`` instead of stopping the parse, so every problem is reported at once."""
    def convert(text: str) -> Any:
        try:
            return check(text)
        except argparse.ArgumentTypeError as err:
            errors.append(f"{option}: {err}")
            return None
    return convert


def build_parser(errors: list[str]) -> argparse.ArgumentParser:
    """The planner's options; bad targets and seeds go to ``errors`` (all reported together)."""
    p = argparse.ArgumentParser(prog="cluster/plan.py", description=__doc__)
    add_option(p, "targets", type=collecting(target_name, "--targets", errors))
    add_option(p, "seeds", type=collecting(seed_number, "--seeds", errors))
    p.add_argument("--indices", nargs="+", default=[])
    p.add_argument("--unfinished", action="store_true")
    p.add_argument("--group-width", default="1", help="experiments per sub-job, trained as one group (default 1)")
    p.add_argument("--slot", type=int, help="print the experiment indices of this sub-job of the whole study")
    add_option(p, "output_dir", default=None)
    add_option(p, "data_dir", default=None)
    add_run_arguments(p)
    p.add_argument("--missing-data-ok", action="store_true", help="report missing data files as a warning")
    return p


def _int_or_error(text: str, what: str, errors: list[str]) -> int | None:
    try:
        return int(text, 10)
    except ValueError:
        errors.append(f"invalid {what} {text!r}: expected an integer")
        return None


def group_width(text: str, errors: list[str]) -> int:
    """The group width W (:func:`everest.config.check_group_width`); 1 after an error, which goes to ``errors``."""
    try:
        return check_group_width(int(text) if re.fullmatch(r"[0-9]{1,6}", text) else None)
    except ConfigError as err:
        errors.append(f"invalid group width {text!r} (--group-width or EVEREST_GROUP_WIDTH): {err}")
        return 1


def plan(args: argparse.Namespace, errors: list[str]) -> tuple[list[Experiment], list[str], list[str]]:
    """(experiments to train, errors, warnings); ``errors`` holds those found while parsing."""
    warnings: list[str] = []
    group_width(args.group_width, errors)
    for option in ("output_dir", "data_dir"):
        if getattr(args, option) is None:
            errors.append(f"--{option.replace('_', '-')} is required")
    if errors and (args.output_dir is None or args.data_dir is None):
        return [], errors, warnings

    targets: list[Target] = []
    for text in args.targets:
        if text is not None and (t := Target.parse(text)) not in targets:
            targets.append(t)

    seeds: list[int] = []
    for s in args.seeds:
        if s is None:
            continue
        if s not in DEFAULT_SEEDS:
            errors.append(f"--seeds: seed {s} has no array index: the 1..45 mapping covers seeds "
                          f"{DEFAULT_SEEDS[0]}-{DEFAULT_SEEDS[-1]}")
        elif s not in seeds:
            seeds.append(s)

    grid = {Experiment(target=t, seed=s).array_index for t in targets for s in seeds}
    chosen = set(grid)
    if args.indices:
        chosen = set()
        for text in args.indices:
            k = _int_or_error(text, "array index", errors)
            if k is None:
                continue
            try:
                exp = Experiment.from_array_index(k)
            except ConfigError as err:
                errors.append(f"--indices: {err}")
                continue
            if k not in grid:
                errors.append(f"--indices: {k} ({exp}) is outside the --targets/--seeds selection")
            chosen.add(k)

    for item in args.overrides:
        if "\n" in item or "\r" in item:
            errors.append(f"invalid --set {item!r}: line breaks are not allowed")
    cfg = None
    if not errors:
        try:
            cfg = config_from_args(args)
        except ConfigError as err:
            errors.append(f"configuration: {err}")

    experiments = [Experiment.from_array_index(k) for k in sorted(chosen)]
    missing = sorted({str(data_file(args.data_dir, e.target, split)) for e in experiments
                      for split in ("train", "test") if not data_file(args.data_dir, e.target, split).is_file()})
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        msg = f"--data-dir: {len(missing)} data file(s) not found: {shown}"
        if args.missing_data_ok:
            msg += " (a real submission stops here)"
        (warnings if args.missing_data_ok else errors).append(msg)

    if cfg is not None and not missing:
        # Every table read and validated by the trainer's reader (columns, values, labels, positives) here, on
        # the login node, instead of inside a job after it queued for a GPU. Nothing is written: the submission
        # may still be refused for another reason.
        try:
            check_experiments(args.data_dir, experiments, cfg.data, cfg.model.seq_len)
        except DataError as err:
            errors.append(f"--data-dir: {err}")

    if args.unfinished and cfg is not None and not missing and not errors:
        # Finished means results on disk with this configuration, data and code version: anything else reruns.
        hashes = {t: {data_file(args.data_dir, t, s).name: file_hash(data_file(args.data_dir, t, s))
                      for s in ("train", "test")} for t in {e.target for e in experiments}}
        experiments = [e for e in experiments
                       if results.finished(args.output_dir, results.identity_for(e, cfg, hashes[e.target])) is None]
    return experiments, errors, warnings


def slot_indices(slot: int, width: int) -> list[int]:
    """The experiment indices that sub-job ``slot`` (1-based) trains when the whole study is cut into groups of
    ``width``; none after the last group."""
    groups = experiment_groups(experiment_matrix(), width)
    return [e.array_index for e in groups[slot - 1]] if 1 <= slot <= len(groups) else []


def _print_slot(slot: int, width_text: str) -> int:
    """``--slot``: the indices of one sub-job of the whole study, or why there are none."""
    errors: list[str] = [] if slot >= 1 else [f"invalid array slot {slot}: slots count from 1"]
    width = group_width(width_text, errors)
    if errors:
        print(f"everest: error: {errors[0]}", file=sys.stderr)
        return EXIT_USAGE
    indices = slot_indices(slot, width)
    if not indices:
        n = len(experiment_groups(experiment_matrix(), width))
        print(f"everest: array slot {slot} is past the last group: the {N_EXPERIMENTS} experiments in groups of "
              f"{width} need slots 1-{n}; nothing to train", file=sys.stderr)
    print(*indices)
    return 0


def main(argv: list[str] | None = None) -> int:
    errors: list[str] = []
    args = build_parser(errors).parse_args(argv)
    if args.slot is not None:
        return _print_slot(args.slot, args.group_width)
    experiments, errors, warnings = plan(args, errors)
    for w in warnings:
        print(f"everest: warning: {w}", file=sys.stderr)
    if errors:
        for e in errors:
            print(f"everest: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    for k, group in enumerate(experiment_groups(experiments, group_width(args.group_width, [])), start=1):
        for e in group:
            print(f"{e.array_index}\t{e.name}\t{k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
