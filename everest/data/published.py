"""The published sample tables of Sun et al. (2022, ApJ 931:163) -> the project's tables, one folder per fold.

The source (``smarp_0.csv`` .. ``smarp_4.csv``, or ``sharp_*.csv`` of the same layout) holds one file per
region-disjoint fold and one row per record of an active-region patch (TARP for SMARP, HARP for SHARP):
``prefix, arpnum, t_start, t_end, label, flares, FLARE_INDEX`` and the magnetic features (``AREA, USFLUX,
MEANGBZ, R_VALUE``). A row's features are the patch's record at ``t_end``; ``flares`` lists the GOES classes
of the flares that start in the 24 hours after ``t_end`` and ``label`` says whether one is of class M or
above. So the source supports three targets: C-24, M-24 (its own label) and M5-24 (from ``flares``).

Import keeps the source's cadence: each row becomes one record at ``t_end``, and a gap in a patch's records
becomes ``padding`` rows (history that holds nothing, never a sample), as many as one window can reach, so a
window spans the real time it claims. ``FLARE_INDEX`` (past flaring) is not imported: EVEREST's features are
magnetic only. The source's ``train.csv``/``test.csv`` are class-balanced subsamples of the folds and are not
read.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from everest import io
from everest.config import EXTENSIVE_FEATURES, ModelConfig, Target
from everest.data.samples import cadence_and_gaps
from everest.data.tables import (
    LABEL_COLUMN,
    MAX_ABS_VALUE,
    MAX_REGION,
    TIME_COLUMN,
    CsvSource,
    check_runs,
    data_file,
    file_hash,
    open_csv,
    read_columns,
    require_once,
    show_cell,
)
from everest.errors import DataError

SOURCES = ("smarp", "sharp")
REGION = "arpnum"
TIME = "t_end"
LABEL = "label"
FLARES = "flares"
META = ("prefix", REGION, "t_start", TIME, LABEL, FLARES, "FLARE_INDEX")  # every other column is a feature
TARGETS: tuple[Target, ...] = tuple(Target.parse(t) for t in ("C-24", "M-24", "M5-24"))
REGION_COLUMN = "HARPNUM"  # the patch number keys the imported tables: the source has no NOAA number
# Extensive features, put through a signed log10 before standardising (AREA is the patch's area).
LOG_FEATURES = frozenset({*EXTENSIVE_FEATURES, "AREA"})
CONFIG_NAME = "everest.yaml"
RECORD_NAME = "import.json"
_GOES = re.compile(r"[ABCMX]\d+(\.\d*)?")
_TRUE, _FALSE = ("true", "1"), ("false", "0")
OUT_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


@dataclass(frozen=True)
class Fold:
    """One source file, validated: its records in file order."""

    path: Path
    index: int
    region: np.ndarray  # (R,) int64 patch number
    time: np.ndarray  # (R,) datetime64[s] record time (t_end)
    label: np.ndarray  # (R,) bool, the source's >= M label
    flares: list[str]  # (R,) GOES classes of the flares in the 24 h after the record
    features: pd.DataFrame  # (R, F) float64
    line: np.ndarray  # (R,) each row's line in the file, as a text editor numbers lines


@dataclass(frozen=True)
class ImportSummary:
    """What an import wrote: one folder per test fold, and every row's fate."""

    folders: list[Path]
    rows_read: int
    cadence_minutes: float
    counts: dict[str, dict]  # per folder: its import.json record


def fold_files(src: Path, name: str) -> list[Path]:
    """The fold files ``<name>_0.csv`` .. of a source folder, in fold order."""
    if not src.is_dir():
        what = "is not a folder" if src.exists() else "folder not found"
        raise DataError(f"{src}: {what}; expected the folder of published fold tables ({name}_0.csv ..)")
    files = sorted((p for p in src.glob(f"{name}_*.csv") if p.stem.split("_")[-1].isdigit()),
                   key=lambda p: int(p.stem.split("_")[-1]))
    if not files:
        others = sorted(p.name for p in src.glob("*.csv"))[:10]
        raise DataError(f"{src}: no {name} fold tables ({name}_0.csv ..); the folder holds {others or 'no CSV'}")
    numbers = [int(p.stem.split("_")[-1]) for p in files]
    if numbers != list(range(len(files))) or len(files) < 2:
        raise DataError(f"{src}: fold tables {[p.name for p in files]}; expected {name}_0.csv .. {name}_<K-1>.csv, "
                        "at least two, numbered without a gap")
    return files


