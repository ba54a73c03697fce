"""The EVEREST network: a small post-norm transformer over SHARP time series with four output heads.

Layout (that of the published EVEREST implementation): embedding -> scaled sinusoidal positions ->
``num_blocks`` transformer blocks -> attention-bottleneck (or mean) pooling -> shared head -> heads.
The ``logits`` head is the forecast; the evidential (Normal-Inverse-Gamma), EVT (generalised Pareto)
and precursor heads feed auxiliary loss terms (:mod:`everest.model.losses`) and can each be switched off for
ablations. With the default :class:`~everest.config.ModelConfig` and 9 features the model has 814,090
parameters.

Padding: windows are front-padded with zero steps and ``forward(x, valid)`` takes the (B, T) bool mask of
real steps. With ``ModelConfig.padding_mask`` (default) padding steps are no keys of any self-attention
and get no weight in pooling, so every output depends on the real steps only; padding *queries* still
produce (finite) hidden states, which pooling then ignores. Without ``valid`` (or with the flag off) the
model treats every step as data, exactly as before the mask existed.

EVT head: it reads the pooled representation ``z`` detached by default (``ModelConfig.evt_detach_trunk``),
so its tail likelihood trains the head alone and cannot change the forecast logits; the range of the
shape xi and the floor of the scale sigma come from the config (the published implementation: (-2, 1) and 1e-3).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from everest.config import ModelConfig

POSITIONAL_BASE = 10_000.0  # wavelength base of the sinusoidal table (Vaswani et al. 2017)


class NIG(NamedTuple):
    """Normal-Inverse-Gamma parameters, each (B,): mean mu, evidence v > 0, shape alpha > 1, scale beta > 0."""

    mu: Tensor
    v: Tensor
    alpha: Tensor
    beta: Tensor


class GPD(NamedTuple):
    """Generalised-Pareto parameters, each (B,): shape xi in ``evt_xi_range``, scale sigma > ``evt_sigma_floor``."""

    xi: Tensor
    sigma: Tensor


class EverestOutput(NamedTuple):
    """Everything the model predicts; heads switched off in the config are None."""

    logits: Tensor  # (B,) flare logit; sigmoid gives the forecast probability
    nig: NIG | None
    gpd: GPD | None
    precursor: Tensor | None  # (B,) auxiliary logit


class Embedding(nn.Module):
    """Project each time step's features to the model width, normalise, drop out."""

    def __init__(self, cfg: ModelConfig, n_features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n_features, cfg.embed_dim)
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.norm(self.proj(x)))  # (B, T, F) -> (B, T, D)


