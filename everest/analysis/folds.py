"""One verdict over cross-validation folds: each fold's verdict as its analysis wrote it, then the folds' test
predictions pooled.

Each fold is a complete output root (EVEREST's results, the baselines, the seed ensemble and the analysis'
``verdict.csv``) whose test regions no other fold tests on, so pooling the folds' test predictions gives every
region of the source one out-of-fold forecast, each made with its own fold's validation-chosen threshold. The
pooled comparison is the analysis' own paired test (:func:`everest.analysis.stats.compare_paired`: region
bootstrap interval, region permutation p), with the best baseline of each fold chosen on that fold's validation
TSS, as the fold's verdict chose it.

``python -m everest.analysis.folds OUT_0 OUT_1 ... --out DIR --target M-24`` writes ``folds.csv``,
``pooled.csv``, ``pooled_comparison.csv`` and ``cross_fold_report.md`` to ``DIR``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from everest import io
from everest.analysis import stats as st
from everest.analysis.analyzer import BASELINES_FOLDER
from everest.analysis.loading import AnalysisError, ExperimentResult, load_results
from everest.analysis.report import fmt, table
from everest.config import Target
from everest.results import experiment_dir, verdict_file
from everest.scoring import metrics as M
from everest.scoring.ensemble import ensemble_name, ensemble_root

ENSEMBLE = "ensemble"
EVEREST = "everest"
BEST = "best baseline"
FOLD_COLUMNS = ("everest_seeds", "everest_tss", "ensemble_tss", "best_baseline", "best_baseline_tss", "delta",
                "ci_low", "ci_high", "verdict", "everest_brier", "ensemble_brier", "best_baseline_brier", "n_units")
CALIBRATION_COLUMNS = ("calibration", "brier_raw", "ece_raw", "ece")  # of the ensemble, from the fold's ensemble.csv


def fold_table(folds: Sequence[Path], target: Target) -> pd.DataFrame:
    """One row per fold: the verdict its analysis wrote for ``target``."""
    rows = []
    for fold in folds:
        path = verdict_file(fold)
        if not path.is_file():
            raise AnalysisError(f"{fold}: no {path.relative_to(fold)}; analyse the fold first (python -m "
                                "everest.analysis --results-dir FOLD/results)")
        verdict = pd.read_csv(path)
        row = verdict[verdict["target"] == str(target)]
        if row.empty:
            raise AnalysisError(f"{path}: no verdict for {target} (it holds {', '.join(verdict['target'])})")
        ensemble = pd.read_csv(path.parent / "ensemble.csv") if (path.parent / "ensemble.csv").is_file() else None
        calibration = ({} if ensemble is None or ensemble[ensemble["target"] == str(target)].empty else
                       ensemble[ensemble["target"] == str(target)].iloc[0][list(CALIBRATION_COLUMNS)].to_dict())
        rows.append({"fold": fold.name, **{c: row.iloc[0][c] for c in FOLD_COLUMNS},
                     **{f"ensemble_{c}": calibration.get(c, np.nan) for c in CALIBRATION_COLUMNS}})
    return pd.DataFrame(rows)


def _predictions(runs: list[ExperimentResult], what: str, fold: Path) -> dict[int, pd.DataFrame]:
    out = {r.seed: r.predictions for r in runs if r.predictions is not None}
    if not out:
        raise AnalysisError(f"{fold}: no finished {what} with test predictions")
    return out


def fold_predictions(fold: Path, target: Target, seeds: Sequence[int] | None,
                     best: str) -> dict[str, dict[int, pd.DataFrame]]:
    """A fold's test predictions by model (everest, the fold's best baseline, the ensemble, and every other
    baseline with predictions), by seed; the one ensemble is listed under each of the best baseline's seeds, with
    which the fold's analysis pairs it."""
    found = load_results(fold / "results", [target], seeds).by_target().get(target, [])
    models = {EVEREST: _predictions(found, "EVEREST seed", fold)}
    baselines = {}
    for root in sorted((fold / BASELINES_FOLDER).glob("*/results")):
        runs = load_results(root, [target], seeds).by_target().get(target, [])
        if got := {r.seed: r.predictions for r in runs if r.predictions is not None}:
            baselines[root.parent.name] = got
    if best not in baselines:
        raise AnalysisError(f"{fold}: its verdict's best baseline {best!r} has no test predictions under "
                            f"{BASELINES_FOLDER}/{best}/results")
    models[BEST] = baselines[best]
    ensemble = experiment_dir(ensemble_root(fold), ensemble_name(target)) / "predictions.csv"
    if not ensemble.is_file():
        raise AnalysisError(f"{fold}: no seed ensemble predictions ({ensemble}); run everest ensemble first")
    models[ENSEMBLE] = dict.fromkeys(models[BEST], pd.read_csv(ensemble))
    return {**models, **baselines}


