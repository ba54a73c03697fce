"""The EVEREST network: a small post-norm transformer over SHARP time series with four output heads.

Layout (reference.md, "Model"): embedding -> scaled sinusoidal positions -> ``num_blocks`` transformer
blocks -> attention-bottleneck (or mean) pooling -> shared head -> heads. The ``logits`` head is the
forecast; the evidential (Normal-Inverse-Gamma), EVT (generalised Pareto) and precursor heads feed
auxiliary loss terms (:mod:`everest.losses`) and can each be switched off for ablations. With the
default :class:`~everest.config.ModelConfig` and 9 features the model has 814,090 parameters.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from everest.config import ModelConfig

POSITIONAL_BASE = 10_000.0  # wavelength base of the sinusoidal table (Vaswani et al. 2017)
XI_SCALE, XI_SHIFT = 1.5, -0.5  # GPD shape xi = 1.5 tanh(.) - 0.5 lies in (-2, 1) (reference)
SIGMA_FLOOR = 1e-3  # GPD scale sigma = softplus(.) + 1e-3 stays away from 0 (reference)


class NIG(NamedTuple):
    """Normal-Inverse-Gamma parameters, each (B,): mean mu, evidence v > 0, shape alpha > 1, scale beta > 0."""

    mu: Tensor
    v: Tensor
    alpha: Tensor
    beta: Tensor


class GPD(NamedTuple):
    """Generalised-Pareto parameters, each (B,): shape xi in (-2, 1), scale sigma > 1e-3."""

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
        self.ff = nn.Sequential(
            nn.Linear(cfg.embed_dim, cfg.ff_dim),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.ff_dim, cfg.embed_dim),
        )
        self.norm2 = nn.LayerNorm(cfg.embed_dim)

    def forward(self, h: Tensor) -> Tensor:
        attended, _ = self.attn(h, h, h, need_weights=False)  # (B, T, D)
        h = self.norm1(h + attended)
        return self.norm2(h + self.ff(h))  # (B, T, D)


class AttentionPool(nn.Module):
    """Attention bottleneck: one learned score per time step, softmax over steps, weighted sum."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.score = nn.Linear(cfg.embed_dim, 1)

    def forward(self, h: Tensor) -> Tensor:
        weights = torch.softmax(self.score(h).squeeze(-1), dim=1)  # (B, T, 1) -> (B, T)
        return torch.einsum("bt,btd->bd", weights, h)  # (B, D)


class MeanPool(nn.Module):
    """Ablation of :class:`AttentionPool`: the plain mean over time steps."""

    def forward(self, h: Tensor) -> Tensor:
        return h.mean(dim=1)  # (B, T, D) -> (B, D)


class EvidentialHead(nn.Module):
    """Normal-Inverse-Gamma head: softplus keeps v, beta > 0 and alpha > 1."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.embed_dim, len(NIG._fields))

    def forward(self, z: Tensor) -> NIG:
        mu, v, alpha, beta = self.proj(z).unbind(dim=-1)  # (B, 4) -> 4 x (B,)
        return NIG(mu, F.softplus(v), 1.0 + F.softplus(alpha), F.softplus(beta))


class EVTHead(nn.Module):
    """Generalised-Pareto head for the tail of the logits: bounded shape, positive scale."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.embed_dim, len(GPD._fields))

    def forward(self, z: Tensor) -> GPD:
        xi, sigma = self.proj(z).unbind(dim=-1)  # (B, 2) -> 2 x (B,)
        return GPD(XI_SCALE * torch.tanh(xi) + XI_SHIFT, F.softplus(sigma) + SIGMA_FLOOR)


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
        self.shared = nn.Sequential(
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.embed_dim, cfg.embed_dim),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
        )
        self.logit_head = nn.Linear(cfg.embed_dim, 1)
        self.evidential_head = EvidentialHead(cfg) if cfg.use_evidential else None
        self.evt_head = EVTHead(cfg) if cfg.use_evt else None
        self.precursor_head = nn.Linear(cfg.embed_dim, 1) if cfg.use_precursor else None

    def forward(self, x: Tensor) -> EverestOutput:
        if x.dim() != 3 or x.shape[2] != self.n_features or x.shape[1] > self.cfg.seq_len:
            raise ValueError(
                f"x must have shape (batch, steps <= {self.cfg.seq_len}, {self.n_features}), got {tuple(x.shape)}"
            )
        h = self.pos(self.embed(x))  # (B, T, D)
        for block in self.blocks:
            h = block(h)  # (B, T, D)
        z = self.shared(self.pool(h))  # (B, D)
        return EverestOutput(
            logits=self.logit_head(z).squeeze(-1),  # (B, 1) -> (B,)
            nig=self.evidential_head(z) if self.evidential_head is not None else None,
            gpd=self.evt_head(z) if self.evt_head is not None else None,
            precursor=self.precursor_head(z).squeeze(-1) if self.precursor_head is not None else None,  # (B,)
        )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``), for size checks and reports."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
