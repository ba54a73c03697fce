"""SHARP tables -> validated columns -> ``(N, T, F)`` sample arrays (data.md section 1).

The only data path: real files and the synthetic generator's files go through the same reader.
Files are read by column name and validated once, here; every error names the file, the row or
column and what was expected. Sample windows are built with array operations (no loop over rows),
cached per file content + data configuration, split by active region (or time) for validation,
scaled with statistics of the training split only, and (M/M5) positives duplicated with noise.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd

from everest.config import DataConfig, Target
from everest.io import write_npz

log = logging.getLogger(__name__)

LABEL_COLUMN = "Flare"
TIME_COLUMN = "DATE__OBS"
REGION_COLUMN = "NOAA_AR"
LABELS = {"N": 0, "P": 1, "padding": -1}
# Largest magnitude accepted: samples are float32 (max 3.4e38); real SHARP values stay below ~1e25.
MAX_ABS_VALUE = 1e37
# Bump when sample formation changes, so stale caches are rebuilt.
BUILDER_VERSION = "1"


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file, the row/column and what was expected."""


@dataclass(frozen=True)
class SampleSet:
    """Samples of one file: windows of ``seq_len`` rows of one region, oldest first, current row last."""

    x: np.ndarray  # (N, T, F) float32 feature windows; zeros at front padding and `padding` rows
    valid: np.ndarray  # (N, T) bool, True where the step is a real (non-padding) record
    y: np.ndarray  # (N,) int8 labels 0/1 of the current row
    region: np.ndarray  # (N,) int64 NOAA_AR of the current row
    row: np.ndarray  # (N,) int64 0-based data-row index of the current row in its file
    time: np.ndarray  # (N,) datetime64[s] record time of the current row

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> SampleSet:
        """Samples selected by a boolean mask or integer index."""
        return SampleSet(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @property
    def n_positive(self) -> int:
        return int(self.y.sum())


def file_hash(path: Path) -> str:
    """SHA-256 of a file's content (streamed), for caching and provenance."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def data_file(data_dir: Path, target: Target, split: str) -> Path:
    """Path of ``training_data_{cls}_{h}.csv`` / ``testing_data_...`` for ``split`` in train|test."""
    prefix = {"train": "training", "test": "testing"}[split]
    return Path(data_dir) / f"{prefix}_data_{target.file_suffix}.csv"


def _resolve_columns(path: Path, header: list[str], cfg: DataConfig) -> dict[str, str]:
    """Map each configured feature to the column that holds it (honouring aliases such as TOTBSQ)."""
    missing_base = [c for c in (LABEL_COLUMN, TIME_COLUMN, REGION_COLUMN) if c not in header]
    found: dict[str, str] = {}
    missing: list[str] = []
    for feat in cfg.features:
        names = [feat] + [alias for alias, canon in cfg.feature_aliases.items() if canon == feat]
        hit = next((n for n in names if n in header), None)
        if hit is None:
            missing.append(feat if len(names) == 1 else f"{feat} (or {' / '.join(names[1:])})")
        else:
            found[feat] = hit
    if missing_base or missing:
        raise DataError(
            f"{path}: missing required column(s) {missing_base + missing}; "
            f"the file has columns {header}"
        )
    return found


def read_table(path: str | Path, cfg: DataConfig) -> pd.DataFrame:
    """Read and validate one SHARP table by column name.

    Returns columns ``label`` (int8: 1 P, 0 N, -1 padding), ``time``, ``region`` and the configured
    features (float64, in configuration order). Raises :class:`DataError` for every malformed input.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found (expected a SHARP table such as training_data_M_24.csv)")
    try:
        header = list(pd.read_csv(path, nrows=0).columns)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty (expected a CSV header and data rows)") from None
    columns = _resolve_columns(path, header, cfg)
    usecols = [LABEL_COLUMN, TIME_COLUMN, REGION_COLUMN, *columns.values()]
    df = pd.read_csv(path, usecols=usecols, dtype={LABEL_COLUMN: str, TIME_COLUMN: str}, low_memory=False)
    if len(df) == 0:
        raise DataError(f"{path}: no data rows (only a header)")

    def where(mask: np.ndarray) -> str:
        first = int(np.flatnonzero(mask)[0])
        return f"line {first + 2} ({int(mask.sum())} such row(s) in all)"

    labels = df[LABEL_COLUMN].str.strip()
    unknown = ~labels.isin(list(LABELS)).to_numpy()
    if unknown.any():
        bad = df[LABEL_COLUMN].iloc[int(np.flatnonzero(unknown)[0])]
        raise DataError(f"{path}: column {LABEL_COLUMN!r} has unknown label {bad!r} at {where(unknown)}; "
                        f"expected one of {list(LABELS)}")
    label = labels.map(LABELS).to_numpy(np.int8)

    out = {"label": label}
    region = pd.to_numeric(df[REGION_COLUMN], errors="coerce").to_numpy()
    bad_region = ~np.isfinite(region)
    if bad_region.any():
        raise DataError(f"{path}: column {REGION_COLUMN!r} is not a number at {where(bad_region)}: "
                        f"{df[REGION_COLUMN].iloc[int(np.flatnonzero(bad_region)[0])]!r}")
    out["region"] = region.astype(np.int64)

    time = pd.to_datetime(df[TIME_COLUMN], errors="coerce", format="ISO8601", utc=True)
    bad_time = (time.isna() & (label != LABELS["padding"])).to_numpy()
    if bad_time.any():
        raise DataError(f"{path}: column {TIME_COLUMN!r} is not an ISO time at {where(bad_time)}: "
                        f"{df[TIME_COLUMN].iloc[int(np.flatnonzero(bad_time)[0])]!r}")
    out["time"] = time.dt.tz_localize(None).to_numpy("datetime64[s]")

    for feat, col in columns.items():
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            raw = df[col].iloc[int(np.flatnonzero(bad)[0])]
            raise DataError(f"{path}: column {col!r} must hold finite numbers; found {raw!r} at {where(bad)}")
        huge = np.abs(values) > MAX_ABS_VALUE
        if huge.any():
            raw = df[col].iloc[int(np.flatnonzero(huge)[0])]
            raise DataError(f"{path}: column {col!r} holds {raw!r} at {where(huge)}: beyond {MAX_ABS_VALUE:.0e}, "
                            "the float32 range samples are stored in (a unit or parsing error?)")
        out[feat] = values
    table = pd.DataFrame(out)
    _check_regions(path, table)
    return table


def _check_regions(path: Path, table: pd.DataFrame) -> None:
    """Rows of one region must be contiguous and strictly increasing in time."""
    region = table["region"].to_numpy()
    new_run = np.r_[True, region[1:] != region[:-1]]
    run_regions = region[new_run]
    uniq, counts = np.unique(run_regions, return_counts=True)
    if (counts > 1).any():
        ar = int(uniq[counts > 1][0])
        lines = np.flatnonzero(new_run & (region == ar))[:2] + 2
        raise DataError(f"{path}: rows of region {REGION_COLUMN}={ar} are not contiguous "
                        f"(separate runs start at lines {lines.tolist()}); expected one time-ordered run per region")
    t = table["time"].to_numpy().astype("datetime64[s]").astype(np.int64)
    known = table["time"].notna().to_numpy()
    # Compare each dated row with the previous dated row of the same region.
    idx = np.flatnonzero(known)
    same = region[idx[1:]] == region[idx[:-1]]
    back = same & (t[idx[1:]] <= t[idx[:-1]])
    if back.any():
        k = int(np.flatnonzero(back)[0])
        r = int(idx[k + 1])
        raise DataError(f"{path}: region {REGION_COLUMN}={int(region[r])} is out of time order at line {r + 2}: "
                        f"{table['time'].iloc[r]} does not follow {table['time'].iloc[int(idx[k])]} "
                        f"(rows of a region must be strictly increasing in {TIME_COLUMN})")


def build_samples(table: pd.DataFrame, features: tuple[str, ...], seq_len: int, zero_filter: bool) -> SampleSet:
    """One sample per non-padding row: it and up to ``seq_len - 1`` earlier rows of the same region.

    Windows are front-padded with zero steps; ``padding`` rows serve as history only. With
    ``zero_filter`` (the reference's C-class rule) a sample is dropped when any feature of its
    *current* row is exactly 0.
    """
    label = table["label"].to_numpy()
    region = table["region"].to_numpy()
    feats = table[list(features)].to_numpy(np.float32)  # (R, F)
    n_rows = len(table)
    run_start = np.maximum.accumulate(np.where(np.r_[True, region[1:] != region[:-1]], np.arange(n_rows), 0))
    pos = np.arange(n_rows) - run_start  # position of each row within its region's run

    keep = label != LABELS["padding"]
    if zero_filter:
        keep &= ~(feats == 0).any(axis=1)
    rows = np.flatnonzero(keep)
    back = np.arange(seq_len - 1, -1, -1)  # (T,) steps back from the current row, oldest first
    src = rows[:, None] - back[None, :]  # (N, T) source row of each step
    in_region = back[None, :] <= pos[rows][:, None]  # (N, T)
    src = np.where(in_region, src, 0)
    valid = in_region & (label[src] != LABELS["padding"])  # (N, T)
    x = feats[src] * valid[:, :, None]  # (N, T, F)
    return SampleSet(
        x=x.astype(np.float32, copy=False),
        valid=valid,
        y=label[rows].astype(np.int8),
        region=region[rows],
        row=rows.astype(np.int64),
        time=table["time"].to_numpy()[rows].astype("datetime64[s]"),
    )


def _cache_key(file_digest: str, target: Target, cfg: DataConfig) -> str:
    parts = {
        "file": file_digest,
        "class": target.flare_class,
        "features": cfg.features,
        "aliases": sorted(cfg.feature_aliases.items()),
        "zero_filter": cfg.c_zero_filter and target.flare_class == "C",
        "builder": BUILDER_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def load_samples(path: str | Path, target: Target, cfg: DataConfig, seq_len: int,
                 cache_dir: Path | None = None) -> tuple[SampleSet, str]:
    """Samples of one file plus its content hash; reuses a cache built from the same content and config."""
    samples, digest, save = _load_samples(Path(path), target, cfg, seq_len, cache_dir)
    save()
    return samples, digest


def _load_samples(path: Path, target: Target, cfg: DataConfig, seq_len: int,
                  cache_dir: Path | None) -> tuple[SampleSet, str, Callable[[], None]]:
    """Like :func:`load_samples`, but the cache write is returned, so callers can write only after all
    their inputs proved valid (bad input leaves nothing behind)."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found (expected a SHARP table such as training_data_M_24.csv)")
    digest = file_hash(path)
    cache = None
    if cache_dir is not None and cfg.cache:
        cache = Path(cache_dir) / f"{path.stem}-{_cache_key(digest, target, cfg)}-T{seq_len}.npz"
        if cache.is_file():
            try:
                with np.load(cache) as z:
                    return SampleSet(**{f.name: z[f.name] for f in fields(SampleSet)}), digest, lambda: None
            except (OSError, ValueError, KeyError) as err:
                log.warning("ignoring unreadable sample cache %s (%s); rebuilding", cache, err)
    table = read_table(path, cfg)
    zero_filter = cfg.c_zero_filter and target.flare_class == "C"
    samples = build_samples(table, cfg.features, seq_len, zero_filter)
    if len(samples) == 0:
        raise DataError(f"{path}: no usable samples (all rows are padding"
                        + (" or have a zero feature in the C-class filter)" if zero_filter else ")"))

    def save() -> None:
        if cache is not None:
            write_npz(cache, **{f.name: getattr(samples, f.name) for f in fields(SampleSet)})

    return samples, digest, save


def split_validation(samples: SampleSet, cfg: DataConfig, seed: int) -> tuple[SampleSet, SampleSet]:
    """Carve a validation split out of training samples by active region (or by time), never by row.

    ``region``: regions are shuffled with ``seed``, separately for regions with and without positives
    (so both splits see flare episodes), and ``validation_fraction`` of each group goes to validation.
    ``time``: the latest ``validation_fraction`` of regions by first record time go to validation.
    """
    regions, first = np.unique(samples.region, return_index=True)
    if len(regions) < 2:
        raise DataError(f"cannot split {len(regions)} region(s) into training and validation by region")
    if cfg.validation_split == "time":
        order = regions[np.argsort(samples.time[first], kind="stable")]
        n_val = max(1, round(cfg.validation_fraction * len(regions)))
        val_regions = order[-n_val:]
    else:
        rng = np.random.default_rng(seed)
        flaring = np.isin(regions, np.unique(samples.region[samples.y == 1]))
        val_regions = []
        for group in (regions[flaring], regions[~flaring]):
            if len(group):
                n_val = round(cfg.validation_fraction * len(group))
                val_regions.append(rng.permutation(group)[:n_val])
        val_regions = np.concatenate(val_regions)
        if len(val_regions) == 0:
            val_regions = rng.permutation(regions)[:1]
    is_val = np.isin(samples.region, val_regions)
    if is_val.all():
        is_val[np.isin(samples.region, val_regions[:1], invert=True)] = False
    return samples.subset(~is_val), samples.subset(is_val)


@dataclass(frozen=True)
class Scaler:
    """Per-feature scaling fitted on the training split: optional signed log10, then standardisation."""

    method: str  # "log_standard" | "standard" | "none"
    log_mask: np.ndarray  # (F,) bool: features put through signed log10
    mean: np.ndarray  # (F,)
    std: np.ndarray  # (F,)

    @classmethod
    def fit(cls, samples: SampleSet, features: tuple[str, ...], cfg: DataConfig) -> Scaler:
        """Fit on the current rows of the training samples (each record once)."""
        current = samples.x[:, -1, :].astype(np.float64)  # (N, F)
        method = cfg.scaling
        log_mask = np.array([f in cfg.log_features for f in features])
        if method == "auto":
            method = "log_standard" if (np.abs(current) > 1e3).any() else "none"
        if method != "log_standard":
            log_mask = np.zeros(len(features), bool)
        f = len(features)
        if method == "none":
            return cls(method, log_mask, np.zeros(f), np.ones(f))
        z = np.where(log_mask, _signed_log10(current), current)
        std = z.std(axis=0)
        return cls(method, log_mask, z.mean(axis=0), np.where(std > 0, std, 1.0))

    def transform(self, samples: SampleSet) -> SampleSet:
        """Scaled copy; padding steps stay exactly zero."""
        x = samples.x.astype(np.float64)
        x = np.where(self.log_mask, _signed_log10(x), x)
        x = (x - self.mean) / self.std
        x = np.where(samples.valid[:, :, None], x, 0.0).astype(np.float32)
        return replace(samples, x=x)

    def to_dict(self) -> dict:
        """JSON-able form stored with the model."""
        return {"method": self.method, "log_mask": self.log_mask.tolist(),
                "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Scaler:
        return cls(d["method"], np.array(d["log_mask"], bool), np.array(d["mean"]), np.array(d["std"]))


def _signed_log10(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log10(1.0 + np.abs(x))


def augment_positives(samples: SampleSet, noise: float, seed: int, copies: int = 1) -> SampleSet:
    """Append ``copies`` noisy copies of every positive (reference M/M5 augmentation: one copy), on scaled
    training data only.

    Noise is ``noise`` x the feature's standard deviation over real steps, added to every feature of
    the real steps of the window (never to front padding, never to the label).
    """
    pos = np.flatnonzero(samples.y == 1)
    if len(pos) == 0 or noise == 0 or copies == 0:
        return samples
    real = samples.x[samples.valid]  # (n_real_steps, F)
    std = real.std(axis=0) if len(real) else np.zeros(samples.x.shape[2])
    rng = np.random.default_rng([seed, 0xA06])
    copy = samples.subset(np.tile(pos, copies))
    jitter = rng.standard_normal(copy.x.shape).astype(np.float32) * (noise * std).astype(np.float32)
    copy = replace(copy, x=copy.x + jitter * copy.valid[:, :, None])
    return SampleSet(**{f.name: np.concatenate([getattr(samples, f.name), getattr(copy, f.name)])
                        for f in fields(SampleSet)})


@dataclass(frozen=True)
class ExperimentData:
    """Scaled train / validation / test samples of one target and seed, with provenance."""

    train: SampleSet
    val: SampleSet
    test: SampleSet
    scaler: Scaler
    file_hashes: dict[str, str]  # file name -> sha256


def prepare_experiment(data_dir: str | Path, target: Target, seed: int, cfg: DataConfig, seq_len: int,
                       cache_dir: Path | None = None) -> ExperimentData:
    """Everything one experiment needs: read (or reuse cached) samples, split, scale, augment."""
    train_path, test_path = data_file(Path(data_dir), target, "train"), data_file(Path(data_dir), target, "test")
    train_all, h_train, save_train = _load_samples(train_path, target, cfg, seq_len, cache_dir)
    test, h_test, save_test = _load_samples(test_path, target, cfg, seq_len, cache_dir)
    train, val = split_validation(train_all, cfg, seed)
    save_train()
    save_test()
    scaler = Scaler.fit(train, cfg.features, cfg)
    train, val, test = scaler.transform(train), scaler.transform(val), scaler.transform(test)
    if target.flare_class in cfg.augment_classes:
        train = augment_positives(train, cfg.augment_noise, seed, cfg.augment_copies)
    return ExperimentData(train, val, test, scaler, {train_path.name: h_train, test_path.name: h_test})