def _bad(src: CsvSource, mask: np.ndarray, column: str, expected: str) -> DataError:
    raw = src.cell(int(np.flatnonzero(mask)[0]), column)
    return DataError(f"{src.path}: column {column!r} holds {show_cell(raw)} at {src.where(mask)}; expected {expected}")


def read_fold(path: Path, index: int) -> Fold:
    """Read and validate one fold file; every error names the file, line, column and value."""
    src, _ = open_csv(path, (REGION, TIME, LABEL, FLARES))
    features = list(dict.fromkeys(c for c in src.header if c not in META))
    if not features:
        raise DataError(f"{path}: no feature columns besides {list(META)}; expected magnetic features such as "
                        "USFLUX")
    require_once(src, features)
    df = read_columns(src, [REGION, TIME, LABEL, FLARES, *features], text=(TIME, LABEL, FLARES))

    region = pd.to_numeric(df[REGION], errors="coerce").to_numpy(np.float64)
    if (wrong := ~((region >= 0) & (region <= MAX_REGION) & (region == np.round(region)))).any():
        raise _bad(src, wrong, REGION, f"an active-region patch number (a whole number from 0 to {MAX_REGION})")
    time = pd.to_datetime(df[TIME], errors="coerce", format="ISO8601", utc=True)
    if (wrong := time.isna().to_numpy()).any():
        raise _bad(src, wrong, TIME, "an ISO 8601 time such as 2000-12-05 19:12:00")
    text = df[LABEL].fillna("").str.strip().str.lower()
    if (wrong := ~text.isin(_TRUE + _FALSE).to_numpy()).any():
        raise _bad(src, wrong, LABEL, "True or False (a flare of class M or above in the 24 h after t_end)")
    label = text.isin(_TRUE).to_numpy()
    flares = df[FLARES].fillna("").str.strip().tolist()
    classes = [[c for c in f.split("|") if c] for f in flares]
    if (wrong := np.array([not all(_GOES.fullmatch(c) for c in cs) for cs in classes])).any():
        raise _bad(src, wrong, FLARES, "GOES classes such as C2.5 or M1.0, separated by '|' (or nothing)")
    if (wrong := label != np.array([any(c[0] in "MX" for c in cs) for cs in classes])).any():
        flares_cell = show_cell(src.cell(int(np.flatnonzero(wrong)[0]), FLARES))
        raise _bad(src, wrong, LABEL, f"the label its flares cell {flares_cell} gives (True exactly when a "
                   "listed flare is M or X)")
    values = {}
    for name in features:
        v = pd.to_numeric(df[name], errors="coerce").to_numpy(np.float64)
        if (wrong := ~(np.isfinite(v) & (np.abs(v) <= MAX_ABS_VALUE))).any():
            raise _bad(src, wrong, name, f"a finite number (at most {MAX_ABS_VALUE:.0e} in size)")
        values[name] = v
    out = Fold(path, index, region.astype(np.int64), time.dt.tz_localize(None).to_numpy("datetime64[s]"),
               label, flares, pd.DataFrame(values), src.layout.line[1:])
    check_runs(src, out.region, out.time, REGION, TIME)
    return out


def cadence_of(folds: Sequence[Fold]) -> np.timedelta64:
    """The source's record cadence: the most common step between consecutive records of a patch."""
    cadence, _ = cadence_and_gaps(np.concatenate([f.region for f in folds]), np.concatenate([f.time for f in folds]))
    if not cadence:
        raise DataError(f"{folds[0].path.parent}: no patch has two records; cannot tell the cadence")
    return np.timedelta64(cadence, "s")


def labels_for(fold: Fold, target: Target) -> np.ndarray:
    """The target's 0/1 label of each record: a flare of at least the class in the 24 h after it."""
    if target.flare_class == "M":
        return fold.label
    least = 1.0 if target.flare_class == "C" else 5.0
    order = "CMX" if target.flare_class == "C" else "MX"

    def hit(flares: str) -> bool:
        for c in filter(None, flares.split("|")):
            if c[0] in order[1:] or (c[0] == order[0] and float(c[1:]) >= least):
                return True
        return False

    return np.array([hit(f) for f in fold.flares], bool)


