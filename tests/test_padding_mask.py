"""Tests for the padding mask: padding steps are no attention keys and get no pooling weight.

The key property: with the mask, a window's outputs do not depend on the values at its padding steps.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from everest.config import LossConfig, ModelConfig
from everest.model.losses import EverestLoss
from everest.model.network import EverestModel, EverestOutput
from everest.training.fast import TrainStep, make_optimizer

N_FEATURES = 9
T = 10
REAL_STEPS = (1, 2, 5, 10, 3, 1, 7, 4)  # real (trailing) steps per window; 1 = only the current record


def _small(**kw) -> ModelConfig:
    return ModelConfig(embed_dim=32, num_heads=4, ff_dim=64, num_blocks=2, **kw)


def _batch(seed: int = 0, real: tuple[int, ...] = REAL_STEPS) -> tuple[Tensor, Tensor]:
    """Front-padded windows as data.py builds them: zeros at padding, ``valid`` True on the last steps."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.arange(T).unsqueeze(0) >= T - torch.tensor(real).unsqueeze(1)  # (B, T)
    x = torch.randn(len(real), T, N_FEATURES, generator=g) * valid.unsqueeze(-1)
    return x, valid


def _junk(x: Tensor, valid: Tensor, seed: int = 1) -> Tensor:
    """``x`` with large random values at its padding steps (real steps untouched)."""
    g = torch.Generator().manual_seed(seed)
    return torch.where(valid.unsqueeze(-1), x, 10 * torch.randn(x.shape, generator=g))


def _tensors(out: EverestOutput) -> list[Tensor]:
    return [out.logits, *out.nig, *out.gpd, out.precursor]


def _assert_outputs_close(a: EverestOutput, b: EverestOutput, **tol) -> None:
    for ta, tb in zip(_tensors(a), _tensors(b), strict=True):
        torch.testing.assert_close(ta, tb, **tol)


def _model(seed: int = 0, **kw) -> EverestModel:
    torch.manual_seed(seed)
    return EverestModel(_small(**kw), N_FEATURES).eval()


def _reference_forward(model: EverestModel, x: Tensor) -> EverestOutput:
    """The forward pass as it was before the mask existed, step by step from the model's own modules."""
    h = model.pos(model.embed(x))
    for block in model.blocks:
        attended, _ = block.attn(h, h, h, need_weights=False)
        h = block.norm1(h + attended)
        h = block.norm2(h + block.ff(h))
    if model.cfg.use_attention_bottleneck:
        weights = torch.softmax(model.pool.score(h).squeeze(-1), dim=1)
        pooled = torch.einsum("bt,btd->bd", weights, h)
    else:
        pooled = h.mean(dim=1)
    z = model.shared(pooled)
    return EverestOutput(model.logit_head(z).squeeze(-1), model.evidential_head(z), model.evt_head(z),
                         model.precursor_head(z).squeeze(-1))


# --- unmasked behaviour is unchanged -------------------------------------------------------------------


@pytest.mark.parametrize("attention_pool", [True, False])
def test_without_valid_or_with_the_flag_off_outputs_are_bit_identical(attention_pool: bool) -> None:
    x, valid = _batch()
    on = _model(use_attention_bottleneck=attention_pool)
    off = _model(use_attention_bottleneck=attention_pool, padding_mask=False)
    with torch.no_grad():
        expected = _reference_forward(on, x)
        for out in (on(x), on(x, None), off(x, valid), off(x)):
            _assert_outputs_close(out, expected, rtol=0, atol=0)


def test_fully_valid_windows_give_the_same_output_with_and_without_the_mask() -> None:
    x = torch.randn(6, T, N_FEATURES)
    model = _model()
    with torch.no_grad():
        _assert_outputs_close(model(x, torch.ones(6, T, dtype=torch.bool)), model(x), rtol=1e-5, atol=1e-6)


# --- the key property: padding values do not matter -----------------------------------------------------


@pytest.mark.parametrize("attention_pool", [True, False])
def test_padding_values_do_not_change_masked_outputs(attention_pool: bool) -> None:
    x, valid = _batch()
    x_junk = _junk(x, valid)
    model = _model(use_attention_bottleneck=attention_pool)
    with torch.no_grad():
        _assert_outputs_close(model(x_junk, valid), model(x, valid), rtol=1e-5, atol=1e-6)
        # Without the mask the padding is data: the same junk moves every window that has padding.
        changed = (model(x_junk).logits - model(x).logits).abs() > 1e-4
    assert changed.tolist() == [n < T for n in REAL_STEPS]


def test_padding_values_do_not_change_outputs_with_the_flag_off_only_when_told() -> None:
    x, valid = _batch()
    model = _model(padding_mask=False)
    with torch.no_grad():
        assert not torch.allclose(model(_junk(x, valid), valid).logits, model(x, valid).logits)


def test_padding_values_do_not_change_masked_outputs_in_train_mode() -> None:
    x, valid = _batch()
    model = _model(dropout=0.0).train()  # the training code path (no fused inference kernel)
    _assert_outputs_close(model(_junk(x, valid), valid), model(x, valid), rtol=1e-5, atol=1e-6)


def test_padding_values_do_not_change_masked_outputs_under_bf16_autocast() -> None:
    x, valid = _batch()
    model = _model()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = model(_junk(x, valid), valid), model(x, valid)
    assert all(torch.isfinite(t).all() for t in _tensors(a))
    _assert_outputs_close(a, b, rtol=1e-2, atol=1e-2)


def test_gradient_at_padding_inputs_is_zero() -> None:
    x, valid = _batch()
    x = _junk(x, valid).requires_grad_()
    model = _model(dropout=0.0).train()
    out = model(x, valid)
    sum(t.sum() for t in _tensors(out)).backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[~valid], torch.zeros_like(x.grad[~valid]))
    assert (x.grad[valid].abs().sum(-1) > 0).all()


