"""What a data folder holds and whether a run can use it: the per-target summary of ``everest data check``
and the preflight check of a run's experiments.

A folder may hold the files of only some targets: a target with neither of its two files is *absent* (not
an error unless it was asked for), one with a single file is an error naming the missing file, and a
malformed file is an error whose message (from :class:`~everest.data.DataError`) names the file, line and
column. A training table without positives, or whose validation split holds too few to choose a threshold,
is an error too; a test table without positives is a warning (its undefined metrics are reported as such).
One bad target does not hide the others' summaries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from everest.config import FLARE_CLASSES, HORIZONS, DataConfig, Experiment, Target, all_targets
from everest.data.samples import (
    SampleSet,
    check_learnable,
    learnable_folds,
    read_samples,
    require_positives,
    split_validation,
)
from everest.data.tables import data_file
from everest.errors import DataError
from everest.scoring import metrics as M

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
OK = "ok"
ABSENT = "absent"
WARNING = "warning: "  # the prefix of a status that does not stop a run
_COUNTS = ("samples", "positives", "rate", "regions")
COLUMNS = ("target", *(f"{s}_{c}" for s in SPLITS for c in _COUNTS), "val_positives")
CEILING_COLUMNS = ("ceiling_tss", "ceiling_auc", "ceiling_brier")
FILE_PATTERN = (f"training_data_<CLASS>_<HOURS>.csv and testing_data_<CLASS>_<HOURS>.csv "
                f"(CLASS in {', '.join(FLARE_CLASSES)}; HOURS in {', '.join(map(str, HORIZONS))}; "
                "e.g. training_data_M_24.csv)")


def summarise(data_dir: str | Path, cfg: DataConfig, seq_len: int,
              targets: Iterable[Target | str] | None = None) -> pd.DataFrame:
    """One row per target (all 9, or ``targets``) with sample counts of both files, the test ceiling given
    truth sidecars, and ``status``: ``"ok"``, ``"absent"`` (neither file; only when ``targets`` is None),
    ``"missing <file name>"`` or the data error of a malformed file.

    Raises DataError when the folder does not exist or holds no target's file at all.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        what = "is not a folder" if data_dir.exists() else "folder not found"
        raise DataError(f"{data_dir}: {what}; expected a folder of SHARP tables named {FILE_PATTERN}")
    if not any(data_file(data_dir, t, s).exists() for t in all_targets() for s in SPLITS):
        raise DataError(f"{data_dir}: no SHARP tables found in this folder; expected files named {FILE_PATTERN}")
    requested = targets is not None
    chosen = list(dict.fromkeys(Target.parse(t) for t in targets)) if requested else all_targets()
    rows = [_target_row(data_dir, t, cfg, seq_len, requested) for t in chosen]
    df = pd.DataFrame(rows)
    ceilings = [c for c in CEILING_COLUMNS if c in df]
    return df.reindex(columns=[*COLUMNS, *ceilings, "status"])


def _target_row(data_dir: Path, target: Target, cfg: DataConfig, seq_len: int, requested: bool) -> dict:
    """The summary row of one target; data errors become its status."""
    from everest.data.synthetic import load_truth, truth_path

    row: dict = {"target": str(target)}
    paths = {split: data_file(data_dir, target, split) for split in SPLITS}
    missing = [p.name for p in paths.values() if not p.exists()]
    if len(missing) == len(paths) and not requested:
        return {**row, "status": ABSENT}
    problems = [f"missing {' and '.join(missing)}"] if missing else []
    samples: dict[str, SampleSet] = {}
    for split, path in paths.items():
        if path.name in missing:
            continue
        try:
            s, _, _ = read_samples(path, target, cfg, seq_len, None)
        except DataError as err:
            problems.append(str(err))
            continue
        samples[split] = s
        row.update({f"{split}_samples": len(s), f"{split}_positives": s.n_positive,
                    f"{split}_rate": s.n_positive / len(s), f"{split}_regions": len(np.unique(s.region))})
        if split == "test" and truth_path(path).is_file():
            try:
                p = load_truth(path)[s.row]
            except (ValueError, IndexError) as err:  # an edited table no longer matches the generator's sidecar
                log.warning("no Bayes ceiling for %s: %s", target, err)
            else:
                with M.ignore_undefined():
                    row.update(ceiling_tss=M.max_tss(s.y, p), ceiling_auc=M.roc_auc(s.y, p),
                               ceiling_brier=M.brier(s.y, p))
    if "train" in samples:
        try:
            val = _learnable(paths["train"], samples["train"], cfg, seed=0)
            row["val_positives"] = val.n_positive
        except DataError as err:
            problems.append(str(err))
    if not problems and samples.get("test") is not None and samples["test"].n_positive == 0:
        return {**row, "status": f"{WARNING}{paths['test'].name} holds no positive samples: test TSS, recall, F1 "
                "and ROC AUC will be undefined"}
    row["status"] = "; ".join(problems) or OK
    return row


def _learnable(train_path: Path, train_all: SampleSet, cfg: DataConfig, seed: int) -> SampleSet:
    """The validation split a run of ``seed`` carves out of the training samples, once they proved learnable."""
    require_positives(train_path, train_all)
    _, val = split_validation(train_all, cfg, seed)
    check_learnable(train_path, train_all, val)
    return val


