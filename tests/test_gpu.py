"""The CUDA-only paths that are on by default (``train.cuda_graphs``, ``train.use_amp``, ``train.device=auto``)
and never run on the CPU-only CI machine. Every test here is marked ``gpu``: ``tests/conftest.py`` skips them
("needs a CUDA device") where ``torch.cuda.is_available()`` is false.

* The CUDA-graph training step (:class:`everest.training.fast.TrainStep` with ``cuda_graphs=True``: three eager full
  batches per epoch, then one captured step replayed for the remaining full batches, the short last batch
  eager) gives the per-epoch loss sums of the eager step (``cuda_graphs=False``), with and without the
  padding mask. The loss schedule changes in every epoch (focal gamma 0 -> 1.4 -> 2.8; the EVT weight
  switches on in the third epoch), so a graph that kept a stale epoch's schedule, replayed a stale batch
  index, or dropped its optimiser step would differ by far more than the tolerance. Both runs use
  float32 (``amp=False``) and dropout 0, so the only differences left are the order of floating-point
  reductions in CUDA kernels (both runs use the same fused AdamW kernel; the graph's is the capturable
  variant): ``rtol=1e-4, atol=1e-6`` on epoch means of about 10 steps each. (Not measured here: this
  machine has no GPU; the bound is the float32 reasoning above, a bug moves the focal term by percent.)
* A 2-epoch tiny :class:`~everest.training.train.ProductionTrainer` run with ``train.device=cuda`` and the production
  defaults (CUDA graphs and bf16 autocast on) captures the step, finishes with finite history and test
  metrics, and records the device in its results.
* Grouped training (:func:`everest.training.group.train_group`, three members of two targets): the group's captured
  step gives the eager group's history (float32, dropout 0: ``rtol=1e-4``, as above); without dropout each
  member reproduces its solo CUDA run (the same initial weights and device shuffles; the kernels differ, batched
  matmuls against single ones, so ``rtol=1e-3`` on 2-epoch histories, a bound reasoned, not measured here);
  with the production defaults (graphs, bf16, dropout) every member finishes with finite numbers.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from tiny import BATCH_256, overrides

from everest.config import EverestConfig, Experiment
from everest.model.losses import EverestLoss
from everest.model.network import EverestModel
from everest.training.fast import TrainStep, device_stream, make_optimizer
from everest.training.group import train_group
from everest.training.train import ProductionTrainer

pytestmark = pytest.mark.gpu

N_FEATURES, SEQ_LEN = 9, 10
BATCH = 64
N = 9 * BATCH + 37  # 9 full batches (3 eager warm-up steps, then capture and 6 replays) and a short eager one
EPOCHS = 3
SCHEDULE = ("[{start_epoch: 0, focal: 0.9, evidential: 0.1, evt: 0.0, precursor: 0.05},"
            " {start_epoch: 2, focal: 0.8, evidential: 0.1, evt: 0.1, precursor: 0.05}]")
STEP_CONFIG = overrides("model.dropout=0.0", "loss.focal_gamma_warmup_epochs=2", f"loss.schedule={SCHEDULE}")
RTOL, ATOL = 1e-4, 1e-6


def _tensors(masked: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inputs, 0/1 labels and (``masked``) front-padded validity masks with 1..SEQ_LEN real steps, padding zeroed
    as the data pipeline leaves it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, SEQ_LEN, N_FEATURES, generator=g)
    y = (torch.rand(N, generator=g) < 0.3).float()
    valid = None
    if masked:
        real = torch.randint(1, SEQ_LEN + 1, (N,), generator=g)
        valid = torch.arange(SEQ_LEN)[None, :] >= (SEQ_LEN - real)[:, None]  # (N, T)
        x = x * valid[:, :, None]
        valid = valid.to(device)
    return x.to(device), y.to(device), valid


def _epoch_losses(cuda_graphs: bool, masked: bool) -> tuple[list[list[float]], TrainStep]:
    """Per-epoch ``[total, focal, evidential, evt, precursor]`` means of a tiny model trained as ``_fit`` does."""
    device = torch.device("cuda")
    cfg = EverestConfig().with_overrides(STEP_CONFIG)
    torch.manual_seed(0)  # the same initial weights for both runs
    model = EverestModel(cfg.model, N_FEATURES).to(device)
    opt = make_optimizer(model, cfg.train.learning_rate, cfg.train.weight_decay, device, capturable=cuda_graphs)
    x, y, valid = _tensors(masked, device)
    epochs = []
    with device_stream(device):  # the trainer's private stream
        step = TrainStep(model, opt, EverestLoss(cfg.loss), x, y, device, valid=valid, amp=False,
                         cuda_graphs=cuda_graphs, name="gpu-test")
        model.train()
        for epoch in range(EPOCHS):
            perm = torch.randperm(N, generator=torch.Generator().manual_seed(epoch)).to(device)
            step.start_epoch(epoch)
            for i in range(0, N, BATCH):
                step(perm[i:i + BATCH], BATCH)
            epochs.append((step.sums / N).tolist())
            if cuda_graphs:  # the epoch really replayed a graph captured for it (a failed capture turns graphs off)
                assert step.cuda_graphs and step._graph is not None and step._static[0].shape[-1] == BATCH, epoch
        torch.cuda.synchronize(device)
    return epochs, step


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding-mask"])
def test_cuda_graph_step_matches_the_eager_step(masked):
    loss = EverestConfig().with_overrides(STEP_CONFIG).loss  # the schedule changes in every epoch
    assert len({loss.gamma_at(e) for e in range(EPOCHS)}) == EPOCHS and loss.weights_at(2) != loss.weights_at(1)
    eager, eager_step = _epoch_losses(cuda_graphs=False, masked=masked)
    graphed, _ = _epoch_losses(cuda_graphs=True, masked=masked)
    assert eager_step._graph is None
    assert all(math.isfinite(v) for row in eager for v in row)
    torch.testing.assert_close(torch.tensor(graphed, dtype=torch.float64), torch.tensor(eager, dtype=torch.float64),
                               rtol=RTOL, atol=ATOL,
                               msg=lambda m: f"per-epoch [total, focal, evidential, evt, precursor]: graphed "
                                             f"{graphed} vs eager {eager}\n{m}")


def test_production_trainer_on_cuda_finishes_and_records_the_device(tiny_data, tmp_path, caplog):
    cfg = EverestConfig().with_overrides(overrides(BATCH_256, "train.epochs=2", "train.device=cuda"))
    assert cfg.train.cuda_graphs and cfg.train.use_amp  # the production defaults under test
    caplog.set_level(logging.DEBUG, logger="everest.training.fast")
    res = ProductionTrainer(Experiment.of("M-24", 0), config=cfg, data_dir=tiny_data, output_dir=tmp_path).train()
    fast_log = [r.getMessage() for r in caplog.records if r.name == "everest.training.fast"]
    assert any("captured the training step" in m for m in fast_log), fast_log
    assert not any("failed" in m for m in fast_log), fast_log
    assert len(res["history"]) == 2
    for row in res["history"]:
        for key in ("train_loss", "focal", "evidential", "evt", "precursor", "val_loss", "val_tss", "val_auc"):
            assert math.isfinite(row[key]), (row["epoch"], key, row[key])
    numbers = {k: v for k, v in res["test_metrics"].items() if isinstance(v, int | float)}
    assert {"tss", "roc_auc", "brier"} <= set(numbers)
    assert all(math.isfinite(v) for v in numbers.values()), numbers
    assert math.isfinite(res["threshold"]["selected"])
    prov = res["provenance"]
    assert prov["device"].startswith("cuda"), prov["device"]
    assert prov["device_name"] == torch.cuda.get_device_name(torch.device(prov["device"]))


GROUP = [Experiment.of("M-24", 0), Experiment.of("M-24", 1), Experiment.of("C-24", 0)]
GROUP_KEYS = ("train_loss", "focal", "evidential", "evt", "precursor", "val_loss")


def _group(tiny_data, out, *extra: str) -> list[dict]:
    cfg = EverestConfig().with_overrides(overrides(BATCH_256, "train.epochs=2", "train.device=cuda", *extra))
    results = train_group(GROUP, config=cfg, data_dir=tiny_data, output_dir=out)
    assert all(r.error is None for r in results), [r.error for r in results]
    return [r.results for r in results]


def _assert_histories_close(got: list[dict], want: list[dict], rtol: float) -> None:
    for g, w in zip(got, want, strict=True):
        a = torch.tensor([[row[k] for k in GROUP_KEYS] for row in g["history"]], dtype=torch.float64)
        b = torch.tensor([[row[k] for k in GROUP_KEYS] for row in w["history"]], dtype=torch.float64)
        torch.testing.assert_close(a, b, rtol=rtol, atol=ATOL, msg=lambda m, n=g["experiment"]["name"]: f"{n}: {m}")


def test_group_cuda_graph_step_matches_the_eager_group(tiny_data, tmp_path, caplog):
    exact = ("model.dropout=0.0", "train.use_amp=false")
    caplog.set_level(logging.DEBUG, logger="everest.training.fast")
    graphed = _group(tiny_data, tmp_path / "graphs", *exact)
    assert any(r.getMessage().startswith("group of 3: captured the training step") for r in caplog.records)
    eager = _group(tiny_data, tmp_path / "eager", *exact, "train.cuda_graphs=false")
    _assert_histories_close(graphed, eager, RTOL)


def test_group_member_matches_its_solo_cuda_run_without_dropout(tiny_data, tmp_path):
    exact = ("model.dropout=0.0", "train.use_amp=false", "train.cuda_graphs=false")
    grouped = _group(tiny_data, tmp_path / "group", *exact)
    cfg = EverestConfig().with_overrides(overrides(BATCH_256, "train.epochs=2", "train.device=cuda", *exact))
    solo = [ProductionTrainer(e, config=cfg, data_dir=tiny_data, output_dir=tmp_path / "solo").train() for e in GROUP]
    _assert_histories_close(grouped, solo, 1e-3)


def test_group_with_the_production_defaults_on_cuda_finishes(tiny_data, tmp_path):
    for res in _group(tiny_data, tmp_path):
        assert len(res["history"]) == 2 and res["provenance"]["device"].startswith("cuda")
        assert all(math.isfinite(row[k]) for row in res["history"] for k in GROUP_KEYS + ("val_tss", "val_auc"))
        assert math.isfinite(res["test_metrics"]["tss"])