def test_masked_windows_match_the_same_windows_without_their_padding() -> None:
    """A window with k real steps gives what its k real steps give as a batch of their own, padded differently."""
    x, valid = _batch()
    model = _model()
    with torch.no_grad():
        full = model(x, valid).logits
        for i, k in enumerate(REAL_STEPS):  # move the window's real steps into another all-junk window
            other = _junk(torch.zeros(1, T, N_FEATURES), torch.zeros(1, T, dtype=torch.bool), seed=i + 7)
            other[0, T - k:] = x[i, T - k:]
            torch.testing.assert_close(model(other, valid[i:i + 1]).logits, full[i:i + 1], rtol=1e-5, atol=1e-6)


# --- edge cases -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention_pool", [True, False])
def test_only_the_last_step_real_is_finite_under_gradients(attention_pool: bool) -> None:
    x, valid = _batch(real=(1, 1, 1))
    model = _model(use_attention_bottleneck=attention_pool, dropout=0.0).train()
    out = model(_junk(x, valid), valid)
    assert all(torch.isfinite(t).all() for t in _tensors(out))
    total, _ = EverestLoss(LossConfig())(out, torch.tensor([0.0, 1.0, 1.0]), 60)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_window_without_any_real_step_is_treated_as_unmasked() -> None:
    x, valid = _batch()
    valid[2] = False
    model = _model()
    with torch.no_grad():
        masked, unmasked = model(x, valid).logits, model(x).logits
    assert torch.isfinite(masked).all()
    torch.testing.assert_close(masked[2], unmasked[2], rtol=1e-5, atol=1e-6)


def test_masked_mean_pool_is_the_mean_over_real_steps() -> None:
    model = _model(use_attention_bottleneck=False)
    h = torch.randn(3, T, 32)
    _, valid = _batch(real=(1, 4, 10))
    pooled = model.pool(h, ~valid)
    for i, k in enumerate((1, 4, 10)):
        torch.testing.assert_close(pooled[i], h[i, T - k:].mean(dim=0))


def test_masked_attention_pool_ignores_padding_steps() -> None:
    model = _model()
    h = torch.randn(3, T, 32)
    _, valid = _batch(real=(1, 4, 10))
    pooled = model.pool(h, ~valid)
    for i, k in enumerate((1, 4, 10)):
        torch.testing.assert_close(pooled[i], model.pool(h[i:i + 1, T - k:])[0])


def test_shorter_windows_take_a_mask_of_their_length() -> None:
    x, valid = _batch()
    model = _model()
    with torch.no_grad():
        assert model(x[:, -4:], valid[:, -4:]).logits.shape == (len(REAL_STEPS),)


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda v: v.float(), r"torch.float32 tensor of shape \(8, 10\)"),
        (lambda v: v[:, :-1], r"torch.bool tensor of shape \(8, 9\)"),
        (lambda v: v[:-1], r"torch.bool tensor of shape \(7, 10\)"),
        (lambda v: v.unsqueeze(-1), r"torch.bool tensor of shape \(8, 10, 1\)"),
        (lambda v: v.numpy(), "'ndarray'"),
    ],
)
def test_bad_valid_is_rejected(make, what: str) -> None:
    x, valid = _batch()
    with pytest.raises(ValueError, match=r"valid must be a torch.bool tensor of shape \(batch, steps\) = \(8, 10\)"
                       r" \(True = real step\), got " + what):
        _model()(x, make(valid))


def test_bad_valid_is_rejected_with_the_flag_off_too() -> None:
    x, valid = _batch()
    with pytest.raises(ValueError, match="valid must be a torch.bool tensor"):
        _model(padding_mask=False)(x, valid.float())


# --- TrainStep ------------------------------------------------------------------------------------------


def _train_step_params(valid: Tensor | None, manual: bool) -> list[Tensor]:
    """Parameters after two steps through TrainStep (or by hand with ``model(x[idx], valid[idx])``)."""
    x, v = _batch()
    x = _junk(x, v)
    y = (torch.arange(len(x)) % 2).float()
    model = _model(dropout=0.0).train()
    opt = make_optimizer(model, 1e-3, 1e-4, torch.device("cpu"))
    loss_fn = EverestLoss(LossConfig())
    batches = [torch.tensor([5, 0, 3, 7]), torch.tensor([1, 2, 6])]
    if manual:
        for idx in batches:
            total, _ = loss_fn(model(x[idx], None if valid is None else valid[idx]), y[idx], 30)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
    else:
        step = TrainStep(model, opt, loss_fn, x, y, torch.device("cpu"), valid=valid)
        step.start_epoch(30)
        for idx in batches:
            step(idx, 4)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("with_valid", [True, False])
def test_train_step_gathers_valid_with_each_batch(with_valid: bool) -> None:
    valid = _batch()[1] if with_valid else None
    for a, b in zip(_train_step_params(valid, manual=False), _train_step_params(valid, manual=True), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_train_step_with_valid_differs_from_without() -> None:
    with_mask, without = _train_step_params(_batch()[1], manual=False), _train_step_params(None, manual=False)
    assert any(not torch.equal(a, b) for a, b in zip(with_mask, without, strict=True))


def test_train_step_rejects_a_bad_valid() -> None:
    x, valid = _batch()
    model = _model()
    opt = make_optimizer(model, 1e-3, 0.0, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"valid must be a torch.bool tensor of shape \(8, 10\)"):
        TrainStep(model, opt, EverestLoss(LossConfig()), x, torch.zeros(8), torch.device("cpu"), valid=valid[:, 1:])
