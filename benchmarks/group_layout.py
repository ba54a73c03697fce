"""How to batch K members: weights written batched (:class:`everest.model.batched.GroupedEverest`) against
``torch.func.stack_module_state`` + ``vmap`` over the solo model, and against K separate solo models.

One training pass (forward in training mode with dropout, backward of the summed logits) over the same
(K, B, T, F) batch, the three layouts interleaved in one process; the rate is K x B samples over the best
of ``repeats`` timed passes. ``vmap`` needs ``randomness="different"`` for dropout; over
``nn.MultiheadAttention`` it runs batched kernels where PyTorch has batching rules and per-member loops where
it has none (its fused attention), which is what this row measures.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch.func import functional_call, stack_module_state, vmap

from everest.config import ModelConfig
from everest.model.batched import GroupedEverest
from everest.model.network import EverestModel


def layout_rates(k: int, batch: int, cfg: ModelConfig, device: torch.device, n_features: int = 9,
                 repeats: int = 3) -> dict[str, float]:
    """Training-pass samples/s of the batched modules, vmap and K solo models (``cfg`` model, fp32)."""
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(EverestModel(cfg, n_features).to(device).train())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(k, batch, cfg.seq_len, n_features, generator=g).to(device)
    valid = torch.ones(k, batch, cfg.seq_len, dtype=torch.bool, device=device)
    valid[:, : batch // 2, : cfg.seq_len // 3] = False  # half the windows front-padded
    grouped = GroupedEverest.stack(models).train()
    params, buffers = stack_module_state(models)
    shell = copy.deepcopy(models[0]).to("meta")

    def logits(p: dict, b: dict, xx: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
        return functional_call(shell, (p, b), (xx, vv)).logits

    over_members = vmap(logits, randomness="different")

    def batched() -> None:
        grouped(x, valid).logits.sum().backward()

    def vmapped() -> None:
        over_members(params, buffers, x, valid).sum().backward()

    def solo() -> None:
        for i, model in enumerate(models):
            model(x[i], valid[i]).logits.sum().backward()

    passes: dict[str, Callable[[], None]] = {"batched modules": batched, "vmap": vmapped, "solo models": solo}
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for run in passes.values():
        run()  # warm-up: allocator, lazy initialisation
    best = dict.fromkeys(passes, float("inf"))
    for _ in range(repeats):
        for name, run in passes.items():
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: k * batch / seconds for name, seconds in best.items()}
