"""Performance work: the benchmark suite's pieces on tiny sizes, packing correctness, and the
CUDA-only fast paths falling back on CPU. No wall-clock assertions: rows, ratios and JSON only."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import BATCH_256, ONE_THREAD, overrides

from benchmarks import run as bench
from benchmarks import workloads as W
from everest.config import ConfigError, EverestConfig, Experiment
from everest.data import synthetic
from everest.model.losses import EverestLoss
from everest.model.network import EverestModel
from everest.training.fast import TrainStep, make_optimizer
from everest.training.train import ProductionTrainer
from flows.profiles import PinnedGPUNanny, load_profile

TINY = overrides(BATCH_256, ONE_THREAD, "train.epochs=2")
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


@pytest.mark.slow
@pytest.mark.parametrize("row", [1, 2, 3, 4, 6, 7, 10])
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


@pytest.mark.slow
def test_grouped_row_measures_a_group_against_its_solo_runs(suite):
    """Row 8 trains the same members as one group and as solo runs; row 9 compares the batching layouts."""
    suite.group_ks, suite.group_epochs, suite.group_reps = [2], 1, 1
    before = len(suite.rows)
    bench.ROWS[8](suite)
    bench.ROWS[9](suite)
    new = suite.rows[before:]
    names = [r["name"] for r in new]
    assert any("grouped K=2 vs 2 solo runs" in n for n in names), names
    assert any(n.startswith("study projection") and "grouped K=2" in n for n in names), names
    assert {n for n in names if "group layout" in n} == {"group layout, K=5: batched modules vs vmap",
                                                         "group layout, K=5: batched modules vs solo models"}
    (measured,) = suite.shared["grouped"]
    assert measured["shared_epoch_seconds"] and measured["members"] == measured["solo_members"]
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in new)


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
    a = ProductionTrainer(Experiment.of("M-24", 0), config=plain, data_dir=data_dir, output_dir=tmp_path / "a").train()
    b = ProductionTrainer(Experiment.of("M-24", 0), config=fast, data_dir=data_dir, output_dir=tmp_path / "b").train()
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


def _train_in_this_process(experiment: Experiment, config: EverestConfig, data_dir: str, output_dir: str) -> dict:
    """What a packed worker process runs: one experiment; returns the ``results.json`` content."""
    return ProductionTrainer(experiment, config=config, data_dir=data_dir, output_dir=output_dir).train()


def _run_packed(jobs: list[dict], experiments_per_device: int) -> list[dict]:
    """The packed Dask workers' situation without Dask: ``k`` fresh (spawned) processes, one experiment each."""
    with ProcessPoolExecutor(max_workers=experiments_per_device, mp_context=mp.get_context("spawn")) as pool:
        return [f.result() for f in [pool.submit(_train_in_this_process, **job) for job in jobs]]


@pytest.mark.slow
def test_packed_experiments_match_their_solo_runs(data_dir, tmp_path):
    cfg = EverestConfig().with_overrides(TINY)
    jobs = [{"experiment": Experiment.of("M-24", s), "config": cfg, "data_dir": str(data_dir),
             "output_dir": str(tmp_path / "packed")} for s in (0, 1)]
    packed = _run_packed(jobs, experiments_per_device=2)
    for job, res in zip(jobs, packed, strict=True):
        seed = job["experiment"].seed
        solo = ProductionTrainer(Experiment.of("M-24", seed), config=cfg, data_dir=data_dir,
                                 output_dir=tmp_path / f"solo{seed}").train()
        assert _metrics(res) == _metrics(solo)
        name = f"results/everest_M_24h_seed{seed}/predictions.csv"
        assert (tmp_path / "packed" / name).read_bytes() == (tmp_path / f"solo{seed}" / name).read_bytes()
    assert packed[0]["test_metrics"]["roc_auc"] != packed[1]["test_metrics"]["roc_auc"]  # seeds independent


def test_grouping_layout_and_validation(monkeypatch):
    """Whatever the group width: one worker per GPU, each pinned to its own device (a worker restarted
    under its name keeps it), and one process per batch job."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    local = load_profile("local").with_overrides(gpus="auto", experiments_per_gpu=3)
    kw = local.cluster_kwargs()
    assert kw["n_workers"] == 2 and kw["worker_class"] is PinnedGPUNanny
    devices: list[str] = []  # the device each worker name gets, without starting a process
    monkeypatch.setattr("distributed.Nanny.__init__",
                        lambda self, *a, env=None, **k: devices.append(env["CUDA_VISIBLE_DEVICES"]))
    for name in [*range(kw["n_workers"]), 1]:
        PinnedGPUNanny(gpu_ids=kw["gpu_ids"], name=name)
    assert devices == ["0", "1", "1"]
    job = load_profile("pbs").with_overrides(experiments_per_gpu=16, job_cpus=8)._job_kwargs()
    assert (job["processes"], job["cores"]) == (1, 1)
    for bad in (0, 46, 1.5, True, "2"):
        with pytest.raises(ConfigError, match=r"experiments_per_gpu: must be an integer in 1\.\.45: .*\(got "):
            load_profile("local").with_overrides(experiments_per_gpu=bad)
