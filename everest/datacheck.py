"""Per-target summary of a data folder: samples, positives, regions, the Bayes ceiling when known, and a status.

A folder may hold the files of only some targets: a target with neither of its two files is *absent* (not
an error unless it was asked for), one with a single file is an error naming the missing file, and a
malformed file is an error whose message (from :class:`~everest.data.DataError`) names the file, line and
column. One bad target does not hide the others' summaries.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from everest import metrics as M
from everest.config import FLARE_CLASSES, HORIZONS, DataConfig, Target, all_targets
from everest.data import DataError, data_file, load_samples

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
OK = "ok"
ABSENT = "absent"
_COUNTS = ("samples", "positives", "rate", "regions")
COLUMNS = ("target", *(f"{s}_{c}" for s in SPLITS for c in _COUNTS))
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
    from everest.synthetic import load_truth, truth_path

    row: dict = {"target": str(target)}
    paths = {split: data_file(data_dir, target, split) for split in SPLITS}
    missing = [p.name for p in paths.values() if not p.exists()]
    if len(missing) == len(paths) and not requested:
        return {**row, "status": ABSENT}
    problems = [f"missing {' and '.join(missing)}"] if missing else []
    for split, path in paths.items():
        if path.name in missing:
            continue
        try:
            s, _ = load_samples(path, target, cfg, seq_len)
        except DataError as err:
            problems.append(str(err))
            continue
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
    row["status"] = "; ".join(problems) or OK
    return row


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


def problems(df: pd.DataFrame) -> list[str]:
    """``"<target>: <status>"`` for every target that was checked and is not ok."""
    bad = df[~df["status"].isin([OK, ABSENT])]
    return [f"{t}: {s}" for t, s in zip(bad["target"], bad["status"], strict=True)]


def summary_line(df: pd.DataFrame) -> str:
    """One line: how many targets are present and readable, which have problems, which are absent."""
    n_ok = int((df["status"] == OK).sum())
    parts = [f"{n_ok} of {len(df)} target{'s' if len(df) != 1 else ''} present and readable"]
    bad = df.loc[~df["status"].isin([OK, ABSENT]), "target"]
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
