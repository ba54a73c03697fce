"""Does a tuned recipe beat the design's on validation? Tune on synthetic data, then train both recipes.

1. ``python -m flows.tune`` on the ``demo`` tables of one target (the shipped search space with the epoch
   range narrowed to short trials, ``--epochs-range``), judged on region folds of the training file;
2. ``python -m flows.production`` twice on the same target and seeds: the design's recipe at the demo
   budget (``--preset demo``) and the tuned recipe (``--config tuned_config.yaml``), both with baselines;
3. prints the mean validation TSS of each (the split every production run chooses its threshold on) and
   the tuned run's verdict row against the baselines on test (reported, never used to choose anything).

Usage: ``python -m benchmarks.tuning_acceptance --out /tmp/tuning-acceptance [--trials 24 --folds 3]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _run(argv: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"{' '.join(argv[:4])} ... failed with status {proc.returncode}; see {log}")
    return time.perf_counter() - t0


def _validation_tss(out: Path, target: str, seeds: list[int]) -> list[float]:
    cls, horizon = target.split("-")
    return [json.loads((out / "results" / f"everest_{cls}_{horizon}h_seed{s}" / "results.json").read_text())
            ["validation_metrics"]["tss"] for s in seeds]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/tuning-acceptance"))
    p.add_argument("--target", default="M-24")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--epochs-range", nargs=2, type=int, default=[3, 8], metavar=("LOW", "HIGH"))
    args = p.parse_args()
    out, py = args.out, sys.executable
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "training_data_M_24.csv").is_file():
        subprocess.run([py, "-m", "everest", "data", "synth", "--size", "demo", "--out", str(data)], check=True)
    space = yaml.safe_load((ROOT / "deployments" / "tuning" / "search_space.yaml").read_text())
    space["train.epochs"] = {"low": args.epochs_range[0], "high": args.epochs_range[1], "integer": True}
    (out / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    env_home = ["env", f"PREFECT_HOME={out / 'prefect-home'}"]
    tune_s = _run([*env_home, py, "-m", "flows.tune", "--targets", args.target, "--trials", str(args.trials),
                   "--folds", str(args.folds), "--space", str(out / "space.yaml"), "--data-dir", str(data),
                   "--output-dir", str(out / "tune"), "--preset", "demo"], out / "tune.log")
    recipe = out / "tune" / "tuning" / "tuned_config.yaml"
    seeds = [str(s) for s in args.seeds]
    runs = {"design (demo budget)": ["--preset", "demo"], "tuned": ["--config", str(recipe)]}
    scores, seconds = {}, {}
    for i, (name, extra) in enumerate(runs.items()):
        run_out = out / f"production-{i}"
        argv = [*env_home, py, "-m", "flows.production", "--targets", args.target, "--seeds", *seeds,
                "--data-dir", str(data), "--output-dir", str(run_out), *extra]
        seconds[name] = _run(argv, out / f"production-{i}.log")
        scores[name] = _validation_tss(run_out, args.target, args.seeds)
    record = yaml.safe_load(recipe.read_text())["tuning"]
    print(f"tuning: {record['trials']} trials, {record['folds']} folds of {args.target}'s training file, best mean "
          f"validation TSS {record['best_value']:.4f} (trial {record['best_trial']}), {tune_s / 60:.1f} min")
    for name, values in scores.items():
        print(f"{name}: validation TSS {statistics.mean(values):.4f} (seeds {args.seeds}: "
              f"{', '.join(f'{v:.4f}' for v in values)}), {seconds[name] / 60:.1f} min")
    verdict = json.loads((out / "production-1" / "analysis" / "analysis_summary.json").read_text())["verdict_rows"]
    for row in verdict:
        print(f"tuned run, test (reported only): {row['sentence']}")


if __name__ == "__main__":
    main()