def pool(folds: Sequence[Path], target: Target, seeds: Sequence[int] | None,
         best: Sequence[str]) -> dict[str, dict[int, pd.DataFrame]]:
    """Every model's test predictions of all folds, concatenated per seed (the seeds every fold has); regions must
    not repeat across folds. A baseline some fold lacks is left out."""
    per_fold = [fold_predictions(f, target, seeds, b) for f, b in zip(folds, best, strict=True)]
    owner: dict[int, int] = {}
    for i, models in enumerate(per_fold):
        for region in np.unique(next(iter(models[EVEREST].values()))["noaa_ar"]):
            if (j := owner.setdefault(int(region), i)) != i:
                raise AnalysisError(f"region {int(region)} is tested in both {folds[j]} and {folds[i]}: the folds "
                                    "are not region-disjoint, so their predictions cannot be pooled")
    pooled: dict[str, dict[int, pd.DataFrame]] = {}
    for name in per_fold[0]:
        common = set.intersection(*(set(m.get(name, {})) for m in per_fold))
        if not common and name in (EVEREST, BEST):
            held = "; ".join(f"{f.name}: {sorted(m[name])}" for f, m in zip(folds, per_fold, strict=True))
            raise AnalysisError(f"no seed of {name} is finished in every fold ({held}); pooling needs the same seeds")
        if common:
            pooled[name] = {s: pd.concat([m[name][s] for m in per_fold], ignore_index=True) for s in sorted(common)}
    if not set(pooled[EVEREST]) & set(pooled[BEST]):
        raise AnalysisError(f"EVEREST's seeds {sorted(pooled[EVEREST])} and the best baseline's "
                            f"{sorted(pooled[BEST])} share none: no paired comparison")
    return pooled


def _scores(pred: pd.DataFrame) -> dict[str, float]:
    y, p = pred["y_true"].to_numpy(), pred["y_prob"].to_numpy()
    with M.ignore_undefined():
        return {"tss": M.tss(y, pred["y_pred"].to_numpy(), 0.5), "roc_auc": M.roc_auc(y, p), "brier": M.brier(y, p)}


def pooled_table(pooled: dict[str, dict[int, pd.DataFrame]]) -> pd.DataFrame:
    """Per model: TSS (each fold's own threshold), ROC AUC and Brier of the pooled predictions, seed mean and sd."""
    rows = []
    for name, by_seed in pooled.items():
        if name == ENSEMBLE:
            by_seed = dict(list(by_seed.items())[:1])  # one ensemble, listed under every seed for pairing
        scores = pd.DataFrame([_scores(p) for p in by_seed.values()])
        first = next(iter(by_seed.values()))
        row = {"model": name, "seeds": len(by_seed), "samples": len(first), "positives": int(first["y_true"].sum()),
               "regions": int(first["noaa_ar"].nunique())}
        for m in scores.columns:
            row[m] = float(scores[m].mean())
            row[f"{m}_sd"] = float(scores[m].std(ddof=1)) if len(scores) > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _units(pred: pd.DataFrame) -> st.UnitStats:
    return st.unit_statistics(pred["y_true"], pred["y_pred"], pred["y_prob"], pred["noaa_ar"].to_numpy())


def pooled_comparisons(pooled: dict[str, dict[int, pd.DataFrame]], n_boot: int, seed: int,
                       confidence: float) -> pd.DataFrame:
    """EVEREST (seed mean) and its ensemble minus the best baseline on the pooled predictions: TSS and Brier,
    paired on regions and seeds."""
    base = {s: _units(p) for s, p in pooled[BEST].items()}
    rows = []
    for i, (name, metric) in enumerate([(EVEREST, "tss"), (ENSEMBLE, "tss"), (EVEREST, "brier"), (ENSEMBLE, "brier")]):
        cand = {s: _units(p) for s, p in pooled[name].items()}
        got = st.compare_paired(base, cand, n_boot, np.random.default_rng([seed, i]), metric, confidence)
        rows.append({"candidate": name, "metric": metric, **got})
    out = pd.DataFrame(rows)
    out["p_holm"] = np.nan
    for idx in out.groupby("metric").groups.values():
        out.loc[idx, "p_holm"] = st.holm(out.loc[idx, "p_value"].to_numpy())
    alpha = 1 - confidence
    better = np.where(out["metric"] == "brier", out["ci_high"] < 0, out["ci_low"] > 0)
    worse = np.where(out["metric"] == "brier", out["ci_low"] > 0, out["ci_high"] < 0)
    significant = out["p_holm"] < alpha
    out["verdict"] = np.where(better & significant, "beats", np.where(worse & significant, "trails", "ties"))
    return out


