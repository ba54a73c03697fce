"""Which calibration map to ship: out-of-fold scores of each method on the validation split only.

For every finished experiment under the given results roots (EVEREST's and the baselines' share a layout),
the raw validation probabilities (``val_predictions.csv``) are split into region-disjoint folds; each method
of :mod:`everest.scoring.calibration` is fitted on the other folds and scored on the held-out one. The test split is
never read. Prints one row per experiment and method, then the mean per model and method and how often
each method had the lowest out-of-fold Brier score.

    python benchmarks/calibration_methods.py output/results output/baselines/logistic/results
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from everest.scoring.calibration import METHODS, choose_method, compare_methods


def measure(roots: list[Path], folds: int) -> pd.DataFrame:
    rows = []
    for root in roots:
        model = root.parent.name if root.parent.parent.name == "baselines" else "everest"
        for f in sorted(root.glob("everest_*/val_predictions.csv")):
            v = pd.read_csv(f)
            table = compare_methods(v["y_true"], v["y_prob_raw"], v["noaa_ar"], METHODS, folds=folds)
            best = choose_method(table)
            for r in table.to_dict("records"):
                rows.append({"model": model, "experiment": f.parent.name, **r, "best": r["method"] == best})
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", nargs="+", type=Path, help="results roots (folders of everest_* experiment folders)")
    p.add_argument("--folds", type=int, default=5)
    args = p.parse_args()
    df = measure(args.roots, args.folds)
    if df.empty:
        raise SystemExit(f"no val_predictions.csv under {[str(r) for r in args.roots]}")
    pd.set_option("display.width", 160)
    summary = df.groupby(["model", "method"]).agg(experiments=("experiment", "nunique"), brier=("brier", "mean"),
                                                   log_loss=("log_loss", "mean"), ece=("ece", "mean"),
                                                   lowest_brier=("best", "sum"))
    print(summary.round(5).to_string())


if __name__ == "__main__":
    main()
