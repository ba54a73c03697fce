"""One EVEREST experiment end to end: data -> model -> early-stopped training -> threshold -> test metrics.

Usable from a notebook (``ProductionTrainer(Experiment(target=Target.parse("M5-72"), seed=0)).train()``),
from the command line (``everest train``), from a PBS/SLURM array job and from the Prefect flow, which
only wraps :meth:`ProductionTrainer.train`.

Early stopping and the decision threshold use a region-disjoint **validation** split, never the test
set; the best weights are a real copy; a non-finite loss stops the run with :class:`TrainingDiverged`.
Every epoch ends with an atomic checkpoint, so a killed run resumes.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from everest import io
from everest.config import EverestConfig, Experiment
from everest.data.samples import ExperimentData, SampleSet, prepare_experiment
from everest.data.tables import data_file
from everest.errors import ConfigError, TrainingDiverged
from everest.model.network import EverestModel, count_parameters
from everest.provenance import environment_info, model_card
from everest.results import (
    Identity,
    begin_attempt,
    experiment_dirs,
    finished,
    identity_for,
    link_trained_model,
    results_record,
    write_results,
)
from everest.scoring.forecast import Predictions, ScoredForecast, final_metrics_row, score_forecast, write_forecast
from everest.scoring.inference import measure_latency, predict
from everest.training.fast import device_stream
from everest.training.loop import EpochReport, FitOutcome, Member, ProgressCallback, SoloEngine, fit_members
from everest.training.stopping import StopOnSignal

__all__ = ["EpochReport", "FitOutcome", "Prepared", "ProductionTrainer", "ProgressCallback", "TrainingDiverged",
           "resolve_device", "seed_everything"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class Prepared:
    """An experiment ready to train: its samples, its freshly seeded model and the device."""

    data: ExperimentData
    model: EverestModel
    device: torch.device


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; explicit names are checked for availability."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device is 'mps' but MPS is not available; use 'auto' or 'cpu'")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class ProductionTrainer:
    """Train, select the threshold for, evaluate and save one (flare class, horizon, seed) experiment."""

    def __init__(
        self,
        experiment: Experiment,
        *,
        config: EverestConfig | None = None,
        data_dir: str | Path = "data",
        output_dir: str | Path = "output",
        cache_dir: str | Path | None = None,
        progress: ProgressCallback | None = None,
        force: bool = False,
    ) -> None:
        self.experiment = experiment
        self.config = config or EverestConfig()
        self.data_dir = Path(data_dir)
        self.output_dir = Path(output_dir)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.output_dir / "cache"
        self.progress = progress
        self.force = force
        self.results_dir, self.model_dir, self.checkpoint_path = experiment_dirs(self.output_dir, self.experiment)
        self.identity: Identity | None = None  # known once train() has hashed the data files

    # ------------------------------------------------------------------ public API
    def train(self) -> dict[str, Any]:
        """Run the experiment (or return its finished results) and return the ``results.json`` content.

        Results count as finished only if they record this run's identity (:func:`everest.results.finished`);
        before training, results of another identity are moved aside (:func:`everest.results.begin_attempt`).
        """
        prepared = self.prepare()
        if isinstance(prepared, dict):
            return prepared
        with device_stream(prepared.device):  # a private CUDA stream (graph capture needs one); no-op elsewhere
            with StopOnSignal() as self._stop:
                fit = self._fit(prepared.model, prepared.data.train, prepared.data.val, prepared.device)
            return self.finish(prepared, fit)

    def prepare(self) -> Prepared | dict[str, Any]:
        """Seed, load the data and build the seeded model; the finished results instead when there are some.

        Every random draw before training (initialisation included) happens here, in the order a solo run
        makes it, so an experiment trained in a group starts from the same weights as one trained alone.
        """
        cfg = self.config
        seed_everything(self.experiment.seed)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        device = resolve_device(cfg.train.device)
        data = prepare_experiment(self.data_dir, self.experiment.target, self.experiment.seed, cfg.data,
                                  cfg.model.seq_len, self.cache_dir)
        self.identity = identity_for(self.experiment, cfg, data.file_hashes)
        done = None if self.force else finished(self.output_dir, self.identity)
        if done is not None:
            log.info("%s: already finished with this config, data and code; skipping", self.experiment.name)
            return done
        begin_attempt(self.output_dir, self.identity, force=self.force)
        if self.force:
            self.checkpoint_path.unlink(missing_ok=True)
        # Optimizer flags (fused, capturable) and RNG streams are device-specific: resume on the same kind.
        self._checkpoint_identity = {"format": CHECKPOINT_FORMAT, **self.identity.model_dump(),
                                     "device_type": device.type}
        log.info("%s: %d train (%d pos), %d val (%d pos), %d test (%d pos) samples on %s",
                 self.experiment.name, len(data.train), data.train.n_positive, len(data.val), data.val.n_positive,
                 len(data.test), data.test.n_positive, device)
        model = EverestModel(cfg.model, n_features=data.train.x.shape[2]).to(device)
        return Prepared(data, model, device)

    def finish(self, prepared: Prepared, fit: FitOutcome) -> dict[str, Any]:
        """Evaluate the best weights (already in ``prepared.model``), write every output and return the results."""
        return self._evaluate_and_save(prepared.model, prepared.data, prepared.device, fit)

    # ------------------------------------------------------------------ training
    def fit(self, train: SampleSet, val: SampleSet) -> FitOutcome:
        """Train on ``train`` with early stopping on ``val`` alone: no test split, no result files (a cross-
        validation fold of hyper-parameter tuning). Checkpoints under this trainer's output folder."""
        cfg = self.config
        seed_everything(self.experiment.seed)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        device = resolve_device(cfg.train.device)
        self._checkpoint_identity = {"format": CHECKPOINT_FORMAT, "config_hash": cfg.config_hash(),
                                     "n_train": len(train), "n_val": len(val), "device_type": device.type}
        model = EverestModel(cfg.model, n_features=train.x.shape[2]).to(device)
        with device_stream(device), StopOnSignal() as self._stop:
            return self._fit(model, train, val, device)

    def member(self, train: SampleSet, val: SampleSet) -> Member:
        """This experiment's state in the epoch loop (after :meth:`prepare` or inside :meth:`fit`)."""
        return Member.of(self.experiment.name, self.experiment.seed, train, val, self.config.train,
                         self.checkpoint_path, self._checkpoint_identity, self.progress)

    def _fit(self, model: EverestModel, train: SampleSet, val: SampleSet, device: torch.device) -> FitOutcome:
        member = self.member(train, val)
        engine = SoloEngine(model, member, self.config, device)
        member.resume(engine.load, self.config.train)
        fit_members([member], engine, self.config, lambda: self._stop.requested)
        if member.error is not None:
            raise member.error
        model.load_state_dict(member.best_state)
        return member.outcome(self.config.train.epochs)

    def _predict(self, model: EverestModel, samples: SampleSet, device: torch.device) -> dict[str, np.ndarray]:
        """Raw probabilities (and evidential uncertainties) with this run's precision and batch size."""
        tc = self.config.train
        return predict(model, samples, device, amp=tc.use_amp and device.type == "cuda",
                       eval_batch_size=tc.eval_batch_size)

    # ------------------------------------------------------------------ evaluation and outputs
    def _evaluate_and_save(self, model: EverestModel, data: ExperimentData, device: torch.device,
                           fit: FitOutcome) -> dict[str, Any]:
        cfg = self.config
        history = fit.history
        val_pred = self._predict(model, data.val, device)
        test_pred = self._predict(model, data.test, device)
        val = Predictions.of(data.val, val_pred.pop("y_prob"))
        test = Predictions.of(data.test, test_pred.pop("y_prob"), **test_pred)
        scored = score_forecast(val, test, cfg)
        test_metrics = scored.sections["test_metrics"]
        latency = measure_latency(model, data.test, device)
        test_metrics.update(latency)
        sections = {
            **scored.sections,
            "training": {"best_epoch": fit.best_epoch, "epochs_run": len(history), "stop_reason": fit.stop_reason,
                         "resumed_after_epoch": fit.resumed_after_epoch,
                         "early_stopping_metric": cfg.train.early_stopping_metric,
                         "seconds": float(sum(h["seconds"] for h in history)),
                         "n_parameters": count_parameters(model)},
            "data": {"data_dir": str(self.data_dir), "synthetic": self._synthetic_data(),
                     "scaler": data.scaler.to_dict(),
                     **{f"n_{k}": len(getattr(data, k)) for k in ("train", "val", "test")},
                     **{f"n_{k}_positive": getattr(data, k).n_positive for k in ("train", "val", "test")},
                     "n_val_regions": int(len(np.unique(data.val.region))), "history_profile": data.history},
            "history": history,
            "config": cfg.model_dump(mode="json"),
        }
        results = results_record(self.identity, "everest", self.experiment.target, self.experiment.seed, sections,
                                 environment_info(device))
        self._write_outputs(results, history, scored, val, test, data, model)
        return results

    def _synthetic_data(self) -> bool:
        """Whether both tables come from the synthetic generator (the report must say so)."""
        from everest.data.synthetic import is_synthetic

        return all(is_synthetic(data_file(self.data_dir, self.experiment.target, s)) for s in ("train", "test"))

    def _write_outputs(self, results: dict[str, Any], history: list[dict], scored: ScoredForecast,
                       val: Predictions, test: Predictions, data: ExperimentData, model: EverestModel) -> None:
        rd, md = self.results_dir, self.model_dir
        io.write_csv(rd / "training_history.csv", pd.DataFrame(history))
        write_forecast(rd, scored, val, test, final_metrics_row(results, best_epoch=results["training"]["best_epoch"]))
        io.write_torch(md / "model_weights.pt", model.state_dict())
        io.write_json(md / "scaler.json", data.scaler.to_dict())
        io.write_json(md / "calibration.json", scored.calibrator.to_dict())
        io.write_json(md / "config.json", results["config"])
        io.write_text(md / "MODEL_CARD.md", model_card(results))
        link_trained_model(self.output_dir, self.experiment, md)
        write_results(self.output_dir, self.identity, results)  # last: its presence marks the experiment finished
        self.checkpoint_path.unlink(missing_ok=True)

