"""Typed, validated configuration for EVEREST experiments.

Everything that changes a result lives in one frozen :class:`EverestConfig`, built in one place
(:func:`load_config`: defaults <- file <- command-line overrides) and passed down. Its
:meth:`EverestConfig.config_hash` names the effective configuration for caching and provenance.
Defaults name their source: "design" is the EVEREST production-training design document, "reference"
the published implementation.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from everest.errors import ConfigError, describe_validation_error
from everest.io import load_mapping

FLARE_CLASSES: tuple[str, ...] = ("C", "M", "M5")
HORIZONS: tuple[int, ...] = (24, 48, 72)
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)

# The 9 EVEREST features in model order (design document); the other 5 columns are flare history.
EVEREST_FEATURES: tuple[str, ...] = (
    "TOTUSJH", "TOTUSJZ", "USFLUX", "MEANALP", "R_VALUE", "TOTPOT", "SAVNCPP", "AREA_ACR", "ABSNJZH",
)
# Positive, heavy-tailed SHARP keys that span orders of magnitude: signed log10 before standardising.
EXTENSIVE_FEATURES: tuple[str, ...] = (
    "TOTUSJH", "TOTUSJZ", "USFLUX", "TOTBSQ", "TOTPOT", "SAVNCPP", "AREA_ACR", "ABSNJZH", "AREA",
)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Target(_Frozen):
    """A forecasting target: flare class at least ``flare_class`` within ``horizon`` hours."""

    flare_class: Literal["C", "M", "M5"]
    horizon: Literal[24, 48, 72]

    @classmethod
    def parse(cls, text: str | Target) -> Target:
        """Parse ``"M5-72"`` (also ``M5_72``, ``m5-72h``); anything else lists the valid targets."""
        if isinstance(text, Target):
            return text
        m = re.fullmatch(r"\s*(C|M5|M)[-_ ]?(\d+)h?\s*", str(text), flags=re.IGNORECASE)
        if m and m.group(1).upper() in FLARE_CLASSES and int(m.group(2)) in HORIZONS:
            return cls(flare_class=m.group(1).upper(), horizon=int(m.group(2)))
        raise ConfigError(
            f"invalid target {text!r}: expected CLASS-HORIZON with class in {list(FLARE_CLASSES)} "
            f"and horizon in {list(HORIZONS)} hours, e.g. 'M5-72'; valid targets: "
            + ", ".join(str(t) for t in all_targets())
        )

    def __str__(self) -> str:
        return f"{self.flare_class}-{self.horizon}"

    @property
    def file_suffix(self) -> str:
        """Suffix of the data files, e.g. ``M5_72`` in ``training_data_M5_72.csv``."""
        return f"{self.flare_class}_{self.horizon}"


def all_targets() -> list[Target]:
    """The 9 targets in array-job order: C-24, C-48, C-72, M-24, ..., M5-72."""
    return [Target(flare_class=c, horizon=h) for c in FLARE_CLASSES for h in HORIZONS]


# The 9 targets' canonical spellings (``str(t)`` of :func:`all_targets`) as a type: the choices a deployment
# form offers.
TargetName = Literal[tuple(f"{c}-{h}" for c in FLARE_CLASSES for h in HORIZONS)]  # type: ignore[valid-type]
# The study: 9 targets x seeds 0-4, array indices 1..45.
N_EXPERIMENTS = len(FLARE_CLASSES) * len(HORIZONS) * len(DEFAULT_SEEDS)


class Experiment(_Frozen):
    """One training run: a target and a seed."""

    target: Target
    seed: int = Field(ge=0)

    @classmethod
    def of(cls, target: str | Target, seed: int = 0) -> Experiment:
        """``Experiment.of("M5-72", 0)``: parse the target text (the notebook's and the tests' shorthand)."""
        return cls(target=Target.parse(target), seed=seed)

    @property
    def name(self) -> str:
        """Directory name of the design document, e.g. ``everest_M5_72h_seed0``."""
        return f"everest_{self.target.flare_class}_{self.target.horizon}h_seed{self.seed}"

    @property
    def array_index(self) -> int:
        """1-based PBS array index (design document mapping); defined for seeds 0-4 only."""
        if self.seed not in DEFAULT_SEEDS:
            raise ConfigError(f"seed {self.seed} has no array index: the 1..45 mapping covers seeds 0-4")
        return all_targets().index(self.target) * len(DEFAULT_SEEDS) + self.seed + 1

    @classmethod
    def from_array_index(cls, index: int) -> Experiment:
        """Inverse of :attr:`array_index`: 1..5 are C-24 seeds 0..4, ..., 41..45 are M5-72."""
        n = len(all_targets()) * len(DEFAULT_SEEDS)
        if not isinstance(index, int) or not 1 <= index <= n:
            raise ConfigError(f"invalid array index {index!r}: expected an integer in 1..{n}")
        t, s = divmod(index - 1, len(DEFAULT_SEEDS))
        return cls(target=all_targets()[t], seed=DEFAULT_SEEDS[s])

    def __str__(self) -> str:
        return f"{self.target} seed {self.seed}"


def experiment_matrix(
    targets: list[str | Target] | None = None, seeds: list[int] | tuple[int, ...] | None = None
) -> list[Experiment]:
    """Experiments for every (target, seed) pair in array-index order; default all 9 x seeds 0-4."""
    ts = all_targets() if targets is None else [Target.parse(t) for t in targets]
    ss = list(DEFAULT_SEEDS if seeds is None else seeds)
    if not ts:
        raise ConfigError("empty target list: give at least one target, e.g. 'C-24'")
    if not ss:
        raise ConfigError("empty seed list: give at least one seed, e.g. 0")
    if len(set(ts)) != len(ts):
        raise ConfigError(f"duplicate targets in {[str(t) for t in ts]}")
    if len(set(ss)) != len(ss) or any((not isinstance(s, int)) or s < 0 for s in ss):
        raise ConfigError(f"seeds must be distinct non-negative integers, got {ss}")
    order = {t: i for i, t in enumerate(all_targets())}
    return [Experiment(target=t, seed=s) for t in sorted(ts, key=order.__getitem__) for s in ss]


def check_group_width(width: Any) -> int:
    """The group width, validated: how many experiments one task (or batch sub-job) trains together as one group
    on one device, an integer in 1..45 (the whole study as one group). The one rule of the flow's profile key
    ``experiments_per_gpu`` and the batch scripts' ``--group-width``; the ConfigError says what is allowed, the
    caller names the key and the value."""
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= N_EXPERIMENTS:
        raise ConfigError(f"must be an integer in 1..{N_EXPERIMENTS}: the number of experiments one task trains "
                          "together on one GPU or CPU worker (1: one task per experiment)")
    return width


def experiment_groups(experiments: Sequence[Experiment], width: int) -> list[tuple[Experiment, ...]]:
    """``experiments`` in order, cut into groups of ``width`` (the last may be smaller): group k (1-based) holds
    positions (k-1)*width .. k*width-1. One task of the flow, or one sub-job of a batch array, per group."""
    return [tuple(experiments[i:i + width]) for i in range(0, len(experiments), width)]


class ModelConfig(_Frozen):
    """Architecture (design document); 814,090 parameters with these defaults and 9 features."""

    seq_len: int = Field(10, ge=1)
    embed_dim: int = Field(128, ge=1)
    num_heads: int = Field(4, ge=1)
    ff_dim: int = Field(256, ge=1)
    num_blocks: int = Field(6, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    use_attention_bottleneck: bool = True
    use_evidential: bool = True
    use_evt: bool = True
    use_precursor: bool = True
    # Windows are front-padded with zero steps (SampleSet.valid marks the real ones; most real windows
    # have only a few). With the mask, padding steps are no attention keys and are left out of pooling,
    # so a forecast depends on real records only; it applies when forward() is given `valid`.
    padding_mask: bool = True
    # EVT head (generalised-Pareto fit of the logits' tail; everest.model.losses.evt_loss). It reads the shared
    # representation z detached, so the tail fit trains the EVT head alone and cannot change the forecast
    # logits. With gradients into z (the reference), switching the term on cut validation AUC averaged
    # over the EVT epochs from 0.938 to 0.906 over 3 seeds (one seed fell to 0.72; benchmarks/evt_phase.py).
    evt_detach_trunk: bool = True
    # Range of the GPD shape xi and floor of the scale sigma. The reference's (-2, 1) and 1e-3 let the NLL
    # sink to about -13.8 (for xi < -1 the density is unbounded at its endpoint); within (-0.5, 0.5) the
    # fit is a regular likelihood and the NLL is at least log(evt_sigma_floor) = -3.0, so the printed
    # loss stays readable. Reference values: evt_xi_range=[-2, 1], evt_sigma_floor=0.001.
    evt_xi_range: tuple[float, float] = (-0.5, 0.5)
    evt_sigma_floor: float = Field(0.05, gt=0.0)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"model.embed_dim ({self.embed_dim}) must be divisible by model.num_heads ({self.num_heads})"
            )
        lo, hi = self.evt_xi_range
        if not float("-inf") < lo < hi < float("inf"):  # also refuses NaN
            raise ValueError(f"model.evt_xi_range must be two finite numbers (low, high) with low < high, "
                             f"got {self.evt_xi_range}")
        return self


class LossPhase(_Frozen):
    """Loss weights from ``start_epoch`` on (reference 3-phase schedule)."""

    start_epoch: int = Field(ge=0)
    focal: float = Field(ge=0.0)
    evidential: float = Field(ge=0.0)
    evt: float = Field(ge=0.0)
    precursor: float = Field(ge=0.0)


_REFERENCE_SCHEDULE = (
    LossPhase(start_epoch=0, focal=0.9, evidential=0.1, evt=0.0, precursor=0.05),
    LossPhase(start_epoch=20, focal=0.8, evidential=0.1, evt=0.1, precursor=0.05),
    LossPhase(start_epoch=40, focal=0.7, evidential=0.1, evt=0.2, precursor=0.05),
)


class LossConfig(_Frozen):
    """Loss terms and their schedule (reference)."""

    focal_gamma_max: float = Field(2.803, ge=0.0)
    focal_gamma_warmup_epochs: int = Field(50, ge=0)
    schedule: tuple[LossPhase, ...] = _REFERENCE_SCHEDULE
    evt_quantile: float = Field(0.9, gt=0.0, lt=1.0)
    evidential_regulariser: float = Field(0.01, ge=0.0)

    @field_validator("schedule")
    @classmethod
    def _schedule_ordered(cls, v: tuple[LossPhase, ...]) -> tuple[LossPhase, ...]:
        starts = [p.start_epoch for p in v]
        if not v or starts[0] != 0 or starts != sorted(set(starts)):
            raise ValueError(f"loss.schedule start epochs must begin at 0 and increase strictly, got {starts}")
        return v

    def weights_at(self, epoch: int) -> LossPhase:
        """The phase in force at ``epoch`` (0-based)."""
        return [p for p in self.schedule if p.start_epoch <= epoch][-1]

    def gamma_at(self, epoch: int) -> float:
        """Focal gamma: linear warm-up from 0 to ``focal_gamma_max`` over the warm-up epochs."""
        if self.focal_gamma_warmup_epochs == 0:
            return self.focal_gamma_max
        return self.focal_gamma_max * min(1.0, epoch / self.focal_gamma_warmup_epochs)


class TrainConfig(_Frozen):
    """Optimisation (design document hyper-parameters) and run control."""

    epochs: int = Field(120, ge=1)
    batch_size: int = Field(512, ge=1)
    learning_rate: float = Field(5.34e-4, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    early_stopping_patience: int = Field(10, ge=1)
    early_stopping_metric: Literal["val_tss", "val_auc", "val_loss"] = "val_tss"
    use_amp: bool = True
    device: str = "auto"
    num_threads: int | None = Field(None, ge=1)
    eval_batch_size: int = Field(8192, ge=1)
    # CUDA-only speed options (everest.training.fast); ignored on CPU. Measured on an H200 (benchmarks/RESULTS.md):
    # graph replay 6.5x the eager step with the same metrics, torch.compile 1.4x, so graphs are on.
    cuda_graphs: bool = True
    compile: bool = False
    time_limit_minutes: float | None = Field(None, gt=0.0)

    @field_validator("device")
    @classmethod
    def _device_known(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError(f"train.device must be auto, cpu, mps, cuda or cuda:N, got {v!r}")
        return v


class ThresholdConfig(_Frozen):
    """Decision-threshold search on the validation split.

    ``grid="validation"`` (default) searches every validation positive's raw probability: TSS peaks at one
    of them, so with ``score="tss"`` the search returns the validation optimum wherever the model's
    probabilities lie; the sweep written to ``threshold_optimization.csv`` shows ``points`` of them, evenly
    spaced in rank and always including the chosen one. ``grid="design"`` is the design document's
    ``points`` values from ``start`` to ``stop`` (0.10, 0.11, ..., 0.90), which misses the optimum when a
    model's useful probabilities lie below 0.10. ``score="balanced"`` is the design's weighted sum of
    metrics (``weights``).
    """

    grid: Literal["validation", "design"] = "validation"
    score: Literal["tss", "balanced"] = "tss"
    start: float = Field(0.10, gt=0.0, lt=1.0)
    stop: float = Field(0.90, gt=0.0, lt=1.0)
    points: int = Field(81, ge=1)
    weights: dict[str, float] = Field(
        default_factory=lambda: {"tss": 0.40, "f1": 0.20, "precision": 0.15, "recall": 0.15, "specificity": 0.10}
    )
    source: Literal["validation", "test"] = "validation"

    @field_validator("weights")
    @classmethod
    def _known_metrics(cls, v: dict[str, float]) -> dict[str, float]:
        allowed = {"tss", "f1", "precision", "recall", "specificity", "accuracy"}
        unknown = sorted(set(v) - allowed)
        if unknown:
            raise ValueError(f"threshold.weights has unknown metrics {unknown}; allowed: {sorted(allowed)}")
        return v

    @model_validator(mode="after")
    def _range(self) -> ThresholdConfig:
        if self.stop < self.start:
            raise ValueError(f"threshold.stop ({self.stop}) must be >= threshold.start ({self.start})")
        return self


class CalibrationConfig(_Frozen):
    """The map from the model's probabilities to calibrated ones, fitted on the validation split.

    Focal loss and noisy positive copies distort probabilities; the shipped forecast (``y_prob``, the
    threshold search, Brier, ECE) is on the calibrated scale and the raw scores are kept beside it.
    """

    method: Literal["none", "temperature", "platt", "isotonic"] = "platt"


class DataConfig(_Frozen):
    """How SHARP tables become samples."""

    features: tuple[str, ...] = EVEREST_FEATURES
    feature_aliases: dict[str, str] = Field(default_factory=lambda: {"TOTBSQ": "MEANALP"})
    log_features: tuple[str, ...] = EXTENSIVE_FEATURES
    scaling: Literal["auto", "log_standard", "standard", "none"] = "auto"
    # The column naming a table's regions: NOAA_AR in SolarFlareNet tables; HARPNUM in tables keyed by the
    # active-region patch (HARP, or TARP in SMARP tables), which carry no NOAA number.
    region_column: Literal["NOAA_AR", "HARPNUM"] = "NOAA_AR"
    validation_split: Literal["region", "time"] = "region"
    validation_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    # Seed of the region shuffle that carves the validation split. One split shared by an experiment's
    # seeds (the seed then controls initialisation, batch order, dropout and augmentation only) lets the
    # seed ensemble choose its threshold and calibration on regions none of its members trained on.
    # None: the experiment's seed (each seed its own split, as the reference did).
    split_seed: int | None = Field(0, ge=0)
    c_zero_filter: bool = True
    augment_classes: tuple[str, ...] = ("M", "M5")
    augment_noise: float = Field(0.05, ge=0.0)
    augment_copies: int = Field(1, ge=0, le=20)  # noisy copies of each positive (the reference: 1)
    cache: bool = True

    @field_validator("features")
    @classmethod
    def _features_distinct(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"data.features must be a non-empty list of distinct column names, got {list(v)}")
        return v

    @field_validator("augment_classes")
    @classmethod
    def _classes_known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [c for c in v if c not in FLARE_CLASSES]
        if bad:
            raise ValueError(f"data.augment_classes has unknown classes {bad}; allowed: {list(FLARE_CLASSES)}")
        return v


# Settings that decide how a run executes, not what it computes (left out of the config hash): where it
# runs and with how many threads, the evaluation batch size (at most last-bit float differences), the
# time limit (a stopped run resumes from its checkpoint) and the sample cache (identical arrays).
# train.cuda_graphs and train.compile stay in the hash: on CPU they are ignored, but on CUDA the graph-
# replayed step is not proven bit-identical to the eager one.
RUN_CONTROL: dict[str, frozenset[str]] = {
    "train": frozenset({"device", "num_threads", "eval_batch_size", "time_limit_minutes"}),
    "data": frozenset({"cache"}),
}


class TuningRecord(_Frozen):
    """Where a tuned recipe came from (written by ``everest-tune``); provenance only, not in the config hash."""

    study: str
    storage: str
    targets: tuple[str, ...]
    metric: str
    folds: int = Field(ge=2)
    trials: int = Field(ge=1)  # finished trials (complete or pruned) when the recipe was written
    best_trial: int = Field(ge=0)
    best_value: float
    space_hash: str


class EverestConfig(_Frozen):
    """The effective configuration of an experiment: everything that can change its result."""

    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    threshold: ThresholdConfig = ThresholdConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    data: DataConfig = DataConfig()
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    tuning: TuningRecord | None = None

    @field_validator("seeds")
    @classmethod
    def _seeds_ok(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or len(set(v)) != len(v) or any(s < 0 for s in v):
            raise ValueError(f"seeds must be a non-empty list of distinct non-negative integers, got {list(v)}")
        return v

    def config_hash(self) -> str:
        """Stable 16-hex-digit hash of the settings that can change a result (canonical sorted JSON).

        The :data:`RUN_CONTROL` settings and the tuning provenance are left out, so changing them keeps
        finished results and checkpoints.
        """
        science = self.model_dump(mode="json", exclude={**{k: set(v) for k, v in RUN_CONTROL.items()}, "tuning": True})
        blob = json.dumps(science, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def with_overrides(self, overrides: dict[str, Any] | list[str]) -> EverestConfig:
        """A copy with dotted-key overrides applied (``{"train.epochs": 3}`` or ``["train.epochs=3"]``)."""
        pairs = _parse_overrides(overrides) if isinstance(overrides, list) else list(overrides.items())
        data = self.model_dump(mode="json")
        for key, value in pairs:  # each checked as given, even when a later one sets the same key
            node, model = data, type(self)
            *path, leaf = key.split(".")
            for part in path:
                field = model.model_fields.get(part)
                if not isinstance(node.get(part), dict) or field is None:
                    raise ConfigError(f"unknown configuration key {key!r}: {part!r} is not a section")
                node, model = node[part], field.annotation
            if leaf not in node:
                raise ConfigError(f"unknown configuration key {key!r}; known keys here: {sorted(node)}")
            _check_value(key, model.model_fields[leaf], value)
            node[leaf] = value
        return _validate(data, source="overrides")


def _parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"invalid override {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else raw))
    return out


def _check_value(key: str, field: FieldInfo, value: Any) -> None:
    """One override's value against its own key's type and bounds (the whole configuration is validated after)."""
    try:
        kind = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
        TypeAdapter(kind).validate_python(value)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, f"override {key}={value!r}")) from None


def _validate(data: dict[str, Any], source: str) -> EverestConfig:
    try:
        return EverestConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, f"configuration from {source}")) from None


# Named training budgets applied before the file and the overrides. "demo" keeps the production recipe
# but caps the budget so all 45 experiments on the demo data finish in minutes on 2 CPU cores.
PRESETS: dict[str, tuple[str, ...]] = {
    "production": (),
    "demo": ("train.epochs=6", "train.early_stopping_patience=2", "train.batch_size=256"),
}


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None,
                preset: str = "production") -> EverestConfig:
    """Build the effective configuration: defaults, a preset, then a TOML/YAML file, then dotted overrides."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {sorted(PRESETS)}")
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        data = load_mapping(path, "configuration file")
        source = str(path)
    base = EverestConfig().with_overrides(list(PRESETS[preset])).model_dump(mode="json")
    # The file's sections update the preset's key by key; a key's value (even a mapping) is replaced whole.
    merged = {k: {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
              for k, v in data.items()}
    cfg = _validate({**base, **merged}, source=source)
    return cfg.with_overrides(overrides) if overrides else cfg


def run_config(config_file: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
               preset: str = "production", epochs: int | None = None, device: str | None = None) -> EverestConfig:
    """The one translation of a run's options (``--config``, ``--preset``, ``--set``, ``--epochs``,
    ``--device``) into its configuration; ``epochs`` and ``device`` are shorthands applied last."""
    extra = list(overrides)
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"invalid --epochs {epochs!r}: expected a positive integer")
        extra.append(f"train.epochs={epochs}")
    if device is not None:
        extra.append(f"train.device={device}")
    return load_config(config_file, extra, preset=preset)
