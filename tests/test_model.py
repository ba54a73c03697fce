"""Tests for everest.model.network: size, shapes under every head switch, determinism, positional encoding, EVT head."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from everest.config import ModelConfig
from everest.model.network import GPD, NIG, EverestModel, EverestOutput, count_parameters

N_FEATURES = 9
FULL_SIZE = 814_090
# Parameters each switch removes with the default width 128: Linear(128->k) has 129 k.
HEAD_SIZES = {"use_attention_bottleneck": 129, "use_evidential": 4 * 129, "use_evt": 2 * 129, "use_precursor": 129}


def test_default_parameter_count() -> None:
    assert count_parameters(EverestModel(ModelConfig(), N_FEATURES)) == FULL_SIZE


def test_count_parameters_trainable_only() -> None:
    model = EverestModel(ModelConfig(), N_FEATURES)
    model.logit_head.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == FULL_SIZE - 129
    assert count_parameters(model) == FULL_SIZE


@pytest.mark.parametrize("flags", list(itertools.product([True, False], repeat=4)), ids=str)
def test_head_switches_shapes_and_size(flags: tuple[bool, ...]) -> None:
    switches = dict(zip(HEAD_SIZES, flags, strict=True))
    cfg = ModelConfig(**switches)
    model = EverestModel(cfg, N_FEATURES)
    expected = FULL_SIZE - sum(size for name, size in HEAD_SIZES.items() if not switches[name])
    assert count_parameters(model) == expected

    out = model(torch.randn(5, cfg.seq_len, N_FEATURES))
    assert isinstance(out, EverestOutput)
    assert out.logits.shape == (5,)
    assert (out.nig is not None) == cfg.use_evidential
    assert (out.gpd is not None) == cfg.use_evt
    assert (out.precursor is not None) == cfg.use_precursor
    if out.nig is not None:
        assert isinstance(out.nig, NIG) and all(t.shape == (5,) for t in out.nig)
        assert (out.nig.v >= 0).all() and (out.nig.alpha >= 1).all() and (out.nig.beta >= 0).all()
    if out.gpd is not None:
        assert isinstance(out.gpd, GPD) and all(t.shape == (5,) for t in out.gpd)
        assert ((out.gpd.xi > -2) & (out.gpd.xi <= 1)).all() and (out.gpd.sigma >= 1e-3).all()
    if out.precursor is not None:
        assert out.precursor.shape == (5,)


def test_mean_pooling_is_the_mean_over_steps() -> None:
    model = EverestModel(ModelConfig(use_attention_bottleneck=False), N_FEATURES)
    h = torch.randn(3, 10, 128)
    torch.testing.assert_close(model.pool(h), h.mean(dim=1))


def test_attention_pool_is_a_convex_combination() -> None:
    model = EverestModel(ModelConfig(), N_FEATURES)
    h = torch.ones(2, 10, 128) * torch.arange(10.0).view(1, 10, 1)  # step t holds the value t
    pooled = model.pool(h)
    assert pooled.shape == (2, 128)
    assert ((pooled >= 0) & (pooled <= 9)).all()


def test_eval_mode_is_deterministic_and_train_mode_uses_dropout() -> None:
    torch.manual_seed(0)
    model = EverestModel(ModelConfig(), N_FEATURES)
    x = torch.randn(8, 10, N_FEATURES)
    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
    for a, b in zip(first, second, strict=True):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        else:
            for ta, tb in zip(a, b, strict=True):
                torch.testing.assert_close(ta, tb, rtol=0, atol=0)
    model.train()
    assert not torch.equal(model(x).logits, model(x).logits)


def test_positional_scale_is_learnable() -> None:
    model = EverestModel(ModelConfig(), N_FEATURES)
    names = dict(model.named_parameters())
    assert "pos.scale" in names and names["pos.scale"].shape == () and names["pos.scale"].item() == 1.0
    model(torch.randn(4, 10, N_FEATURES)).logits.sum().backward()
    grad = model.pos.scale.grad
    assert grad is not None and torch.isfinite(grad) and grad != 0


def test_positional_table_is_sinusoidal_and_not_saved() -> None:
    cfg = ModelConfig()
    model = EverestModel(cfg, N_FEATURES)
    table = model.pos.table
    assert table.shape == (cfg.seq_len, cfg.embed_dim)
    torch.testing.assert_close(table[0, 0::2], torch.zeros(cfg.embed_dim // 2))
    torch.testing.assert_close(table[0, 1::2], torch.ones(cfg.embed_dim // 2))
    i = 3  # frequency index: columns 2i (sin) and 2i + 1 (cos)
    angle = 7 / 10_000 ** (2 * i / cfg.embed_dim)
    assert table[7, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert table[7, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert "pos.table" not in model.state_dict()


def test_odd_width_positional_table() -> None:
    model = EverestModel(ModelConfig(embed_dim=9, num_heads=3, ff_dim=8, num_blocks=1), N_FEATURES)
    assert model.pos.table.shape == (10, 9)
    assert model(torch.randn(2, 10, N_FEATURES)).logits.shape == (2,)


def test_shorter_sequences_are_accepted() -> None:
    model = EverestModel(ModelConfig(), N_FEATURES)
    assert model(torch.randn(2, 4, N_FEATURES)).logits.shape == (2,)


@pytest.mark.parametrize("shape", [(2, 10), (2, 10, 8), (2, 11, 9)])
def test_bad_input_shape_is_rejected(shape: tuple[int, ...]) -> None:
    model = EverestModel(ModelConfig(), N_FEATURES)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, steps <= 10, 9\)"):
        model(torch.randn(*shape))


def test_bad_feature_count_is_rejected() -> None:
    with pytest.raises(ValueError, match="n_features must be a positive integer, got 0"):
        EverestModel(ModelConfig(), 0)


# --- EVT head: range and trunk detachment ---------------------------------------------------------------


def test_evt_head_default_range_and_floor() -> None:
    cfg = ModelConfig()
    assert cfg.evt_detach_trunk and cfg.evt_xi_range == (-0.5, 0.5) and cfg.evt_sigma_floor == 0.05
    head = EverestModel(cfg, N_FEATURES).evt_head
    head.proj = torch.nn.Identity()
    raw = torch.tensor([[-1e4, -1e4], [1e4, 1e4], [0.0, 0.0], [-3.0, 2.0]])
    xi, sigma = head(raw)
    assert ((xi >= -0.5) & (xi <= 0.5)).all() and (sigma >= 0.05).all()
    assert xi[0].item() == -0.5 and xi[1].item() == 0.5 and xi[2].item() == 0.0


def test_evt_head_reference_range_reproduces_the_reference_formula() -> None:
    cfg = ModelConfig(evt_xi_range=(-2.0, 1.0), evt_sigma_floor=1e-3)
    head = EverestModel(cfg, N_FEATURES).evt_head
    z = torch.randn(16, cfg.embed_dim)
    raw_xi, raw_sigma = head.proj(z).unbind(-1)
    xi, sigma = head(z)
    torch.testing.assert_close(xi, 1.5 * torch.tanh(raw_xi) - 0.5, rtol=0, atol=0)
    torch.testing.assert_close(sigma, torch.nn.functional.softplus(raw_sigma) + 1e-3, rtol=0, atol=0)


@pytest.mark.parametrize("detach", [True, False])
def test_evt_detach_changes_gradients_not_values(detach: bool) -> None:
    torch.manual_seed(0)
    model = EverestModel(ModelConfig(evt_detach_trunk=detach, dropout=0.0), N_FEATURES)
    torch.manual_seed(0)
    other = EverestModel(ModelConfig(evt_detach_trunk=not detach, dropout=0.0), N_FEATURES)
    x = torch.randn(4, 10, N_FEATURES)
    a, b = model(x), other(x)
    torch.testing.assert_close(a.gpd.xi, b.gpd.xi, rtol=0, atol=0)
    a.gpd.sigma.sum().backward()
    assert (model.embed.proj.weight.grad is None) == detach


@pytest.mark.parametrize("bad", [(1.0, -1.0), (0.5, 0.5), (float("nan"), 1.0), (-float("inf"), 1.0)])
def test_bad_evt_xi_range_is_rejected(bad: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="model.evt_xi_range must be two finite numbers"):
        ModelConfig(evt_xi_range=bad)


def test_evt_sigma_floor_must_be_positive() -> None:
    with pytest.raises(ValueError, match="evt_sigma_floor"):
        ModelConfig(evt_sigma_floor=0.0)
