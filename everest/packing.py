"""Several experiments on one GPU: ``k`` worker processes share a device, one experiment each.

Measured on an H200 (benchmarks/RESULTS.md, row 3): with CUDA-graph steps (the default) one experiment
keeps the GPU busy and 2-8 processes give 0.91x, so the profiles keep ``experiments_per_gpu: 1``. Packing is
for eager steps (``train.cuda_graphs=false``), whose launch gaps other processes can fill (not yet
measured on a GPU).

Why processes rather than threads:

* An eager step of this model is launch-bound: one Python thread issuing kernels leaves the GPU mostly idle,
  so k issuers (processes, each with its own interpreter, GIL and CUDA context) fill it; threads in one
  process share one GIL that is the bottleneck.
* Correctness: the trainer seeds and draws from torch's *process-global* generators (shuffling per
  epoch, dropout inside ``nn.Dropout``). Experiments in threads of one process would interleave draws
  from one generator, so no run would reproduce its solo result. In separate processes each
  experiment's random stream is exactly its solo stream: results are identical to a solo run on
  CPU (tested) and seeds are independent.
* A vectorised 5-seed ensemble (``torch.func``) needs a second model implementation (SDPA has no vmap
  batching rule in torch 2.13), per-member early stopping and checkpointing: a rewrite of the trainer
  for a gain that k processes give without touching the science.

The Dask wiring keeps tasks at ``resources={"GPU": 1}`` (one experiment per worker) and starts
``experiments_per_gpu`` workers per GPU (:func:`worker_gpu_ids`); a batch job with one GPU runs
``experiments_per_gpu`` worker processes (:func:`batch_job_layout`).
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from everest.config import ConfigError

MAX_EXPERIMENTS_PER_GPU = 16


def check_experiments_per_gpu(k: Any) -> int:
    """Validate ``experiments_per_gpu``: an integer in 1..16 (more only adds contention)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_EXPERIMENTS_PER_GPU:
        raise ConfigError(f"experiments_per_gpu must be an integer in 1..{MAX_EXPERIMENTS_PER_GPU}, got {k!r}")
    return k


def worker_gpu_ids(gpu_ids: Sequence[str], experiments_per_gpu: int) -> list[str]:
    """The device each local worker process is pinned to: ``k`` workers per GPU, round-robin over GPUs.

    Worker ``i`` gets ``gpu_ids[i % len(gpu_ids)]``, which is what ``PinnedGPUNanny`` does with worker
    names ``0..n-1``, so ``n_workers = len(gpu_ids) * k`` is the whole change on a local machine.
    """
    k = check_experiments_per_gpu(experiments_per_gpu)
    return [str(gpu_ids[i % len(gpu_ids)]) for i in range(len(gpu_ids) * k)]


def batch_job_layout(experiments_per_gpu: int, threads_per_experiment: int = 1) -> dict[str, int]:
    """dask-jobqueue keys for one single-GPU job that runs ``k`` experiments: ``k`` worker processes,
    each with the ``GPU=1`` worker resource (so each takes one experiment) and its own threads."""
    k = check_experiments_per_gpu(experiments_per_gpu)
    return {"processes": k, "cores": k * threads_per_experiment}


def run_packed(fn: Callable[..., Any], jobs: Sequence[dict[str, Any]], experiments_per_device: int) -> list[Any]:
    """Run ``fn(**job)`` for every job, ``experiments_per_device`` at a time, each in its own fresh process.

    The library-level equivalent of the packed Dask workers (spawned processes, so no state is shared);
    results come back in job order and the first error is re-raised.
    """
    k = check_experiments_per_gpu(experiments_per_device)
    with ProcessPoolExecutor(max_workers=k, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(fn, **job) for job in jobs]
        return [f.result() for f in futures]


def train_experiment(flare_class: str, time_window: int, seed: int, config: dict[str, Any], data_dir: str,
                     output_dir: str) -> dict[str, Any]:
    """One experiment in this process (what a packed worker runs); returns the ``results.json`` content."""
    from everest.config import EverestConfig
    from everest.train import ProductionTrainer

    cfg = EverestConfig.model_validate(config)
    return ProductionTrainer(flare_class, time_window, seed, config=cfg, data_dir=data_dir,
                             output_dir=output_dir).train()