@dataclass(frozen=True)
class _Layout:
    """A fold's rows in the output: its records with padding rows before the records that follow a gap."""

    frame: pd.DataFrame  # Flare ('padding' everywhere until a target's labels are set), time, region, features
    at: np.ndarray  # (R,) each record's row in the frame
    gaps: int
    padding_rows: int

    def table(self, labels: np.ndarray) -> pd.DataFrame:
        """The frame with the records labelled P/N by ``labels`` (R,)."""
        flare = self.frame[LABEL_COLUMN].to_numpy(copy=True)
        flare[self.at] = np.where(labels, "P", "N")
        return self.frame.assign(**{LABEL_COLUMN: flare})


def _layout(fold: Fold, cadence: np.timedelta64, max_padding: int) -> _Layout:
    """Padding rows at the fold's gaps: ``min(missing records, max_padding)`` per gap, nearest its next record."""
    region, t = fold.region, fold.time
    same = np.r_[False, region[1:] == region[:-1]]
    step = np.r_[np.timedelta64(0, "s"), np.diff(t)]
    missing = np.where(same, np.rint(step / cadence).astype(np.int64) - 1, 0)  # (R,) slots missing before a row
    pad = np.clip(missing, 0, max_padding)
    n = len(region) + int(pad.sum())
    at = np.arange(len(region)) + np.cumsum(pad)  # (R,) each record's row in the output
    # A padding row k rows before its record sits at that record's time minus k cadences.
    before = np.repeat(at, pad + 1) - np.arange(n)  # (n,) rows to the record each output row belongs to
    out_time = np.repeat(t, pad + 1) - before * cadence
    frame = {LABEL_COLUMN: np.full(n, "padding", dtype=object),
             TIME_COLUMN: pd.to_datetime(out_time).strftime(OUT_TIME_FORMAT), REGION_COLUMN: np.repeat(region, pad + 1)}
    for name in fold.features.columns:
        column = np.zeros(n)
        column[at] = fold.features[name].to_numpy()
        frame[name] = column
    return _Layout(pd.DataFrame(frame), at, int((missing > 0).sum()), int(pad.sum()))


def import_published(name: str, src: str | Path, out: str | Path, folds: Sequence[int] | None = None,
                     window: int | None = None) -> ImportSummary:
    """Write ``out/fold_K`` for each test fold K (all by default): the targets' training tables (the other folds)
    and test tables (fold K), an ``everest.yaml`` naming the source's features and the window length
    (``window`` records, the model's default), and ``import.json``, the rows' accounting. A gap gets at most
    ``window - 1`` padding rows: enough that no window reaches across it. Every source file is validated and
    every folder checked before anything is written; the folders are written beside their places and renamed
    into them only when all are complete."""
    if name not in SOURCES:
        raise DataError(f"unknown source {name!r}; expected one of {list(SOURCES)}")
    window = ModelConfig().seq_len if window is None else window
    if window < 1:
        raise DataError(f"window {window}: expected a whole number of records, at least 1")
    src, out = Path(src), Path(out)
    files = fold_files(src, name)
    chosen = list(range(len(files))) if folds is None else list(dict.fromkeys(folds))
    if bad := [k for k in chosen if not 0 <= k < len(files)]:
        raise DataError(f"--fold {bad[0]}: {src} holds folds 0 .. {len(files) - 1}")
    parts = [read_fold(p, k) for k, p in enumerate(files)]
    features = list(parts[0].features.columns)
    for f in parts[1:]:
        if list(f.features.columns) != features:
            raise DataError(f"{f.path}: feature columns {list(f.features.columns)} (line 1, the header) differ from "
                            f"{files[0].name}'s {features}; expected the same columns in every fold")
    owner: dict[int, int] = {}
    for f in parts:
        for r in np.unique(f.region):
            if (j := owner.setdefault(int(r), f.index)) != f.index:
                first = [int(parts[i].line[parts[i].region == r][0]) for i in (f.index, j)]
                raise DataError(f"{f.path}: patch {REGION}={int(r)} at line {first[0]} is also in "
                                f"{files[j].name} (line {first[1]}); expected region-disjoint folds")
    io.check_writable_dir(out, "import folder")
    for k in chosen:
        if (folder := out / f"fold_{k}").exists() and not (folder / RECORD_NAME).is_file():
            raise DataError(f"{folder} exists and holds no {RECORD_NAME} (not an earlier import); choose another "
                            "--out, nothing was written")
    cadence = cadence_of(parts)
    layouts = {f.index: _layout(f, cadence, window - 1) for f in parts}
    config = {"data": {"features": features, "region_column": REGION_COLUMN,
                       "log_features": [c for c in features if c in LOG_FEATURES],
                       "scaling": "log_standard", "c_zero_filter": False},
              "model": {"seq_len": window}}
    sources = {p.name: {"rows": len(f.region), "regions": int(np.unique(f.region).size), "sha256": file_hash(p)}
               for p, f in zip(files, parts, strict=True)}
    rows_read = sum(len(f.region) for f in parts)
    records = {}
    with contextlib.ExitStack() as stack:  # every folder complete before any is renamed into place
        for k in chosen:
            tmp = stack.enter_context(io.staged_dir(out / f"fold_{k}"))
            records[k] = _write_fold(tmp, k, parts, layouts, rows_read)
            records[k].update({"source": str(src), "dataset": name, "files": sources,
                               "cadence_minutes": cadence / np.timedelta64(60, "s"), "window": window,
                               "features": features, "region_column": REGION_COLUMN,
                               "not_imported": ["FLARE_INDEX (past flaring; EVEREST's features are magnetic only)",
                                                "train.csv and test.csv (class-balanced subsamples of the folds)"]})
            io.write_text(tmp / CONFIG_NAME, _config_text(name, src, config, window))
            io.write_json(tmp / RECORD_NAME, records[k])
    return ImportSummary([out / f"fold_{k}" for k in chosen], rows_read, cadence / np.timedelta64(60, "s"),
                         {f"fold_{k}": r for k, r in records.items()})


