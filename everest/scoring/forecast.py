"""From a model's validation and test probabilities to the reported forecast, the same way for every model.

EVEREST, the simple baselines and the seed ensemble all pass through :func:`score_forecast`: a calibration
map (``calibration.method``) is fitted on the validation split and gives the forecast probabilities
(``y_prob``; Brier score, ECE, reliability), and the decision threshold is searched on the validation split
(``threshold``). The search runs on the model's raw scores, where the calibration map cannot merge
distinct values (a steep map saturates at 0 and 1 in floating point); the threshold is reported on both
scales, and for a strictly increasing map deciding ``y_prob_raw >= selected_raw`` is deciding
``y_prob >= selected``. Ranking metrics (ROC AUC) are those of the raw scores. The test split informs
nothing; its best threshold is recorded only as a labelled optimistic reference.
:func:`write_forecast` writes the files every model's results folder holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from everest import io
from everest.config import EverestConfig
from everest.data.samples import SampleSet
from everest.scoring import metrics as M
from everest.scoring.calibration import Calibrator, fit_calibrator

ORACLE_NOTE = ("'oracle_test' is the threshold of the highest test TSS over all thresholds, i.e. tuned on the "
               "test set: an optimistic reference, never a result. Decisions are y_prob_raw >= selected_raw.")


@dataclass(frozen=True)
class Predictions:
    """One split's forecasts: labels, the model's raw probabilities and the keys of each sample."""

    y: np.ndarray  # (N,) 0/1
    prob: np.ndarray  # (N,) raw model probability
    region: np.ndarray  # (N,) NOAA active region
    row: np.ndarray  # (N,) data-row index in its file
    time: np.ndarray  # (N,) datetime64[s]
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. evidential uncertainties

    @classmethod
    def of(cls, samples: SampleSet, prob: np.ndarray, **extra: np.ndarray) -> Predictions:
        """Predictions for the samples of a :class:`SampleSet`."""
        return cls(samples.y, np.asarray(prob, np.float64), samples.region, samples.row, samples.time, extra)

    @classmethod
    def read(cls, path: str | Path) -> Predictions:
        """Read a predictions file written by :func:`write_forecast` (raw probabilities in ``y_prob_raw``)."""
        df = pd.read_csv(path)
        missing = [c for c in ("y_true", "y_prob_raw", "noaa_ar", "row", "time") if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; expected a predictions file of this version")
        return cls(df["y_true"].to_numpy(np.int8), df["y_prob_raw"].to_numpy(np.float64),
                   df["noaa_ar"].to_numpy(np.int64), df["row"].to_numpy(np.int64),
                   pd.to_datetime(df["time"]).to_numpy().astype("datetime64[s]"))

    def frame(self, prob: np.ndarray, raw_threshold: float) -> pd.DataFrame:
        """The predictions table: label, calibrated and raw probability, decision, sample keys."""
        df = pd.DataFrame({"y_true": self.y, "y_prob": prob, "y_prob_raw": self.prob,
                           "y_pred": (self.prob >= raw_threshold).astype(np.int8), "noaa_ar": self.region,
                           "row": self.row, "time": pd.to_datetime(self.time).strftime("%Y-%m-%dT%H:%M:%S")})
        for k, v in self.extra.items():
            df[k] = v
        return df


@dataclass(frozen=True)
class ScoredForecast:
    """A calibrated, thresholded forecast and its scores; ``sections`` go into ``results.json`` as they are."""

    calibrator: Calibrator
    val_prob: np.ndarray  # calibrated
    test_prob: np.ndarray  # calibrated
    val_table: pd.DataFrame  # threshold sweep on validation (the search, raw scale) ...
    test_table: pd.DataFrame  # ... and on test at the same thresholds (reported, never used)
    sections: dict[str, Any]
    sweep_points: int  # rows of the sweep a results folder shows (threshold.points)

    @property
    def threshold(self) -> float:
        """The decision threshold on the calibrated scale (``y_prob``)."""
        return float(self.sections["threshold"]["selected"])

    @property
    def raw_threshold(self) -> float:
        """The decision threshold on the model's raw scores."""
        return float(self.sections["threshold"]["selected_raw"])


def _scores(y: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, raw_threshold: float) -> dict[str, float]:
    """Threshold metrics of the decisions ``raw >= raw_threshold``, ROC AUC of the raw scores, Brier and ECE of
    the calibrated probabilities (and of the raw ones, ``*_raw``)."""
    out = M.evaluate(y, raw, raw_threshold)
    out.update(brier=M.brier(y, calibrated), ece=M.ece(y, calibrated), brier_raw=out["brier"], ece_raw=out["ece"])
    return out


