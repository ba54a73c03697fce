"""Trained skill against the synthetic generator's Bayes ceiling, one experiment per flare class.

    python benchmarks/skill_vs_ceiling.py [--data-dir data/demo] [--targets C-72 M-24 M5-48] [--seeds 0]
        [--set KEY=VALUE ...] [--jobs N] [--out DIR]

Trains each target and seed (production recipe unless ``--preset demo``; ``--set`` overrides, e.g. to
compare recipes) on synthetic data with truth sidecars and prints, on the same test samples:

* the model's test TSS at its validation-chosen threshold (the reported number) and its best TSS over
  all thresholds (what a perfect threshold would give);
* the ceiling: the generator's true probabilities, at their best threshold (the Bayes ceiling) and at a
  threshold chosen by the same search on the validation rows (the ceiling under the protocol);
* a logistic regression on the last record's features (a simple, strong baseline).

``--jobs N`` trains N experiments at once in separate single-threaded processes.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from everest.config import Experiment, Target, load_config
from everest.data.samples import prepare_experiment
from everest.data.synthetic import generate, load_truth
from everest.data.tables import data_file
from everest.scoring import metrics as M
from everest.training.train import ProductionTrainer


def compare(target: str, seed: int, data_dir: Path, out: Path, preset: str, overrides: tuple[str, ...]) -> dict:
    """Train one experiment and measure it, a baseline and the ceiling on identical samples."""
    from sklearn.linear_model import LogisticRegression

    t = Target.parse(target)
    cfg = load_config(overrides=[*overrides, "train.num_threads=1"], preset=preset)
    res = ProductionTrainer(Experiment(target=t, seed=seed), config=cfg, data_dir=data_dir, output_dir=out).train()
    data = prepare_experiment(data_dir, t, seed, cfg.data, cfg.model.seq_len)
    p_test = load_truth(data_file(data_dir, t, "test"))[data.test.row]
    p_val = load_truth(data_file(data_dir, t, "train"))[data.val.row]
    with M.ignore_undefined():
        protocol_t = M.select_threshold(M.threshold_table(data.val.y, p_val, cfg.threshold), cfg.threshold.score)
        lr = LogisticRegression(max_iter=5000).fit(data.train.x[:, -1, :], data.train.y)
        lr_val, lr_test = (lr.predict_proba(s.x[:, -1, :])[:, 1] for s in (data.val, data.test))
        lr_t = M.select_threshold(M.threshold_table(data.val.y, lr_val, cfg.threshold), cfg.threshold.score)
        table = Path(out) / "results" / res["experiment"]["name"]
        model_best = float(pd.read_csv(table / "threshold_optimization.csv")["test_tss"].max())
        return {
            "target": str(t),
            "seed": seed,
            "model_tss": res["test_metrics"]["tss"],
            "model_best_grid_tss": model_best,
            "model_auc": res["test_metrics"]["roc_auc"],
            "ceiling_tss": M.max_tss(data.test.y, p_test),
            "ceiling_tss_protocol": M.tss(data.test.y, p_test, protocol_t),
            "ceiling_auc": M.roc_auc(data.test.y, p_test),
            "logistic_tss": M.tss(data.test.y, lr_test, lr_t),
            "logistic_auc": M.roc_auc(data.test.y, lr_test),
            "epochs": res["training"]["epochs_run"],
            "best_epoch": res["training"]["best_epoch"],
            "overrides": list(overrides),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data/demo")
    p.add_argument("--targets", nargs="+", default=["C-72", "M-24", "M5-48"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default="output/skill-vs-ceiling")
    p.add_argument("--preset", default="production", choices=["production", "demo"])
    args = p.parse_args(argv)
    data_dir, out = Path(args.data_dir), Path(args.out)
    if not any(data_dir.glob("training_data_*.csv")):
        generate(data_dir, size="demo", seed=0)
    runs = [(t, s, data_dir, out, args.preset, tuple(args.overrides)) for t in args.targets for s in args.seeds]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(compare, *zip(*runs, strict=True)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "skill_vs_ceiling.json").write_text(json.dumps(rows, indent=2))
    cols = ["target", "seed", "model_tss", "model_best_grid_tss", "ceiling_tss", "ceiling_tss_protocol",
            "logistic_tss", "model_auc", "ceiling_auc", "logistic_auc", "epochs", "best_epoch"]
    print(" ".join(f"{c:>12.12}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>12.3f}" if isinstance(r[c], float) else f"{r[c]!s:>12}" for c in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
