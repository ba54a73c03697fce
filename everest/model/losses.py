r"""EVEREST loss terms and their scheduled sum; every term is computed in float32 and finite for all inputs.

The evidential and EVT terms are negative log-likelihoods of *densities*, so they (and the total) can be
negative; only the focal and precursor terms are bounded below by 0. See "evt" below for the bounds.

Terms (``y`` is the 0/1 flare label, ``z`` the forecast logit, ``p = sigmoid(z)``):

* **focal** (Lin et al. 2017, no class weight): ``[y (1-p)^g + (1-y) p^g] * BCE(z, y)``, mean over the
  batch. ``p^g`` and ``(1-p)^g`` are ``exp(g * logsigmoid(+-z))`` and BCE uses logsigmoid, so logits of
  +-1e4 stay finite; at ``g = 0`` the term is plain BCE.
* **evidential** (deep evidential regression, Amini et al. 2020): the negative log-likelihood of the
  label under the Normal-Inverse-Gamma prior's Student-t marginal, plus the evidence regulariser,
  mean over the batch::

      Omega = 2 beta (1 + v)
      NLL   = 0.5 log(pi / v) - alpha log(Omega) + (alpha + 0.5) log((y - mu)^2 v + Omega)
              + lgamma(alpha) - lgamma(alpha + 0.5)
      term  = NLL + lambda |y - mu| (2 v + alpha),   lambda = LossConfig.evidential_regulariser

  The 0/1 label is treated as a real-valued target, so ``mu`` is a regression of the label and
  :func:`nig_uncertainty` gives per-prediction aleatoric ``beta / (alpha - 1)`` and epistemic
  ``beta / (v (alpha - 1))`` variance. ``v`` and ``beta`` (softplus outputs, which reach 0 in float32)
  are clamped to at least ``EPS`` so the logarithms stay finite.
* **evt** (peaks over threshold): ``u`` = the batch's ``evt_quantile`` quantile of the logits (detached);
  for each sample with ``z > u`` the exceedance ``e = z - u`` is scored by the generalised-Pareto NLL
  with that sample's ``(xi, sigma)``::

      NLL = log sigma + (1 + 1/xi) log(1 + xi e / sigma)        (xi != 0)
      NLL = log sigma + e / sigma                               (|xi| < XI_ZERO: exponential limit)

  averaged over the exceeding samples. The exceedances are detached by default: a density rewards
  concentration, so with gradients into the logits the term shrinks the spread of the top logits (a tiny
  model trained from scratch at the epoch-40+ weights drove every logit to one value and raised the
  focal loss 30-fold). Detached, it is a likelihood for the EVT head's parameters given the current logits,
  as a fitted tail model should be; ``evt_loss(..., grad_to_logits=True)`` keeps the literal reference form.
  The EVT head itself reads the shared representation detached (``ModelConfig.evt_detach_trunk``, the
  default), so by default this term trains the EVT head only and has no gradient on any parameter of the
  forecast path: the tail fit describes the forecast's logits and cannot reshape them. (With gradients
  into the trunk, minimising the tail NLL reshaped the forecast representation: benchmarks/evt_phase.py.)

  The NLL is a negative log-*density*, so it is negative wherever the fitted density exceeds 1 (small
  ``sigma``): a negative EVT term, and a total loss that drops when the term switches on, are normal and
  say nothing about the forecast (read the ``focal`` term and the validation metrics for that). Its
  lower bound is set by the EVT head's range (``ModelConfig.evt_xi_range``, ``evt_sigma_floor``): for
  ``xi >= -1`` the density is largest at ``e = 0``, so every per-sample NLL is at least
  ``log sigma >= log(evt_sigma_floor)``; the default head (xi in (-0.5, 0.5), where the GPD likelihood
  is regular, and sigma > 0.05) keeps it above ``log 0.05 ~ -3.0``, and the weighted term (weight at
  most 0.2) above -0.6.
  Outside the support (``xi < 0`` and ``e > -sigma / xi``) the true NLL is infinite; we clamp
  ``1 + xi e / sigma`` to at least ``EPS`` so the term stays finite. For ``xi < -1`` (the reference head,
  ``evt_xi_range=(-2, 1)``, ``evt_sigma_floor=1e-3``) the GPD density is unbounded at its endpoint, so
  each per-sample fit can sink towards the floor ``log(1e-3) + 0.5 log(EPS)`` ~ -13.8 (reached on
  synthetic data within 7 epochs of the switch): the term is finite but not a proper likelihood there.
  With no exceedance (e.g. all logits equal) the term is an exact 0 that is still
  connected to the graph. It always runs in float32 with autocast disabled, and nothing is caught: the
  first implementation swallowed an fp16 exception here and its EVT head never trained.
* **precursor**: BCE of the precursor logit on the same label. The data hold no separate precursor
  label, so this head is an auxiliary multi-task regulariser trained on the flare target, not a
  precursor detector.

:class:`EverestLoss` weights the terms with ``LossConfig.weights_at(epoch)`` and the focal gamma
``LossConfig.gamma_at(epoch)``.

Shapes: every term reduces over the last dimension only, so ``(B,)`` inputs give one value and the
``(K, B)`` inputs of a group of K experiments (:mod:`everest.training.group`) give one value per member. An optional
``weight`` of the same shape (1 for a sample, 0 for a padding row of a member's shorter batch) makes each
mean, and the EVT quantile, cover the weighted rows only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from everest.config import LossConfig
from everest.model.network import GPD, NIG, EverestOutput

EPS = 1e-6  # floor for NIG v, beta, alpha - 1 and for the GPD support term 1 + xi e / sigma
XI_ZERO = 1e-4  # below this |xi| the GPD NLL uses its exponential limit (the 1/xi form loses precision)
LOSS_KEYS: tuple[str, ...] = ("focal", "evidential", "evt", "precursor")


def batch_mean(values: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean over the last dimension; with ``weight`` (0/1 per row), over the weighted rows (0 when none)."""
    if weight is None:
        return values.mean(dim=-1)
    return (values * weight).sum(dim=-1) / weight.sum(dim=-1).clamp_min(1)


