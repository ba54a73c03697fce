"""Keep a training-rule change only if validation says so: the recipe against one change undone, across seeds.

    python benchmarks/recipe_comparison.py --data-dir data/demo --targets C-24 M-24 M5-24 --seeds 0 1 2 --jobs 2

Each variant trains the real trainer (:class:`everest.training.train.ProductionTrainer`, the ``demo`` budget unless
``--preset production``) on the same data, seeds and shared validation split, and is scored on the
**validation** split only, with threshold-free numbers of its best-epoch weights: ROC AUC, the highest
TSS over every threshold, and the log loss and Brier score of the raw probabilities. The test split is
not read here. Variants (``--variants``):

* ``recipe``: the defaults.
* ``no_padding_mask``: ``model.padding_mask=false`` (padding steps enter attention and pooling as data).
* ``design_grid_stopping``: early stopping and best weights on TSS over the design grid 0.10-0.90 with the
  balanced threshold score (the reference rule).
* candidate recipes against overfitting: ``small_model`` (width 64, 2 blocks), ``dropout_0.4``,
  ``weight_decay_0.05``, ``slow_lr`` (learning rate 2e-4 for up to 12 epochs, patience 3),
  ``no_augmentation`` (no noisy copies of M/M5 positives).

Prints one row per (variant, target, seed) and the per-variant means, and the mean difference to
``recipe`` with how many (target, seed) pairs it wins.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/recipe_comparison.py`: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd

VARIANTS: dict[str, tuple[str, ...]] = {
    "recipe": (),
    "no_padding_mask": ("model.padding_mask=false",),
    "design_grid_stopping": ("threshold.grid=design", "threshold.score=balanced"),
    # candidate recipes against overfitting (the model's best epoch is 1-4 on a few thousand windows)
    "small_model": ("model.embed_dim=64", "model.ff_dim=128", "model.num_blocks=2"),
    "dropout_0.4": ("model.dropout=0.4",),
    "weight_decay_0.05": ("train.weight_decay=0.05",),
    "slow_lr": ("train.learning_rate=2e-4", "train.epochs=12", "train.early_stopping_patience=3"),
    "no_augmentation": ("data.augment_copies=0",),
}


def run_one(job: tuple[str, str, int, str, str, str]) -> dict:
    """Train one (variant, target, seed) and score its validation predictions without a threshold."""
    import torch

    from everest.config import Experiment, Target, load_config
    from everest.scoring import metrics as M
    from everest.scoring.calibration import log_loss
    from everest.training.train import ProductionTrainer

    variant, target, seed, data_dir, out, preset = job
    torch.set_num_threads(1)
    cfg = load_config(None, ["train.num_threads=1", *VARIANTS[variant]], preset=preset)
    t = Target.parse(target)
    res = ProductionTrainer(Experiment(target=t, seed=seed), config=cfg, data_dir=data_dir,
                            output_dir=Path(out) / variant).train()
    v = pd.read_csv(Path(out) / variant / "results" / res["experiment"]["name"] / "val_predictions.csv")
    y, p = v["y_true"].to_numpy(), v["y_prob_raw"].to_numpy(float)
    with M.ignore_undefined():
        return {"variant": variant, "target": target, "seed": seed, "val_auc": M.roc_auc(y, p),
                "val_max_tss": M.max_tss(y, p), "val_log_loss": log_loss(y, p), "val_brier": M.brier(y, p),
                "best_epoch": res["training"]["best_epoch"], "epochs": res["training"]["epochs_run"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--targets", nargs="+", default=["C-24", "M-24", "M5-24"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--preset", default="demo", choices=["demo", "production"])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", help="output folder (default: a temporary one)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        jobs = [(v, t, s, args.data_dir, out, args.preset) for v in args.variants for t in args.targets
                for s in args.seeds]
        with ProcessPoolExecutor(args.jobs) as pool:
            df = pd.DataFrame(list(pool.map(run_one, jobs)))
    pd.set_option("display.width", 160)
    print(df.round(4).to_string(index=False))
    metrics = ["val_auc", "val_max_tss", "val_log_loss", "val_brier"]
    print("\nmeans over targets and seeds:")
    print(df.groupby("variant")[metrics + ["best_epoch"]].mean().round(4).to_string())
    if "recipe" in args.variants:
        base = df[df.variant == "recipe"].set_index(["target", "seed"])[metrics]
        print("\nvariant minus recipe (mean; pairs where the variant is better):")
        for v in [x for x in args.variants if x != "recipe"]:
            d = df[df.variant == v].set_index(["target", "seed"])[metrics] - base
            better = {m: int(np.sum(d[m] > 0 if m in ("val_auc", "val_max_tss") else d[m] < 0)) for m in metrics}
            print(f"{v}: " + ", ".join(f"{m} {d[m].mean():+.4f} ({better[m]}/{len(d)})" for m in metrics))


if __name__ == "__main__":
    main()
