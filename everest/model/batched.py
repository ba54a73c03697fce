"""K EVEREST networks as one: every weight gets a leading member dimension, every layer is a batched matmul.

:class:`GroupedEverest` computes exactly what K :class:`~everest.model.network.EverestModel` instances compute,
member by member, from inputs ``(K, B, T, F)``; its weights are named like theirs (``blocks.0.attn.in_proj_weight``
with shape ``(K, 3D, D)``), so :meth:`GroupedEverest.member_state` is a solo model's state dict and a member
can be evaluated, saved and loaded by everything that handles solo models. Attention folds the members
into the batch (one ``scaled_dot_product_attention`` call for all K).

The tie to the solo network is its structure, read once at construction (:func:`layout_of`): the layers come
from a solo model's attributes (``block.attn``, ``block.ff``, ``model.shared``...), their weight names from
that model's own module names, and the layers of every ``nn.Sequential`` (``block.ff``, ``model.shared``) are
applied in the Sequential's order. Reordering or swapping layers inside a Sequential therefore changes both
engines alike; a layer this module cannot batch, a renamed attribute, or a parameter of the solo model that
the grouped forward would not read is refused when a :class:`GroupedEverest` is built, with the names.
What is written out here, not read, is the order inside the modules with their own ``forward`` (the post-norm
block, the embedding, attention, pooling, the heads): a change there is caught by the member-equals-solo
tests of ``tests/test_group.py``.

Dropout has two sources. With :class:`MemberDraws` (CPU) each member draws its masks from its own
generator in the order and shapes a solo model draws them from the global one, so a member trained in a
group sees the dropout of the same experiment trained alone. Without it (CUDA) the whole group's masks come
from the device generator in fused kernels, which CUDA-graph capture supports; members still differ.

:class:`GroupAdamW` is AdamW with per-member step counts and a per-member ``active`` mask: a member with no
samples in a step, or one that stopped early, is left exactly as it was.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from everest.config import ModelConfig
from everest.model.network import (
    AttentionPool,
    EverestModel,
    EverestOutput,
    MeanPool,
    attention_pool,
    check_valid,
    mean_pool,
)

# Parameter-free element-wise layers: applied to (K, ..., D) as they are to (..., D).
POINTWISE: tuple[type[nn.Module], ...] = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Identity)


@dataclass(frozen=True)
class MemberDraws:
    """Per-member dropout draws: member k draws ``rows[k]`` rows of each mask from ``generators[k]``."""

    generators: Sequence[torch.Generator]
    rows: Sequence[int]

    def mask(self, shape: tuple[int, ...], p: float, like: Tensor) -> Tensor:
        """Scaled keep-masks of ``shape`` = (K, B, ...): member k's first ``rows[k]`` rows drawn, the rest 0."""
        masks = torch.empty(shape, dtype=like.dtype, device=like.device)
        for k, (g, n) in enumerate(zip(self.generators, self.rows, strict=True)):
            # The solo model's dropout: bernoulli(1 - p) over the batch's rows (a contiguous block), then / (1 - p).
            masks[k, :n].bernoulli_(1 - p, generator=g)
            masks[k, n:] = 0
        return masks.div_(1 - p)


# ---------------------------------------------------------------------- the solo network's layout
@dataclass(frozen=True)
class Layer:
    """One layer of the solo network as the grouped forward applies it.

    ``name`` is the layer's module name in the solo model (its weights are ``{name}.weight``/``.bias``);
    ``p`` is a dropout probability, ``eps`` a layer norm's epsilon, ``fn`` a :data:`POINTWISE` module.
    """

    kind: Literal["linear", "norm", "dropout", "pointwise"]
    name: str
    p: float = 0.0
    eps: float = 0.0
    fn: nn.Module | None = None

    def parameters(self) -> list[str]:
        """The solo parameter names this layer reads."""
        return [f"{self.name}.weight", f"{self.name}.bias"] if self.kind in ("linear", "norm") else []