def _write_fold(folder: Path, k: int, parts: Sequence[Fold], layouts: dict[int, _Layout], rows_read: int) -> dict:
    """Write test fold ``k``'s tables of every target that has a training positive; return their accounting."""
    record: dict = {"test_fold": k, "targets": {}, "skipped_targets": {}}
    for t in TARGETS:
        frames, counts = {}, {}
        for split, members in (("train", [f for f in parts if f.index != k]), ("test", [parts[k]])):
            frames[split] = frame = pd.concat([layouts[f.index].table(labels_for(f, t)) for f in members],
                                              ignore_index=True)
            real = frame[LABEL_COLUMN] != "padding"
            counts[split] = {"records": int(real.sum()), "positives": int((frame[LABEL_COLUMN] == "P").sum()),
                             "regions": int(frame.loc[real, REGION_COLUMN].nunique()),
                             "gaps": sum(layouts[f.index].gaps for f in members),
                             "padding_rows": sum(layouts[f.index].padding_rows for f in members)}
        if counts["train"]["positives"] == 0:
            record["skipped_targets"][str(t)] = "no positive record in the training folds: nothing to learn"
            continue
        for split, frame in frames.items():
            io.write_csv(data_file(folder, t, split), frame)
        dropped = rows_read - counts["train"]["records"] - counts["test"]["records"]
        record["targets"][str(t)] = {**counts, "dropped_rows": dropped}
    return record


def _config_text(name: str, src: Path, config: dict, window: int) -> str:
    head = (f"# Written by `everest data import {name}` from {src}: how these tables become samples.\n"
            f"# Gaps hold at most {window - 1} padding rows, enough for windows of {window} records: for longer\n"
            "# windows import again with --window.\n"
            "# Regions are keyed by the patch number (HARPNUM: the source's arpnum; it has no NOAA number).\n"
            "# The extensive features are log-scaled; R_VALUE is 0 for a patch without strong-gradient\n"
            "# polarity inversion lines, a real value, so the C-class rule that drops zero rows is off.\n")
    return head + yaml.safe_dump(config, sort_keys=False)


def summary_text(summary: ImportSummary) -> str:
    """The import's accounting as printed: rows read, and per fold and target the records written, the padding
    rows added and the rows dropped (none, unless a bug: each is counted, not assumed)."""
    lines = [f"read {summary.rows_read} rows (cadence {summary.cadence_minutes:g} minutes)"]
    for folder, record in zip(summary.folders, summary.counts.values(), strict=True):
        lines.append(f"{folder}: test = fold {record['test_fold']}, training = the other folds")
        for t, c in record["targets"].items():
            lines.append(f"  {t}: " + "; ".join(
                f"{s} {c[s]['records']} records ({c[s]['positives']} P) of {c[s]['regions']} regions, "
                f"{c[s]['padding_rows']} padding rows at {c[s]['gaps']} gaps" for s in ("train", "test"))
                + f"; dropped {c['dropped_rows']}")
        for t, why in record["skipped_targets"].items():
            lines.append(f"  {t}: not written ({why})")
    return "\n".join(lines)
