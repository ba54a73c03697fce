"""Grouped training: K experiments as one batched model give each member its solo run.

Equivalence tolerance (measured on this project's CPU, torch 2.13.0+cpu, 1 thread): a member of a
3-member group (M-24 seeds 0 and 1, C-24 seed 0; different training-set sizes, so the shorter member's
last batches are partial and it sits steps out) differs from the same experiment trained alone by at most
3.1e-7 relative on every history value (losses, loss terms, validation loss, TSS, AUC); the test TSS and
the chosen thresholds are identical. The batched kernels only reorder sums: the dropout masks, shuffles
and initial weights are the solo run's draws. The tests allow 1e-5 relative (the golden tier's margin)
and one positive sample (0.01) on a TSS. A rerun of the same group is bit-identical.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import ONE_THREAD, TINY_MODEL, overrides
from torch import nn

from everest.config import EverestConfig, Experiment, ModelConfig
from everest.data.tables import data_file
from everest.errors import Preempted, TrainingDiverged
from everest.model.batched import GroupAdamW, GroupedEverest, MemberDraws
from everest.model.losses import EverestLoss, batch_quantile
from everest.model.network import Block, EverestModel
from everest.training.group import train_group
from everest.training.train import ProductionTrainer

REL = 1e-5  # measured 3.1e-7
TSS_ABS = 0.01
KEYS = ("train_loss", "focal", "evidential", "evt", "precursor", "val_loss", "val_tss", "val_auc")
EXPERIMENTS = [Experiment.of("M-24", 0), Experiment.of("M-24", 1), Experiment.of("C-24", 0)]
CONFIG = EverestConfig().with_overrides(
    overrides("train.epochs=4", "train.early_stopping_patience=1", ONE_THREAD, "train.device=cpu"))
TINY = EverestConfig().with_overrides(list(TINY_MODEL)).model


@pytest.fixture(scope="module")
def data_dir(tiny_data) -> Path:
    """The session's tiny tables (conftest), read only here."""
    return tiny_data