@dataclass(frozen=True)
class BlockLayout:
    """A transformer block: attention ``attn`` (its module name) with ``heads`` heads and attention dropout
    ``attn_dropout``, then ``norm1``, the feed-forward layers ``ff`` in order, ``norm2``."""

    attn: str
    heads: int
    attn_dropout: float
    norm1: Layer
    ff: tuple[Layer, ...]
    norm2: Layer

    def parameters(self) -> list[str]:
        attn = [f"{self.attn}.{w}" for w in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")]
        return attn + [n for layer in (self.norm1, *self.ff, self.norm2) for n in layer.parameters()]


@dataclass(frozen=True)
class Layout:
    """The solo network's layers, in forward order, as :func:`layout_of` reads them from a model.

    ``pool_score`` is None for mean pooling; a head switched off in the config is None.
    """

    embed: tuple[Layer, Layer, Layer]  # projection, norm, dropout: Embedding.forward's order
    pos_scale: str
    blocks: tuple[BlockLayout, ...]
    pool_score: Layer | None
    shared: tuple[Layer, ...]
    logit: Layer
    evidential: Layer | None
    evt: Layer | None
    precursor: Layer | None

    def parameters(self) -> list[str]:
        """Every solo parameter name the grouped forward reads."""
        layers = [*self.embed, self.pool_score, *self.shared, self.logit, self.evidential, self.evt, self.precursor]
        return ([self.pos_scale] + [n for b in self.blocks for n in b.parameters()]
                + [n for layer in layers if layer is not None for n in layer.parameters()])


def layout_of(model: EverestModel) -> Layout:
    """Read ``model``'s layers by attribute and its module names; raise TypeError on a layer with no batched form.

    Why: the grouped forward must follow the solo network; reading the network (instead of spelling its
    ``nn.Sequential`` positions here) makes a reorder inside a Sequential change both engines, and anything
    else surface here rather than as a silently different member.
    """
    names = {module: name for name, module in model.named_modules()}

    def layer(module: nn.Module) -> Layer:
        name = names[module]
        if isinstance(module, nn.Linear):
            return Layer("linear", name)
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
            return Layer("norm", name, eps=module.eps)
        if isinstance(module, nn.Dropout):
            return Layer("dropout", name, p=module.p)
        if isinstance(module, POINTWISE):
            return Layer("pointwise", name, fn=module)
        raise TypeError(f"grouped training has no batched form of {name} ({type(module).__name__}); "
                        f"it batches {', '.join(t.__name__ for t in (nn.Linear, nn.LayerNorm, nn.Dropout, *POINTWISE))}"
                        " (add it to everest/model/batched.py)")

    def block(b: nn.Module) -> BlockLayout:
        attn = b.attn
        if not isinstance(attn, nn.MultiheadAttention) or not attn.batch_first or not attn._qkv_same_embed_dim:
            raise TypeError(f"grouped training batches {names[attn]} only as nn.MultiheadAttention(batch_first=True) "
                            f"with one in-projection, got {attn!r}")
        return BlockLayout(names[attn], attn.num_heads, attn.dropout, layer(b.norm1),
                           tuple(layer(m) for m in b.ff), layer(b.norm2))

    if isinstance(model.pool, AttentionPool):
        pool_score = layer(model.pool.score)
    elif isinstance(model.pool, MeanPool):
        pool_score = None
    else:
        raise TypeError(f"grouped training has no batched form of the pool {type(model.pool).__name__}")
    return Layout(
        embed=(layer(model.embed.proj), layer(model.embed.norm), layer(model.embed.drop)),
        pos_scale=f"{names[model.pos]}.scale",
        blocks=tuple(block(b) for b in model.blocks),
        pool_score=pool_score,
        shared=tuple(layer(m) for m in model.shared),
        logit=layer(model.logit_head),
        evidential=layer(model.evidential_head.proj) if model.evidential_head is not None else None,
        evt=layer(model.evt_head.proj) if model.evt_head is not None else None,
        precursor=layer(model.precursor_head) if model.precursor_head is not None else None,
    )


def check_layout(layout: Layout, model: EverestModel) -> None:
    """Refuse a layout that does not read exactly ``model``'s parameters, naming the missing and extra ones.

    Why: a parameter the grouped forward never reads (a new layer outside the Sequentials) would train in
    the solo model only; one it reads that the solo model lacks would fail mid-epoch.
    """
    solo = [name for name, _ in model.named_parameters()]
    read = layout.parameters()
    missing, extra = sorted(set(solo) - set(read)), sorted(set(read) - set(solo))
    if missing or extra:
        raise TypeError("the grouped forward (everest/model/batched.py) does not compute the EVEREST network as "
                        f"built: solo parameters it never reads: {missing or 'none'}; "
                        f"names it reads that the solo model lacks: {extra or 'none'}")


# ---------------------------------------------------------------------- batched maths
def _linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Member-wise ``x @ w.T + b``: x (K, ..., in), w (K, out, in), b (K, out) -> (K, ..., out)."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (K, M, in)
    out = torch.baddbmm(b.unsqueeze(1), flat, w.transpose(1, 2))  # (K, M, out)
    return out.reshape(*x.shape[:-1], w.shape[1])


def _member(v: Tensor, like: Tensor) -> Tensor:
    """A per-member (K, D) vector shaped to broadcast against ``like`` (K, ..., D)."""
    return v.reshape(v.shape[0], *([1] * (like.dim() - 2)), v.shape[-1])


class GroupedEverest(nn.Module):
    """K EVEREST transformers with stacked weights: (K, B, T, F) windows -> :class:`EverestOutput` of (K, B).

    Raises TypeError at construction when the solo network holds a layer or parameter this module would not
    compute (see :func:`layout_of`).
    """

    def __init__(self, cfg: ModelConfig, n_features: int, members: int) -> None:
        super().__init__()
        self.cfg, self.n_features, self.members = cfg, n_features, members
        template = EverestModel(cfg, n_features)  # names, shapes and layers of one member
        self.layout = layout_of(template)
        check_layout(self.layout, template)
        self.names = [name for name, _ in template.named_parameters()]
        # An OrderedDict keeps the solo model's parameter order (a plain dict would be sorted), so optimizer
        # state indices mean the same parameters as in a solo optimizer.
        self.weights = nn.ParameterDict(OrderedDict(
            (_key(name), nn.Parameter(torch.zeros(members, *p.shape))) for name, p in template.named_parameters()))
        self.register_buffer("table", template.pos.table.clone(), persistent=False)  # (T, D) sinusoids
        self.evidential = template.evidential_head.parameters_of if template.evidential_head is not None else None
        self.evt = template.evt_head.parameters_of if template.evt_head is not None else None

    @classmethod
    def stack(cls, models: Sequence[EverestModel]) -> GroupedEverest:
        """The group of ``models`` (same config and feature count), on their device, member k = models[k]."""
        first = models[0]
        group = cls(first.cfg, first.n_features, len(models)).to(next(first.parameters()).device)
        with torch.no_grad():
            for k, model in enumerate(models):
                group.load_member(k, model.state_dict())
        return group

    def w(self, name: str) -> Tensor:
        """The stacked weight of the solo parameter ``name``, shape (K, *solo shape)."""
        return self.weights[_key(name)]

    def member_state(self, k: int) -> dict[str, Tensor]:
        """Member ``k``'s weights as a solo model's state dict (detached copies)."""
        return {name: self.w(name)[k].detach().clone() for name in self.names}

    @torch.no_grad()
    def load_member(self, k: int, state: dict[str, Tensor]) -> None:
        """Set member ``k`` from a solo model's state dict."""
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise KeyError(f"a member's state lacks {missing[:3]}{'...' if len(missing) > 3 else ''}")
        for name in self.names:
            self.w(name)[k].copy_(state[name])

    def select(self, keep: Sequence[int]) -> None:
        """Keep only the members ``keep`` (in that order): a stopped member costs nothing from here on."""
        index = torch.tensor(list(keep), device=self.table.device)
        for key, p in self.weights.items():
            self.weights[key] = nn.Parameter(p.detach().index_select(0, index))
        self.members = len(keep)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, valid: Tensor | None = None, draws: MemberDraws | None = None,
                members: Sequence[int] | None = None) -> EverestOutput:
        """Outputs for windows ``x`` (K, B, T, F); ``valid`` (K, B, T) marks real steps, as in the solo model.

        ``members`` runs only those members (x then holds their windows, in that order): a step in which
        some members have no samples costs nothing for them.
        """
        k = self.members if members is None else len(members)
        if x.dim() != 4 or x.shape[0] != k or x.shape[3] != self.n_features or x.shape[2] > self.cfg.seq_len:
            raise ValueError(f"x must have shape ({k} members, batch, steps <= {self.cfg.seq_len}, "
                             f"{self.n_features}), got {tuple(x.shape)}")
        index = None if members is None else torch.as_tensor(list(members), device=x.device)

        def weight(name: str) -> Tensor:
            return self.w(name) if index is None else self.w(name).index_select(0, index)

        lay = self.layout
        pad = None
        if valid is not None:
            check_valid(x, valid)
            if self.cfg.padding_mask:
                pad = ~valid & valid.any(dim=-1, keepdim=True)  # (K, B, T); a window without real steps: unmasked
        h = self._layers(x, lay.embed, weight, draws)  # (K, B, T, F) -> (K, B, T, D)
        t = x.shape[2]
        h = h + weight(lay.pos_scale).reshape(-1, 1, 1, 1) * self.table[:t]
        for block in lay.blocks:
            h = self._block(h, pad, block, draws, weight)
        if lay.pool_score is not None:
            scores = self._layer(h, lay.pool_score, weight, draws).squeeze(-1)  # (K, B, T, 1) -> (K, B, T)
            pooled = attention_pool(h, scores, pad)  # (K, B, D)
        else:
            pooled = mean_pool(h, pad)
        z = self._layers(pooled, lay.shared, weight, draws)  # (K, B, D)

        def head(layer: Layer, z: Tensor = z) -> Tensor:
            return self._layer(z, layer, weight, draws)

        return EverestOutput(
            logits=head(lay.logit).squeeze(-1),  # (K, B, 1) -> (K, B)
            nig=self.evidential(head(lay.evidential)) if lay.evidential is not None else None,
            gpd=(self.evt(head(lay.evt, z.detach() if self.cfg.evt_detach_trunk else z))
                 if lay.evt is not None else None),
            precursor=head(lay.precursor).squeeze(-1) if lay.precursor is not None else None,  # (K, B)
        )

    def _block(self, h: Tensor, pad: Tensor | None, block: BlockLayout, draws: MemberDraws | None,
               weight: Callable[[str], Tensor]) -> Tensor:
        """Post-norm block: self-attention, add & norm, feed-forward, add & norm (nn.MultiheadAttention's maths)."""
        k, b, t, d = h.shape
        heads = block.heads
        q, key, v = _linear(h, weight(f"{block.attn}.in_proj_weight"),
                            weight(f"{block.attn}.in_proj_bias")).chunk(3, dim=-1)  # 3 x (K, B, T, D)
        q, key, v = (u.reshape(k * b, t, heads, d // heads).transpose(1, 2) for u in (q, key, v))  # (KB, H, T, dh)
        keys = None if pad is None else ~pad.reshape(k * b, 1, 1, t)  # True = may be attended to
        p = block.attn_dropout if self.training else 0.0
        if h.device.type != "cpu" and draws is None:
            attended = F.scaled_dot_product_attention(q, key, v, attn_mask=keys, dropout_p=p)
        else:  # written out: for 10 steps 2.8x faster than the CPU's fused kernel, and dropout per member
            scores = q @ key.transpose(-2, -1) / math.sqrt(d // heads)  # (KB, H, T, T)
            if keys is not None:
                scores = scores.masked_fill(~keys, float("-inf"))
            weights = torch.softmax(scores, dim=-1)
            if p > 0.0:
                mask = (draws.mask((k, b, heads, t, t), p, weights).reshape(k * b, heads, t, t) if draws is not None
                        else F.dropout(torch.ones_like(weights), p))
                weights = weights * mask
            attended = weights @ v
        attended = attended.transpose(1, 2).reshape(k, b, t, d)  # (KB, H, T, dh) -> (K, B, T, D)
        out_proj = _linear(attended, weight(f"{block.attn}.out_proj.weight"), weight(f"{block.attn}.out_proj.bias"))
        h = self._layer(h + out_proj, block.norm1, weight, draws)
        return self._layer(h + self._layers(h, block.ff, weight, draws), block.norm2, weight, draws)

    def _layers(self, x: Tensor, layers: Sequence[Layer], weight: Callable[[str], Tensor],
                draws: MemberDraws | None) -> Tensor:
        for layer in layers:
            x = self._layer(x, layer, weight, draws)
        return x

    def _layer(self, x: Tensor, layer: Layer, weight: Callable[[str], Tensor], draws: MemberDraws | None) -> Tensor:
        """``layer`` applied member-wise to ``x`` (K, ..., in) -> (K, ..., out)."""
        if layer.kind == "linear":
            return _linear(x, weight(f"{layer.name}.weight"), weight(f"{layer.name}.bias"))
        if layer.kind == "norm":  # each member's scale and shift
            x = F.layer_norm(x, x.shape[-1:], eps=layer.eps)
            scale, shift = weight(f"{layer.name}.weight"), weight(f"{layer.name}.bias")
            return torch.addcmul(_member(shift, x), x, _member(scale, x))
        if layer.kind == "dropout":
            return self._drop(x, layer.p, draws)
        return layer.fn(x)

    def _drop(self, x: Tensor, p: float, draws: MemberDraws | None) -> Tensor:
        if not self.training or p == 0.0:
            return x
        if draws is None:
            return F.dropout(x, p, training=True)
        return x * draws.mask(tuple(x.shape), p, x)


def _key(name: str) -> str:
    """ParameterDict keys cannot contain dots."""
    return name.replace(".", "__")


class GroupAdamW:
    """AdamW (torch's single-tensor arithmetic) over stacked (K, ...) weights, with a step count per member.

    :meth:`step` takes ``active`` (K,) bool: inactive members' weights and moments stay exactly as they were.
    Only tensor operations, no host synchronisation, so a CUDA graph can capture it.
    """

    def __init__(self, params: Sequence[Tensor], lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = list(params)
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        members = self.params[0].shape[0]
        device = self.params[0].device
        self.steps = torch.zeros(members, dtype=torch.float64, device=device)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, active: Tensor, all_active: bool = False) -> None:
        """One AdamW step of the ``active`` (K,) members; ``all_active`` (known on the host) takes the in-place
        path, which skips the masking."""
        beta1, beta2 = self.betas
        self.steps += active
        steps = self.steps.clamp_min(1)  # a member that never stepped keeps its state (masked below)
        step_size = (self.lr / (1 - beta1 ** steps)).float()  # bias corrections in float64, as torch's AdamW
        correction2 = (1 - beta2 ** steps).sqrt().float()
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            shape = (-1,) + (1,) * (p.dim() - 1)
            if all_active:
                p.mul_(1 - self.lr * self.weight_decay)
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v.sqrt() / correction2.reshape(shape)).add_(self.eps)
                p.sub_(step_size.reshape(shape) * m / denom)
                continue
            keep = active.reshape(shape)
            new_p = p * (1 - self.lr * self.weight_decay)
            new_m = m.lerp(g, 1 - beta1)
            new_v = (v * beta2).addcmul_(g, g, value=1 - beta2)
            denom = (new_v.sqrt() / correction2.reshape(shape)).add_(self.eps)
            new_p = new_p - step_size.reshape(shape) * new_m / denom
            p.copy_(torch.where(keep, new_p, p))
            m.copy_(torch.where(keep, new_m, m))
            v.copy_(torch.where(keep, new_v, v))

    def select(self, params: Sequence[Tensor], keep: Sequence[int]) -> None:
        """Follow :meth:`GroupedEverest.select`: the new parameter tensors and the kept members' state."""
        index = torch.tensor(list(keep), device=self.steps.device)
        self.params = list(params)
        self.steps = self.steps.index_select(0, index)
        self.exp_avg = [m.index_select(0, index) for m in self.exp_avg]
        self.exp_avg_sq = [v.index_select(0, index) for v in self.exp_avg_sq]

    def member_state(self, k: int, template: dict) -> dict:
        """Member ``k``'s state in ``torch.optim.AdamW.state_dict()`` form (``template``: a solo optimizer's)."""
        state = {i: {"step": torch.tensor(float(self.steps[k])), "exp_avg": m[k].clone(), "exp_avg_sq": v[k].clone()}
                 for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq, strict=True))}
        return {"state": state, "param_groups": template["param_groups"]}

    @torch.no_grad()
    def load_member(self, k: int, state: dict) -> None:
        """Set member ``k`` from a solo ``torch.optim.AdamW`` state dict (an empty state: never stepped)."""
        entries = state["state"]
        if not entries:
            return
        self.steps[k] = float(entries[0]["step"])
        for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq, strict=True)):
            m[k].copy_(entries[i]["exp_avg"])
            v[k].copy_(entries[i]["exp_avg_sq"])
