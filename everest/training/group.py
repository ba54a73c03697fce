"""Several experiments trained at once as one vectorised model: the group.

:func:`train_group` trains K experiments (any mix of targets and seeds sharing one configuration) as a
single batched network (:class:`everest.model.batched.GroupedEverest`) on one device, with one optimizer step
and, on CUDA, one captured graph per step for all K. Each member keeps a solo run's semantics and outputs
(its own shuffling, validation score, best weights, early stopping, checkpoint and result folder), so
analysis, caching, resume and the report do not know the difference. Finished members are skipped, a
member that fails alone (diverged, bad data) does not stop the others, and a stopped member leaves the
batch at the next epoch.

Batches: every member's training windows live in one device tensor; per epoch each member shuffles its own
samples with its own generator (the solo run's seed and order) into an index table, and step s gathers row
s of every member's table. Members with fewer samples run out of batches first: their last batch is
shorter (the missing rows carry weight 0) and afterwards they sit the epoch's remaining steps out, exactly
as many steps as they would have run alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from everest.config import EverestConfig, Experiment
from everest.data.samples import SampleSet
from everest.errors import ConfigError, DataError, TrainingDiverged
from everest.model.batched import GroupAdamW, GroupedEverest, MemberDraws
from everest.model.losses import LOSS_KEYS, EverestLoss
from everest.model.network import EverestModel
from everest.scoring.inference import predict
from everest.training.fast import N_SUMS, GraphedStep, device_stream, make_optimizer
from everest.training.loop import Member, SoloEngine, epoch_seed, fit_members, rng_state
from everest.training.stopping import StopOnSignal
from everest.training.train import Prepared, ProductionTrainer, ProgressCallback

log = logging.getLogger(__name__)

# A member's own failure, recorded for it alone; anything else (a signal, the time limit, an
# out-of-memory error) stops the whole group after every member has checkpointed.
MEMBER_ERRORS = (TrainingDiverged, DataError, ConfigError)


@dataclass(frozen=True)
class MemberResult:
    """One member's outcome: its ``results.json`` content, or the error that stopped it alone."""

    experiment: Experiment
    results: dict[str, Any] | None
    error: BaseException | None = None


