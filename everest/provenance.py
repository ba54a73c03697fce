"""What every result records about where it came from: versions, commit, device, batch job; the model card."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from everest import __version__


def _git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return res.stdout.strip() or None if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info(device: torch.device) -> dict[str, Any]:
    """Versions and device recorded with every result."""
    import pandas
    import scipy
    import sklearn

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "everest": __version__, "git_commit": _git_commit(), "python": platform.python_version(),
        "torch": torch.__version__, "numpy": np.__version__, "pandas": pandas.__version__,
        "scipy": scipy.__version__, "scikit_learn": sklearn.__version__,
        "device": str(device), "device_name": name, "torch_threads": torch.get_num_threads(),
        "host": platform.node(), "batch_job_id": os.environ.get("PBS_JOBID") or os.environ.get("SLURM_JOB_ID"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def model_card(res: dict[str, Any]) -> str:
    """``MODEL_CARD.md`` of a trained model, from its ``results.json`` content."""
    e, m, th = res["experiment"], res["test_metrics"], res["threshold"]
    return (
        f"# EVEREST {e['target']} (seed {e['seed']})\n\n"
        f"Forecasts whether a flare of class >= {e['flare_class']} starts within {e['horizon_hours']} h of a "
        f"record, from the last {res['config']['model']['seq_len']} records of its active region.\n\n"
        f"* Parameters: {res['training']['n_parameters']:,}; best epoch {res['training']['best_epoch']} of "
        f"{res['training']['epochs_run']} ({res['training']['stop_reason']}).\n"
        f"* Probabilities calibrated on the validation split ({res['calibration']['method']}); decision threshold "
        f"{th['selected']:.4g} on that scale, chosen on the {th['source']} split"
        f"{' (at the edge of the searched grid)' if th['at_grid_edge'] else ''}.\n"
        f"* Test: TSS {m['tss']:.3f}, ROC AUC {m['roc_auc']:.3f}, Brier {m['brier']:.4f}, ECE {m['ece']:.4f}.\n"
        f"* Config hash {res['provenance']['config_hash']}; data {res['provenance']['data_hashes']}.\n"
        f"* Load: `everest.scoring.inference.load_model(dir)` (weights_only=True); inputs scaled with `scaler.json`; "
        f"calibrate its probabilities with `everest.scoring.inference.load_calibrator(dir).apply(p)`.\n"
    )