def score_forecast(val: Predictions, test: Predictions, cfg: EverestConfig) -> ScoredForecast:
    """Calibrate and choose the threshold on ``val``, then score ``test`` (see the module docstring)."""
    th = cfg.threshold
    with M.ignore_undefined():
        cal = fit_calibrator(val.y, val.prob, cfg.calibration.method)
        pv, pt = cal.apply(val.prob), cal.apply(test.prob)
        grid = M.threshold_grid(th, val.y, val.prob)
        val_table = M.threshold_table(val.y, val.prob, th, grid)
        test_table = M.threshold_table(test.y, test.prob, th, grid)
        val_raw = M.select_threshold(val_table, th.score)
        oracle_raw = M.best_threshold(test.y, test.prob)
        chosen_raw = val_raw if th.source == "validation" else oracle_raw
        on_scale = {k: float(cal.apply(np.array([v]))[0]) for k, v in
                    (("selected", chosen_raw), ("validation", val_raw), ("oracle_test", oracle_raw))}
        # The validation grid spans every positive's score, so no better TSS lies beyond its ends;
        # only the fixed design grid can cut the search short.
        edge = th.grid == "design" and M.at_grid_edge(val_table, val_raw)
        test_metrics = _scores(test.y, test.prob, pt, chosen_raw)
        sections = {
            "threshold": {"source": th.source, "grid": th.grid, "score": th.score, **on_scale,
                          "selected_raw": chosen_raw, "validation_raw": val_raw, "oracle_test_raw": oracle_raw,
                          "at_grid_edge": edge, "grid_points": len(grid), "grid_min": float(grid.min()),
                          "grid_max": float(grid.max()), "note": ORACLE_NOTE},
            "calibration": {**cal.to_dict(),
                            **{k: {m: s[m] for m in ("brier_raw", "brier", "ece_raw", "ece")}
                               for k, s in (("validation", _scores(val.y, val.prob, pv, chosen_raw)),
                                            ("test", test_metrics))}},
            "test_metrics": test_metrics,
            "validation_metrics": _scores(val.y, val.prob, pv, chosen_raw),
            "oracle_test_metrics": _scores(test.y, test.prob, pt, oracle_raw),
            "confusion_matrix": {k: int(test_metrics[k]) for k in ("tp", "fp", "tn", "fn")},
        }
    return ScoredForecast(cal, pv, pt, val_table, test_table, sections, th.points)


def final_metrics_row(results: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The one-row ``final_metrics.csv`` of a results folder."""
    e, th = results["experiment"], results["threshold"]
    return {"experiment": e["name"], "target": e["target"], "seed": e.get("seed"), **extra,
            "threshold": th["selected"], "threshold_raw": th["selected_raw"], "threshold_source": th["source"],
            "threshold_at_grid_edge": th["at_grid_edge"], **results["test_metrics"],
            "oracle_threshold": th["oracle_test"], "oracle_max_tss": results["oracle_test_metrics"]["tss"],
            "config_hash": results["provenance"]["config_hash"]}


def write_forecast(folder: Path, scored: ScoredForecast, val: Predictions, test: Predictions,
                   final: dict[str, Any]) -> None:
    """Write the threshold sweep (``threshold.points`` of the raw thresholds searched, with the chosen one,
    and their calibrated values), test and validation predictions and the final-metrics row into ``folder``."""
    rows = M.thin_sweep(scored.val_table, scored.sweep_points, scored.raw_threshold)
    sweep = [t.iloc[rows].set_index("threshold").add_prefix(f"{k}_") for k, t in (("val", scored.val_table),
                                                                                  ("test", scored.test_table))]
    sweep_table = pd.concat(sweep, axis=1).reset_index()
    sweep_table.insert(1, "threshold_calibrated", scored.calibrator.apply(sweep_table["threshold"].to_numpy()))
    io.write_csv(folder / "threshold_optimization.csv", sweep_table)
    io.write_csv(folder / "predictions.csv", test.frame(scored.test_prob, scored.raw_threshold))
    io.write_csv(folder / "val_predictions.csv", val.frame(scored.val_prob, scored.raw_threshold))
    io.write_csv(folder / "final_metrics.csv", pd.DataFrame([final]))
