"""One EVEREST experiment end to end: data -> model -> early-stopped training -> threshold -> test metrics.

Usable from a notebook (``ProductionTrainer(Experiment(target=Target.parse("M5-72"), seed=0)).train()``),
from the command line (``everest train``), from a PBS/SLURM array job and from the Prefect flow, which
only wraps :meth:`ProductionTrainer.train`.

Early stopping and the decision threshold use a region-disjoint **validation** split, never the test
set; the best weights are a real copy; a non-finite loss stops the run with :class:`TrainingDiverged`.
Every epoch ends with an atomic checkpoint, so a killed run resumes.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from everest import io, stopping
from everest import metrics as M
from everest.calibration import log_loss
from everest.config import EverestConfig, Experiment
from everest.data import ExperimentData, SampleSet, data_file, prepare_experiment
from everest.errors import ConfigError, Preempted, TimeLimitReached, TrainingDiverged
from everest.fast import TrainStep, device_stream, make_optimizer
from everest.forecast import Predictions, ScoredForecast, final_metrics_row, score_forecast, write_forecast
from everest.inference import measure_latency, predict
from everest.losses import EverestLoss
from everest.model import EverestModel, count_parameters
from everest.provenance import environment_info, model_card
from everest.results import (
    Identity,
    begin_attempt,
    clear_failure,
    experiment_dirs,
    finished,
    identity_for,
    link_trained_model,
)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class _StopOnSignal:
    """Record SIGTERM/SIGINT instead of dying, so training can checkpoint mid-epoch and exit cleanly.

    Signal handlers can only be installed from the main thread; on another thread (a Dask worker)
    the launcher forwards its signals through :func:`everest.stopping.request_stop`.
    """

    def __init__(self) -> None:
        self._signal: str | None = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> str | None:
        """The signal or reason that asked training to stop, if any."""
        return self._signal or stopping.stop_reason()

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self._signal = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass(frozen=True)
class EpochReport:
    """What the progress callback receives after each epoch."""

    experiment: str
    epoch: int  # 1-based number of finished epochs
    max_epochs: int
    train_loss: float
    val_loss: float
    val_tss: float
    best_epoch: int


ProgressCallback = Callable[[EpochReport], None]


@dataclass(frozen=True)
class Prepared:
    """An experiment ready to train: its samples, its freshly seeded model and the device."""

    data: ExperimentData
    model: EverestModel
    device: torch.device


@dataclass(frozen=True)
class FitOutcome:
    """What the training loop hands to evaluation."""

    history: list[dict]
    best_epoch: int  # 1-based
    stop_reason: str
    resumed_after_epoch: int  # 0 for a fresh run; else the checkpoint's finished epochs


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
            with _StopOnSignal() as self._stop:
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
        with device_stream(device), _StopOnSignal() as self._stop:
            return self._fit(model, train, val, device)

    def _fit(self, model: EverestModel, train: SampleSet, val_set: SampleSet, device: torch.device) -> FitOutcome:
        cfg = self.config
        tc = cfg.train
        opt = make_optimizer(model, tc.learning_rate, tc.weight_decay, device, capturable=tc.cuda_graphs)
        loss_fn = EverestLoss(cfg.loss)
        amp = tc.use_amp and device.type == "cuda"
        x = torch.from_numpy(train.x).to(device)  # (N, T, F), resident on the device
        y = torch.from_numpy(train.y).to(device=device, dtype=torch.float32)
        valid = torch.from_numpy(train.valid).to(device)  # (N, T) real steps; padding is masked in the model
        step = TrainStep(model, opt, loss_fn, x, y, device, valid=valid, amp=amp, cuda_graphs=tc.cuda_graphs,
                         compile=tc.compile, name=self.experiment.name)
        state = self._resume(model, opt)
        history: list[dict] = state["history"]
        best_state, best_score, best_epoch = state["best_state"], state["best_score"], state["best_epoch"]
        start_epoch = state["epoch"]
        started = time.monotonic()
        bar = _progress_bar(self.experiment.name, tc.epochs, start_epoch)
        metric = tc.early_stopping_metric
        if metric != "val_loss" and val_set.n_positive in (0, len(val_set)):
            log.warning("%s: validation split has one class only; early stopping on val_loss", self.experiment.name)
            metric = "val_loss"
        patience_left = not history or len(history) - 1 - best_epoch < tc.early_stopping_patience
        partial = state["partial"]
        for epoch in range(start_epoch, tc.epochs if patience_left else start_epoch):
            t0 = time.perf_counter()
            # Shuffling and dropout depend only on (seed, epoch): a resumed run replays them exactly.
            torch.manual_seed(self.experiment.seed * 1_000_003 + epoch)
            model.train()
            n = len(y)
            perm = torch.randperm(n, device=device)
            first, sums = 0, None
            if partial:  # resume inside the epoch a SIGTERM interrupted, with its random state
                first, sums = partial["offset"], partial["sums"]
                _set_rng_state(partial["rng"], device)
                partial = None
            step.start_epoch(epoch, sums)  # running sums: total, focal, evidential, evt, precursor
            for i in range(first, n, tc.batch_size):
                if self._stop.requested:
                    self._save_checkpoint(model, opt, epoch, history, best_state, best_score, best_epoch,
                                          partial={"offset": i, "sums": step.sums.cpu(), "rng": _rng_state(device)})
                    stopping.mark_checkpointed()
                    raise Preempted(f"{self.experiment.name}: stopped by {self._stop.requested} in epoch {epoch + 1}"
                                    f" at sample {i} of {n}; checkpointed, rerun to resume")
                step(perm[i:i + tc.batch_size], tc.batch_size)
            train_terms = (step.sums / n).tolist()  # one host sync per epoch
            if not all(math.isfinite(v) for v in train_terms):
                raise TrainingDiverged(f"{self.experiment.name}: training loss is {train_terms[0]} at epoch {epoch + 1}"
                                       f" (terms focal/evidential/evt/precursor = {train_terms[1:]}); "
                                       "the last finished epoch is checkpointed")
            val = self._validate(model, val_set, device)
            seconds = time.perf_counter() - t0
            row = {"epoch": epoch + 1, "train_loss": train_terms[0], "focal": train_terms[1],
                   "evidential": train_terms[2], "evt": train_terms[3], "precursor": train_terms[4],
                   "val_loss": val["val_loss"], "val_tss": val["val_tss"], "val_auc": val["val_auc"],
                   "lr": opt.param_groups[0]["lr"], "seconds": seconds, "samples_per_s": n / seconds}
            history.append(row)
            score = -val["val_loss"] if metric == "val_loss" else val[metric]
            if best_epoch < 0 or (math.isfinite(score) and score > best_score):
                best_score, best_epoch = score, epoch
                best_state = copy.deepcopy(model.state_dict())  # a real copy, not references to live tensors
            self._save_checkpoint(model, opt, epoch + 1, history, best_state, best_score, best_epoch)
            bar(row)
            if self.progress:
                self.progress(EpochReport(self.experiment.name, epoch + 1, tc.epochs, row["train_loss"],
                                          row["val_loss"], row["val_tss"], best_epoch + 1))
            if tc.time_limit_minutes and (time.monotonic() - started) / 60 > tc.time_limit_minutes:
                raise TimeLimitReached(f"{self.experiment.name}: time limit of {tc.time_limit_minutes} min reached "
                                       f"after epoch {epoch + 1}; rerun to resume from the checkpoint")
            if epoch - best_epoch >= tc.early_stopping_patience:
                break
        stopped_early = len(history) < tc.epochs
        model.load_state_dict(best_state)
        return FitOutcome(history, best_epoch + 1, f"early_stopping on {metric}" if stopped_early else "max_epochs",
                          start_epoch)

    def _validate(self, model: EverestModel, val: SampleSet, device: torch.device) -> dict[str, float]:
        """Epoch scores on validation. ``val_tss`` is the best TSS over the threshold grid: with the default
        ``validation`` grid, over every threshold, so early stopping never scores a grid artefact (on the
        design's 0.10-0.90 grid it fell as a better model's probabilities moved below 0.10)."""
        p = self._predict(model, val, device)["y_prob"]
        val_loss = log_loss(val.y, p)  # BCE of the forecast
        with M.ignore_undefined():
            table = M.threshold_table(val.y, p, self.config.threshold)
            auc = M.roc_auc(val.y, p)
        return {"val_loss": val_loss, "val_tss": float(np.nanmax(table["tss"])) if len(table) else float("nan"),
                "val_auc": auc}

    def _predict(self, model: EverestModel, samples: SampleSet, device: torch.device) -> dict[str, np.ndarray]:
        """Raw probabilities (and evidential uncertainties) with this run's precision and batch size."""
        tc = self.config.train
        return predict(model, samples, device, amp=tc.use_amp and device.type == "cuda",
                       eval_batch_size=tc.eval_batch_size)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, opt, epoch, history, best_state, best_score, best_epoch, partial=None) -> None:
        """``epoch`` finished epochs; ``partial`` marks a mid-epoch stop (sample offset, loss sums, RNG)."""
        payload = {**self._checkpoint_identity, "epoch": epoch, "model": model.state_dict(),
                   "optimizer": opt.state_dict(), "history": history, "best_state": best_state,
                   "best_score": best_score, "best_epoch": best_epoch, "partial": partial}
        io.write_torch(self.checkpoint_path, payload)

    def _resume(self, model: EverestModel, opt: torch.optim.Optimizer) -> dict[str, Any]:
        fresh = {"epoch": 0, "history": [], "best_state": None, "best_score": -math.inf, "best_epoch": -1,
                 "partial": None}
        if not self.checkpoint_path.is_file():
            return fresh
        try:
            ck = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
            if {k: ck.get(k) for k in self._checkpoint_identity} != self._checkpoint_identity:
                log.warning("%s: checkpoint %s is from another config, data, code version or device; starting fresh",
                            self.experiment.name, self.checkpoint_path)
                return fresh
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
        except Exception as err:  # a corrupt checkpoint must not block the run: log it and start over
            log.error("%s: cannot load checkpoint %s (%s: %s); starting from epoch 0",
                      self.experiment.name, self.checkpoint_path, type(err).__name__, err)
            return fresh
        log.info("%s: resuming after epoch %d%s from %s", self.experiment.name, ck["epoch"],
                 f" (+{ck['partial']['offset']} samples)" if ck.get("partial") else "", self.checkpoint_path)
        return {k: ck.get(k) for k in fresh}

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
        env = environment_info(device)
        t = self.experiment.target
        results = {
            "experiment": {"name": self.experiment.name, "flare_class": t.flare_class, "horizon_hours": t.horizon,
                           "target": str(t), "seed": self.experiment.seed,
                           "array_index": self.experiment.array_index if self.experiment.seed < 5 else None},
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
                     "n_val_regions": int(len(np.unique(data.val.region)))},
            "history": history,
            "config": cfg.model_dump(mode="json"),
            "provenance": {**self.identity.provenance(), **env},
        }
        self._write_outputs(results, history, scored, val, test, data, model)
        return results

    def _synthetic_data(self) -> bool:
        """Whether both tables come from the synthetic generator (the report must say so)."""
        from everest.synthetic import is_synthetic

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
        clear_failure(self.output_dir, self.experiment.name)  # this attempt succeeded: no failure beside results
        io.write_json(rd / "results.json", results)  # last: its presence marks the experiment finished
        self.checkpoint_path.unlink(missing_ok=True)


def _progress_bar(name: str, total: int, start: int) -> Callable[[dict], None]:
    """A tqdm bar on a terminal, plain log lines otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc=name, unit="epoch", leave=False)

        def update(row: dict) -> None:
            bar.set_postfix(loss=f"{row['train_loss']:.4f}", val_tss=f"{row['val_tss']:.3f}")
            bar.update(1)
        return update

    def log_line(row: dict) -> None:
        log.info("%s epoch %d/%d: loss %.4f val_loss %.4f val_tss %.3f val_auc %.3f (%.1f s, %.0f samples/s)",
                 name, row["epoch"], total, row["train_loss"], row["val_loss"], row["val_tss"], row["val_auc"],
                 row["seconds"], row["samples_per_s"])
    return log_line
