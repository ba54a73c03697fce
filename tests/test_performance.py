"""Performance work: the benchmark suite's pieces on tiny sizes, packing correctness, and the
CUDA-only fast paths falling back on CPU. No wall-clock assertions: rows, ratios and JSON only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import run as bench
from benchmarks import workloads as W
from everest import packing, synthetic
from everest.config import ConfigError, EverestConfig
from everest.fast import TrainStep, make_optimizer
from everest.losses import EverestLoss
from everest.model import EverestModel
from everest.train import ProductionTrainer

TINY = ["model.embed_dim=16", "model.ff_dim=32", "model.num_blocks=1", "model.num_heads=2",
        "train.batch_size=256", "train.num_threads=1", "train.epochs=2"]
DROP = ("latency_ms", "latency_single_ms")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-data")
    synthetic.generate(out, size="tiny", seed=0)
    return out


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> bench.Suite:
    torch.set_num_threads(1)
    s = bench.Suite(quick=True, device=torch.device("cpu"), out=tmp_path_factory.mktemp("bench"), size="tiny")
    s.packing_ks, s.packing_seconds = [1, 2], 0.5
    s.config, s.n_eval = EverestConfig().with_overrides(TINY), 1024
    return s


def _metrics(res: dict) -> dict:
    return {k: v for k, v in res["test_metrics"].items() if k not in DROP}


def test_per_row_builder_matches_the_vectorised_one():
    table = W.synthetic_table("tiny", "C-24")
    features = EverestConfig().data.features
    for zero_filter in (False, True):
        fast = W.build_samples(table, features, 10, zero_filter)
        slow = W.build_samples_per_row(table, features, 10, zero_filter)
        for name in ("x", "valid", "y", "region", "row", "time"):
            np.testing.assert_array_equal(getattr(fast, name), getattr(slow, name), err_msg=name)
    bigger = W.resize_table(table, 2 * len(table) + 7)
    assert len(bigger) == 2 * len(table) + 7 and bigger["region"].is_monotonic_increasing


@pytest.mark.parametrize("row", [1, 2, 3, 4, 6, 7])
def test_suite_rows_compute_ratios(suite, row):
    before = len(suite.rows)
    bench.ROWS[row](suite)
    new = [r for r in suite.rows[before:] if r["row"] == row]
    assert new, f"row {row} added nothing"
    for r in new:
        assert r["ratio"] is not None and math.isfinite(r["ratio"]) and r["ratio"] > 0, r
        assert math.isfinite(r["ours"]) and r["unit"]
    if row == 3:
        assert sorted(suite.shared["packing"]) == [1, 2]


def test_main_writes_json_and_prints_the_table_last(tmp_path, capsys):
    assert bench.main(["--quick", "--size", "tiny", "--rows", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "benchmarks.json").read_text())
    assert {r["row"] for r in report["rows"]} == {1} and report["errors"] == []
    assert report["environment"]["cores"] >= 1 and "torch" in report["environment"]
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].lstrip().startswith("1 ") and "ratio" in lines[-len(report["rows"]) - 2]


def test_cuda_only_options_fall_back_to_the_identical_cpu_run(data_dir, tmp_path):
    plain = EverestConfig().with_overrides([*TINY, "train.cuda_graphs=false"])
    fast = plain.with_overrides(["train.compile=true", "train.cuda_graphs=true"])
    assert fast.config_hash() != plain.config_hash()
    a = ProductionTrainer("M", 24, 0, config=plain, data_dir=data_dir, output_dir=tmp_path / "a").train()
    b = ProductionTrainer("M", 24, 0, config=fast, data_dir=data_dir, output_dir=tmp_path / "b").train()
    assert _metrics(a) == _metrics(b)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


def test_train_step_on_cpu_ignores_graphs_and_compile():
    torch.manual_seed(0)
    cfg = EverestConfig().with_overrides(TINY)
    model = EverestModel(cfg.model, 9)
    opt = make_optimizer(model, 1e-3, 0.0, torch.device("cpu"), capturable=True)
    assert not opt.param_groups[0]["capturable"] and not opt.param_groups[0]["fused"]
    x, y = (torch.from_numpy(a) for a in W.training_tensors(600))
    step = TrainStep(model, opt, EverestLoss(cfg.loss), x, y, torch.device("cpu"), cuda_graphs=True, compile=True)
    assert not step.cuda_graphs and not step.compiled
    step.start_epoch(0)
    for i in range(0, 600, 256):
        step(torch.arange(i, min(i + 256, 600)), 256)
    assert step._graph is None and torch.isfinite(step.sums).all() and step.sums[0] > 0


def test_packed_experiments_match_their_solo_runs(data_dir, tmp_path):
    cfg = EverestConfig().with_overrides(TINY)
    jobs = [{"flare_class": "M", "time_window": 24, "seed": s, "config": cfg.model_dump(mode="json"),
             "data_dir": str(data_dir), "output_dir": str(tmp_path / "packed")} for s in (0, 1)]
    packed = packing.run_packed(packing.train_experiment, jobs, experiments_per_device=2)
    for job, res in zip(jobs, packed, strict=True):
        solo = ProductionTrainer("M", 24, job["seed"], config=cfg, data_dir=data_dir,
                                 output_dir=tmp_path / f"solo{job['seed']}").train()
        assert _metrics(res) == _metrics(solo)
        name = f"results/everest_M_24h_seed{job['seed']}/predictions.csv"
        assert (tmp_path / "packed" / name).read_bytes() == (tmp_path / f"solo{job['seed']}" / name).read_bytes()
    assert packed[0]["test_metrics"]["roc_auc"] != packed[1]["test_metrics"]["roc_auc"]  # seeds independent


def test_packing_layout_and_validation():
    assert packing.worker_gpu_ids(["0", "1"], 3) == ["0", "1", "0", "1", "0", "1"]
    assert packing.batch_job_layout(4, threads_per_experiment=2) == {"processes": 4, "cores": 8}
    for bad in (0, 17, 1.5, True, "2"):
        with pytest.raises(ConfigError, match=r"experiments_per_gpu must be an integer in 1\.\.16, got"):
            packing.check_experiments_per_gpu(bad)