@pytest.fixture(scope="module")
def solo_runs(data_dir, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("solo")
    return [ProductionTrainer(e, config=CONFIG, data_dir=data_dir, output_dir=out).train() for e in EXPERIMENTS]


@pytest.fixture(scope="module")
def group_run(data_dir, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("group")
    results = train_group(EXPERIMENTS, config=CONFIG, data_dir=data_dir, output_dir=out)
    assert all(r.error is None for r in results), [r.error for r in results]
    return out, [r.results for r in results]


def _assert_same_run(got: dict, want: dict, rel: float = REL) -> None:
    assert len(got["history"]) == len(want["history"]), (got["experiment"]["name"], len(got["history"]))
    for g, w in zip(got["history"], want["history"], strict=True):
        for key in KEYS:
            tol = TSS_ABS if key == "val_tss" else 0.0
            assert math.isclose(g[key], w[key], rel_tol=rel, abs_tol=tol), (got["experiment"]["name"], key, g, w)
    assert got["training"]["best_epoch"] == want["training"]["best_epoch"]
    assert got["training"]["stop_reason"] == want["training"]["stop_reason"]
    assert math.isclose(got["test_metrics"]["tss"], want["test_metrics"]["tss"], abs_tol=TSS_ABS)
    assert math.isclose(got["threshold"]["selected_raw"], want["threshold"]["selected_raw"], abs_tol=1e-4)


@pytest.mark.slow
def test_each_member_of_a_group_reproduces_its_solo_run(solo_runs, group_run):
    _, grouped = group_run
    for got, want in zip(grouped, solo_runs, strict=True):
        assert got["experiment"] == want["experiment"]
        _assert_same_run(got, want)
    # Early stopping is per member: here seed 1 stops after 2 epochs and leaves the batch, the others run 4.
    assert [r["training"]["epochs_run"] for r in grouped] == [4, 2, 4]
    assert grouped[1]["training"]["stop_reason"] == "early_stopping on val_tss"
    assert grouped[2]["data"]["n_train"] < grouped[0]["data"]["n_train"]  # C-24 sits the last steps out


@pytest.mark.slow
def test_group_outputs_have_the_solo_layout(solo_runs, group_run, data_dir):
    out, grouped = group_run
    for res in grouped:
        name = res["experiment"]["name"]
        for f in ("results.json", "training_history.csv", "predictions.csv"):
            assert (out / "results" / name / f).is_file(), (name, f)
        assert not list((out).rglob("checkpoint*.pt")), "finished members keep no checkpoint"
    # A finished group is finished for solo runs too (same identity): nothing is trained again.
    again = ProductionTrainer(EXPERIMENTS[2], config=CONFIG, data_dir=data_dir, output_dir=out).train()
    assert again["history"] == grouped[2]["history"]


@pytest.mark.slow
def test_a_rerun_of_the_same_group_is_bit_identical(group_run, data_dir, tmp_path):
    _, first = group_run
    second = train_group(EXPERIMENTS, config=CONFIG, data_dir=data_dir, output_dir=tmp_path)
    for a, b in zip(first, second, strict=True):
        rows = [[{k: r[k] for k in KEYS} for r in res["history"]] for res in (a, b.results)]
        assert rows[0] == rows[1]
        assert a["test_metrics"]["tss"] == b.results["test_metrics"]["tss"]


@pytest.mark.slow
def test_a_group_stopped_by_sigterm_resumes_every_member_exactly(group_run, data_dir, tmp_path):
    """SIGTERM mid-epoch: every member checkpoints; the rerun (two members as a group, one alone) continues."""
    _, uninterrupted = group_run
    with pytest.raises(Preempted, match="stopped by SIGTERM in epoch 2"):
        train_group(EXPERIMENTS, config=CONFIG, data_dir=data_dir, output_dir=tmp_path, progress=_stop_after_epoch_one)
    for exp in EXPERIMENTS:
        ck = torch.load(tmp_path / "checkpoints" / f"{exp.name}.pt", weights_only=True)
        assert ck["epoch"] == 1 and ck["partial"]["step"] == 0, exp.name
    solo = ProductionTrainer(EXPERIMENTS[2], config=CONFIG, data_dir=data_dir, output_dir=tmp_path).train()
    rest = train_group(EXPERIMENTS[:2], config=CONFIG, data_dir=data_dir, output_dir=tmp_path)
    for got, want in zip([r.results for r in rest] + [solo], uninterrupted, strict=True):
        assert got["training"]["resumed_after_epoch"] == 1
        _assert_same_run(got, want)


def _stop_after_epoch_one(report) -> None:
    if report.epoch == 1 and report.experiment == EXPERIMENTS[-1].name:
        os.kill(os.getpid(), signal.SIGTERM)  # recorded by the trainer's handler, acted on at the next step


@pytest.mark.slow
def test_a_member_that_fails_alone_does_not_stop_the_others(group_run, data_dir, tmp_path):
    """NaN weights in one member's checkpoint make it diverge inside the group; a broken file fails another's
    data before training. The others finish as if alone."""
    _, uninterrupted = group_run
    with pytest.raises(Preempted):
        train_group(EXPERIMENTS, config=CONFIG, data_dir=data_dir, output_dir=tmp_path, progress=_stop_after_epoch_one)
    path = tmp_path / "checkpoints" / f"{EXPERIMENTS[0].name}.pt"
    ck = torch.load(path, weights_only=True)
    ck["model"] = {k: torch.full_like(v, math.nan) for k, v in ck["model"].items()}
    torch.save(ck, path)
    results = train_group(EXPERIMENTS, config=CONFIG, data_dir=data_dir, output_dir=tmp_path)
    assert isinstance(results[0].error, TrainingDiverged), results[0]
    assert "everest_M_24h_seed0: training loss is nan at epoch 2" in str(results[0].error)
    for got, want in zip(results[1:], uninterrupted[1:], strict=True):
        assert got.error is None
        _assert_same_run(got.results, want)
    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    data_file(broken, EXPERIMENTS[2].target, "train").write_text("not,a,sharp,table\n")
    bad = train_group(EXPERIMENTS[1:], config=CONFIG, data_dir=broken, output_dir=tmp_path / "bad")
    assert bad[1].error is not None and str(data_file(broken, EXPERIMENTS[2].target, "train")) in str(bad[1].error)
    assert bad[0].error is None
    _assert_same_run(bad[0].results, uninterrupted[1])


# --- the batched model and optimizer ----------------------------------------------------------------------
def _models(n: int, cfg: ModelConfig = TINY) -> list[EverestModel]:
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        models.append(EverestModel(cfg, n_features=9))
    return models


def _batch(k: int, b: int = 6, t: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(k, b, t, 9, generator=g)
    valid = torch.ones(k, b, t, dtype=torch.bool)
    valid[:, 0, :4] = False  # a front-padded window in every member
    return x, valid


@pytest.mark.parametrize("cfg", [TINY, TINY.model_copy(update={"use_attention_bottleneck": False, "use_evt": False})])
def test_grouped_forward_equals_each_solo_model(cfg):
    models = _models(3, cfg)
    group = GroupedEverest.stack(models).eval()
    x, valid = _batch(3)
    out = group(x, valid)
    for k, model in enumerate(models):
        solo = model.eval()(x[k], valid[k])
        torch.testing.assert_close(out.logits[k], solo.logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.nig.beta[k], solo.nig.beta, rtol=1e-5, atol=1e-6)
        if cfg.use_evt:
            torch.testing.assert_close(out.gpd.xi[k], solo.gpd.xi, rtol=1e-5, atol=1e-6)


def test_member_dropout_draws_are_the_solo_models_draws():
    """In training mode each member's masks come from its generator in the solo model's order and shapes."""
    models = _models(2)
    group = GroupedEverest.stack(models).train()
    x, valid = _batch(2)
    generators = [torch.Generator().manual_seed(10 + k) for k in range(2)]
    rows = [6, 4]  # member 1 has a short batch: only its first 4 rows are drawn, as alone
    out = group(x, valid, MemberDraws(generators, rows))
    for k, model in enumerate(models):
        torch.manual_seed(10 + k)
        solo = model.train()(x[k, :rows[k]], valid[k, :rows[k]])
        torch.testing.assert_close(out.logits[k, :rows[k]], solo.logits, rtol=1e-5, atol=1e-6)


def test_member_state_round_trip_and_select():
    models = _models(3)
    group = GroupedEverest.stack(models)
    for k, model in enumerate(models):
        state = group.member_state(k)
        assert state.keys() == model.state_dict().keys()
        assert all(torch.equal(state[n], v) for n, v in model.state_dict().items())
    group.select([2, 0])
    assert group.members == 2 and torch.equal(group.member_state(0)["logit_head.weight"],
                                              models[2].state_dict()["logit_head.weight"])


def _with_ff(monkeypatch: pytest.MonkeyPatch, make: Callable[[nn.Sequential], nn.Module]) -> None:
    """Every Block's feed-forward becomes ``make(the network's own ff)``, in solo and grouped models alike."""
    init = Block.__init__

    def patched(self: Block, cfg: ModelConfig) -> None:
        init(self, cfg)
        self.ff = make(self.ff)

    monkeypatch.setattr(Block, "__init__", patched)


def test_a_reordered_sequential_changes_both_engines(monkeypatch):
    """Dropout moved before a swapped activation: the grouped forward follows the solo network's Sequential."""
    _with_ff(monkeypatch, lambda ff: nn.Sequential(ff[0], ff[2], nn.Tanh(), ff[3]))
    models = _models(2)
    group = GroupedEverest.stack(models).train()
    x, valid = _batch(2)
    generators = [torch.Generator().manual_seed(10 + k) for k in range(2)]
    out = group(x, valid, MemberDraws(generators, [6, 6]))
    for k, model in enumerate(models):
        torch.manual_seed(10 + k)
        torch.testing.assert_close(out.logits[k], model.train()(x[k], valid[k]).logits, rtol=1e-5, atol=1e-6)


def test_a_network_the_group_cannot_compute_is_refused_with_the_names(monkeypatch):
    _with_ff(monkeypatch, lambda ff: nn.Sequential(*ff, nn.Softmax(dim=-1)))
    with pytest.raises(TypeError, match=r"no batched form of blocks\.0\.ff\.4 \(Softmax\)"):
        GroupedEverest(TINY, n_features=9, members=2)
    monkeypatch.undo()

    def gated(ff: nn.Sequential) -> nn.Module:
        ff.gate = nn.Parameter(torch.ones(()))  # a weight outside the layers the Sequential applies
        return ff

    _with_ff(monkeypatch, gated)
    with pytest.raises(TypeError, match=r"solo parameters it never reads: \['blocks\.0\.ff\.gate'\]; names it reads "
                                        r"that the solo model lacks: none"):
        GroupedEverest(TINY, n_features=9, members=2)


def test_group_adamw_is_torch_adamw_per_member_and_leaves_inactive_members_alone():
    torch.manual_seed(0)
    start = torch.randn(3, 4, 5)
    stacked = start.clone().requires_grad_(True)
    opt = GroupAdamW([stacked], lr=1e-2, weight_decay=1e-2)
    solo = [start[k].clone().requires_grad_(True) for k in range(3)]
    solo_opts = [torch.optim.AdamW([p], lr=1e-2, weight_decay=1e-2) for p in solo]
    pattern = [[True, True, True], [True, False, True], [False, False, True]]
    for step, active in enumerate(pattern):
        grad = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(step))
        stacked.grad = grad.clone()
        opt.step(torch.tensor(active))
        for k in range(3):
            if active[k]:
                solo[k].grad = grad[k].clone()
                solo_opts[k].step()
    for k in range(3):
        torch.testing.assert_close(stacked[k].detach(), solo[k].detach(), rtol=1e-6, atol=1e-7)
        state = opt.member_state(k, solo_opts[k].state_dict())["state"][0]
        assert float(state["step"]) == float(solo_opts[k].state_dict()["state"][0]["step"])
    untouched = start[0].clone()
    before = stacked.detach()[0].clone()
    stacked.grad = torch.randn(3, 4, 5)
    opt.step(torch.tensor([False, True, True]))
    assert torch.equal(stacked.detach()[0], before) and not torch.equal(before, untouched)


def test_weighted_loss_is_the_loss_of_the_weighted_rows():
    torch.manual_seed(3)
    logits = torch.randn(2, 8)
    y = (torch.rand(2, 8) > 0.5).float()
    weight = torch.ones(2, 8)
    weight[1, 5:] = 0
    for q in (0.1, 0.5, 0.9):
        assert torch.allclose(batch_quantile(logits, q, weight)[1], torch.quantile(logits[1, :5], q))
        assert torch.allclose(batch_quantile(logits, q, weight)[0], torch.quantile(logits[0], q))
    models = _models(1)
    group = GroupedEverest.stack(models + _models(2)[1:]).eval()
    x, valid = _batch(2, b=8)
    out = group(x, valid)
    loss = EverestLoss(EverestConfig().loss)
    total, terms = loss(out, y, epoch=60, weight=weight)
    solo_total, solo_terms = loss(models[0].eval()(x[0], valid[0]), y[0], epoch=60)
    torch.testing.assert_close(total[0], solo_total, rtol=1e-5, atol=1e-6)
    short = group(x[:, :5].contiguous(), valid[:, :5].contiguous())
    short_total, _ = loss(short, y[:, :5], epoch=60)
    torch.testing.assert_close(total[1], short_total[1], rtol=1e-5, atol=1e-6)
    empty = torch.zeros(2, 8)
    none_total, none_terms = loss(out, y, epoch=60, weight=empty)
    assert torch.equal(none_total, torch.zeros(2)) and all(np.isfinite(v.numpy()).all() for v in none_terms.values())


@pytest.mark.slow
def test_a_group_killed_by_sigkill_resumes_from_each_members_last_epoch(group_run, data_dir, tmp_path):
    """SIGKILL (a lost node) mid-training: each member resumes after its last checkpointed epoch, exactly."""
    _, uninterrupted = group_run
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from pathlib import Path\n"
              "from test_group import CONFIG, EXPERIMENTS\n"
              "from everest.training.group import train_group\n"
              f"train_group(EXPERIMENTS, config=CONFIG, data_dir=Path({str(data_dir)!r}), "
              f"output_dir=Path({str(tmp_path)!r}))\n")
    child = subprocess.Popen([sys.executable, "-c", script])
    paths = [tmp_path / "checkpoints" / f"{e.name}.pt" for e in EXPERIMENTS]
    deadline = time.monotonic() + 300
    try:
        while not all(_epochs(p) >= 1 for p in paths):
            assert child.poll() is None and time.monotonic() < deadline, "the group ended before it was killed"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not any((tmp_path / "results" / e.name / "results.json").exists() for e in EXPERIMENTS)
    resumed = train_group(EXPERIMENTS, config=CONFIG, data_dir=data_dir, output_dir=tmp_path)
    for got, want in zip(resumed, uninterrupted, strict=True):
        assert got.error is None and got.results["training"]["resumed_after_epoch"] >= 1
        _assert_same_run(got.results, want)


def _epochs(path: Path) -> int:
    """Finished epochs in a checkpoint (0 while there is none or it is being replaced)."""
    try:
        return torch.load(path, weights_only=True)["epoch"]
    except (OSError, RuntimeError, EOFError):
        return 0
