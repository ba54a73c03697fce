"""The epoch loop shared by a solo experiment and a group of them: early stopping, best weights, checkpoints.

Each :class:`Member` is one experiment's training state (history, best weights and score, its checkpoint);
an engine (:class:`SoloEngine` here, :class:`everest.training.group.GroupEngine` for K at once) runs the steps.
Members advance epoch by epoch together; each is scored on its own validation split, keeps its own best
weights, stops on its own patience and writes its own checkpoint after every epoch, in one format for
both engines, so a member can resume alone or in any group.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from everest import io
from everest.config import EverestConfig, ThresholdConfig, TrainConfig
from everest.data.samples import SampleSet
from everest.errors import Preempted, TimeLimitReached, TrainingDiverged
from everest.model.losses import EverestLoss
from everest.model.network import EverestModel
from everest.scoring import metrics as M
from everest.scoring.calibration import log_loss
from everest.scoring.inference import predict
from everest.training import stopping
from everest.training.fast import TrainStep, make_optimizer

log = logging.getLogger(__name__)

EPOCH_SEED_STRIDE = 1_000_003  # shuffling and dropout of epoch e of seed s draw from seed s * stride + e


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
class FitOutcome:
    """What the training loop hands to evaluation."""

    history: list[dict]
    best_epoch: int  # 1-based
    stop_reason: str
    resumed_after_epoch: int  # 0 for a fresh run; else the checkpoint's finished epochs


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's shuffle and dropout: a resumed run replays them exactly."""
    return seed * EPOCH_SEED_STRIDE + epoch


def rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass(eq=False)
class Member:
    """One experiment's training state in the loop."""

    name: str
    seed: int
    train: SampleSet
    val: SampleSet
    checkpoint_path: Path
    checkpoint_identity: dict[str, Any]
    metric: str  # the early-stopping metric in force (val_loss when validation has one class)
    progress: ProgressCallback | None = None
    history: list[dict] = field(default_factory=list)
    best_state: dict[str, Tensor] | None = None
    best_score: float = -math.inf
    best_epoch: int = -1  # 0-based
    epoch: int = 0  # finished epochs
    partial: dict[str, Any] | None = None  # where an interrupted epoch stopped
    resumed_after: int = 0
    done: bool = False
    error: BaseException | None = None

    @classmethod
    def of(cls, name: str, seed: int, train: SampleSet, val: SampleSet, tc: TrainConfig, checkpoint_path: Path,
           checkpoint_identity: dict[str, Any], progress: ProgressCallback | None = None) -> Member:
        metric = tc.early_stopping_metric
        if metric != "val_loss" and val.n_positive in (0, len(val)):
            log.warning("%s: validation split has one class only; early stopping on val_loss", name)
            metric = "val_loss"
        return cls(name, seed, train, val, checkpoint_path, checkpoint_identity, metric, progress)

    @property
    def resume_point(self) -> tuple[int, int]:
        """(finished epochs, first step of the next epoch): members train together only from the same point."""
        return self.epoch, _first_step(self.partial)

    def resume(self, load: Callable[[dict[str, Any]], None], tc: TrainConfig) -> None:
        """Continue from this member's checkpoint if it has one of the same identity; ``load`` takes the
        checkpoint's model and optimizer state. A foreign or unreadable checkpoint means a fresh start."""
        if not self.checkpoint_path.is_file():
            return
        try:
            ck = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
            if {k: ck.get(k) for k in self.checkpoint_identity} != self.checkpoint_identity:
                log.warning("%s: checkpoint %s is from another config, data, code version or device; starting fresh",
                            self.name, self.checkpoint_path)
                return
            load(ck)
        except Exception as err:  # a corrupt checkpoint must not block the run: log it and start over
            log.error("%s: cannot load checkpoint %s (%s: %s); starting from epoch 0",
                      self.name, self.checkpoint_path, type(err).__name__, err)
            return
        log.info("%s: resuming after epoch %d%s from %s", self.name, ck["epoch"],
                 f" (+{ck['partial']['offset']} samples)" if ck.get("partial") else "", self.checkpoint_path)
        self.epoch = self.resumed_after = ck["epoch"]
        self.history, self.partial = ck["history"], ck["partial"]
        if self.partial and "step" not in self.partial:  # written before steps were recorded: offsets are whole batches
            self.partial["step"] = self.partial["offset"] // tc.batch_size
        self.best_state, self.best_score, self.best_epoch = ck["best_state"], ck["best_score"], ck["best_epoch"]
        self.done = bool(self.history) and len(self.history) - 1 - self.best_epoch >= tc.early_stopping_patience

    def save(self, model_state: dict[str, Tensor], optimizer_state: dict, partial: dict | None = None) -> None:
        """Atomic checkpoint after ``self.epoch`` finished epochs (``partial``: a mid-epoch stop)."""
        payload = {**self.checkpoint_identity, "epoch": self.epoch, "model": model_state,
                   "optimizer": optimizer_state, "history": self.history, "best_state": self.best_state,
                   "best_score": self.best_score, "best_epoch": self.best_epoch, "partial": partial}
        io.write_torch(self.checkpoint_path, payload)

    def outcome(self, max_epochs: int) -> FitOutcome:
        stopped_early = len(self.history) < max_epochs
        return FitOutcome(self.history, self.best_epoch + 1,
                          f"early_stopping on {self.metric}" if stopped_early else "max_epochs", self.resumed_after)


