"""Validated tables -> ``(N, T, F)`` sample arrays: windows, cache, validation split, scaling, augmentation.

Sample windows are built with array operations (no loop over rows), cached per file content + data
configuration, split by active region (or time) for validation, scaled with statistics of the training
split only, and (M/M5) positives duplicated with noise. Tables come from :mod:`everest.data.tables`.
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
from everest.data.tables import LABEL_COLUMN, LABELS, data_file, file_hash, read_table, require_file
from everest.errors import DataError
from everest.io import write_npz

log = logging.getLogger(__name__)

# Bump when sample formation changes, so stale caches are rebuilt.
BUILDER_VERSION = "1"
# Fewest positive samples a validation split may hold. The threshold is the one of highest validation TSS,
# whose recall term moves in steps of 1 / positives: below 10 positives one sample moves TSS by more than
# 0.1, as much as the seed-to-seed spread of the rarest targets, so the chosen threshold would be noise.
MIN_VALIDATION_POSITIVES = 10


@dataclass(frozen=True)
class SampleSet:
    """Samples of one file: windows of ``seq_len`` rows of one region, oldest first, current row last."""

    x: np.ndarray  # (N, T, F) float32 feature windows; zeros at front padding and `padding` rows
    valid: np.ndarray  # (N, T) bool, True where the step is a real (non-padding) record
    y: np.ndarray  # (N,) int8 labels 0/1 of the current row
    region: np.ndarray  # (N,) int64 region number of the current row (the configured region column)
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
        "region": cfg.region_column,
        "zero_filter": cfg.c_zero_filter and target.flare_class == "C",
        "builder": BUILDER_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def load_samples(path: str | Path, target: Target, cfg: DataConfig, seq_len: int,
                 cache_dir: Path | None = None) -> tuple[SampleSet, str]:
    """Samples of one file plus its content hash; reuses a cache built from the same content and config."""
    samples, digest, save = read_samples(Path(path), target, cfg, seq_len, cache_dir)
    save()
    return samples, digest


def read_samples(path: Path, target: Target, cfg: DataConfig, seq_len: int,
                 cache_dir: Path | None) -> tuple[SampleSet, str, Callable[[], None]]:
    """Like :func:`load_samples`, but the cache write is returned, so callers can write only after all
    their inputs proved valid (bad input leaves nothing behind)."""
    require_file(path)
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

    ``region``: regions are shuffled with ``cfg.split_seed`` (or ``seed`` when that is None), separately
    for regions with and without positives (so both splits see flare episodes), and ``validation_fraction``
    of each group goes to validation.
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
        rng = np.random.default_rng(seed if cfg.split_seed is None else cfg.split_seed)
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


def require_positives(train_path: Path, samples: SampleSet) -> None:
    """Refuse a training table without positive samples: there is nothing to learn."""
    if samples.n_positive == 0:
        raise DataError(f"{train_path}: no positive samples: all {len(samples)} samples are labelled 'N' in "
                        f"column {LABEL_COLUMN!r}, so there is nothing to learn; expected flaring rows labelled "
                        "'P' (a different label convention?)")


def check_learnable(train_path: Path, train_all: SampleSet, val: SampleSet, split: str = "validation split") -> None:
    """Refuse a training table that cannot be learned from, or a validation ``split`` of it too poor in
    positives to choose a threshold on, naming the file and the counts. A test table without positives is
    allowed: its undefined metrics are reported as undefined."""
    require_positives(train_path, train_all)
    if val.n_positive < MIN_VALIDATION_POSITIVES:
        flaring = len(np.unique(val.region[val.y == 1]))
        raise DataError(f"{train_path}: the {split} ({len(np.unique(val.region))} regions, {len(val)} samples) "
                        f"holds {val.n_positive} positive sample(s) from {flaring} flaring region(s) of the "
                        f"table's {train_all.n_positive}; at least {MIN_VALIDATION_POSITIVES} are needed to choose "
                        "a decision threshold (raise data.validation_fraction, or give a table with more flaring "
                        "regions)")


def learnable_folds(train_path: Path, samples: SampleSet, k: int, seed: int,
                    cfg: DataConfig) -> list[tuple[SampleSet, SampleSet]]:
    """The ``k`` region folds tuning scores on (:func:`region_folds`), each refused unless learnable."""
    require_positives(train_path, samples)
    folds = region_folds(samples, k, seed if cfg.split_seed is None else cfg.split_seed)
    for i, (_, val) in enumerate(folds):
        check_learnable(train_path, samples, val, f"validation fold {i + 1} of {k}")
    return folds


def region_folds(samples: SampleSet, k: int, seed: int) -> list[tuple[SampleSet, SampleSet]]:
    """``k`` region-disjoint (training, validation) pairs: every region is validation in exactly one fold.

    Regions with and without positives are dealt round-robin into the folds after a seeded shuffle, so
    every fold sees flare episodes (as :func:`split_validation` does for one split).
    """
    regions = np.unique(samples.region)
    if k < 2 or len(regions) < k:
        raise DataError(f"cannot make {k} region-disjoint folds of {len(regions)} region(s): need k >= 2 and at "
                        "least k regions")
    rng = np.random.default_rng(seed)
    flaring = np.isin(regions, np.unique(samples.region[samples.y == 1]))
    ordered = np.concatenate([rng.permutation(regions[flaring]), rng.permutation(regions[~flaring])])
    fold_of = dict(zip(ordered.tolist(), np.arange(len(ordered)) % k, strict=True))
    sample_fold = np.array([fold_of[r] for r in samples.region.tolist()])
    return [(samples.subset(sample_fold != i), samples.subset(sample_fold == i)) for i in range(k)]


def prepare_folds(data_dir: str | Path, target: Target, seed: int, cfg: DataConfig, seq_len: int, k: int,
                  cache_dir: Path | None = None) -> tuple[list[tuple[SampleSet, SampleSet]], dict[str, str]]:
    """Scaled, augmented (training, validation) folds of the training file alone, and its content hash.

    The testing file is never opened: tuning on these folds cannot see the test period.
    """
    path = data_file(Path(data_dir), target, "train")
    samples, digest = load_samples(path, target, cfg, seq_len, cache_dir)
    folds = []
    for train, val in learnable_folds(path, samples, k, seed, cfg):
        scaler = Scaler.fit(train, cfg.features, cfg)
        train, val = scaler.transform(train), scaler.transform(val)
        if target.flare_class in cfg.augment_classes:
            train = augment_positives(train, cfg.augment_noise, seed, cfg.augment_copies)
        folds.append((train, val))
    return folds, {path.name: digest}


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
    history: dict[str, dict[str, float | int | None]]  # "train" (before augmentation), "test": history_profile


def cadence_and_gaps(region: np.ndarray, time: np.ndarray) -> tuple[int | None, int]:
    """The cadence of time-ordered records (seconds: the most common step between consecutive records of a
    region; None without such a pair) and the gaps (steps of two cadences or more, rounded)."""
    same = region[1:] == region[:-1]
    steps = np.diff(time.astype("datetime64[s]").astype(np.int64))[same]
    if steps.size == 0:
        return None, 0
    values, counts = np.unique(steps, return_counts=True)
    cadence = int(values[np.argmax(counts)])
    return cadence, int((np.rint(steps / cadence) > 1).sum()) if cadence else 0


def history_profile(samples: SampleSet) -> dict[str, float | int | None]:
    """How much history the windows hold: the base rate, the records' cadence (the most common step between a
    region's consecutive samples), the gaps (steps of two cadences or more, rounded), and the windows with padded
    steps."""
    n = len(samples)
    cadence, gaps = cadence_and_gaps(samples.region, samples.time)
    real_steps = samples.valid.sum(axis=1)
    return {"samples": n, "positives": samples.n_positive, "base_rate": samples.n_positive / n if n else None,
            "regions": int(np.unique(samples.region).size),
            "cadence_minutes": cadence / 60 if cadence is not None else None, "gaps": gaps,
            "padded_windows": int((real_steps < samples.valid.shape[1]).sum()),
            "mean_real_steps": float(real_steps.mean()) if n else None}


def prepare_experiment(data_dir: str | Path, target: Target, seed: int, cfg: DataConfig, seq_len: int,
                       cache_dir: Path | None = None) -> ExperimentData:
    """Everything one experiment needs: read (or reuse cached) samples, split, scale, augment."""
    train_path, test_path = data_file(Path(data_dir), target, "train"), data_file(Path(data_dir), target, "test")
    train_all, h_train, save_train = read_samples(train_path, target, cfg, seq_len, cache_dir)
    test, h_test, save_test = read_samples(test_path, target, cfg, seq_len, cache_dir)
    require_positives(train_path, train_all)
    train, val = split_validation(train_all, cfg, seed)
    check_learnable(train_path, train_all, val)
    save_train()
    save_test()
    scaler = Scaler.fit(train, cfg.features, cfg)
    train, val, test = scaler.transform(train), scaler.transform(val), scaler.transform(test)
    if target.flare_class in cfg.augment_classes:
        train = augment_positives(train, cfg.augment_noise, seed, cfg.augment_copies)
    history = {"train": history_profile(train_all), "test": history_profile(test)}
    return ExperimentData(train, val, test, scaler, {train_path.name: h_train, test_path.name: h_test}, history)
