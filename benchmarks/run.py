"""EVEREST benchmark suite: every row a ratio of two quantities measured side by side in this run.

    python -m benchmarks [--quick] [--out DIR] [--rows 1,2,...] [--device auto|cpu|cuda]

Rows: 1 data build, 2 training throughput, 3 packing, 4 inference, 5 orchestration,
6 analysis, 7 study projection, 8 grouped trainer vs solo runs (and its study projection), 9 how a group
is batched (weights written batched vs ``torch.func.vmap`` vs separate models), 10 forecasting from a bundle.
Writes ``DIR/benchmarks.json`` after every row and prints the table last. A row whose
dependencies are missing (e.g. prefect on a bare GPU machine) is recorded as skipped, not failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/run.py`: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks import grouped as G
from benchmarks import workloads as W
from everest import io
from everest.config import DEFAULT_SEEDS, EverestConfig

log = logging.getLogger("benchmarks")
GOAL_STUDY_SECONDS = 30 * 60  # the goal: the 45-experiment study on one H100-class GPU in under 30 minutes
STUDY_EPOCHS = 120  # train.epochs: the projection's upper bound (early stopping ends most runs sooner)


class Suite:
    """Holds the settings, the shared measurements between rows, and the result rows."""

    def __init__(self, quick: bool, device: torch.device, out: Path, size: str = "full") -> None:
        self.quick, self.device, self.out, self.size = quick, device, out, size
        self.packing_ks = [1, 2, 4] if quick else [1, 2, 4, 8]
        self.packing_seconds = (2.0 if quick else 10.0) if device.type != "cuda" else (4.0 if quick else 15.0)
        self.config = W.EverestConfig()  # tests shrink the model here
        self.n_eval = 16_384
        self.rows: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.shared: dict[str, Any] = {}
        # row 8: group sizes, epochs per run, interleaved repeats (None: 2 for K <= 5 on CPU, else 1) and
        # the most solo runs per K (None: all K; a GPU budget may measure the solo rate on a subset)
        self.group_ks: list[int] = [1, 5, 9, 45]
        self.group_epochs = 2
        self.group_reps: int | None = None
        self.group_solo_max: int | None = None
        self.group_data: Path | None = None  # where row 8 writes (and keeps) its tables; None: a temporary folder

    def save(self) -> None:
        """Write ``benchmarks.json`` with every row so far (a run cut short keeps what it measured)."""
        report = {"environment": environment(self.device), "quick": self.quick, "rows": self.rows,
                  "errors": self.errors}
        io.write_text(self.out / "benchmarks.json", json.dumps(report, indent=2, default=float))

    def counts(self, size: str) -> dict[str, dict[str, int]]:
        """:func:`study_counts` of ``size``, computed once per suite."""
        cache = self.shared.setdefault("study_counts", {})
        if size not in cache:
            cache[size] = study_counts(size)
        return cache[size]

    def add(self, row: int, name: str, ours: float, baseline: float | None, unit: str, ratio: float | None = None,
            note: str = "", **extra: Any) -> None:
        """One table line; ``ratio`` defaults to baseline/ours for times and ours/baseline for rates."""
        if ratio is None and baseline not in (None, 0) and ours:
            ratio = (baseline / ours) if unit in ("s", "ms/sample", "s/task") else (ours / baseline)
        self.rows.append({"row": row, "name": name, "ours": ours, "baseline": baseline, "ratio": ratio,
                          "unit": unit, "note": note, **extra})

    # ------------------------------------------------------------------ row 1
    def data_build(self) -> None:
        """Vectorised builder vs the per-row loop on a full-size synthetic training file, plus scaling."""
        cfg = W.EverestConfig().data
        table = self.table()
        self.shared["table"] = table
        args = (cfg.features, 10, False)
        vec_t = W.median([W.timed(lambda: W.build_samples(table, *args)) for _ in range(3)])
        loop_t = W.timed(lambda: W.build_samples_per_row(table, *args))
        self.add(1, f"data build, {self.size}-size file ({len(table):,} rows)", vec_t, loop_t, "s",
                 note="vectorised vs per-row loop (ratio = speed-up)")
        sizes = [10_000, 100_000] if self.quick else [10_000, 100_000, 600_000]
        if self.size != "full":
            sizes = [1_000, 2 * len(table)]
        for rows in sizes:
            t = W.resize_table(table, rows)
            v = W.median([W.timed(lambda t=t: W.build_samples(t, *args)) for _ in range(3)])
            lp = W.timed(lambda t=t: W.build_samples_per_row(t, *args))
            self.add(1, f"data build, {rows:,} rows", v, lp, "s", note=f"{rows / v:,.0f} rows/s vectorised")

    def table(self) -> Any:
        """The M-24 synthetic training table of this suite's size, built once."""
        if "table" not in self.shared:
            self.shared["table"] = W.synthetic_table(self.size, "M-24")
        return self.shared["table"]

    # ------------------------------------------------------------------ row 2
    def _tensors(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` scaled samples of the synthetic table (all of them on CUDA), resident on the device."""
        s = W.full_samples(self.table())
        n = len(s) if self.device.type == "cuda" else n
        x, y = s.x[:n], s.y[:n].astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device), torch.from_numpy(y).to(self.device)

    def training(self) -> None:
        """Reference-style loop vs ours: same model, data and device; interleaved repeats, median."""
        cuda = self.device.type == "cuda"
        steps = (4 if self.quick else 20) if not cuda else (50 if self.quick else 300)
        reps = 2 if self.quick else 3
        x, y = self._tensors(65_536 if cuda else 16_384)
        kinds = ["reference", "ours"] + (["ours+graphs", "ours+compile"] if cuda else [])
        trainers = {k: W.Trainer(k, self.device, x, y, config=self.config) for k in kinds}
        for tr in trainers.values():
            tr.run(WARMUP_STEPS)  # warm-up: allocator, cuBLAS handles, compilation, first capture
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(reps):
            for k in kinds:
                rates[k].append(trainers[k].samples_per_s(steps))
        ref = W.median(rates["reference"])
        best_kind = max(kinds[1:], key=lambda k: W.median(rates[k]))
        self.shared.update(train_rate=W.median(rates[best_kind]), train_rate_ref=ref, train_kind=best_kind)
        prec = "bf16 autocast, fused AdamW" if cuda else "fp32"
        for k in kinds[1:]:
            r = W.median(rates[k])
            extra = {}
            note = f"{k} ({prec}, no per-batch sync) vs reference loop ({'fp16+GradScaler' if cuda else 'fp32'}, " \
                   f".item() per batch); {steps} steps x {reps}"
            if cuda:
                peak = self.shared.setdefault("peak_tflops", measured_peak(self.device))
                achieved = r * W.TRAIN_FLOP_PER_SAMPLE / 1e12
                extra = {"tflops": achieved, "peak_bf16_tflops": peak, "fraction_of_peak": achieved / peak}
                note += f"; {achieved:.2f} TFLOP/s = {100 * achieved / peak:.2f}% of measured bf16 peak {peak:.0f}"
            else:
                note += f"; {r * W.TRAIN_FLOP_PER_SAMPLE / 1e9:.0f} GFLOP/s"
            self.add(2, f"training samples/s, {k}", r, ref, "samples/s", note=note, **extra)
        if cuda:
            self._graph_agreement(x, y)
        else:
            self._threads(x, y, steps, reps)

    def _graph_agreement(self, x: torch.Tensor, y: torch.Tensor, steps: int = 40) -> None:
        """CUDA-graph replay vs the eager step from the same init and batches: mean training loss."""
        eager, graphs = (W.Trainer(k, self.device, x, y, seed=1, config=self.config) for k in ("ours", "ours+graphs"))
        eager.run(steps)
        graphs.run(steps)
        le, lg = (float(t.step.sums[0]) / (steps * t.batch_size) for t in (eager, graphs))
        captured = graphs.step._graph is not None
        self.add(2, "CUDA graphs vs eager, mean loss of 40 steps", lg, le, "loss", ratio=lg / le,
                 note=f"same seed, init and batches (dropout draws differ): expect ~1; captured={captured}",
                 captured=captured)

    def _threads(self, x: torch.Tensor, y: torch.Tensor, steps: int, reps: int) -> None:
        """CPU intra-op threads: 1 vs all cores for our step (the profile's torch_threads)."""
        cores = len(os.sched_getaffinity(0))
        if cores < 2:
            return
        before = torch.get_num_threads()
        tr = W.Trainer("ours", self.device, x, y, config=self.config)
        tr.run(1)
        got: dict[int, list[float]] = {1: [], cores: []}
        try:
            for _ in range(reps):
                for n in got:
                    torch.set_num_threads(n)
                    got[n].append(tr.samples_per_s(steps))
        finally:
            torch.set_num_threads(before)
        one, many = W.median(got[1]), W.median(got[cores])
        self.add(2, f"training samples/s, ours at 1 vs {cores} threads", one, many, "samples/s",
                 note=f"1 thread / {cores} threads (ratio > 1: one thread per worker is faster here)")

    # ------------------------------------------------------------------ row 3
    def packing(self) -> None:
        """Aggregate samples/s of k concurrent training processes on this device."""
        cuda = self.device.type == "cuda"
        ks, seconds = self.packing_ks, self.packing_seconds
        steps = 1 if not cuda else 10
        kind = "ours+graphs" if cuda and self.shared.get("train_kind") == "ours+graphs" else "ours"
        base = None
        ctx = mp.get_context("spawn")
        for k in ks:
            threads = 1  # one intra-op thread per experiment process, as the profiles' workers run
            with ctx.Manager() as mgr:
                barrier = mgr.Barrier(k)
                with ProcessPoolExecutor(max_workers=k, mp_context=ctx) as pool:
                    futs = [pool.submit(W.packed_worker, kind, str(self.device), threads, steps, seconds, 8192, barrier,
                                        self.config.model_dump(mode="json"))
                            for _ in range(k)]
                    res = [f.result() for f in futs]
            agg = sum(r["samples"] / r["seconds"] for r in res)
            base = base or agg
            self.shared.setdefault("packing", {})[k] = agg
            self.add(3, f"packing: {k} concurrent experiment(s)", agg, base, "samples/s",
                     note=f"aggregate of {k} process(es), {kind}, {threads} thread(s) each; ratio vs 1")

    # ------------------------------------------------------------------ row 4
    def inference(self) -> None:
        """Latency per sample at batch 32 and 1; throughput at a large batch vs the old 8192-sample chunk."""
        from everest.model.network import EverestModel
        from everest.training.fast import eval_chunk

        torch.manual_seed(0)
        model = EverestModel(self.config.model, 9).to(self.device).eval()
        cuda = self.device.type == "cuda"
        x = torch.randn(self.n_eval, 10, 9, device=self.device)
        reps = 20 if self.quick else 100

        @torch.no_grad()
        def per_sample_ms(bs: int, n_calls: int) -> float:
            xb = x[:bs]
            for _ in range(3):
                model(xb)
            return W.timed(lambda: [model(xb) for _ in range(n_calls)], self.device) / n_calls / bs * 1e3

        b32, b1 = per_sample_ms(32, reps), per_sample_ms(1, reps)
        self.add(4, "inference ms/sample, batch 32 vs batch 1", b32, b1, "ms/sample",
                 note=f"batch 1: {b1:.3f} ms per call; ratio = batching gain")

        @torch.no_grad()
        def rate(chunk: int) -> float:
            def go() -> None:
                for i in range(0, len(x), chunk):
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda):
                        model(x[i:i + chunk])
            go()
            return len(x) / W.median([W.timed(go, self.device) for _ in range(2 if self.quick else 3)])

        ours_chunk = eval_chunk(self.device, 8192)
        ours, old = rate(ours_chunk), rate(8192)
        self.shared["eval_rate"] = ours
        self.add(4, f"inference samples/s, chunk {ours_chunk} vs 8192", ours, old, "samples/s",
                 note="the trainer's evaluation chunk on this device vs a fixed 8192")

    # ------------------------------------------------------------------ row 5
    def orchestration(self) -> None:
        """Seconds per no-op task through Prefect on the thread pool and on a LocalCluster."""
        try:
            from benchmarks.orchestration import noop_seconds
        except ImportError as err:
            self.add(5, "orchestration", float("nan"), None, "s/task", note=f"skipped: {err}")
            return
        counts = [45] if self.quick else [45, 450]
        for n, threads_s, cluster_s in noop_seconds(counts):
            self.add(5, f"orchestration, {n} no-op experiments", cluster_s / n, threads_s / n, "s/task",
                     ratio=cluster_s / threads_s,
                     note=f"LocalCluster {cluster_s:.1f} s vs thread pool {threads_s:.1f} s in all "
                          "(ratio = LocalCluster / threads)")

    # ------------------------------------------------------------------ row 6
    def analysis(self) -> None:
        """Full analysis of 45 constructed experiments with the region bootstrap, vs without plots."""
        try:
            from benchmarks.analysis_bench import analysis_seconds
        except ImportError as err:
            self.add(6, "analysis", float("nan"), None, "s", note=f"skipped: {err}")
            return
        n_boot = 1000 if self.quick else 10_000
        full, bare = analysis_seconds(n_boot, rows_per_experiment=2_000 if self.quick else 20_000)
        self.add(6, f"analysis of 45 experiments, bootstrap {n_boot}", full, bare, "s", ratio=full / bare,
                 note=f"with plots {full:.1f} s vs statistics only {bare:.1f} s")

    # ------------------------------------------------------------------ row 7
    def projection(self) -> None:
        """Projected wall time of 45 experiments x STUDY_EPOCHS epochs on full-size data on this device."""
        if "train_rate" not in self.shared:
            self.training()
        if "eval_rate" not in self.shared:
            self.inference()
        counts = self.counts(self.size)
        per_epoch_train = sum(c["train"] for c in counts.values()) * 5
        per_epoch_val = sum(c["val"] for c in counts.values()) * 5
        agg = max(self.shared.get("packing", {1: self.shared["train_rate"]}).values())
        packing_gain = agg / self.shared.get("packing", {1: agg})[1]
        ours = STUDY_EPOCHS * (per_epoch_train / (self.shared["train_rate"] * packing_gain)
                               + per_epoch_val / (self.shared["eval_rate"] * packing_gain))
        ref = STUDY_EPOCHS * (per_epoch_train / self.shared["train_rate_ref"]
                              + per_epoch_val / self.shared["eval_rate"])
        self.shared["study_seconds"] = ours
        self.add(7, f"study projection, 45 x {STUDY_EPOCHS} epochs, {self.size}-size data", ours, ref, "s",
                 note=f"{ours / 3600:.2f} h ours (packing x{packing_gain:.2f}) vs {ref / 3600:.2f} h reference loop; "
                      f"goal {GOAL_STUDY_SECONDS / 60:.0f} min = {ours / GOAL_STUDY_SECONDS:.1f}x goal",
                 goal_seconds=GOAL_STUDY_SECONDS, train_samples_per_epoch_all=per_epoch_train)

    # ------------------------------------------------------------------ row 8
    def grouped(self) -> None:
        """The grouped trainer vs the same K experiments as K solo runs (interleaved), then the study projection."""
        plans = self.group_plans()
        with tempfile.TemporaryDirectory(prefix="everest-group-") as tmp:
            work = Path(tmp)
            tables = self.group_data or work
            warm = {(p.config.model_dump_json(), p.data_size): p for p in plans}
            for p in warm.values():
                G.warm_up(p.config, G.synthetic_data(p.data_size, tables), work)
            for p in plans:
                m = G.compare(p, G.synthetic_data(p.data_size, tables), work)
                self.shared.setdefault("grouped", []).append(m)
                n_solo = len(m["solo_members"])
                solo = f"{p.k} solo run{'s' if p.k > 1 else ''}" if n_solo == p.k else f"solo runs ({n_solo} of {p.k})"
                group_time = "one shared time per group epoch" if m["shared_epoch_seconds"] else \
                    "members' epoch seconds summed (they reported separate times)"
                self.add(8, f"training samples/s, grouped K={p.k} vs {solo} ({p.model} model, {p.data_size} data)",
                         m["grouped_rate"], m["solo_rate"], "samples/s", ratio=m["ratio"],
                         note=f"sum of n_train x epochs / epoch seconds (training + validation forward pass; data "
                              f"preparation, test evaluation and outputs excluded); {m['epochs']} epochs, patience "
                              f"= epochs; {p.reps} repeat(s), order alternated; {group_time}; end to end "
                              f"{m['grouped_wall_s']:.0f} s grouped vs {m['solo_wall_s']:.0f} s solo", grouped=m)
                self.group_projection()
                self.save()

    def group_plans(self) -> list[G.Plan]:
        """Row 8's measurements. On CUDA: the suite's model and data size. On a CPU: ``tiny`` tables with
        ``--quick``, else ``demo``; for K > 9 always ``tiny`` tables, and with ``--quick`` the tiny model."""
        cuda = self.device.type == "cuda"
        size = self.size if cuda or self.size == "tiny" else ("tiny" if self.quick else "demo")
        base = "production" if self.config.model == EverestConfig().model else "custom"
        plans = []
        for i, k in enumerate(self.group_ks):
            cfg, model, data = self.config, base, size
            if k > 9 and not cuda:  # 2 x 45 production-model runs on demo tables: ~15 min on 2 cores
                data = "tiny"
                if self.quick and base == "production":
                    cfg, model = cfg.with_overrides(list(G.TINY_MODEL)), "tiny"
            e = self.group_epochs
            cfg = cfg.with_overrides({"train.epochs": e, "train.early_stopping_patience": e,
                                      "train.device": str(self.device), "train.num_threads": torch.get_num_threads()})
            reps = self.group_reps or (2 if k <= 5 and not cuda else 1)
            plans.append(G.Plan(k, cfg, model, data, reps, self.group_solo_max, ("grouped", "solo")[i % 2]))
        return plans

    def group_projection(self) -> None:
        """45 experiments x STUDY_EPOCHS epochs on full-size data at the best K's grouped and solo rates
        (replacing the projection of the Ks measured before)."""
        measured = self.shared.get("grouped", [])
        if not measured:
            return
        self.rows = [r for r in self.rows if not (r["row"] == 8 and "group_k" in r)]
        best = max([m for m in measured if m["model"] != "tiny"] or measured, key=lambda m: m["grouped_rate"])
        n = sum(c["train"] for c in self.counts("full").values()) * len(DEFAULT_SEEDS)
        ours, solo = STUDY_EPOCHS * n / best["grouped_rate"], STUDY_EPOCHS * n / best["solo_rate"]
        self.add(8, f"study projection, 45 x {STUDY_EPOCHS} epochs, full-size data: grouped K={best['k']} vs solo "
                    "runs", ours, solo, "s",
                 note=f"{ours / 3600:.2f} h grouped vs {solo / 3600:.2f} h solo (one after another) at the "
                      f"K={best['k']} rates ({best['model']} model, {best['data_size']} data, {best['device']}); "
                      f"{n:,} training samples per epoch over the 45 (full size); epoch time includes validation, "
                      "not data preparation or test evaluation; an upper bound: early stopping ends most runs sooner",
                 group_k=best["k"], train_samples_per_epoch_all=n)

    # ------------------------------------------------------------------ row 9
    def layout(self) -> None:
        """How to batch K members: weights written batched vs ``vmap`` over the solo model vs K solo models."""
        from benchmarks.group_layout import layout_rates

        k, batch = 5, 128 if self.quick else 512
        rates = layout_rates(k, batch, self.config.model, self.device, repeats=3 if self.quick else 5)
        note = (f"training pass (forward with dropout, backward) of {k} members x batch {batch}, best of the "
                f"interleaved repeats; {self.device}")
        for other in ("vmap", "solo models"):
            self.add(9, f"group layout, K={k}: batched modules vs {other}", rates["batched modules"], rates[other],
                     "samples/s", note=note, layout=rates)

    # ------------------------------------------------------------------ row 10
    def forecasting(self) -> None:
        """Forecasts from a bundle on the CPU (``everest predict``'s path), ms per forecast of one region and
        target, for 1 and 1,000 regions x 9 targets x 5 members, beside the study's per-sample latency x 5."""
        from benchmarks import forecast_latency as F

        cfg, members = self.config, len(DEFAULT_SEEDS)
        forecaster = F.in_memory_forecaster(cfg, members)
        n_targets = len(forecaster.targets)
        model_ms = F.study_latency_ms(cfg) * members  # the members' network time of one window, batch 32
        for regions in (1, 1000):
            table = F.records(cfg, regions, cfg.model.seq_len)
            call_ms = F.forecast_ms(forecaster, table, repeats=3 if self.quick else 10)
            per = call_ms / (regions * n_targets)
            self.add(10, f"forecast, {regions:,} region(s) x {n_targets} targets x {members} members (CPU)", per,
                     model_ms, "ms/sample", note=f"{call_ms:.1f} ms per call; baseline: the study's latency_ms x "
                     f"{members} members (network only, batch 32); ratio < 1: validation, windows and scaling cost")


WARMUP_STEPS = 5


def measured_peak(device: torch.device) -> float:
    """The device's measured bf16 matmul rate (TFLOP/s)."""
    from everest.training.fast import matmul_peak_tflops

    return matmul_peak_tflops(device)


def study_counts(size: str = "full") -> dict[str, dict[str, int]]:
    """Training and validation samples per epoch of each target on synthetic data of ``size``."""
    from everest.config import all_targets
    from everest.data import synthetic
    from everest.data.tables import LABELS

    split = synthetic.simulate(size, 0)["training"]
    cfg = W.EverestConfig().data
    out = {}
    for t in all_targets():
        label = np.where(split.padding, LABELS["padding"], split.labels[t].astype(np.int8))
        keep = label != LABELS["padding"]
        if t.flare_class == "C" and cfg.c_zero_filter:
            keep &= ~(split.table[list(cfg.features)].to_numpy() == 0).any(axis=1)
        n = int(keep.sum())
        pos = int((label[keep] == 1).sum())
        n_val = int(n * cfg.validation_fraction)
        n_train = n - n_val
        if t.flare_class in cfg.augment_classes:
            n_train += int(pos * (1 - cfg.validation_fraction))  # positives duplicated with noise
        out[str(t)] = {"train": n_train, "val": n_val}
    return out


ROWS: dict[int, Callable[[Suite], None]] = {1: Suite.data_build, 2: Suite.training, 3: Suite.packing,
                                            4: Suite.inference, 5: Suite.orchestration, 6: Suite.analysis,
                                            7: Suite.projection, 8: Suite.grouped, 9: Suite.layout,
                                            10: Suite.forecasting}


def environment(device: torch.device) -> dict[str, Any]:
    """Where the numbers come from: device, CPU, versions, commit (and whether the tree had changes), date."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                                  cwd=Path(__file__).resolve().parent)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = (git("rev-parse", "HEAD") or "").strip() or None
    status = git("status", "--porcelain")
    changed = None if status is None else [ln for ln in status.splitlines() if not ln[3:].startswith(".whl/")]
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "commit": commit,
            "tree_dirty": None if changed is None else bool(changed), "tree_changes": changed,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
            "cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table."""
    def num(v: Any) -> str:
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            return "-"
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"

    head = ("row", "measurement", "ours", "baseline", "ratio", "unit")
    body = [(str(r["row"]), r["name"], num(r["ours"]), num(r["baseline"]),
             (num(r["ratio"]) + "x") if r["ratio"] is not None else "-", r["unit"]) for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in  # noqa: E731
                                   enumerate(zip(cells, widths, strict=True)))
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(b) for b in body)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI-sized run (~10 min on 2 cores, row 8 half of it)")
    p.add_argument("--out", default=os.environ.get("OUT") or None,
                   help="folder for benchmarks.json (default $OUT, else a temporary folder)")
    p.add_argument("--rows", default="1,2,3,4,5,6,7,8,9", help="comma-separated rows to run (default all)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--size", default="full", help="synthetic data size: full (default), demo or tiny")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for the rows (default 1, as each local CPU worker runs: "
                        "row 2 measures 1 vs all cores)")
    p.add_argument("--group-ks", default="1,5,9,45", help="row 8: group sizes K (default 1,5,9,45)")
    p.add_argument("--group-epochs", type=int, default=2, help="row 8: epochs per run (default 2)")
    p.add_argument("--group-reps", type=int, default=None,
                   help="row 8: interleaved repeats per K (default 2 for K <= 5 on a CPU, else 1)")
    p.add_argument("--group-solo-max", type=int, default=None,
                   help="row 8: train at most N of the K experiments solo (the solo rate on a subset; default all)")
    p.add_argument("--group-data", default=None,
                   help="row 8: folder for its synthetic tables, written once as DIR/data-SIZE and kept "
                        "(default: a temporary folder)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="everest-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    wanted = [int(r) for r in args.rows.split(",") if r.strip()]
    suite = Suite(args.quick, device, out, size=args.size)
    suite.group_ks = [int(k) for k in args.group_ks.split(",") if k.strip()]
    suite.group_epochs, suite.group_reps, suite.group_solo_max = args.group_epochs, args.group_reps, args.group_solo_max
    suite.group_data = Path(args.group_data) if args.group_data else None
    errors = suite.errors
    for r in wanted:
        t0 = time.perf_counter()
        try:
            ROWS[r](suite)
        except Exception as err:  # noqa: BLE001 - one broken row must not hide the others; recorded and reported
            errors.append({"row": r, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()})
            suite.add(r, f"row {r} FAILED: {type(err).__name__}", float("nan"), None, "-", note=str(err)[:200])
        print(f"row {r} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        for row in suite.rows:  # each row as soon as it is measured: a run cut short keeps what it had
            if row["row"] == r:
                print(f"  {format_table([row]).splitlines()[-1].strip()}  ({row['note']})", file=sys.stderr, flush=True)
        suite.save()
    print(f"wrote {out / 'benchmarks.json'}")
    env = environment(device)
    print(f"\nEVEREST benchmarks on {env['device_name']} ({env['device']}, {env['cores']} cores, torch {env['torch']})"
          f"{' [quick]' if args.quick else ''}")
    print(format_table(suite.rows))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
