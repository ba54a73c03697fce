"""Tests for everest.model.losses: hand-computed terms, the schedule, float32 EVT under bf16, finiteness,
overfitting."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from everest.config import LossConfig, ModelConfig
from everest.model.losses import (
    XI_ZERO,
    EverestLoss,
    evidential_loss,
    evt_loss,
    focal_loss,
    gpd_nll,
    nig_nll,
    nig_uncertainty,
    precursor_loss,
)
from everest.model.network import GPD, NIG, EverestModel, EverestOutput, EvidentialHead, EVTHead

N_FEATURES = 9


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _nig_nll_by_hand(y: float, mu: float, v: float, alpha: float, beta: float) -> float:
    omega = 2 * beta * (1 + v)
    return (
        0.5 * math.log(math.pi / v)
        - alpha * math.log(omega)
        + (alpha + 0.5) * math.log((y - mu) ** 2 * v + omega)
        + math.lgamma(alpha)
        - math.lgamma(alpha + 0.5)
    )


def _gpd_nll_by_hand(e: float, xi: float, sigma: float) -> float:
    return math.log(sigma) + (1 + 1 / xi) * math.log(1 + xi * e / sigma)


def _random_output(batch: int, seed: int = 0) -> EverestOutput:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(7, batch, generator=g)
    nig = NIG(r[0], F.softplus(r[1]), 1 + F.softplus(r[2]), F.softplus(r[3]))
    gpd = GPD(1.5 * torch.tanh(r[4]) - 0.5, F.softplus(r[5]) + 1e-3)
    return EverestOutput(logits=3 * r[6], nig=nig, gpd=gpd, precursor=r[6].flip(0))


# --- focal ---------------------------------------------------------------------------------------------


def test_focal_at_gamma_zero_is_bce() -> None:
    logits, y = torch.randn(50), (torch.rand(50) > 0.5).float()
    torch.testing.assert_close(focal_loss(logits, y, 0.0), F.binary_cross_entropy_with_logits(logits, y))


def test_focal_at_gamma_two_by_hand() -> None:
    p1, p2 = _sigmoid(0.5), _sigmoid(-1.2)
    expected = ((1 - p1) ** 2 * -math.log(p1) + p2**2 * -math.log(1 - p2)) / 2
    got = focal_loss(torch.tensor([0.5, -1.2]), torch.tensor([1.0, 0.0]), 2.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_focal_down_weights_easy_examples() -> None:
    logits, y = torch.tensor([4.0, -4.0]), torch.tensor([1.0, 0.0])
    assert focal_loss(logits, y, 2.0) < 1e-3 * focal_loss(logits, y, 0.0)


# --- evidential ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("y", "mu", "v", "alpha", "beta"), [(1.0, 0.3, 0.7, 1.8, 0.4), (0.0, 0.9, 2.5, 3.2, 1.1)])
def test_nig_nll_by_hand(y: float, mu: float, v: float, alpha: float, beta: float) -> None:
    got = nig_nll(*(torch.tensor([x], dtype=torch.float64) for x in (y, mu, v, alpha, beta)))
    assert got.item() == pytest.approx(_nig_nll_by_hand(y, mu, v, alpha, beta), rel=1e-5)


def test_evidential_loss_adds_the_regulariser() -> None:
    points = [(1.0, 0.3, 0.7, 1.8, 0.4), (0.0, 0.9, 2.5, 3.2, 1.1)]
    lam = 0.05
    expected = sum(_nig_nll_by_hand(*p) + lam * abs(p[0] - p[1]) * (2 * p[2] + p[3]) for p in points) / 2
    y, mu, v, alpha, beta = (torch.tensor(col) for col in zip(*points, strict=True))
    assert evidential_loss(NIG(mu, v, alpha, beta), y, lam).item() == pytest.approx(expected, rel=1e-5)


def test_nig_nll_prefers_the_right_mean() -> None:
    v, alpha, beta = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.5])
    y = torch.tensor([1.0])
    assert nig_nll(y, torch.tensor([0.9]), v, alpha, beta) < nig_nll(y, torch.tensor([0.1]), v, alpha, beta)


def test_nig_uncertainty_by_hand() -> None:
    aleatoric, epistemic = nig_uncertainty(
        torch.tensor([0.2, 5.0]), torch.tensor([0.5, 4.0]), torch.tensor([3.0, 1.5]), torch.tensor([1.0, 2.0])
    )
    torch.testing.assert_close(aleatoric, torch.tensor([1.0 / 2.0, 2.0 / 0.5]))
    torch.testing.assert_close(epistemic, torch.tensor([1.0 / (0.5 * 2.0), 2.0 / (4.0 * 0.5)]))


def test_nig_uncertainty_is_finite_at_the_edges() -> None:
    aleatoric, epistemic = nig_uncertainty(torch.zeros(2), torch.zeros(2), torch.ones(2), torch.ones(2))
    assert torch.isfinite(aleatoric).all() and torch.isfinite(epistemic).all()


# --- EVT -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("e", "xi", "sigma"), [(0.8, 0.3, 1.2), (0.5, -0.4, 0.9), (2.0, 0.9, 0.05)])
def test_gpd_nll_by_hand(e: float, xi: float, sigma: float) -> None:
    got = gpd_nll(torch.tensor([e]), torch.tensor([xi]), torch.tensor([sigma]))
    assert got.item() == pytest.approx(_gpd_nll_by_hand(e, xi, sigma), rel=1e-5)


def test_gpd_nll_exponential_limit_and_continuity() -> None:
    e, sigma = torch.tensor([0.7, 0.7, 0.7]), torch.tensor([1.3, 1.3, 1.3])
    xi = torch.tensor([0.0, 0.5 * XI_ZERO, 2 * XI_ZERO])
    got = gpd_nll(e, xi, sigma)
    exponential = math.log(1.3) + 0.7 / 1.3
    assert got[0].item() == pytest.approx(exponential, rel=1e-6)
    assert got[1].item() == pytest.approx(exponential, rel=1e-6)
    assert got[2].item() == pytest.approx(exponential, rel=1e-3)


def test_gpd_nll_outside_support_is_clamped_and_finite() -> None:
    e = torch.tensor([10.0, 10.0], requires_grad=True)
    nll = gpd_nll(e, torch.tensor([-0.5, -1.5]), torch.tensor([1.0, 1.0]))  # endpoints at e = 2 and 2/3
    nll.sum().backward()
    assert torch.isfinite(nll).all() and torch.isfinite(e.grad).all()


def test_evt_loss_by_hand() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    xi, sigma = torch.tensor([0.1, 0.2, 0.3, 0.4, -0.3]), torch.tensor([1.0, 1.0, 1.0, 2.0, 0.5])
    u = 3.0 + 0.6 * (4.0 - 3.0)  # the 0.9 quantile of 0..4 sits at position 3.6: only logit 4 exceeds
    expected = _gpd_nll_by_hand(4.0 - u, -0.3, 0.5)
    assert evt_loss(logits, GPD(xi, sigma), 0.9).item() == pytest.approx(expected, rel=1e-5)
    u = 0.5 * 2.0 + 0.5 * 3.0  # the 0.625 quantile is 2.5: logits 3 and 4 exceed
    expected = (_gpd_nll_by_hand(3.0 - u, 0.4, 2.0) + _gpd_nll_by_hand(4.0 - u, -0.3, 0.5)) / 2
    assert evt_loss(logits, GPD(xi, sigma), 0.625).item() == pytest.approx(expected, rel=1e-5)


def test_evt_loss_without_exceedance_is_zero_with_graph() -> None:
    logits = torch.full((6,), 2.0, requires_grad=True)
    raw = torch.randn(6, requires_grad=True)
    loss = evt_loss(logits, GPD(torch.tanh(raw), F.softplus(raw) + 1e-3), 0.9)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(raw.grad, torch.zeros(6))


def test_evt_loss_reaches_the_logits_only_when_asked() -> None:
    out = _random_output(32)
    logits = out.logits.clone().requires_grad_()
    assert not evt_loss(logits, out.gpd, 0.9).requires_grad
    (literal,) = torch.autograd.grad(evt_loss(logits, out.gpd, 0.9, grad_to_logits=True), logits)
    assert torch.isfinite(literal).all() and literal.abs().sum() > 0


def test_evt_loss_is_float32_with_bf16_inputs() -> None:
    out = _random_output(32)
    gpd = GPD(out.gpd.xi.bfloat16(), out.gpd.sigma.bfloat16())
    assert evt_loss(out.logits.bfloat16(), gpd, 0.9).dtype == torch.float32


def test_evt_head_trains_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    model = EverestModel(ModelConfig(embed_dim=32, num_heads=2, ff_dim=64, num_blocks=2), N_FEATURES)
    x = torch.randn(64, 10, N_FEATURES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = evt_loss(out.logits, out.gpd, LossConfig().evt_quantile)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grad = model.evt_head.proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def _evt_grads(cfg: ModelConfig) -> tuple[dict[str, torch.Tensor | None], EverestModel]:
    """Gradients of the EVT term alone (default evt_loss) on every parameter of a small model."""
    torch.manual_seed(0)
    model = EverestModel(cfg, N_FEATURES)
    x, valid = torch.randn(64, 10, N_FEATURES), torch.arange(10).expand(64, 10) >= torch.arange(64).unsqueeze(1) % 10
    out = model(x * valid.unsqueeze(-1), valid)
    loss = evt_loss(out.logits, out.gpd, LossConfig().evt_quantile)
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return dict(zip(names, grads, strict=True)), model


def test_evt_term_trains_only_the_evt_head_by_default() -> None:
    grads, _ = _evt_grads(ModelConfig(embed_dim=32, num_heads=2, ff_dim=64, num_blocks=2))
    evt = {n: g for n, g in grads.items() if n.startswith("evt_head.")}
    assert set(evt) == {"evt_head.proj.weight", "evt_head.proj.bias"}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in evt.values())
    # Embedding, positions, blocks, pooling, shared layer and every other head: no gradient at all.
    assert all(g is None or not g.any() for n, g in grads.items() if n not in evt)


def test_evt_term_reaches_the_trunk_only_when_not_detached() -> None:
    grads, _ = _evt_grads(ModelConfig(embed_dim=32, num_heads=2, ff_dim=64, num_blocks=2, evt_detach_trunk=False))
    for name in ("embed.proj.weight", "blocks.0.attn.in_proj_weight", "pool.score.weight", "shared.1.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert grads["logit_head.weight"] is None  # the exceedances themselves stay detached


def test_evt_weight_does_not_change_forecast_path_gradients_by_default() -> None:
    torch.manual_seed(0)
    model = EverestModel(ModelConfig(embed_dim=32, num_heads=2, ff_dim=64, num_blocks=2, dropout=0.0), N_FEATURES)
    x, y = torch.randn(48, 10, N_FEATURES), (torch.arange(48) % 3 == 0).float()
    base = LossConfig().weights_at(60)
    grads = []
    for evt_weight in (0.0, base.evt):
        phase = base.model_copy(update={"start_epoch": 0, "evt": evt_weight})
        total, _ = EverestLoss(LossConfig(schedule=(phase,)))(model(x), y, 0)
        model.zero_grad()
        total.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if not n.startswith("evt_head.")})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=0, msg=name)


def test_default_evt_term_is_bounded_below_by_the_sigma_floor() -> None:
    cfg = ModelConfig()
    head = EVTHead(cfg)
    head.proj = nn.Identity()  # raw pre-activations straight in
    raw = torch.cat([torch.randn(4096, 2) * 20, torch.tensor([[-1e4, -1e4], [1e4, -1e4], [-1e4, 1e4]])])
    gpd = head(raw)
    e = torch.cat([torch.rand(2048) * 1e-3, torch.rand(2051) * 50])  # tiny and large exceedances
    nll = gpd_nll(e, gpd.xi, gpd.sigma)
    assert torch.isfinite(nll).all() and (nll >= math.log(cfg.evt_sigma_floor) - 1e-6).all()
    logits = torch.randn(4099) * 5
    assert evt_loss(logits, gpd, 0.9).item() >= math.log(cfg.evt_sigma_floor)


def test_reference_evt_head_can_sink_below_the_default_floor() -> None:
    """Why the default bounds: with xi down to -2 the per-sample NLL reaches about -13.8."""
    xi, sigma = torch.tensor([-1.999]), torch.tensor([1e-3])
    e = -sigma / xi  # the support's endpoint, where the density is unbounded for xi < -1
    assert gpd_nll(e, xi, sigma).item() < -13.0 < math.log(ModelConfig().evt_sigma_floor)


# --- precursor -----------------------------------------------------------------------------------------


def test_precursor_loss_is_bce() -> None:
    logits, y = torch.randn(20), (torch.rand(20) > 0.5).float()
    torch.testing.assert_close(precursor_loss(logits, y), F.binary_cross_entropy_with_logits(logits, y))


# --- schedule and the combined loss --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("epoch", "weights"),
    [
        (0, (0.9, 0.1, 0.0, 0.05)),
        (19, (0.9, 0.1, 0.0, 0.05)),
        (20, (0.8, 0.1, 0.1, 0.05)),
        (39, (0.8, 0.1, 0.1, 0.05)),
        (40, (0.7, 0.1, 0.2, 0.05)),
        (119, (0.7, 0.1, 0.2, 0.05)),
    ],
)
def test_schedule_weights(epoch: int, weights: tuple[float, ...]) -> None:
    phase = LossConfig().weights_at(epoch)
    assert (phase.focal, phase.evidential, phase.evt, phase.precursor) == weights

    out, y = _random_output(40), (torch.rand(40) > 0.7).float()
    total, terms = EverestLoss(LossConfig())(out, y, epoch)
    expected = sum(w * terms[k] for w, k in zip(weights, ("focal", "evidential", "evt", "precursor"), strict=True))
    torch.testing.assert_close(total, expected)


@pytest.mark.parametrize(("epoch", "gamma"), [(0, 0.0), (25, 1.4015), (50, 2.803), (100, 2.803)])
def test_gamma_warmup(epoch: int, gamma: float) -> None:
    assert LossConfig().gamma_at(epoch) == pytest.approx(gamma)
    out, y = _random_output(30), (torch.rand(30) > 0.5).float()
    _, terms = EverestLoss(LossConfig())(out, y, epoch)
    torch.testing.assert_close(terms["focal"], focal_loss(out.logits, y, gamma))


def test_terms_are_detached_tensors_under_fixed_keys() -> None:
    torch.manual_seed(0)
    model = EverestModel(ModelConfig(), N_FEATURES)
    total, terms = EverestLoss(LossConfig())(model(torch.randn(16, 10, N_FEATURES)), torch.ones(16), 40)
    assert set(terms) == {"focal", "evidential", "evt", "precursor"}
    assert all(isinstance(t, torch.Tensor) and not t.requires_grad and t.dtype == torch.float32 for t in terms.values())
    assert total.requires_grad and total.dtype == torch.float32


def test_absent_heads_have_no_terms() -> None:
    cfg = ModelConfig(use_evidential=False, use_evt=False, use_precursor=False)
    out = EverestModel(cfg, N_FEATURES)(torch.randn(8, 10, N_FEATURES))
    total, terms = EverestLoss(LossConfig())(out, torch.zeros(8), 60)
    assert set(terms) == {"focal"}
    torch.testing.assert_close(total, 0.7 * terms["focal"])


def test_label_shape_must_match_logits() -> None:
    out = _random_output(8)
    with pytest.raises(ValueError, match=r"y must have the logits' shape \(8,\), got \(8, 1\)"):
        EverestLoss(LossConfig())(out, torch.zeros(8, 1), 0)


# --- finiteness ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_terms_finite_for_extreme_head_outputs(dtype: torch.dtype) -> None:
    cfg = ModelConfig()
    evidential, evt = EvidentialHead(cfg), EVTHead(cfg)
    evidential.proj, evt.proj = nn.Identity(), nn.Identity()  # feed raw pre-activations straight in
    signs = torch.tensor([[float(b) for b in f"{i:07b}"] for i in range(2**7)]) * 2 - 1  # every sign pattern
    raw = (1e4 * signs).to(dtype).requires_grad_()  # (128, 7): 4 NIG, 2 GPD, 1 logit
    y = (torch.arange(128) % 3 == 0).float()
    logits = raw[:, 6]
    out = EverestOutput(logits=logits, nig=evidential(raw[:, :4]), gpd=evt(raw[:, 4:6]), precursor=-logits)
    for epoch in (0, 20, 60):
        total, terms = EverestLoss(LossConfig())(out, y, epoch)
        assert torch.isfinite(total) and all(torch.isfinite(t) for t in terms.values())
        (grad,) = torch.autograd.grad(total, raw, retain_graph=True)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("value", [1e4, -1e4, 0.0])
def test_constant_extreme_logits_are_finite(value: float) -> None:
    out = _random_output(16)
    out = out._replace(logits=torch.full((16,), value, requires_grad=True))
    total, terms = EverestLoss(LossConfig())(out, (torch.arange(16) % 2).float(), 80)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(out.logits.grad).all()
    assert terms["evt"].item() == 0.0  # all logits tie at the quantile: nothing exceeds


# --- overfitting sanity check --------------------------------------------------------------------------


def test_tiny_model_overfits_64_samples() -> None:
    torch.manual_seed(0)
    model = EverestModel(ModelConfig(embed_dim=32, num_heads=2, ff_dim=64, num_blocks=2, dropout=0.0), N_FEATURES)
    x = torch.randn(64, 10, N_FEATURES)
    y = (x[:, -1, 0] + x[:, 0, 1] > 0).float()
    criterion = EverestLoss(LossConfig())
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for epoch in [0] * 30 + [60] * 10:  # the warm-up phase, then every term switched on
        total, terms = criterion(model(x), y, epoch)
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        history.append((epoch, total.item(), terms["focal"].item()))
    warmup = [h for h in history if h[0] == 0]
    assert warmup[-1][1] < 0.3 * warmup[0][1] and warmup[-1][2] < 0.3 * warmup[0][2]
    assert history[-1][2] < 0.3 * history[0][2]  # the EVT term (weight 0.2) does not undo the classifier
    with torch.no_grad():
        assert ((model(x).logits > 0).float() == y).float().mean() > 0.9


# --- independent oracles (scipy) -----------------------------------------------------------------------
# The evidential term's NLL is that of the Normal-Inverse-Gamma prior's marginal predictive, a Student-t with
# df = 2 alpha, loc = mu, scale = sqrt(beta (1 + v) / (v alpha)); the EVT term's is the generalised Pareto with
# scipy's shape c = xi (xi > 0 heavy tail, xi < 0 bounded support e < -sigma / xi) and scale sigma.
# ``nig_nll`` and ``evt_loss`` compute in float32 by design (their ``.float()`` casts), so they are compared at
# float32-exact inputs with |got - scipy| <= 1e-5 (1 + |scipy|): the NLL is a sum of terms up to ~50 that
# cancel, and the measured error was at most 2.5e-6 (1 + |scipy|), ~4 float32 ulps of the terms' sum.
# ``gpd_nll`` keeps its inputs' dtype and is compared in float64 to 1e-10 relative.

F32_TOL = 1e-5


def _nig_grid() -> np.ndarray:
    """(5, 288) float32-exact (y, mu, v, alpha, beta): labels 0/1, means inside and outside [0, 1], evidence
    from 0.01 to 20, alpha from just above 1 to 12, beta from 0.02 to 2.5."""
    grid = itertools.product([0.0, 1.0], [-0.4, 0.2, 0.9, 1.6], [0.01, 0.5, 3.0, 20.0], [1.05, 1.5, 4.0, 12.0],
                             [0.02, 0.3, 2.5])
    return np.array(list(grid), dtype=np.float32).T.astype(np.float64)


def _student_t_nll(y, mu, v, alpha, beta) -> np.ndarray:
    return -stats.t.logpdf(y, df=2.0 * alpha, loc=mu, scale=np.sqrt(beta * (1.0 + v) / (v * alpha)))


def test_nig_nll_is_the_student_t_marginal_nll_of_scipy() -> None:
    cols = _nig_grid()
    want = _student_t_nll(*cols)
    got = nig_nll(*(torch.from_numpy(c) for c in cols)).double().numpy()
    np.testing.assert_allclose(got, want, rtol=F32_TOL, atol=F32_TOL)


def test_evidential_loss_is_the_mean_scipy_nll_plus_the_regulariser() -> None:
    y, mu, v, alpha, beta = cols = _nig_grid()
    for lam in (0.0, 0.01, 0.5):
        want = np.mean(_student_t_nll(*cols) + lam * np.abs(y - mu) * (2.0 * v + alpha))
        nig = NIG(*(torch.from_numpy(c) for c in (mu, v, alpha, beta)))
        got = evidential_loss(nig, torch.from_numpy(y), lam).item()
        assert got == pytest.approx(want, rel=F32_TOL, abs=F32_TOL), lam


def _gpd_points(xi: float, sigma: float) -> np.ndarray:
    """Exceedances from 0 to 3 sigma, kept strictly inside the support when xi < 0."""
    e = np.array([0.0, 0.01, 0.2, 1.0, 3.0]) * sigma
    return e[e < -0.99 * sigma / xi] if xi < 0 else e


def _gpd(e: np.ndarray, xi: float, sigma: float) -> np.ndarray:
    n = len(e)
    return gpd_nll(torch.from_numpy(e), torch.full((n,), xi, dtype=torch.float64),
                   torch.full((n,), sigma, dtype=torch.float64)).numpy()


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.7])
@pytest.mark.parametrize("xi", [0.5, 0.2, 0.01, 1e-3, 1.01 * XI_ZERO, -1.01 * XI_ZERO, -0.1, -0.3, -0.49])
def test_gpd_nll_is_the_genpareto_nll_of_scipy(xi: float, sigma: float) -> None:
    e = _gpd_points(xi, sigma)
    assert e[-1] > 0.1 * sigma  # some points beyond the first
    np.testing.assert_allclose(_gpd(e, xi, sigma), -stats.genpareto.logpdf(e, c=xi, scale=sigma),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.7])
@pytest.mark.parametrize("xi", [0.0, 1e-6, -1e-6, 5e-5, -5e-5, 0.9 * XI_ZERO, -0.9 * XI_ZERO])
def test_gpd_nll_near_zero_xi_is_the_exponential_limit_within_its_error_bound(xi: float, sigma: float) -> None:
    """Below XI_ZERO the density is scipy's exponential (genpareto at c = 0) exactly; it differs from the GPD at the
    true xi by xi (t - t^2 / 2) + O(xi^2), t = e / sigma (the expansion of (1 + 1/xi) log(1 + xi t) - t)."""
    e = _gpd_points(xi, sigma)
    got = _gpd(e, xi, sigma)
    np.testing.assert_allclose(got, -stats.genpareto.logpdf(e, c=0.0, scale=sigma), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got, -stats.expon.logpdf(e, scale=sigma), rtol=1e-12, atol=1e-12)
    t = e / sigma
    bound = abs(xi) * np.abs(t - t**2 / 2) * 1.01 + 10 * xi**2 * (1 + t**3) + 1e-12
    assert np.all(np.abs(got + stats.genpareto.logpdf(e, c=xi, scale=sigma)) <= bound)


@pytest.mark.parametrize(("n", "quantile", "at_a_sample"), [(41, 0.9, True), (40, 0.87, False), (64, 0.5, False)])
def test_evt_loss_is_the_mean_genpareto_nll_over_the_quantile_threshold(n: int, quantile: float,
                                                                         at_a_sample: bool) -> None:
    """End to end: u = the batch quantile of the logits (linear interpolation, numpy's default), exceedances
    e = z - u of the logits strictly above u, mean of scipy's genpareto NLL with each sample's (xi, sigma)."""
    rng = np.random.default_rng(n)
    z = rng.permutation(np.linspace(-3.0, 3.0, n)).astype(np.float32)  # distinct logits, shuffled
    xi = rng.uniform(-0.3, 0.5, n).astype(np.float32)
    sigma = rng.uniform(1.0, 2.0, n).astype(np.float32)  # exceedances (<= 3) inside the support (sigma/|xi| > 3.3)
    z64, xi64, sigma64 = (a.astype(np.float64) for a in (z, xi, sigma))
    u = np.quantile(z64, quantile)
    assert (u in z64) == at_a_sample  # at a sample the threshold itself is no exceedance (strict >)
    above = z64 > u
    assert above.sum() == (n - 1 - math.floor(quantile * (n - 1)))
    want = np.mean(-stats.genpareto.logpdf(z64[above] - u, c=xi64[above], scale=sigma64[above]))
    assert np.isfinite(want)
    got = evt_loss(torch.from_numpy(z), GPD(torch.from_numpy(xi), torch.from_numpy(sigma)), quantile).item()
    assert got == pytest.approx(want, rel=F32_TOL, abs=F32_TOL)