def _first_step(partial: dict[str, Any] | None) -> int:
    return 0 if not partial else partial.get("step", 0)


class Engine(Protocol):
    """What the loop needs from whatever runs the steps of K members (K = 1 for a solo run)."""

    n_steps: int  # steps of the current epoch

    def start_epoch(self, epoch: int, partials: Sequence[dict[str, Any] | None]) -> int:
        """Shuffle each member's samples for ``epoch`` (restoring interrupted epochs); the first step to run."""

    def step(self, s: int) -> None: ...

    def sums(self) -> Tensor:
        """(K, N_SUMS) running sums of this epoch's loss terms, each summed over the member's samples."""

    def partial(self, k: int, s: int) -> dict[str, Any]:
        """Where member ``k`` stands before step ``s``, for a mid-epoch checkpoint."""

    def val_probabilities(self, ks: Sequence[int]) -> list[np.ndarray]: ...

    def model_state(self, k: int) -> dict[str, Tensor]: ...

    def optimizer_state(self, k: int) -> dict: ...

    def select(self, ks: Sequence[int]) -> None:
        """Keep only members ``ks`` (the others stopped)."""

    @property
    def lr(self) -> float: ...


def validation_scores(y: np.ndarray, p: np.ndarray, threshold: ThresholdConfig) -> dict[str, float]:
    """Epoch scores on validation. ``val_tss`` is the best TSS over the threshold grid: with the default
    ``validation`` grid, over every threshold, so early stopping never scores a grid artefact (on the
    design's 0.10-0.90 grid it fell as a better model's probabilities moved below 0.10)."""
    val_loss = log_loss(y, p)  # BCE of the forecast
    with M.ignore_undefined():
        table = M.threshold_table(y, p, threshold)
        auc = M.roc_auc(y, p)
    return {"val_loss": val_loss, "val_tss": float(np.nanmax(table["tss"])) if len(table) else float("nan"),
            "val_auc": auc}


def fit_members(members: Sequence[Member], engine: Engine, cfg: EverestConfig,
                stop: Callable[[], str | None]) -> None:
    """Train ``members`` (all at the same resume point) to their early stop or the epoch cap.

    A member whose loss turns non-finite gets :class:`TrainingDiverged` in ``member.error`` and leaves;
    a stop request or the time limit checkpoints every member and raises for all.
    """
    tc = cfg.train
    start_epoch = members[0].epoch
    started = time.monotonic()
    bars = {m.name: _progress_bar(m.name, tc.epochs, start_epoch) for m in members}
    live = list(members)
    for epoch in range(start_epoch, tc.epochs):
        keep = [k for k, m in enumerate(live) if not m.done]
        if not keep:
            break
        if len(keep) < len(live):
            engine.select(keep)
            live = [live[k] for k in keep]
        t0 = time.perf_counter()
        first = engine.start_epoch(epoch, [m.partial for m in live])
        for m in live:
            m.partial = None
        for s in range(first, engine.n_steps):
            if stop():
                for k, m in enumerate(live):
                    m.save(engine.model_state(k), engine.optimizer_state(k), partial=engine.partial(k, s))
                stopping.mark_checkpointed()
                where = ", ".join(f"{m.name} at sample {engine.partial(k, s)['offset']} of {len(m.train)}"
                                  for k, m in enumerate(live))
                raise Preempted(f"stopped by {stop()} in epoch {epoch + 1} ({where}); checkpointed, rerun to resume")
            engine.step(s)
        sums = engine.sums().cpu()  # one host sync per epoch
        healthy = []
        for k, m in enumerate(live):
            terms = (sums[k] / len(m.train)).tolist()
            if all(math.isfinite(v) for v in terms):
                healthy.append(k)
                continue
            m.error = TrainingDiverged(f"{m.name}: training loss is {terms[0]} at epoch {epoch + 1} (terms focal/"
                                       f"evidential/evt/precursor = {terms[1:]}); the last finished epoch is "
                                       "checkpointed")
            m.done = True
        probs = engine.val_probabilities(healthy)
        seconds = time.perf_counter() - t0
        for k, p in zip(healthy, probs, strict=True):
            m = live[k]
            terms = (sums[k] / len(m.train)).tolist()
            val = validation_scores(m.val.y, p, cfg.threshold)
            row = {"epoch": epoch + 1, "train_loss": terms[0], "focal": terms[1], "evidential": terms[2],
                   "evt": terms[3], "precursor": terms[4], "val_loss": val["val_loss"], "val_tss": val["val_tss"],
                   "val_auc": val["val_auc"], "lr": engine.lr, "seconds": seconds,
                   "samples_per_s": len(m.train) / seconds}
            m.history.append(row)
            score = -val["val_loss"] if m.metric == "val_loss" else val[m.metric]
            if m.best_epoch < 0 or (math.isfinite(score) and score > m.best_score):
                m.best_score, m.best_epoch = score, epoch
                m.best_state = copy.deepcopy(engine.model_state(k))  # a real copy, not references to live tensors
            m.epoch = epoch + 1
            m.save(engine.model_state(k), engine.optimizer_state(k))
            bars[m.name](row)
            if m.progress:
                m.progress(EpochReport(m.name, epoch + 1, tc.epochs, row["train_loss"], row["val_loss"],
                                       row["val_tss"], m.best_epoch + 1))
            m.done = epoch - m.best_epoch >= tc.early_stopping_patience
        if tc.time_limit_minutes and (time.monotonic() - started) / 60 > tc.time_limit_minutes:
            names = ", ".join(m.name for m in live)
            raise TimeLimitReached(f"{names}: time limit of {tc.time_limit_minutes} min reached after epoch "
                                   f"{epoch + 1}; rerun to resume from the checkpoint")