_CHECKED: set[tuple] = set()  # runs whose tables this process has already checked: (file digests, settings)


def check_experiments(data_dir: str | Path, experiments: Sequence[Experiment], cfg: DataConfig, seq_len: int,
                      cache_dir: Path | None = None) -> None:
    """Read and validate every table the experiments use, with the reader their training uses, before any work.

    Refuses (:class:`DataError`, every problem in one line) a missing or malformed table, a training table
    without positives, and a validation split (of each seed, when the split depends on it) with fewer than
    :data:`everest.data.MIN_VALIDATION_POSITIVES` positives. The cost stays proportional: each table is read
    once, the samples built from it go to ``cache_dir`` (the cache training reads, keyed by content) only once
    every table proved valid, and a process checks the same content and settings once.
    """
    data_dir = Path(data_dir)
    seeds: dict[Target, list[int]] = {}
    for e in experiments:
        seeds.setdefault(e.target, []).append(e.seed)
    problems: list[str] = []
    saves: list[Callable[[], None]] = []
    for target, target_seeds in seeds.items():
        paths = [data_file(data_dir, target, split) for split in SPLITS]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            problems.append(f"{target}: data file(s) not found in {data_dir}: {', '.join(missing)}")
            continue
        split_seeds = target_seeds if cfg.split_seed is None else [cfg.split_seed]
        try:
            loaded = [read_samples(p, target, cfg, seq_len, cache_dir) for p in paths]
            key = (str(target), loaded[0][1], loaded[1][1], cfg.model_dump_json(), seq_len, tuple(split_seeds))
            if key not in _CHECKED:
                for seed in split_seeds:
                    _learnable(paths[0], loaded[0][0], cfg, seed)
        except DataError as err:
            problems.append(str(err))
            continue
        saves += [save for _, _, save in loaded]
        _CHECKED.add(key)
    if problems:
        raise DataError("; ".join(problems))
    for save in saves:
        save()


def check_training_folds(data_dir: str | Path, targets: Sequence[Target], cfg: DataConfig, seq_len: int,
                         folds: int, seed: int) -> None:
    """Tuning's preflight: each target's training table (the only one tuning opens), read by the same reader,
    must have positives and every region fold's validation part enough to score a threshold on."""
    problems = []
    for target in targets:
        path = data_file(Path(data_dir), target, "train")
        try:
            samples, _, _ = read_samples(path, target, cfg, seq_len, None)
            learnable_folds(path, samples, folds, seed, cfg)
        except DataError as err:
            problems.append(str(err))
    if problems:
        raise DataError("; ".join(problems))


def _cell(column: str, value: object) -> str:
    if pd.isna(value):
        return "-"
    if column.endswith("_rate"):
        return f"{100 * value:.2f}%"
    if column in CEILING_COLUMNS:
        return f"{value:.3f}"
    return str(int(value))


def format_summary(df: pd.DataFrame) -> str:
    """A fixed-width table for the terminal of the targets that were checked (absent ones left out)."""
    shown = df[df["status"] != ABSENT]
    if shown.empty:
        return "(no target was checked)"
    out = pd.DataFrame({c: [_cell(c, v) for v in shown[c]] if c != "target" else list(shown[c])
                        for c in df.columns if c != "status"})
    lines = out.to_string(index=False).split("\n")
    status = ["status", *shown["status"]]  # left-aligned, last: error messages are long
    return "\n".join(f"{line}  {s}" for line, s in zip(lines, status, strict=True))


def _usable(status: pd.Series) -> pd.Series:
    """Statuses that do not stop a run: ok, absent, or a warning."""
    return status.isin([OK, ABSENT]) | status.str.startswith(WARNING)


def problems(df: pd.DataFrame) -> list[str]:
    """``"<target>: <status>"`` for every target that was checked and cannot be used by a run."""
    bad = df[~_usable(df["status"])]
    return [f"{t}: {s}" for t, s in zip(bad["target"], bad["status"], strict=True)]


def summary_line(df: pd.DataFrame) -> str:
    """One line: how many targets are present and readable, which have warnings or errors, which are absent."""
    n_ok = int(((df["status"] == OK) | df["status"].str.startswith(WARNING)).sum())
    parts = [f"{n_ok} of {len(df)} target{'s' if len(df) != 1 else ''} present and readable"]
    warned = df.loc[df["status"].str.startswith(WARNING), "target"]
    if len(warned):
        parts.append(f"with warnings: {', '.join(warned)}")
    bad = df.loc[~_usable(df["status"]), "target"]
    if len(bad):
        parts.append(f"with errors: {', '.join(bad)}")
    absent = df.loc[df["status"] == ABSENT, "target"]
    if len(absent):
        parts.append(f"absent: {', '.join(absent)}")
    return "; ".join(parts)


def check_folder(data_dir: str | Path, cfg: DataConfig, seq_len: int,
                 targets: Iterable[Target | str] | None = None) -> pd.DataFrame:
    """Print the table and the summary line; raise DataError if a checked target is not ok."""
    df = summarise(data_dir, cfg, seq_len, targets)
    print(format_summary(df))
    print(summary_line(df), flush=True)
    if bad := problems(df):
        raise DataError(f"{data_dir}: {len(bad)} of {int((df['status'] != ABSENT).sum())} checked target(s) "
                        "failed: " + "; ".join(bad))
    return df
