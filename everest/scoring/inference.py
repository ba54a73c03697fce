"""A model's forecasts: probabilities in large batches, inference latency, and reloading a saved model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from everest.config import EverestConfig
from everest.data.samples import SampleSet
from everest.model.losses import nig_uncertainty
from everest.model.network import EverestModel
from everest.scoring.calibration import Calibrator
from everest.training.fast import eval_chunk


@torch.no_grad()
def predict(model: EverestModel, samples: SampleSet, device: torch.device, *, amp: bool = False,
            eval_batch_size: int = 8192) -> dict[str, np.ndarray]:
    """Raw forecast probability (``y_prob``) and, with the evidential head, aleatoric and epistemic
    uncertainty for every sample; ``amp`` runs the forward pass in bfloat16 (CUDA)."""
    model.eval()
    x, valid = torch.from_numpy(samples.x), torch.from_numpy(samples.valid)
    probs, alea, epis = [], [], []
    chunk = eval_chunk(device, eval_batch_size)
    for i in range(0, len(x), chunk):
        xb = x[i:i + chunk].to(device, non_blocking=True)
        vb = valid[i:i + chunk].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(xb, vb)
        probs.append(torch.sigmoid(out.logits.float()))
        if out.nig is not None:
            a, e = nig_uncertainty(*(t.float() for t in out.nig))
            alea.append(a)
            epis.append(e)
    res = {"y_prob": torch.cat(probs).cpu().numpy().astype(np.float64)}
    if alea:
        res["aleatoric"] = torch.cat(alea).cpu().numpy()
        res["epistemic"] = torch.cat(epis).cpu().numpy()
    return res


@torch.no_grad()
def measure_latency(model: EverestModel, samples: SampleSet, device: torch.device, repeats: int = 30) -> dict:
    """Inference latency: ms per sample at batch 32 after warm-up (reference method) and for one sample."""
    model.eval()
    x = torch.from_numpy(samples.x[:32]).to(device)
    valid = torch.from_numpy(samples.valid[:32]).to(device)
    if len(x) == 0:
        return {"latency_ms": float("nan"), "latency_single_ms": float("nan")}

    def timed(batch: torch.Tensor, mask: torch.Tensor) -> float:
        for _ in range(5):
            model(batch, mask)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(batch, mask)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / repeats * 1000

    return {"latency_ms": timed(x, valid) / len(x), "latency_single_ms": timed(x[:1], valid[:1])}


def load_model(model_dir: str | Path, n_features: int | None = None) -> tuple[EverestModel, EverestConfig, dict]:
    """Reload a saved model, its configuration and scaler (weights only: nothing is unpickled).

    The model gives raw probabilities; :func:`load_calibrator` maps them to the reported, calibrated ones.
    """
    md = Path(model_dir)
    cfg = EverestConfig.model_validate(json.loads((md / "config.json").read_text()))
    scaler = json.loads((md / "scaler.json").read_text())
    model = EverestModel(cfg.model, n_features=n_features or len(cfg.data.features))
    model.load_state_dict(torch.load(md / "model_weights.pt", map_location="cpu", weights_only=True))
    return model.eval(), cfg, scaler


def load_calibrator(model_dir: str | Path) -> Calibrator:
    """The calibration map saved with a model (fitted on its validation split)."""
    return Calibrator.from_dict(json.loads((Path(model_dir) / "calibration.json").read_text()))
