"""Simple baselines fitted on exactly the windows EVEREST sees, saved as one more model for the analysis.

A claim that EVEREST forecasts well means little without strong simple models on the same footing. Each
baseline here uses, for one experiment (target, seed), the same :func:`everest.data.prepare_experiment`
output as the transformer: the same training split (with the same M/M5 noisy positive copies), the same
scaling fitted on the training split, the same ``seq_len`` windows, the same region-disjoint validation
split for calibration and the threshold search (:func:`everest.scoring.forecast.score_forecast`) and the same test
metrics. Results go to a results root of their own with EVEREST's layout and experiment names::

    <output>/baselines/<model>/results/everest_M_24h_seed0/{results.json, predictions.csv,
                                                             threshold_optimization.csv, final_metrics.csv}

so ``ProductionAnalyzer(baseline_root(out, "logistic") / "results")`` analyses a baseline like EVEREST,
and ``ProductionAnalyzer(out / "results")`` finds every ``out/baselines/<model>/results`` and opens its
report with the verdict of EVEREST against the best of them (chosen on validation TSS), paired on seeds
and test samples.

Models (:data:`BASELINES`):

* ``logistic``: L2 logistic regression (lbfgs, C = 1) on the last step's features.
* ``boosted``: histogram gradient boosting on the last step, ``last - previous real step``,
  ``last - oldest real step`` and the number of real steps (:func:`window_features`).

Neither weights classes. Measured on the ``demo`` synthetic data (9 targets x seeds 0-1; TSS on test at
the validation-chosen threshold): logistic 0.555 unweighted vs 0.558 with ``class_weight="balanced"``,
boosted 0.485 vs 0.526; but the test Brier score / ECE worsen from 0.082 / 0.074 to 0.127 / 0.154
(logistic) and from 0.088 / 0.071 to 0.109 / 0.104 (boosted). Unweighted, the probabilities stay near
calibrated, so the probability metrics compare fairly too, at the same TSS for logistic and 0.04 less for
boosted (``BoostedConfig(class_weight="balanced")`` trades it back). The boosted model is regularised
(depth 3, 100 rounds of 0.05, at least 100 windows per leaf), chosen on validation: on the demo data
(seed 0) its mean validation max-TSS was 0.636 against 0.596 for scikit-learn's defaults, which overfit
the few thousand windows. It never early-stops: scikit-learn's internal split would draw rows, not regions, and must not
touch the validation or test split anyway.

Reruns skip finished results of the same identity (:mod:`everest.results`): experiment, hyper-parameters
plus the EverestConfig parts that shape windows and thresholds (``data``, ``threshold``,
``model.seq_len``), data file hashes and code version (:data:`everest.results.CODE_VERSION` with this
module's version). Each experiment takes seconds on a CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from sklearn.ensemble import HistGradientBoostingClassifier  # at import: threads importing it at once break
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from everest.config import RUN_CONTROL, ConfigError, EverestConfig, Experiment, Target
from everest.data.samples import ExperimentData, SampleSet, prepare_experiment
from everest.data.tables import data_file
from everest.errors import DataError
from everest.results import (
    Identity,
    begin_attempt,
    experiment_dir,
    finished,
    model_identity,
    record_failure,
    results_record,
    write_results,
)
from everest.scoring.forecast import Predictions, ScoredForecast, final_metrics_row, score_forecast, write_forecast
from everest.scoring.portable import FEATURES, PortableBaseline

log = logging.getLogger(__name__)

BASELINES: tuple[str, ...] = ("logistic", "boosted")
# Bump when a baseline's results change (features, estimator, outputs); a CODE_VERSION bump also refits.
BASELINE_VERSION = "baselines-3"
LATENCY_BATCH = 32  # the trainer's latency protocol: ms per sample at batch 32, after warm-up


# ---------------------------------------------------------------------- hyper-parameters
class BaselineConfig(BaseModel):
    """Hyper-parameters of one baseline model (frozen; the subclass's ``model`` names it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: ClassVar[str]
    feature_set: ClassVar[str]  # a key of everest.scoring.portable.FEATURES

    def features(self, x: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """The model's (N, k) inputs from scaled windows ``x`` (N, T, F) and their real-step mask (N, T)."""
        return FEATURES[self.feature_set](x, valid)

    def estimator(self, seed: int) -> Any:
        """An unfitted scikit-learn classifier seeded by the experiment seed."""
        raise NotImplementedError


class LogisticConfig(BaselineConfig):
    """L2 logistic regression on the last step; lbfgs converged in 15-38 iterations on the demo targets."""

    model: ClassVar[str] = "logistic"
    feature_set: ClassVar[str] = "last_step"
    C: float = Field(1.0, gt=0.0)
    max_iter: int = Field(1000, ge=1)
    tol: float = Field(1e-6, gt=0.0)
    class_weight: Literal["balanced"] | None = None

    def estimator(self, seed: int) -> Any:
        return LogisticRegression(C=self.C, solver="lbfgs", max_iter=self.max_iter, tol=self.tol,
                                  class_weight=self.class_weight, random_state=seed)


class BoostedConfig(BaselineConfig):
    """Histogram gradient boosting on :func:`window_features`, without early stopping."""

    model: ClassVar[str] = "boosted"
    feature_set: ClassVar[str] = "window_features"
    learning_rate: float = Field(0.05, gt=0.0)
    max_iter: int = Field(100, ge=1)
    max_depth: int | None = Field(3, ge=1)
    max_leaf_nodes: int = Field(31, ge=2)
    min_samples_leaf: int = Field(100, ge=1)
    l2_regularization: float = Field(1.0, ge=0.0)
    class_weight: Literal["balanced"] | None = None

    def estimator(self, seed: int) -> Any:
        params = self.model_dump()
        return HistGradientBoostingClassifier(**params, early_stopping=False, random_state=seed)


DEFAULTS: dict[str, BaselineConfig] = {c.model: c() for c in (LogisticConfig, BoostedConfig)}


def _params_for(model: str, params: BaselineConfig | None) -> BaselineConfig:
    if model not in DEFAULTS:
        raise ConfigError(f"unknown baseline model {model!r}; valid models: {', '.join(BASELINES)}")
    if params is not None and params.model != model:
        raise ConfigError(f"params are for model {params.model!r}, not {model!r}")
    return params or DEFAULTS[model]


def recorded_config(params: BaselineConfig, config: EverestConfig) -> dict[str, Any]:
    """What ``results.json`` records under ``config``: the hyper-parameters and the EverestConfig parts
    that change a baseline's result (windows, data sections, threshold search, calibration)."""
    return {"baseline": {"model": params.model, **params.model_dump(mode="json")},
            "seq_len": config.model.seq_len,
            "data": config.data.model_dump(mode="json", exclude=set(RUN_CONTROL["data"])),
            "threshold": config.threshold.model_dump(mode="json"),
            "calibration": config.calibration.model_dump(mode="json")}


def baseline_identity(experiment: Experiment, params: BaselineConfig, config: EverestConfig,
                      data_hashes: dict[str, str]) -> Identity:
    """The identity of a baseline result (:func:`everest.results.model_identity`): its config hash covers
    :func:`recorded_config`, its code version carries :data:`BASELINE_VERSION`."""
    return model_identity(experiment, recorded_config(params, config), data_hashes, BASELINE_VERSION)


# ---------------------------------------------------------------------- layout
def baseline_root(output_dir: str | Path, model: str) -> Path:
    """``<output_dir>/baselines/<model>``: laid out like an output root; its ``results/`` is a results root."""
    return Path(output_dir) / "baselines" / model


# ---------------------------------------------------------------------- fitting
def fit_baseline(model: str, experiment: Experiment, config: EverestConfig | None = None,
                 data_dir: str | Path = "data", output_dir: str | Path = "output", *,
                 cache_dir: str | Path | None = None, force: bool = False,
                 params: BaselineConfig | None = None, threads: int | None = 1) -> dict[str, Any]:
    """Fit, threshold, evaluate and save one baseline for one experiment; return the ``results.json`` content.

    Finished results of the same identity are returned without refitting unless ``force``. ``params``
    replaces the model's default hyper-parameters. ``threads`` caps the OpenMP/BLAS threads of fitting and
    prediction (None: the libraries' default). One thread is the default because on windows of this size
    thread start-up dominates: on 2 busy cores the boosted fit took 0.1 s with one thread and 0.8-1.4 s
    with two. It is run control, not part of the identity. The sample cache defaults to the trainer's
    (``<output_dir>/cache``), so EVEREST and its baselines read the same cached windows.
    """
    params = _params_for(model, params)
    cfg = config or EverestConfig()
    root = baseline_root(output_dir, model)
    cache = Path(cache_dir) if cache_dir is not None else Path(output_dir) / "cache"
    data = prepare_experiment(data_dir, experiment.target, experiment.seed, cfg.data, cfg.model.seq_len, cache)
    identity = baseline_identity(experiment, params, cfg, data.file_hashes)
    done = None if force else finished(root, identity)
    if done is not None:
        log.info("%s %s: already finished with this config, data and code; skipping", model, experiment.name)
        return done
    begin_attempt(root, identity, force=force)
    try:
        with threadpool_limits(threads):
            results, scored, val, test, model = _fit_evaluate(params, experiment, cfg, data, identity,
                                                              Path(data_dir))
        results["training"]["threads"] = threads
        _write(root, identity, results, scored, val, test, model)
    except Exception as err:  # recorded so the analysis lists the experiment as failed, then re-raised
        record_failure(root, experiment, type(err).__name__, str(err), identity)
        raise
    return results


def _fit_evaluate(params: BaselineConfig, experiment: Experiment, cfg: EverestConfig, data: ExperimentData,
                  identity: Identity, data_dir: Path) -> tuple[dict[str, Any], ScoredForecast, Predictions,
                                                               Predictions, PortableBaseline]:
    """Fit on the training windows, calibrate and choose the threshold on validation, score the test split; the
    fitted model is returned as plain arrays (:class:`~everest.scoring.portable.PortableBaseline`)."""
    if len(np.unique(data.train.y)) < 2:
        raise DataError(f"{experiment.name}: the training windows hold one class only; a classifier needs both")
    seed = experiment.seed
    est = params.estimator(seed)  # imports scikit-learn outside the timed fit
    started = time.perf_counter()
    est.fit(params.features(data.train.x, data.train.valid), data.train.y)
    seconds = time.perf_counter() - started

    def predict(s: SampleSet | np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        x, v = (s.x, s.valid) if isinstance(s, SampleSet) else (s, valid)
        return est.predict_proba(params.features(x, v))[:, 1].astype(np.float64)

    val, test = Predictions.of(data.val, predict(data.val)), Predictions.of(data.test, predict(data.test))
    scored = score_forecast(val, test, cfg)
    scored.sections["test_metrics"].update(_latency(lambda w: predict(w, data.test.valid[:len(w)]), data.test.x))
    t = experiment.target
    sections = {
        **scored.sections,
        "training": {"best_epoch": None, "epochs_run": 1, "stop_reason": "fitted", "seconds": seconds,
                     "n_parameters": _n_parameters(est), "n_iter": int(np.max(est.n_iter_))},
        "data": _data_record(data, data_dir, t, params),
        "history": [],
        "config": recorded_config(params, cfg),
    }
    model = PortableBaseline.from_estimator(params.model, params.feature_set, est)
    return results_record(identity, params.model, t, seed, sections, _environment()), scored, val, test, model


def _latency(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, repeats: int = 30) -> dict[str, float]:
    """The trainer's protocol on the baseline's whole path (window -> features -> probability):
    ms per sample at batch 32 after 5 warm-up calls, and ms for one sample."""
    def ms_per_call(batch: np.ndarray) -> float:
        for _ in range(5):
            predict(batch)
        t0 = time.perf_counter()
        for _ in range(repeats):
            predict(batch)
        return (time.perf_counter() - t0) / repeats * 1000

    batch = x[:LATENCY_BATCH]
    if not len(batch):
        return {"latency_ms": float("nan"), "latency_single_ms": float("nan")}
    return {"latency_ms": ms_per_call(batch) / len(batch), "latency_single_ms": ms_per_call(batch[:1])}


def _n_parameters(est: Any) -> int:
    """Logistic: weights + intercept. Boosted: tree nodes (each holds a split or a leaf value)."""
    if hasattr(est, "coef_"):
        return int(est.coef_.size + est.intercept_.size)
    return int(sum(tree.nodes.size for trees in getattr(est, "_predictors", []) for tree in trees))


def _data_record(data: ExperimentData, data_dir: Path, target: Target, params: BaselineConfig) -> dict[str, Any]:
    from everest.data.synthetic import is_synthetic

    splits = {"train": data.train, "val": data.val, "test": data.test}
    return {"data_dir": str(data_dir),
            "synthetic": all(is_synthetic(data_file(data_dir, target, s)) for s in ("train", "test")),
            "scaler": data.scaler.to_dict(),
            **{f"n_{k}": len(s) for k, s in splits.items()},
            **{f"n_{k}_positive": s.n_positive for k, s in splits.items()},
            "n_val_regions": int(len(np.unique(data.val.region))),
            "n_features": int(params.features(data.test.x[:1], data.test.valid[:1]).shape[1])}


def _environment() -> dict[str, Any]:
    """The trainer's environment record (versions, host, batch job), on the CPU."""
    import torch

    from everest.provenance import environment_info

    return environment_info(torch.device("cpu"))


def _write(root: Path, identity: Identity, results: dict[str, Any], scored: ScoredForecast, val: Predictions,
           test: Predictions, model: PortableBaseline) -> None:
    """Write EVEREST's result files and the fitted model (``model/baseline.{json,npz}``, what a model bundle
    ships) into ``<root>/results/<name>/``; ``results.json`` last (it marks done)."""
    folder = experiment_dir(root, identity.experiment)
    write_forecast(folder, scored, val, test, final_metrics_row(results, model=results["model"], best_epoch=None))
    model.save(folder / "model")
    write_results(root, identity, results)
