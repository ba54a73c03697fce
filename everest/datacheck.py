"""Per-target summary of a data folder: samples, positives, regions, and the Bayes ceiling when known."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from everest import metrics as M
from everest.config import DataConfig, all_targets
from everest.data import data_file, load_samples

log = logging.getLogger(__name__)


def summarise(data_dir: str | Path, cfg: DataConfig, seq_len: int) -> pd.DataFrame:
    """One row per target with sample counts of both files and, given truth sidecars, the test ceiling."""
    from everest.synthetic import load_truth, truth_path

    rows = []
    for target in all_targets():
        row: dict = {"target": str(target)}
        for split in ("train", "test"):
            path = data_file(Path(data_dir), target, split)
            s, _ = load_samples(path, target, cfg, seq_len)
            row.update({f"{split}_samples": len(s), f"{split}_positives": s.n_positive,
                        f"{split}_rate": s.n_positive / len(s), f"{split}_regions": len(np.unique(s.region))})
            if split == "test" and truth_path(path).is_file():
                try:
                    p = load_truth(path)[s.row]
                except ValueError as err:  # an edited table no longer matches the generator's sidecar
                    log.warning("no Bayes ceiling for %s: %s", target, err)
                else:
                    with M.ignore_undefined():
                        row.update(ceiling_tss=M.max_tss(s.y, p), ceiling_auc=M.roc_auc(s.y, p),
                                   ceiling_brier=M.brier(s.y, p))
        rows.append(row)
    return pd.DataFrame(rows)


def format_summary(df: pd.DataFrame) -> str:
    """A fixed-width table for the terminal."""
    out = df.copy()
    for c in ("train_rate", "test_rate"):
        out[c] = (100 * out[c]).map("{:.2f}%".format)
    for c in ("ceiling_tss", "ceiling_auc", "ceiling_brier"):
        if c in out:
            out[c] = out[c].map("{:.3f}".format)
    return out.to_string(index=False)
