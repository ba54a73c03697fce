"""Does switching on the EVT loss term hurt the forecast? Validation AUC / max TSS around the switch, per variant.

    python -m benchmarks.evt_phase [--seeds 0,1,2] [--epochs 10] [--size tiny] [--evt-start 3]
                                   [--variants reference,no_evt,detach,bounded,detach_bounded]

Synthetic data (``everest.data.synthetic``, target M-24) is generated into a temporary directory; each
variant is trained with a minimal loop of its own (AdamW from ``everest.training.fast.make_optimizer``,
``EverestLoss``, batch 256, the padding mask on) under a compressed copy of the reference loss schedule:
EVT off until ``--evt-start`` (weight 0.1 from there, 0.2 from twice that; focal gamma warm-up over 2.5x,
the reference's 20 / 40 / 50 epoch ratios). Only the validation split is scored, never the test split.

Variants (``ModelConfig`` / schedule):

* ``reference``: the reference EVT head (xi in (-2, 1), sigma > 1e-3) trained through the shared trunk z.
* ``no_evt``: the same model with the EVT weight 0 in every phase.
* ``detach``: the EVT head reads ``z.detach()``: the tail fit cannot move the forecast representation.
* ``bounded``: gradients reach z, but xi in (-0.5, 0.5) and sigma > 0.05, so the NLL is bounded below.
* ``detach_bounded``: both.

Before the switch every variant of a seed trains identically (the EVT weight is 0), so the rows of a
seed share their "before" numbers and the differences after it are the EVT term's doing. ``detach``
and ``no_evt`` must then agree exactly in AUC/TSS: with a detached input the EVT term has no gradient
on any parameter of the forecast path.
Prints one row per variant and seed, then per-variant means over seeds.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/evt_phase.py`: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from everest.config import EverestConfig, LossConfig, LossPhase, ModelConfig, Target
from everest.data import synthetic
from everest.data.samples import ExperimentData, prepare_experiment
from everest.model.losses import EverestLoss
from everest.model.network import EverestModel
from everest.scoring import metrics as M
from everest.training.fast import make_optimizer

BATCH = 256
TARGET = "M-24"
BOUNDED = {"evt_xi_range": (-0.5, 0.5), "evt_sigma_floor": 0.05}
REFERENCE_HEAD = {"evt_xi_range": (-2.0, 1.0), "evt_sigma_floor": 1e-3}
VARIANTS: dict[str, tuple[dict, bool]] = {  # name -> (ModelConfig fields, EVT term on)
    "reference": ({"evt_detach_trunk": False, **REFERENCE_HEAD}, True),
    "no_evt": ({"evt_detach_trunk": False, **REFERENCE_HEAD}, False),
    "detach": ({"evt_detach_trunk": True, **REFERENCE_HEAD}, True),
    "bounded": ({"evt_detach_trunk": False, **BOUNDED}, True),
    "detach_bounded": ({"evt_detach_trunk": True, **BOUNDED}, True),
}


def loss_config(evt_start: int, evt_on: bool) -> LossConfig:
    """The reference schedule compressed: phases at 0 / evt_start / 2 evt_start, gamma warm-up 2.5 evt_start."""
    w = 1.0 if evt_on else 0.0
    schedule = (
        LossPhase(start_epoch=0, focal=0.9, evidential=0.1, evt=0.0, precursor=0.05),
        LossPhase(start_epoch=evt_start, focal=0.8, evidential=0.1, evt=0.1 * w, precursor=0.05),
        LossPhase(start_epoch=2 * evt_start, focal=0.7, evidential=0.1, evt=0.2 * w, precursor=0.05),
    )
    return LossConfig(schedule=schedule, focal_gamma_warmup_epochs=round(2.5 * evt_start))


@dataclass
class Epoch:
    loss: float  # mean training total loss
    evt: float  # mean unweighted EVT term
    auc: float  # validation ROC AUC
    tss: float  # validation max TSS


@torch.no_grad()
def val_probs(model: EverestModel, x: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    model.eval()
    out = [torch.sigmoid(model(x[i:i + 512], valid[i:i + 512]).logits) for i in range(0, len(x), 512)]
    return torch.cat(out).double().numpy()


def train(data: ExperimentData, variant: str, seed: int, epochs: int, evt_start: int) -> list[Epoch]:
    fields, evt_on = VARIANTS[variant]
    base = EverestConfig()
    torch.manual_seed(seed)
    model = EverestModel(ModelConfig(**fields), n_features=data.train.x.shape[2])
    device = torch.device("cpu")
    opt = make_optimizer(model, base.train.learning_rate, base.train.weight_decay, device)
    loss_fn = EverestLoss(loss_config(evt_start, evt_on))
    x, v = torch.from_numpy(data.train.x), torch.from_numpy(data.train.valid)
    y = torch.from_numpy(data.train.y).float()
    xv, vv = torch.from_numpy(data.val.x), torch.from_numpy(data.val.valid)
    history = []
    for epoch in range(epochs):
        torch.manual_seed(seed * 1_000_003 + epoch)  # shuffling and dropout: the same in every variant
        model.train()
        perm = torch.randperm(len(y))
        sums = np.zeros(2)
        for i in range(0, len(y), BATCH):
            idx = perm[i:i + BATCH]
            total, terms = loss_fn(model(x[idx], v[idx]), y[idx], epoch)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sums += np.array([total.item(), terms["evt"].item()]) * len(idx)
        p = val_probs(model, xv, vv)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", M.UndefinedMetricWarning)
            history.append(Epoch(*(sums / len(y)), M.roc_auc(data.val.y, p), M.max_tss(data.val.y, p)))
    return history


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--evt-start", type=int, default=3, help="first epoch with the EVT term (0-based)")
    ap.add_argument("--size", default="tiny", choices=["tiny", "demo"], help="synthetic data size")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CI machine is shared)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if not 1 <= args.evt_start < args.epochs:
        ap.error("--evt-start must lie in 1 .. epochs-1 (there must be an epoch before and after the switch)")
    torch.set_num_threads(args.threads)
    before, after, last = args.evt_start - 1, args.evt_start, args.epochs - 1
    print(f"# synthetic {args.size}, {TARGET}, {args.epochs} epochs, EVT from epoch {args.evt_start} (0-based), "
          f"batch {BATCH}, {args.threads} thread(s); validation split only")
    cols = ("variant", "seed", "auc_before", "auc_after", "auc_end", "tss_before", "tss_after", "tss_end",
            "loss_before", "loss_after", "loss_end", "evt_after", "evt_end", "auc_evt_mean", "s")
    print(" ".join(f"{c:>14}" for c in cols))
    rows: dict[str, list[list[float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.generate(tmp, size=args.size, seed=0)
        cfg = EverestConfig()
        for seed in seeds:
            data = prepare_experiment(tmp, Target.parse(TARGET), seed, cfg.data, cfg.model.seq_len)
            for variant in variants:
                t0 = time.perf_counter()
                h = train(data, variant, seed, args.epochs, args.evt_start)
                evt_auc = statistics.fmean(e.auc for e in h[after:])
                vals = [h[before].auc, h[after].auc, h[last].auc, h[before].tss, h[after].tss, h[last].tss,
                        h[before].loss, h[after].loss, h[last].loss, h[after].evt, h[last].evt, evt_auc]
                rows[variant].append(vals)
                print(" ".join([f"{variant:>14}", f"{seed:>14}", *(f"{v:>14.4f}" for v in vals),
                                f"{time.perf_counter() - t0:>14.1f}"]), flush=True)
    print("\n# mean (sd) over seeds")
    print(" ".join(f"{c:>16}" for c in cols[:1] + cols[2:-1]))
    for variant, vals in rows.items():
        arr = np.array(vals)
        sd = arr.std(axis=0, ddof=1) if len(arr) > 1 else np.full(arr.shape[1], math.nan)
        print(" ".join([f"{variant:>16}", *(f"{m:>8.4f} ({s:.3f})" for m, s in zip(arr.mean(0), sd, strict=True))]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