class SoloEngine:
    """One experiment's steps: :class:`everest.training.fast.TrainStep` over an :class:`EverestModel` and torch's
    AdamW."""

    def __init__(self, model: EverestModel, member: Member, cfg: EverestConfig, device: torch.device) -> None:
        tc = cfg.train
        self.model, self.member, self.device, self.tc = model, member, device, tc
        self.opt = make_optimizer(model, tc.learning_rate, tc.weight_decay, device, capturable=tc.cuda_graphs)
        self.amp = tc.use_amp and device.type == "cuda"
        train = member.train
        x = torch.from_numpy(train.x).to(device)  # (N, T, F), resident on the device
        y = torch.from_numpy(train.y).to(device=device, dtype=torch.float32)
        valid = torch.from_numpy(train.valid).to(device)  # (N, T) real steps; padding is masked in the model
        self.train_step = TrainStep(model, self.opt, EverestLoss(cfg.loss), x, y, device, valid=valid, amp=self.amp,
                                    cuda_graphs=tc.cuda_graphs, compile=tc.compile, name=member.name)
        self.n = len(y)
        self.n_steps = math.ceil(self.n / tc.batch_size)
        self.perm: Tensor | None = None

    def load(self, ck: dict[str, Any]) -> None:
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])

    def start_epoch(self, epoch: int, partials: Sequence[dict[str, Any] | None]) -> int:
        torch.manual_seed(epoch_seed(self.member.seed, epoch))
        self.model.train()
        self.perm = torch.randperm(self.n, device=self.device)
        (partial,) = partials
        if partial:  # resume inside the epoch a SIGTERM interrupted, with its random state
            set_rng_state(partial["rng"], self.device)
        self.train_step.start_epoch(epoch, partial["sums"] if partial else None)
        return _first_step(partial)

    def step(self, s: int) -> None:
        b = self.tc.batch_size
        self.train_step(self.perm[s * b:(s + 1) * b], b)  # type: ignore[index]

    def sums(self) -> Tensor:
        return self.train_step.sums.unsqueeze(0)

    def partial(self, k: int, s: int) -> dict[str, Any]:
        return {"offset": min(s * self.tc.batch_size, self.n), "step": s, "sums": self.train_step.sums.cpu(),
                "rng": rng_state(self.device)}

    def val_probabilities(self, ks: Sequence[int]) -> list[np.ndarray]:
        return [predict(self.model, self.member.val, self.device, amp=self.amp,
                        eval_batch_size=self.tc.eval_batch_size)["y_prob"] for _ in ks]

    def model_state(self, k: int) -> dict[str, Tensor]:
        return self.model.state_dict()

    def optimizer_state(self, k: int) -> dict:
        return self.opt.state_dict()

    def select(self, ks: Sequence[int]) -> None:
        """A solo run has one member: the loop ends when it stops."""

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]


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