def batch_quantile(values: Tensor, q: float, weight: Tensor | None = None) -> Tensor:
    """``torch.quantile(values, q, dim=-1, keepdim=True)`` (linear interpolation), over the weighted rows only
    when ``weight`` is given; a row without weight gives +inf, above every value."""
    if weight is None:
        return torch.quantile(values, q, dim=-1, keepdim=True)
    ordered = torch.where(weight > 0, values, torch.full_like(values, math.inf)).sort(dim=-1).values
    count = weight.sum(dim=-1, keepdim=True).to(values.dtype)
    rank = q * (count - 1).clamp_min(0)
    below = rank.long()
    above = rank.ceil().long()
    return torch.lerp(ordered.gather(-1, below), ordered.gather(-1, above), rank - below)


def focal_loss(logits: Tensor, y: Tensor, gamma: float, weight: Tensor | None = None) -> Tensor:
    """Mean binary focal loss from logits (stable for any logit); plain BCE at ``gamma = 0``."""
    logits, y = logits.float(), y.float()
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    bce = -(y * log_p + (1.0 - y) * log_not_p)
    modulator = y * torch.exp(gamma * log_not_p) + (1.0 - y) * torch.exp(gamma * log_p)
    return batch_mean(modulator * bce, weight)


def nig_nll(y: Tensor, mu: Tensor, v: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """Per-sample Normal-Inverse-Gamma (Student-t marginal) negative log-likelihood of ``y``."""
    y, mu, alpha = y.float(), mu.float(), alpha.float()
    v, beta = v.float().clamp_min(EPS), beta.float().clamp_min(EPS)
    omega = 2.0 * beta * (1.0 + v)
    return (
        0.5 * torch.log(math.pi / v)
        - alpha * torch.log(omega)
        + (alpha + 0.5) * torch.log((y - mu) ** 2 * v + omega)
        + torch.lgamma(alpha)
        - torch.lgamma(alpha + 0.5)
    )


def evidential_loss(nig: NIG, y: Tensor, regulariser: float, weight: Tensor | None = None) -> Tensor:
    """Mean NIG NLL plus ``regulariser * |y - mu| (2 v + alpha)``, which removes evidence from errors."""
    y = y.float()
    error = (y - nig.mu.float()).abs()
    evidence = 2.0 * nig.v.float() + nig.alpha.float()
    return batch_mean(nig_nll(y, *nig) + regulariser * error * evidence, weight)


def nig_uncertainty(mu: Tensor, v: Tensor, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Per-prediction (aleatoric ``beta/(alpha-1)``, epistemic ``beta/(v(alpha-1))``) variances of a NIG."""
    denom = (alpha.float() - 1.0).clamp_min(EPS)  # the head gives alpha > 1; the guard covers float32 rounding
    aleatoric = beta.float() / denom
    return aleatoric, aleatoric / v.float().clamp_min(EPS)


def gpd_nll(exceedance: Tensor, xi: Tensor, sigma: Tensor) -> Tensor:
    """Per-element generalised-Pareto NLL of non-negative exceedances (exponential limit near xi = 0)."""
    near_zero = xi.abs() < XI_ZERO
    safe_xi = torch.where(near_zero, torch.full_like(xi, XI_ZERO), xi)  # keeps 1/xi and its gradient finite
    log_support = torch.log1p((safe_xi * exceedance / sigma).clamp_min(EPS - 1.0))  # log(max(1 + xi e/s, EPS))
    tail = torch.where(near_zero, exceedance / sigma, (1.0 + 1.0 / safe_xi) * log_support)
    return torch.log(sigma) + tail


def evt_loss(logits: Tensor, gpd: GPD, quantile: float, grad_to_logits: bool = False,
             weight: Tensor | None = None) -> Tensor:
    """Mean GPD NLL of the logits' exceedances over their batch ``quantile``; float32, 0 with no exceedance.

    By default the exceedances are detached, so the term fits the tail model (the EVT head; the trunk too
    only if the model was built with ``evt_detach_trunk=False``) to the current logits;
    ``grad_to_logits=True`` also lets it move the logits, which collapses them. The value is a negative
    log-density: it can be negative, and is at least ``log(evt_sigma_floor)`` when xi >= -1.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits, xi, sigma = logits.float(), gpd.xi.float(), gpd.sigma.float()
        if not grad_to_logits:
            logits = logits.detach()
        threshold = batch_quantile(logits.detach(), quantile, weight)
        exceeds = logits > threshold
        if weight is not None:
            exceeds = exceeds & (weight > 0)
        # Masking instead of boolean indexing keeps shapes static: no host sync and no empty-tensor case.
        exceedance = torch.where(exceeds, logits - threshold, torch.zeros_like(logits))
        nll = torch.where(exceeds, gpd_nll(exceedance, xi, sigma), torch.zeros_like(logits))
        return nll.sum(dim=-1) / exceeds.sum(dim=-1).clamp_min(1)


def precursor_loss(logits: Tensor, y: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean BCE of the auxiliary precursor logit on the flare label (there is no separate precursor label)."""
    return batch_mean(F.binary_cross_entropy_with_logits(logits.float(), y.float(), reduction="none"), weight)


class EverestLoss:
    """The scheduled EVEREST objective: weighted focal, evidential, EVT and precursor terms."""

    def __init__(self, cfg: LossConfig) -> None:
        self.cfg = cfg

    def __call__(self, out: EverestOutput, y: Tensor, epoch: int,
                 weight: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss for ``epoch`` and the detached unweighted terms; terms of absent heads are left out.

        ``(B,)`` logits give scalars; ``(K, B)`` logits of a group give ``(K,)`` values, one per member.
        """
        if y.shape != out.logits.shape:
            raise ValueError(f"y must have the logits' shape {tuple(out.logits.shape)}, got {tuple(y.shape)}")
        if weight is not None and weight.shape != y.shape:
            raise ValueError(f"weight must have the labels' shape {tuple(y.shape)}, got {tuple(weight.shape)}")
        weights = self.cfg.weights_at(epoch)
        terms = {"focal": focal_loss(out.logits, y, self.cfg.gamma_at(epoch), weight)}
        if out.nig is not None:
            terms["evidential"] = evidential_loss(out.nig, y, self.cfg.evidential_regulariser, weight)
        if out.gpd is not None:
            terms["evt"] = evt_loss(out.logits, out.gpd, self.cfg.evt_quantile, weight=weight)
        if out.precursor is not None:
            terms["precursor"] = precursor_loss(out.precursor, y, weight)
        total = sum((getattr(weights, name) * term for name, term in terms.items()),
                    torch.zeros(y.shape[:-1], device=y.device))
        return total, {name: term.detach() for name, term in terms.items()}