def render(target: Target, folds: pd.DataFrame, pooled: pd.DataFrame, cmp: pd.DataFrame, confidence: float) -> str:
    """The cross-fold verdict as Markdown: the per-fold verdicts, the pooled scores, the pooled comparisons."""
    pct = f"{confidence * 100:g} %"
    out = [f"# {target}: EVEREST against the baselines over {len(folds)} region-disjoint folds\n",
           "## Per fold (each fold's own analysis)\n",
           "ΔTSS is EVEREST's seed mean minus the best baseline (chosen on the fold's validation TSS), with its "
           f"{pct} paired region-bootstrap interval.\n",
           table(["fold", "EVEREST", "ensemble", "best baseline", "ΔTSS", "interval", "verdict", "regions"],
                 [[r.fold, fmt(r.everest_tss), fmt(r.ensemble_tss), f"{r.best_baseline} {fmt(r.best_baseline_tss)}",
                   fmt(r.delta), f"[{fmt(r.ci_low)}, {fmt(r.ci_high)}]", r.verdict, fmt(r.n_units, 0)]
                  for r in folds.itertuples()]), "",
           "Brier scores, and the ensemble's calibration: its map fitted on the fold's validation regions, with "
           "the Brier score and the expected calibration error (ECE) before (raw) and after it.\n",
           table(["fold", "EVEREST Brier", "best baseline Brier", "ensemble Brier (raw)", "ensemble ECE (raw)",
                  "calibration"],
                 [[r.fold, fmt(r.everest_brier, 4), fmt(r.best_baseline_brier, 4),
                   f"{fmt(r.ensemble_brier, 4)} ({fmt(r.ensemble_brier_raw, 4)})",
                   f"{fmt(r.ensemble_ece, 4)} ({fmt(r.ensemble_ece_raw, 4)})", r.ensemble_calibration]
                  for r in folds.itertuples()]), "",
           "## Pooled over the folds\n",
           "Every test region once, forecast by the models of the fold that held it out; TSS at each fold's own "
           "threshold; mean ± sd over seeds.\n",
           table(["model", "seeds", "TSS", "ROC AUC", "Brier", "samples", "positives", "regions"],
                 [[r.model, r.seeds, _pm(r.tss, r.tss_sd), _pm(r.roc_auc, r.roc_auc_sd), _pm(r.brier, r.brier_sd, 4),
                   r.samples, r.positives, r.regions] for r in pooled.itertuples()]), "",
           f"Candidate minus best baseline, paired on regions and seeds ({pct} region-bootstrap interval, "
           "region-permutation p; Holm over the two candidates within each metric, TSS and Brier being two "
           "questions; for Brier lower is better):\n",
           table(["candidate", "metric", "difference", "interval", "p (Holm)", "verdict", "regions"],
                 [[r.candidate, r.metric, fmt(r.delta, 4), f"[{fmt(r.ci_low, 4)}, {fmt(r.ci_high, 4)}]",
                   fmt(r.p_holm, 4), r.verdict, r.n_units] for r in cmp.itertuples()]), ""]
    return "\n".join(out)


def _pm(mean: float, sd: float, nd: int = 3) -> str:
    return fmt(mean, nd) if not np.isfinite(sd) else f"{fmt(mean, nd)} ± {fmt(sd, nd)}"


def cross_fold_verdict(folds: Sequence[str | Path], out: str | Path, target: str | Target = "M-24",
                       seeds: Sequence[int] | None = None, n_boot: int = 10_000, seed: int = 0,
                       confidence: float = 0.95) -> Path:
    """Write the cross-fold verdict of ``target`` to ``out``; returns the report's path."""
    target, folds, out = Target.parse(target), [Path(f) for f in folds], Path(out)
    if len(folds) < 2:
        raise AnalysisError(f"{len(folds)} fold(s) given; a cross-fold verdict needs at least two")
    per_fold = fold_table(folds, target)
    pooled = pool(folds, target, seeds, list(per_fold["best_baseline"]))
    scores = pooled_table(pooled)
    cmp = pooled_comparisons(pooled, n_boot, seed, confidence)
    io.write_csv(out / "folds.csv", per_fold)
    io.write_csv(out / "pooled.csv", scores)
    io.write_csv(out / "pooled_comparison.csv", cmp)
    return io.write_text(out / "cross_fold_report.md", render(target, per_fold, scores, cmp, confidence))


def main(argv: list[str] | None = None) -> int:
    from everest.cli import run_guarded
    from everest.errors import DataError

    p = argparse.ArgumentParser(prog="python -m everest.analysis.folds", description=__doc__.split("\n\n")[0])
    p.add_argument("folds", nargs="+", help="the folds' output roots (each with results/, baselines/, ensemble/ "
                   "and analysis/)")
    p.add_argument("--out", required=True, help="folder for the cross-fold verdict")
    p.add_argument("--target", default="M-24", help="target, e.g. M-24 (default)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: every finished seed)")
    p.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    args = p.parse_args(argv)

    def run() -> None:
        try:
            path = cross_fold_verdict(args.folds, args.out, args.target, args.seeds, args.bootstrap, args.seed)
        except AnalysisError as err:
            raise DataError(str(err)) from None
        print(path.read_text())

    return run_guarded(run)


if __name__ == "__main__":
    sys.exit(main())
