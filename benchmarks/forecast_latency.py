"""Row 10: forecasting from a bundle on the CPU, per forecast, beside the per-sample latency the study measures.

The forecaster is built in memory (9 targets x 5 members of the default network, untrained weights, identity
scalers and calibration): what is timed is the path ``everest predict`` runs (validate the records, build the
windows, scale them per member, run every member, average, calibrate, decide), for one region and for 1,000.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from everest.config import DEFAULT_SEEDS, EverestConfig, all_targets
from everest.data.samples import Scaler
from everest.data.tables import TIME_COLUMN
from everest.model.network import EverestModel
from everest.scoring.calibration import Calibrator
from everest.serving.bundle import Bundle, Member, TargetBundle
from everest.serving.forecaster import Forecaster


def in_memory_forecaster(config: EverestConfig, members: int = len(DEFAULT_SEEDS)) -> Forecaster:
    """Every target with ``members`` randomly initialised members; scaling and calibration are identities."""
    n = len(config.data.features)
    scaler = Scaler("none", np.zeros(n, bool), np.zeros(n), np.ones(n))
    targets = {}
    for t in all_targets():
        seeds = []
        for seed in range(members):
            torch.manual_seed(seed)
            state = {k: v.numpy() for k, v in EverestModel(config.model, n).state_dict().items()}
            seeds.append(Member(seed, scaler, state))
        record = {"validation_metrics": {"tss": 0.0}, "verdict": {"verdict": "not analysed"}}
        targets[str(t)] = TargetBundle(t, config, seeds, Calibrator("none"), 0.5, 0.5, None, record)
    return Forecaster(Bundle(Path("in-memory"), {}, targets))


def records(config: EverestConfig, regions: int, per_region: int, seed: int = 0) -> pd.DataFrame:
    """A table of ``regions`` regions with ``per_region`` 12-minute records each, in the table layout."""
    rng = np.random.default_rng(seed)
    n = regions * per_region
    times = pd.Timestamp("2024-05-01") + pd.to_timedelta(np.tile(np.arange(per_region) * 12, regions), unit="min")
    table = {TIME_COLUMN: times.strftime("%Y-%m-%dT%H:%M:%S"),
             config.data.region_column: np.repeat(np.arange(regions), per_region)}
    table.update({f: rng.normal(size=n).astype(str) for f in config.data.features})
    return pd.DataFrame(table).astype(str)


def forecast_ms(forecaster: Forecaster, table: pd.DataFrame, repeats: int) -> float:
    """Median wall time of one ``predict`` call over ``repeats`` (after one warm-up), in ms."""
    forecaster.predict(table)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forecaster.predict(table)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def study_latency_ms(config: EverestConfig, repeats: int = 30) -> float:
    """The study's latency protocol (``latency_ms`` of results.json): ms per sample at batch 32 after warm-up."""
    torch.manual_seed(0)
    model = EverestModel(config.model, len(config.data.features)).eval()
    x = torch.randn(32, config.model.seq_len, len(config.data.features))
    with torch.no_grad():
        for _ in range(5):
            model(x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return (time.perf_counter() - t0) / repeats * 1e3 / len(x)
