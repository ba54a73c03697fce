"""What the benchmark rows time: full-size synthetic data in memory, the reference-style training loop
and per-row sample builder (the first implementation's habits, kept here only to be measured against),
and the packed-process training worker.

Nothing here is used by training itself; the rows import ``everest`` for the production code paths.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from everest.config import EverestConfig, Target
from everest.data.samples import SampleSet, build_samples
from everest.data.tables import LABELS

TRAIN_FLOP_PER_SAMPLE = 48e6  # forward ~16 MFLOP, training step ~3x forward
FORWARD_FLOP_PER_SAMPLE = 16e6


# ---------------------------------------------------------------------- data
def synthetic_table(size: str = "full", target: str = "M-24", seed: int = 0) -> pd.DataFrame:
    """The validated-table form (``read_table``'s columns) of a synthetic training file, built in memory."""
    from everest.data import synthetic

    split = synthetic.simulate(size, seed)["training"]
    frame = split.frame(target)
    cfg = EverestConfig().data
    out = {"label": frame["Flare"].map(LABELS).to_numpy(np.int8),
           "region": frame["NOAA_AR"].to_numpy(np.int64),
           "time": pd.to_datetime(frame["DATE__OBS"], format="ISO8601", utc=True).dt.tz_localize(None)
           .to_numpy("datetime64[s]")}
    for feat in cfg.features:
        out[feat] = frame[feat].to_numpy(np.float64)
    return pd.DataFrame(out)


def resize_table(table: pd.DataFrame, rows: int) -> pd.DataFrame:
    """The first ``rows`` rows, or the table repeated (with new region numbers) up to ``rows``."""
    if rows <= len(table):
        return table.iloc[:rows].reset_index(drop=True)
    parts, offset = [], 0
    span = int(table["region"].max() - table["region"].min() + 1)
    while sum(len(p) for p in parts) < rows:
        parts.append(table.assign(region=table["region"] + offset))
        offset += span
    return pd.concat(parts, ignore_index=True).iloc[:rows]


def build_samples_per_row(table: pd.DataFrame, features: tuple[str, ...], seq_len: int,
                          zero_filter: bool) -> SampleSet:
    """The reference algorithm as a straightforward loop: for each row, walk back through its region."""
    label = table["label"].to_numpy()
    region = table["region"].to_numpy()
    feats = table[list(features)].to_numpy(np.float32)
    times = table["time"].to_numpy()
    xs, valids, rows = [], [], []
    for r in range(len(table)):
        if label[r] == LABELS["padding"] or (zero_filter and (feats[r] == 0).any()):
            continue
        window = np.zeros((seq_len, feats.shape[1]), np.float32)
        valid = np.zeros(seq_len, bool)
        for back in range(seq_len):
            s = r - back
            if s < 0 or region[s] != region[r]:
                break
            if label[s] != LABELS["padding"]:
                window[seq_len - 1 - back] = feats[s]
                valid[seq_len - 1 - back] = True
        xs.append(window)
        valids.append(valid)
        rows.append(r)
    idx = np.asarray(rows, dtype=np.int64)
    return SampleSet(x=np.stack(xs), valid=np.stack(valids), y=label[idx].astype(np.int8), region=region[idx],
                     row=idx, time=times[idx].astype("datetime64[s]"))


def training_tensors(n: int, n_features: int = 9, seq_len: int = 10, positive_rate: float = 0.05,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Standardised-looking inputs and 0/1 labels of the full model's shape (throughput does not depend on values)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, seq_len, n_features), dtype=np.float32)
    y = (rng.random(n) < positive_rate).astype(np.float32)
    return x, y


def padding_mask(n: int, seq_len: int = 10, seed: int = 0) -> np.ndarray:
    """(n, seq_len) validity masks of front-padded windows with 1..seq_len real steps, as the trainer passes."""
    real = np.random.default_rng([seed, 1]).integers(1, seq_len + 1, n)
    return np.arange(seq_len)[None, :] >= (seq_len - real)[:, None]


def full_samples(table: pd.DataFrame, target: str = "M-24") -> SampleSet:
    """Vectorised, scaled samples of one full-size table (what training sees)."""
    from everest.data.samples import Scaler

    cfg = EverestConfig().data
    zero = cfg.c_zero_filter and Target.parse(target).flare_class == "C"
    s = build_samples(table, cfg.features, 10, zero)
    return Scaler.fit(s, cfg.features, cfg).transform(s)


# ---------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | None = None) -> float:
    """Seconds one call of ``fn`` takes (device work included)."""
    if device is not None:
        sync(device)
    t0 = time.perf_counter()
    fn()
    if device is not None:
        sync(device)
    return time.perf_counter() - t0


def median(values: list[float]) -> float:
    return float(statistics.median(values))


# ---------------------------------------------------------------------- training loops
@dataclass
class Trainer:
    """One model + optimizer + loop flavour over device-resident data, for throughput measurements."""

    kind: str  # "reference" | "ours" | "ours+graphs" | "ours+compile"
    device: torch.device
    x: torch.Tensor
    y: torch.Tensor
    batch_size: int = 512
    seed: int = 0
    config: EverestConfig | None = None

    def __post_init__(self) -> None:
        from everest.model.losses import EverestLoss
        from everest.model.network import EverestModel
        from everest.training.fast import TrainStep, make_optimizer

        torch.manual_seed(self.seed)
        cfg = self.config or EverestConfig()
        self.model = EverestModel(cfg.model, n_features=self.x.shape[2]).to(self.device).train()
        self.loss_fn = EverestLoss(cfg.loss)
        self.epoch = 45  # all four loss terms active (the last schedule phase)
        self.pos = 0
        self.perm = torch.randperm(len(self.y), device=self.device)
        cuda = self.device.type == "cuda"
        if self.kind == "reference":
            # The first implementation: plain AdamW, fp16 autocast + GradScaler on GPU, .item() per batch.
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=5.34e-4, weight_decay=1e-4)
            self.scaler = torch.amp.GradScaler("cuda", enabled=cuda)
            self.losses: list[float] = []
        else:
            graphs, compiled = self.kind == "ours+graphs", self.kind == "ours+compile"
            self.opt = make_optimizer(self.model, 5.34e-4, 1e-4, self.device, capturable=graphs)
            valid = torch.from_numpy(padding_mask(len(self.y), self.x.shape[1], self.seed)).to(self.device)
            self.step = TrainStep(self.model, self.opt, self.loss_fn, self.x, self.y, self.device, valid=valid,
                                  amp=cuda, cuda_graphs=graphs, compile=compiled, name=self.kind)
            self.step.start_epoch(self.epoch)

    def _next(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.y):
            self.pos = 0
        idx = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def run(self, steps: int) -> None:
        cuda = self.device.type == "cuda"
        for _ in range(steps):
            idx = self._next()
            if self.kind != "reference":
                self.step(idx, self.batch_size)
                continue
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=cuda):
                out = self.model(self.x[idx])
                loss, _ = self.loss_fn(out, self.y[idx], self.epoch)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.losses.append(loss.item())  # the per-batch host sync

    def samples_per_s(self, steps: int) -> float:
        return steps * self.batch_size / timed(lambda: self.run(steps), self.device)


def packed_worker(kind: str, device: str, threads: int, steps: int, seconds: float, n: int,
                  barrier: Any, config: dict | None = None) -> dict[str, float]:
    """One of ``k`` concurrent training processes: warm up, wait for all, train for ``seconds``."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    x, y = training_tensors(n)
    cfg = EverestConfig.model_validate(config) if config else None
    tr = Trainer(kind, dev, torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev), config=cfg)
    tr.run(steps)  # warm-up (and, for graphs, the capture)
    sync(dev)
    barrier.wait()
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        tr.run(steps)
        done += steps
    sync(dev)
    elapsed = time.perf_counter() - t0
    return {"samples": done * tr.batch_size, "seconds": elapsed, "pid": os.getpid()}
