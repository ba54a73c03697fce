"""Row 8: the grouped trainer (:func:`everest.training.group.train_group`) against the same experiments trained as
solo runs (:class:`everest.training.train.ProductionTrainer`), side by side in one process, interleaved.

Both sides run the real trainers on synthetic tables written to disk, with a fixed epoch count and early
stopping off (patience = epochs). A side's rate is the sum over members of ``n_train x epochs run`` divided
by its training time, read from the results' per-epoch ``seconds``: the epoch's training steps and its
validation forward pass; data preparation, the final test evaluation and the output files are left out
(the end-to-end wall time of each side is kept beside it in the JSON). A group reports one epoch time
shared by its members, so it is counted once per epoch; members trained one after another are summed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from everest.config import DEFAULT_SEEDS, DataConfig, EverestConfig, Experiment, Target, all_targets

TINY_MODEL: tuple[str, ...] = ("model.embed_dim=16", "model.ff_dim=32", "model.num_blocks=1", "model.num_heads=2")
"""A narrow one-block model (the tests' tiny model), for the K=45 row on a CPU."""


def members(k: int) -> list[Experiment]:
    """The study's experiments a group of ``k`` holds: 1 -> M-24 seed 0; 5 -> the 5 seeds of M-24;
    9 -> seed 0 of each target; 45 -> all; any other ``k`` -> the first ``k`` in seed-major order."""
    if k == 1:
        return [Experiment.of("M-24", 0)]
    if k == len(DEFAULT_SEEDS):
        return [Experiment.of("M-24", s) for s in DEFAULT_SEEDS]
    order = seed_major([Experiment(target=t, seed=s) for t in all_targets() for s in DEFAULT_SEEDS])
    if not 1 <= k <= len(order):
        raise ValueError(f"a group holds 1..{len(order)} experiments of the study, not {k}")
    return order[:k]


def seed_major(experiments: Sequence[Experiment]) -> list[Experiment]:
    """``experiments`` ordered seed by seed, targets in array order: any prefix spreads over the targets."""
    targets = all_targets()
    return sorted(experiments, key=lambda e: (e.seed, targets.index(e.target)))


@dataclass(frozen=True)
class Run:
    """One side of a comparison: how much it trained and how long it took."""

    how: str  # "grouped" | "solo"
    members: int
    samples: int  # sum over members of n_train x epochs run
    train_seconds: float  # epoch seconds (training + per-epoch validation); a group's epoch counted once
    wall_seconds: float  # the whole call: data preparation, training, test evaluation, outputs
    shared_epoch_seconds: bool  # every member reported the same time for each epoch (trained as one)

    @property
    def rate(self) -> float:
        """Aggregate training samples/s."""
        return self.samples / self.train_seconds


def training_seconds(histories: Sequence[Sequence[dict[str, Any]]]) -> tuple[float, bool]:
    """Training time behind ``histories`` and whether it was shared: when every member reports the same
    seconds for each epoch (one group epoch), that time once per epoch; else the sum over members."""
    longest = max((len(h) for h in histories), default=0)
    per_epoch = [{h[e]["seconds"] for h in histories if len(h) > e} for e in range(longest)]
    if len(histories) > 1 and all(len(s) == 1 for s in per_epoch):
        return float(sum(s.pop() for s in per_epoch)), True
    return float(sum(row["seconds"] for h in histories for row in h)), False


def _run(how: str, results: Sequence[dict[str, Any]], wall: float) -> Run:
    histories = [r["history"] for r in results]
    seconds, shared = training_seconds(histories) if how == "grouped" else \
        (float(sum(row["seconds"] for h in histories for row in h)), False)
    samples = sum(int(r["data"]["n_train"]) * len(r["history"]) for r in results)
    return Run(how, len(results), samples, seconds, wall, shared)


def run_grouped(experiments: Sequence[Experiment], config: EverestConfig, data_dir: Path, output_dir: Path,
                cache_dir: Path) -> Run:
    """Train ``experiments`` as one group; a member's failure fails the measurement."""
    from everest.training.group import train_group

    t0 = time.perf_counter()
    out = train_group(experiments, config=config, data_dir=data_dir, output_dir=output_dir, cache_dir=cache_dir,
                      force=True)
    wall = time.perf_counter() - t0
    failed = [f"{m.experiment.name}: {m.error}" for m in out if m.results is None]
    if failed:
        raise RuntimeError(f"grouped run: {len(failed)} member(s) failed: {'; '.join(failed)[:500]}")
    return _run("grouped", [m.results for m in out if m.results is not None], wall)


def run_solo(experiments: Sequence[Experiment], config: EverestConfig, data_dir: Path, output_dir: Path,
             cache_dir: Path) -> Run:
    """Train ``experiments`` one after another, each a solo :class:`ProductionTrainer` run."""
    from everest.training.train import ProductionTrainer

    t0 = time.perf_counter()
    results = [ProductionTrainer(e, config=config, data_dir=data_dir, output_dir=output_dir, cache_dir=cache_dir,
                                 force=True).train() for e in experiments]
    return _run("solo", results, time.perf_counter() - t0)


def synthetic_data(size: str, root: Path) -> Path:
    """The 18 synthetic tables of ``size`` (seed 0) under ``root``, written once."""
    from everest.data import synthetic

    folder = root / f"data-{size}"
    if not (folder / "testing_data_M5_72.csv").is_file():
        synthetic.generate(folder, size=size, seed=0)
    return folder


def _prepare(data_dir: Path, target: Target, data: DataConfig, seq_len: int, cache_dir: Path) -> None:
    from everest.data.samples import prepare_experiment

    prepare_experiment(data_dir, target, 0, data, seq_len, cache_dir)


def warm_cache(experiments: Sequence[Experiment], config: EverestConfig, data_dir: Path, cache_dir: Path) -> None:
    """Fill the samples cache of each target (in parallel, one process per core), so that neither side pays
    for parsing the tables first."""
    targets = list(dict.fromkeys(e.target for e in experiments))
    workers = min(len(targets), len(os.sched_getaffinity(0)))
    if workers <= 1:
        for t in targets:
            _prepare(data_dir, t, config.data, config.model.seq_len, cache_dir)
        return
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        for f in [pool.submit(_prepare, data_dir, t, config.data, config.model.seq_len, cache_dir) for t in targets]:
            f.result()


@dataclass(frozen=True)
class Plan:
    """One row: ``k`` experiments, grouped vs solo, on ``data_size`` tables with this configuration."""

    k: int
    config: EverestConfig  # epochs, patience = epochs, device and threads already set
    model: str  # how the row names the model
    data_size: str
    reps: int = 1
    solo_max: int | None = None  # train at most this many of the K solo (a seed-major subset)
    first: str = "grouped"  # which side runs first in even repeats (odd repeats swap: ABBA)


def compare(plan: Plan, data_dir: Path, work: Path) -> dict[str, Any]:
    """Measure ``plan`` on the tables in ``data_dir``: grouped and solo side by side, alternating which goes
    first; the raw numbers. ``work`` holds the samples cache and the (removed) outputs."""
    exps = members(plan.k)
    solo_exps = seed_major(exps)[:plan.solo_max] if plan.solo_max else exps
    cache = work / "cache"
    warm_cache(exps, plan.config, data_dir, cache)
    sides = {"grouped": lambda out: run_grouped(exps, plan.config, data_dir, out, cache),
             "solo": lambda out: run_solo(solo_exps, plan.config, data_dir, out, cache)}
    runs: dict[str, list[Run]] = {"grouped": [], "solo": []}
    for rep in range(plan.reps):
        order = ["grouped", "solo"] if plan.first == "grouped" else ["solo", "grouped"]
        for how in order if rep % 2 == 0 else order[::-1]:
            out = work / f"out-{how}-{plan.k}-{rep}"
            runs[how].append(sides[how](out))
            shutil.rmtree(out, ignore_errors=True)
    rate = {how: sum(r.samples for r in rs) / sum(r.train_seconds for r in rs) for how, rs in runs.items()}
    return {"k": plan.k, "model": plan.model, "data_size": plan.data_size,
            "epochs": plan.config.train.epochs, "device": plan.config.train.device, "reps": plan.reps,
            "members": [e.name for e in exps], "solo_members": [e.name for e in solo_exps],
            "grouped_rate": rate["grouped"], "solo_rate": rate["solo"], "ratio": rate["grouped"] / rate["solo"],
            "grouped_wall_s": sum(r.wall_seconds for r in runs["grouped"]),
            "solo_wall_s": sum(r.wall_seconds for r in runs["solo"]),
            "shared_epoch_seconds": all(r.shared_epoch_seconds for r in runs["grouped"]),
            "runs": [asdict(r) for rs in runs.values() for r in rs]}


def warm_up(config: EverestConfig, data_dir: Path, work: Path) -> None:
    """One epoch solo and one as a group of two: one-time costs (allocator, thread pools, the CUDA context)
    land on no measured side."""
    cfg = config.with_overrides({"train.epochs": 1, "train.early_stopping_patience": 1})
    for name, run, exps in (("solo", run_solo, members(1)), ("grouped", run_grouped, members(2))):
        out = work / f"out-warm-up-{name}"
        run(exps, cfg, data_dir, out, work / "cache")
        shutil.rmtree(out, ignore_errors=True)