class ScaledPositionalEncoding(nn.Module):
    """Fixed sinusoidal positions times one learnable scalar, so training can tune their weight."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        pos = torch.arange(cfg.seq_len, dtype=torch.float32).unsqueeze(1)  # (T, 1)
        freq = torch.exp(
            torch.arange(0, cfg.embed_dim, 2, dtype=torch.float32) * (-math.log(POSITIONAL_BASE) / cfg.embed_dim)
        )  # (ceil(D/2),)
        table = torch.zeros(cfg.seq_len, cfg.embed_dim)  # (T, D)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq[: cfg.embed_dim // 2])  # odd D has one cosine fewer
        # Not persistent: the table is a pure function of the config, so checkpoints hold only weights.
        self.register_buffer("table", table, persistent=False)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, h: Tensor) -> Tensor:
        return h + self.scale * self.table[: h.shape[1]]  # (B, T, D) + (T, D) -> (B, T, D)


class Block(nn.Module):
    """Post-norm transformer block: self-attention, add & norm, feed-forward, add & norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(cfg.embed_dim, cfg.num_heads, dropout=cfg.dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(cfg.embed_dim)
        # Grouped training (everest.model.batched.layout_of) applies this Sequential's layers in this order too,
        # so an edit here reaches both engines, and a layer it cannot batch is refused when a group is built.
        self.ff = nn.Sequential(
            nn.Linear(cfg.embed_dim, cfg.ff_dim),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.ff_dim, cfg.embed_dim),
        )
        self.norm2 = nn.LayerNorm(cfg.embed_dim)

    def forward(self, h: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``key_padding_mask`` (B, T) bool, True at steps no query may attend to (None: all are keys)."""
        attended, _ = self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)  # (B, T, D)
        h = self.norm1(h + attended)
        return self.norm2(h + self.ff(h))  # (B, T, D)


class AttentionPool(nn.Module):
    """Attention bottleneck: one learned score per time step, softmax over steps, weighted sum."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.score = nn.Linear(cfg.embed_dim, 1)

    def forward(self, h: Tensor, pad: Tensor | None = None) -> Tensor:
        """``pad`` (B, T) bool, True at steps to leave out (each row keeps at least one step)."""
        return attention_pool(h, self.score(h).squeeze(-1), pad)  # scores (B, T, 1) -> (B, T)


class MeanPool(nn.Module):
    """Ablation of :class:`AttentionPool`: the plain mean over time steps."""

    def forward(self, h: Tensor, pad: Tensor | None = None) -> Tensor:
        """``pad`` (B, T) bool, True at steps to leave out (each row keeps at least one step)."""
        return mean_pool(h, pad)


def attention_pool(h: Tensor, scores: Tensor, pad: Tensor | None) -> Tensor:
    """Softmax of ``scores`` (..., T) over steps, padding excluded, weighting ``h`` (..., T, D) -> (..., D)."""
    if pad is not None:
        scores = scores.masked_fill(pad, float("-inf"))  # exact 0 weight; -inf exists in every float dtype
    weights = torch.softmax(scores, dim=-1)  # (..., T)
    return torch.einsum("...t,...td->...d", weights, h)


def mean_pool(h: Tensor, pad: Tensor | None) -> Tensor:
    """Mean of ``h`` (..., T, D) over the real steps (``pad`` True at padding) -> (..., D)."""
    if pad is None:
        return h.mean(dim=-2)
    keep = ~pad  # (..., T)
    total = torch.where(keep.unsqueeze(-1), h, torch.zeros((), dtype=h.dtype, device=h.device)).sum(dim=-2)
    return total / keep.sum(dim=-1, keepdim=True).to(total.dtype)


class EvidentialHead(nn.Module):
    """Normal-Inverse-Gamma head: softplus keeps v, beta > 0 and alpha > 1."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.embed_dim, len(NIG._fields))

    def forward(self, z: Tensor) -> NIG:
        return self.parameters_of(self.proj(z))

    @staticmethod
    def parameters_of(raw: Tensor) -> NIG:
        """The NIG from the projection's raw (..., 4) output."""
        mu, v, alpha, beta = raw.unbind(dim=-1)  # (..., 4) -> 4 x (...)
        return NIG(mu, F.softplus(v), 1.0 + F.softplus(alpha), F.softplus(beta))


class EVTHead(nn.Module):
    """Generalised-Pareto head for the tail of the logits: xi in ``cfg.evt_xi_range``, sigma > ``cfg.evt_sigma_floor``.

    ``xi = half * tanh(.) + mid`` with the range's half-width and midpoint (the reference range (-2, 1)
    gives its ``1.5 tanh(.) - 0.5``); ``sigma = softplus(.) + floor``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.embed_dim, len(GPD._fields))
        lo, hi = cfg.evt_xi_range
        self.xi_half, self.xi_mid = (hi - lo) / 2.0, (hi + lo) / 2.0
        self.sigma_floor = cfg.evt_sigma_floor

    def forward(self, z: Tensor) -> GPD:
        return self.parameters_of(self.proj(z))

    def parameters_of(self, raw: Tensor) -> GPD:
        """The GPD from the projection's raw (..., 2) output."""
        xi, sigma = raw.unbind(dim=-1)  # (..., 2) -> 2 x (...)
        return GPD(self.xi_half * torch.tanh(xi) + self.xi_mid, F.softplus(sigma) + self.sigma_floor)


class EverestModel(nn.Module):
    """EVEREST transformer: (B, T, F) SHARP sequences -> :class:`EverestOutput`."""

    def __init__(self, cfg: ModelConfig, n_features: int) -> None:
        super().__init__()
        if n_features < 1:
            raise ValueError(f"n_features must be a positive integer, got {n_features!r}")
        self.cfg = cfg
        self.n_features = n_features
        self.embed = Embedding(cfg, n_features)
        self.pos = ScaledPositionalEncoding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.pool = AttentionPool(cfg) if cfg.use_attention_bottleneck else MeanPool()
        self.shared = nn.Sequential(  # read layer by layer by grouped training too, as Block.ff
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.embed_dim, cfg.embed_dim),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
        )
        self.logit_head = nn.Linear(cfg.embed_dim, 1)
        self.evidential_head = EvidentialHead(cfg) if cfg.use_evidential else None
        self.evt_head = EVTHead(cfg) if cfg.use_evt else None
        self.precursor_head = nn.Linear(cfg.embed_dim, 1) if cfg.use_precursor else None

    def forward(self, x: Tensor, valid: Tensor | None = None) -> EverestOutput:
        """Outputs for windows ``x`` (B, T, F); ``valid`` (B, T) bool marks real steps (True) vs padding.

        ``valid`` is used when ``cfg.padding_mask`` is on (see the module docstring); None treats every
        step as real. A window without any real step (data.py never builds one) is treated as unmasked,
        so it cannot turn into NaN.
        """
        if x.dim() != 3 or x.shape[2] != self.n_features or x.shape[1] > self.cfg.seq_len:
            raise ValueError(
                f"x must have shape (batch, steps <= {self.cfg.seq_len}, {self.n_features}), got {tuple(x.shape)}"
            )
        pad = self._padding(x, valid)  # (B, T) True at padding, or None
        h = self.pos(self.embed(x))  # (B, T, D)
        for block in self.blocks:
            h = block(h, pad)  # (B, T, D)
        z = self.shared(self.pool(h, pad))  # (B, D)
        return EverestOutput(
            logits=self.logit_head(z).squeeze(-1),  # (B, 1) -> (B,)
            nig=self.evidential_head(z) if self.evidential_head is not None else None,
            gpd=self._evt(z),
            precursor=self.precursor_head(z).squeeze(-1) if self.precursor_head is not None else None,  # (B,)
        )

    def _padding(self, x: Tensor, valid: Tensor | None) -> Tensor | None:
        """The key-padding mask (True = padding) from ``valid``, or None when unmasked. No host sync."""
        if valid is None:
            return None
        check_valid(x, valid)
        if not self.cfg.padding_mask:
            return None
        return ~valid & valid.any(dim=-1, keepdim=True)  # a window with no real step stays unmasked

    def _evt(self, z: Tensor) -> GPD | None:
        if self.evt_head is None:
            return None
        return self.evt_head(z.detach() if self.cfg.evt_detach_trunk else z)


def check_valid(x: Tensor, valid: Tensor) -> None:
    """Refuse a ``valid`` mask that is not a bool tensor shaped like ``x`` without its feature axis."""
    shape = tuple(x.shape[:-1])
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != shape:
        what = f"{valid.dtype} tensor of shape {tuple(valid.shape)}" if isinstance(valid, Tensor) else repr(
            type(valid).__name__)
        raise ValueError(f"valid must be a torch.bool tensor of shape (batch, steps) = {shape} "
                         f"(True = real step), got {what}")
    if valid.device != x.device:
        raise ValueError(f"valid must be on x's device {x.device}, got {valid.device}")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``), for size checks and reports."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