class _Tables:
    """Every member's training windows in one device tensor (identical arrays stored once) and each
    member's row offset into it."""

    def __init__(self, sets: Sequence[SampleSet], device: torch.device) -> None:
        unique: list[SampleSet] = []
        self.offsets: list[int] = []
        for s in sets:
            same = next((i for i, u in enumerate(unique) if u.x.shape == s.x.shape and np.array_equal(u.y, s.y)
                         and np.array_equal(u.x, s.x) and np.array_equal(u.valid, s.valid)), None)
            if same is None:
                unique.append(s)
                same = len(unique) - 1
            self.offsets.append(sum(len(u) for u in unique[:same]))
        self.x = torch.from_numpy(np.concatenate([u.x for u in unique])).to(device)  # (N, T, F)
        self.y = torch.from_numpy(np.concatenate([u.y for u in unique])).to(device=device, dtype=torch.float32)
        self.valid = torch.from_numpy(np.concatenate([u.valid for u in unique])).to(device)  # (N, T)

    def gather(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Windows, labels and validity masks of the rows ``idx`` (K, B): index_select, which graphs capture."""
        flat = idx.reshape(-1)
        return (self.x.index_select(0, flat).reshape(*idx.shape, *self.x.shape[1:]),
                self.y.index_select(0, flat).reshape(idx.shape),
                self.valid.index_select(0, flat).reshape(*idx.shape, *self.valid.shape[1:]))


class GroupEngine(GraphedStep):
    """The steps of K members as one batched model; the engine :func:`everest.training.loop.fit_members` drives."""

    def __init__(self, models: Sequence[EverestModel], members: Sequence[Member], cfg: EverestConfig,
                 device: torch.device) -> None:
        tc = cfg.train
        super().__init__(device, tc.cuda_graphs, f"group of {len(members)}")
        self.members, self.tc = list(members), tc
        self.model = GroupedEverest.stack(models)
        self.solo_models = list(models)  # CPU validation runs each member's weights in its solo model
        self.opt = GroupAdamW(list(self.model.parameters()), tc.learning_rate, tc.weight_decay)
        self.opt_template = make_optimizer(models[0], tc.learning_rate, tc.weight_decay, device,
                                           capturable=tc.cuda_graphs).state_dict()
        self.loss_fn = EverestLoss(cfg.loss)
        self.amp = tc.use_amp and device.type == "cuda"
        # Each member shuffles with its own generator on the device, as alone; on CPU it draws its dropout
        # from it too (CUDA uses fused dropout kernels and the device generator, which graph capture supports).
        self.generators = [torch.Generator(device=device) for _ in members]
        self.exact_dropout = device.type == "cpu"
        self.tables = _Tables([m.train for m in members], device)
        self.val_tables: _Tables | None = None
        self.sizes = [len(m.train) for m in members]
        self._sums = torch.zeros(len(members), N_SUMS, device=device)
        self.n_steps = 0

    # ------------------------------------------------------------------ loop interface
    def start_epoch(self, epoch: int, partials: Sequence[dict[str, Any] | None]) -> int:
        self._begin_epoch(epoch)
        self.model.train()
        b, k = self.tc.batch_size, len(self.members)
        self.n_steps = max(math.ceil(n / b) for n in self.sizes)
        if not self.exact_dropout:  # the group's fused dropout draws from the device generator
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(epoch_seed(sum(m.seed for m in self.members), epoch))
        self.idx = torch.zeros(k, self.n_steps * b, dtype=torch.long, device=self.device)
        first = 0
        for i, (m, n, offset) in enumerate(zip(self.members, self.sizes, self.tables.offsets, strict=True)):
            g = self.generators[i]
            g.manual_seed(epoch_seed(m.seed, epoch))  # the solo run's shuffle of this epoch
            self.idx[i, :n] = offset + torch.randperm(n, generator=g, device=self.device)
            partial = partials[i]
            self._sums[i] = partial["sums"].to(self.device) if partial else 0.0
            if partial:
                first = partial["step"]
                if self.exact_dropout:
                    g.set_state(partial["rng"]["cpu"])
                elif "cuda" in partial["rng"]:
                    torch.cuda.set_rng_state(partial["rng"]["cuda"], self.device)
        self.rows = [[min(b, max(0, n - s * b)) for n in self.sizes] for s in range(self.n_steps)]
        rows = torch.tensor(self.rows, device=self.device)  # (S, K) samples of each member in each step
        self._step_rows = rows.float()
        self._weights = (torch.arange(b, device=self.device) < rows.unsqueeze(-1)).float()  # (S, K, B)
        return first

    def step(self, s: int) -> None:
        b = self.tc.batch_size
        self._rows = self.rows[s]
        # On CUDA every step has the same shapes (missing rows weigh 0), so one graph replays them all; on CPU
        # a full step runs the solo run's unweighted loss, for member-by-member equality with it.
        replayable = not self.exact_dropout or all(r == b for r in self._rows)
        self.run((self.idx[:, s * b:(s + 1) * b], self._weights[s], self._step_rows[s]), replayable)

    def sums(self) -> Tensor:
        return self._sums

    def partial(self, k: int, s: int) -> dict[str, Any]:
        rng = {"cpu": self.generators[k].get_state()} if self.exact_dropout else rng_state(self.device)
        return {"offset": min(s * self.tc.batch_size, self.sizes[k]), "step": s, "sums": self._sums[k].cpu(),
                "rng": rng}

    @torch.no_grad()
    def val_probabilities(self, ks: Sequence[int]) -> list[np.ndarray]:
        """Each member's raw validation probabilities: on CUDA one batched forward per chunk for all members;
        on CPU each member's weights in its solo model, whose fused attention is faster there for 10 steps."""
        if self.device.type == "cpu":
            out = []
            for k in ks:
                self.solo_models[k].load_state_dict(self.model.member_state(k))
                out.append(predict(self.solo_models[k], self.members[k].val, self.device,
                                   eval_batch_size=self.tc.eval_batch_size)["y_prob"])
            return out
        self.model.eval()
        if self.val_tables is None:  # built on first use, kept on the device for every epoch
            self.val_tables = _Tables([m.val for m in self.members], self.device)
        t, sizes = self.val_tables, [len(m.val) for m in self.members]
        chunk = self.tc.eval_batch_size
        probs: list[list[Tensor]] = [[] for _ in sizes]
        for i in range(0, max(sizes), chunk):
            rows = torch.arange(i, i + chunk, device=self.device)
            idx = torch.stack([o + rows.clamp(max=n - 1) for o, n in zip(t.offsets, sizes, strict=True)])  # (K, C)
            x, _, valid = t.gather(idx)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = self.model(x, valid).logits.float()  # (K, C)
            for k, n in enumerate(sizes):
                probs[k].append(torch.sigmoid(logits[k, :max(0, min(chunk, n - i))]))
        return [torch.cat(probs[k]).cpu().numpy().astype(np.float64) for k in ks]

    def model_state(self, k: int) -> dict[str, Tensor]:
        return self.model.member_state(k)

    def optimizer_state(self, k: int) -> dict:
        return self.opt.member_state(k, self.opt_template)

    def select(self, ks: Sequence[int]) -> None:
        self.model.select(ks)
        self.opt.select(list(self.model.parameters()), ks)
        self.members = [self.members[k] for k in ks]
        self.solo_models = [self.solo_models[k] for k in ks]
        self.sizes = [self.sizes[k] for k in ks]
        self.tables.offsets = [self.tables.offsets[k] for k in ks]
        if self.val_tables is not None:
            self.val_tables.offsets = [self.val_tables.offsets[k] for k in ks]
        self.generators = [self.generators[k] for k in ks]
        self._sums = self._sums[list(ks)].clone()
        self._graph = None

    @property
    def lr(self) -> float:
        return self.opt.lr

    # ------------------------------------------------------------------ the step
    def _zero_grad(self) -> None:
        self.opt.zero_grad()

    def _eager(self, idx: Tensor, weight: Tensor, rows: Tensor) -> None:
        if not self.exact_dropout:
            self._train(idx, weight, rows, None)
            return
        # CPU: run only the members with samples in this step, on as many rows as the fullest has (a tail
        # step of equal members is then exactly their solo runs' short last batch).
        active = [k for k, r in enumerate(self._rows) if r]
        width = max(self._rows)
        counts = [self._rows[k] for k in active]
        members = None if len(active) == len(self._rows) else active
        if members is not None:
            idx, weight = idx[members], weight[members]
        self._train(idx[:, :width], None if min(counts) == width else weight[:, :width], rows,
                    MemberDraws([self.generators[k] for k in active], counts), members=members,
                    all_active=members is None)

    def _captured(self, idx: Tensor, weight: Tensor, rows: Tensor) -> None:
        self._train(idx, weight, rows, None, cache=False)  # autocast's weight cache is not capturable

    def _train(self, idx: Tensor, weight: Tensor | None, rows: Tensor, draws: MemberDraws | None,
               cache: bool = True, members: list[int] | None = None, all_active: bool = False) -> None:
        """Forward, loss, backward and optimizer step for batch ``idx`` (K, B) of global row numbers (of the
        ``members`` only, when given); ``rows`` (all K) counts each member's samples in it (a member with none
        is not updated), ``weight`` marks them (None: all rows count)."""
        xb, yb, vb = self.tables.gather(idx)  # (K, B, T, F), (K, B), (K, B, T)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=cache):
            out = self.model(xb, vb, draws, members)
            total, terms = self.loss_fn(out, yb, self.epoch, weight)  # (K,) each
        self.opt.zero_grad()
        total.sum().backward()  # members share no weights: each gets the gradient of its own loss
        self.opt.step(rows > 0, all_active)
        zero = torch.zeros_like(total)
        parts = torch.stack([total.detach()] + [terms.get(key, zero) for key in LOSS_KEYS], dim=1).float()
        if members is None:
            self._sums += parts * rows.unsqueeze(1)
        else:
            index = torch.tensor(members, device=self.device)
            self._sums.index_add_(0, index, parts * rows[index].unsqueeze(1))


def train_group(experiments: Sequence[Experiment], *, config: EverestConfig | None = None,
                data_dir: str | Path = "data", output_dir: str | Path = "output",
                cache_dir: str | Path | None = None, progress: ProgressCallback | None = None,
                force: bool = False) -> list[MemberResult]:
    """Train ``experiments`` as one group and return their outcomes in the same order.

    Members are prepared as solo runs (seed, data, initial weights), resumed from their own checkpoints,
    trained together from a common resume point (members checkpointed at different points train as
    separate groups, one after the other) and evaluated and saved as solo runs.
    """
    names = [e.name for e in experiments]
    if len(set(names)) != len(names):
        raise ConfigError(f"a group lists an experiment twice: {names}")
    cfg = config or EverestConfig()
    outcomes: dict[str, MemberResult] = {}
    pending: list[tuple[ProductionTrainer, Prepared]] = []
    for exp in experiments:
        trainer = ProductionTrainer(exp, config=cfg, data_dir=data_dir, output_dir=output_dir, cache_dir=cache_dir,
                                    progress=progress, force=force)
        try:
            prepared = trainer.prepare()
        except MEMBER_ERRORS as err:
            log.error("%s: %s", exp.name, err)
            outcomes[exp.name] = MemberResult(exp, None, err)
            continue
        if isinstance(prepared, dict):
            outcomes[exp.name] = MemberResult(exp, prepared)
        else:
            pending.append((trainer, prepared))
    if pending:
        device = pending[0][1].device
        with device_stream(device), StopOnSignal() as stop:
            fitted = _fit_pending(pending, cfg, device, lambda: stop.requested)
        for (trainer, prepared), member in zip(pending, fitted, strict=True):
            exp = trainer.experiment
            if member.error is not None:
                log.error("%s: %s", exp.name, member.error)
                outcomes[exp.name] = MemberResult(exp, None, member.error)
                continue
            prepared.model.load_state_dict(member.best_state)
            outcomes[exp.name] = MemberResult(exp, trainer.finish(prepared, member.outcome(cfg.train.epochs)))
    return [outcomes[name] for name in names]


def _fit_pending(pending: list[tuple[ProductionTrainer, Prepared]], cfg: EverestConfig, device: torch.device,
                 stop: Callable[[], str | None]) -> list[Member]:
    """Resume each member from its checkpoint, then train the members of each resume point together
    (one member alone takes the solo engine, which trains it identically)."""
    members, optimizer_states = [], []
    for trainer, prepared in pending:
        member = trainer.member(prepared.data.train, prepared.data.val)
        saved: dict[str, Any] = {}

        def load(ck: dict[str, Any], model: EverestModel = prepared.model, saved: dict[str, Any] = saved) -> None:
            model.load_state_dict(ck["model"])
            saved["optimizer"] = ck["optimizer"]
        member.resume(load, cfg.train)
        members.append(member)
        optimizer_states.append(saved.get("optimizer"))
    for point in sorted({m.resume_point for m in members}):
        ks = [i for i, m in enumerate(members) if m.resume_point == point and not m.done]
        if not ks:
            continue
        part = [members[i] for i in ks]
        if len(ks) == 1:
            engine: Any = SoloEngine(pending[ks[0]][1].model, part[0], cfg, device)
            if optimizer_states[ks[0]] is not None:
                engine.opt.load_state_dict(optimizer_states[ks[0]])
        else:
            log.info("training %d experiments as one group on %s: %s", len(ks), device,
                     ", ".join(m.name for m in part))
            engine = GroupEngine([pending[i][1].model for i in ks], part, cfg, device)
            for j, i in enumerate(ks):
                if optimizer_states[i] is not None:
                    engine.opt.load_member(j, optimizer_states[i])
        fit_members(part, engine, cfg, stop)
    return members
