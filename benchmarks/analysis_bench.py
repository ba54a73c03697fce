"""Row 6: the full analysis (region bootstrap, tables, report, plots) of 45 constructed experiments."""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from everest.analysis import ProductionAnalyzer
from everest.config import experiment_matrix
from everest.scoring import metrics as M


def write_results(root: Path, rows_per_experiment: int, seed: int = 0) -> None:
    """45 finished experiments whose test predictions share errors within regions (as real ones do)."""
    rng = np.random.default_rng(seed)
    n_regions = max(20, rows_per_experiment // 100)
    for exp in experiment_matrix():
        region = np.sort(rng.integers(11_000, 11_000 + n_regions, rows_per_experiment))
        y_region = rng.random(n_regions) < 0.3
        y = y_region[region - 11_000].astype(int)
        p = np.clip(0.3 + 0.3 * y + rng.normal(0, 0.15, rows_per_experiment), 0, 1)
        folder = root / exp.name
        folder.mkdir(parents=True)
        pred = pd.DataFrame({"y_true": y, "y_prob": p, "y_pred": (p >= 0.5).astype(int), "noaa_ar": region})
        pred.to_csv(folder / "predictions.csv", index=False)
        metrics = {**M.evaluate(y, p, 0.5), "latency_ms": 0.2}
        with M.ignore_undefined():
            table = M.threshold_table(y, p)
        pd.concat([table.add_prefix("val_").rename(columns={"val_threshold": "threshold"}),
                   table.drop(columns="threshold").add_prefix("test_")], axis=1).to_csv(
            folder / "threshold_optimization.csv", index=False)
        t = exp.target
        res = {"experiment": {"name": exp.name, "flare_class": t.flare_class, "horizon_hours": t.horizon,
                              "target": str(t), "seed": exp.seed},
               "threshold": {"source": "validation", "selected": 0.5, "validation": 0.5, "oracle_test": 0.5},
               "test_metrics": metrics, "validation_metrics": metrics, "oracle_test_metrics": metrics,
               "training": {"best_epoch": 2, "epochs_run": 3, "stop_reason": "max_epochs", "seconds": 1.0},
               "data": {"n_test": rows_per_experiment},
               "history": [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "val_tss": 0.2 * e}
                           for e in (1, 2, 3)],
               "provenance": {"config_hash": "bench", "data_hashes": {f"testing_data_{t.file_suffix}.csv": "d"},
                              "everest": "bench", "python": "3", "device": "cpu"}}
        (folder / "results.json").write_text(json.dumps(res))


def analysis_seconds(n_bootstrap: int, rows_per_experiment: int) -> tuple[float, float]:
    """(seconds with plots, seconds without plots) of ``run_complete_analysis`` over the same 45 results."""
    with tempfile.TemporaryDirectory(prefix="everest-bench-analysis-") as tmp:
        root = Path(tmp)
        write_results(root / "results", rows_per_experiment)
        out = []
        for plots in (True, False):
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ProductionAnalyzer(root / "results", root / f"out-{plots}", n_bootstrap=n_bootstrap,
                                   make_plots=plots).run_complete_analysis()
            out.append(time.perf_counter() - t0)
    return out[0], out[1]
