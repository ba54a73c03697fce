"""The training step and its fast paths: eager (every device), CUDA-graph replay and ``torch.compile`` (CUDA).

EVEREST's model is tiny (~48 MFLOP per training sample), so on a GPU a step costs kernel launches and
host synchronisation, not arithmetic. :class:`TrainStep` keeps the data
resident on the device, gathers each batch by index and accumulates the loss terms on the device, so
nothing waits for the host inside an epoch. On CUDA it can additionally

* capture one whole step (gather, forward, loss, backward, fused AdamW, loss sums) as a CUDA graph and
  replay it: one launch per step instead of ~300. The loss schedule (focal gamma, term weights) is a
  Python number per epoch, so the graph is captured afresh in each epoch, after ``GRAPH_WARMUP`` eager
  steps of that epoch; every batch is still run exactly once, in order. The last, shorter batch of an
  epoch runs eagerly.
* run the model through ``torch.compile`` (kernel fusion).

Both are CUDA-only options: on any other device they are ignored with one log line, and a failure
while compiling or capturing on CUDA falls back to the eager step with a warning, so a run never dies
of an optimisation. The eager CPU path is the plain float32 loop, so a seed reproduces its metrics
bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from everest.model.losses import LOSS_KEYS

log = logging.getLogger(__name__)

GRAPH_WARMUP = 3  # eager steps per epoch before capture: lazy CUDA/cuBLAS initialisation must not be captured
N_SUMS = 1 + len(LOSS_KEYS)  # total loss, then the unweighted terms, each summed over samples
# Activations of an evaluation chunk should stay in the CPU's cache: on the 2-core CI machine, 512
# samples per forward ran 1.8x faster than 8192 (benchmarks/RESULTS.md, "predict chunk").
CPU_EVAL_CHUNK = 512


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device,
                   capturable: bool = False) -> torch.optim.Optimizer:
    """AdamW: fused on CUDA (one kernel for all parameters), and capturable when steps are graph-replayed."""
    cuda = device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=cuda,
                             capturable=cuda and capturable)


def accumulate_terms(sums: Tensor, loss: Tensor, terms: dict[str, Tensor], n: int) -> None:
    """``sums += [loss, focal, evidential, evt, precursor] * n`` on the device (absent terms add 0)."""
    zero = torch.zeros((), device=sums.device)
    parts = [loss.detach()] + [terms.get(k, zero) for k in LOSS_KEYS]
    sums += torch.stack([t.float() for t in parts]) * n


def eval_chunk(device: torch.device, eval_batch_size: int) -> int:
    """Samples per forward pass in evaluation: the configured size, capped on CPU to stay in cache."""
    return eval_batch_size if device.type != "cpu" else min(eval_batch_size, CPU_EVAL_CHUNK)


class GraphedStep:
    """A training step run eagerly, or on CUDA replayed from one graph captured per epoch.

    A step takes a tuple of input tensors of fixed shapes (a batch's indices, and whatever else the step
    reads); replayable steps copy them into the graph's static inputs and replay it. Subclasses give the step
    itself: :meth:`_eager` (any step) and :meth:`_captured` (the step as recorded into the graph, reading the
    static inputs it is given).
    """

    def __init__(self, device: torch.device, cuda_graphs: bool, name: str) -> None:
        self.device, self.name = device, name
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.epoch = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._eager_full_steps = 0
        self._static: tuple[Tensor, ...] = ()

    def _begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._graph = None  # the loss schedule is baked into a graph: capture again for this epoch
        self._eager_full_steps = 0

    def run(self, inputs: tuple[Tensor, ...], replayable: bool) -> None:
        """One step on ``inputs``; ``replayable`` says they have the captured shapes (a full batch)."""
        if self._graph is not None and replayable:
            for static, new in zip(self._static, inputs, strict=True):
                static.copy_(new)
            self._graph.replay()
            return
        if self.cuda_graphs and replayable and self._eager_full_steps >= GRAPH_WARMUP and self._capture(inputs):
            self._graph.replay()  # type: ignore[union-attr]  # capture records, it does not run
            return
        self._eager(*inputs)
        if replayable:
            self._eager_full_steps += 1

    def _eager(self, *inputs: Tensor) -> None:
        raise NotImplementedError

    def _captured(self, *inputs: Tensor) -> None:
        raise NotImplementedError

    def _zero_grad(self) -> None:
        raise NotImplementedError

    def _capture(self, inputs: tuple[Tensor, ...]) -> bool:
        """Record one whole step for this epoch; False (and graphs off) if capture fails."""
        t0 = time.perf_counter()
        self._static = tuple(t.clone() for t in inputs)
        graph = torch.cuda.CUDAGraph()
        self._zero_grad()  # the graph's backward then writes (not adds) static gradients
        try:
            with torch.cuda.graph(graph):
                self._captured(*self._static)
        except Exception as err:  # noqa: BLE001 - an optimisation must not kill the run
            log.warning("%s: CUDA-graph capture failed (%s: %s); continuing with eager steps",
                        self.name, type(err).__name__, str(err)[:300])
            self.cuda_graphs, self._graph = False, None
            self._zero_grad()
            torch.cuda.synchronize(self.device)
            return False
        self._graph = graph
        log.debug("%s: captured the training step for epoch %d in %.3f s", self.name, self.epoch,
                  time.perf_counter() - t0)
        return True


class TrainStep(GraphedStep):
    """One optimisation step over a batch of indices into device-resident ``x``/``y`` (and ``valid``).

    ``valid`` (N, T) bool, optional, marks the real (non-padding) steps of ``x``; each batch's rows are
    gathered with ``x``'s and passed to the model as ``model(xb, valid_b)`` (None: ``model(xb, None)``).

    Call :meth:`start_epoch` before each epoch (it sets the loss schedule's epoch and the running
    sums), then the step with each batch's indices; :attr:`sums` holds the epoch's running sums
    ``[total, focal, evidential, evt, precursor]`` (each summed over samples), on the device.
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable[..., Any], x: Tensor,
                 y: Tensor, device: torch.device, *, valid: Tensor | None = None, amp: bool = False,
                 cuda_graphs: bool = False, compile: bool = False, name: str = "") -> None:
        if valid is not None and (valid.dtype != torch.bool or tuple(valid.shape) != tuple(x.shape[:2])):
            raise ValueError(f"valid must be a torch.bool tensor of shape {tuple(x.shape[:2])} (x's first two "
                             f"dimensions), got {valid.dtype} of shape {tuple(valid.shape)}")
        super().__init__(device, cuda_graphs, name)
        self.model, self.opt, self.loss_fn, self.x, self.y = model, opt, loss_fn, x, y
        self.valid = valid
        self.amp = amp
        cuda = device.type == "cuda"
        if compile and not cuda:
            log.info("%s: train.compile applies to CUDA only; eager model on %s", name, device)
        if self.cuda_graphs and not opt.param_groups[0].get("capturable", False):
            log.warning("%s: CUDA graphs need a capturable optimizer (fast.make_optimizer(..., capturable=True));"
                        " eager step", name)
            self.cuda_graphs = False
        self.forward: Callable[[Tensor, Tensor | None], Any] = model
        if compile and cuda:
            self.forward = torch.compile(model, dynamic=False)
        self.compiled = self.forward is not model
        self.sums = torch.zeros(N_SUMS, device=device)

    # ------------------------------------------------------------------ driving
    def start_epoch(self, epoch: int, sums: Tensor | None = None) -> None:
        """Begin ``epoch`` (0-based); ``sums`` restores the running sums of an interrupted epoch."""
        self._begin_epoch(epoch)
        self.sums.copy_(sums.to(self.device) if sums is not None else torch.zeros(N_SUMS))

    def __call__(self, idx: Tensor, full_batch: int) -> None:
        """Train on samples ``idx``; ``full_batch`` is the configured batch size (shorter batches run eagerly)."""
        self.run((idx,), len(idx) == full_batch)

    # ------------------------------------------------------------------ implementations
    def _loss(self, xb: Tensor, yb: Tensor, vb: Tensor | None,
              cache: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=cache):
            out = self.forward(xb, vb)
            return self.loss_fn(out, yb, self.epoch)

    def _zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def _eager(self, idx: Tensor) -> None:
        xb, yb = self.x[idx], self.y[idx]
        vb = self.valid[idx] if self.valid is not None else None
        try:
            loss, terms = self._loss(xb, yb, vb)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        except Exception as err:  # noqa: BLE001 - only a compiler failure is absorbed; eager errors re-raise
            if not self.compiled:
                raise
            log.warning("%s: torch.compile failed (%s: %s); continuing with the eager model",
                        self.name, type(err).__name__, str(err)[:300])
            self.forward, self.compiled = self.model, False
            loss, terms = self._loss(xb, yb, vb)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        self.opt.step()
        accumulate_terms(self.sums, loss, terms, len(idx))

    def _captured(self, idx: Tensor) -> None:
        xb = self.x.index_select(0, idx)
        yb = self.y.index_select(0, idx)
        vb = self.valid.index_select(0, idx) if self.valid is not None else None
        loss, terms = self._loss(xb, yb, vb, cache=False)  # autocast's weight cache is not capturable
        loss.backward()
        self.opt.step()
        accumulate_terms(self.sums, loss, terms, len(idx))


def device_stream(device: torch.device) -> contextlib.AbstractContextManager:
    """A private CUDA stream for one experiment's work (graph capture wants a non-default stream);
    a no-op elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.Stream(device))


def matmul_peak_tflops(device: torch.device, n: int = 8192, repeats: int = 10,
                       dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense matmul rate (TFLOP/s) of ``device`` for ``n x n x n`` products: the peak to compare with."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
