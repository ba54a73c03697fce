"""Validate a batch submission and list the experiments it trains (used by the submit_jobs.sh scripts).

Prints one line per experiment, ``<array index 1..45><TAB><experiment name><TAB><sub-job>``, in array-index
order (target-major, seeds inner); prints nothing when every selected experiment has already finished and
``--unfinished`` was given. ``--group-width W`` (default 1) trains W experiments per sub-job as one group:
the experiment at position p (0-based) of the list goes to sub-job ``p // W + 1``, so there are
``ceil(n / W)`` sub-jobs and sub-job k (1-based) trains positions ``(k-1)*W .. k*W-1``.
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
from pathlib import Path

from everest import results
from everest.cli import add_run_arguments, config_from_args
from everest.config import DEFAULT_SEEDS, Experiment, Target, all_targets
from everest.data.check import check_experiments
from everest.data.tables import data_file, file_hash
from everest.errors import ConfigError, DataError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cluster/plan.py", description=__doc__)
    p.add_argument("--targets", nargs="+", default=[])
    p.add_argument("--seeds", nargs="+", default=[])
    p.add_argument("--indices", nargs="+", default=[])
    p.add_argument("--unfinished", action="store_true")
    p.add_argument("--group-width", default="1", help="experiments per sub-job, trained as one group (default 1)")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True)
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
    """The group width W, a positive integer; 1 after an error, which goes to ``errors``."""
    width = int(text) if re.fullmatch(r"[0-9]{1,6}", text) else 0
    if width < 1:
        errors.append(f"invalid group width {text!r} (--group-width or EVEREST_GROUP_WIDTH): "
                      "expected a positive integer")
    return max(width, 1)


def plan(args: argparse.Namespace) -> tuple[list[Experiment], list[str], list[str]]:
    """(experiments to train, errors, warnings)."""
    errors: list[str] = []
    warnings: list[str] = []
    group_width(args.group_width, errors)

    targets: list[Target] = []
    for text in args.targets or [str(t) for t in all_targets()]:
        try:
            t = Target.parse(text)
        except ConfigError as err:
            errors.append(f"--targets: {err}")
            continue
        if t not in targets:
            targets.append(t)

    seeds: list[int] = []
    for text in args.seeds or [str(s) for s in DEFAULT_SEEDS]:
        s = _int_or_error(text, "seed", errors)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    experiments, errors, warnings = plan(args)
    width = group_width(args.group_width, [])
    for w in warnings:
        print(f"everest: warning: {w}", file=sys.stderr)
    if errors:
        for e in errors:
            print(f"everest: error: {e}", file=sys.stderr)
        return 2
    for position, e in enumerate(experiments):
        print(f"{e.array_index}\t{e.name}\t{position // width + 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
