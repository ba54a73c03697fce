"""Find and read what a results root holds: finished, failed, missing and unexpected experiments.

A results root holds one folder per experiment (``everest_M5_72h_seed0``, the layout of :mod:`everest.train`).
A folder with ``results.json`` is finished (``results.json`` is written last); one with only ``failure.json``
failed (the orchestrator writes it); an expected experiment with neither is missing. Partial results are
normal: everything found is read, nothing is dropped, and the gaps are listed.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from everest.config import ConfigError, Experiment, Target, all_targets, experiment_matrix

log = logging.getLogger(__name__)

EXPERIMENT_DIR = re.compile(r"everest_(C|M5|M)_(24|48|72)h_seed(\d+)")
PREDICTION_COLUMNS = ("y_true", "y_prob", "y_pred", "noaa_ar")
MixedPolicy = Literal["raise", "warn"]


class AnalysisError(ValueError):
    """The results cannot be analysed as asked; the message says what was found and what to do."""


class MixedResultsError(AnalysisError):
    """One target holds results of different configurations or data files (see ``on_mixed``)."""


@dataclass(frozen=True)
class ExperimentResult:
    """One finished experiment: its ``results.json`` plus the test predictions and threshold sweep."""

    name: str
    target: Target
    seed: int
    path: Path
    results: dict[str, Any]
    predictions: pd.DataFrame | None
    threshold_table: pd.DataFrame | None
    expected: bool = True
    notes: tuple[str, ...] = ()

    @property
    def config_hash(self) -> str:
        """Hash of the effective configuration that produced this result ('unknown' if not recorded)."""
        return str(self.results.get("provenance", {}).get("config_hash", "unknown"))

    @property
    def data_hashes(self) -> dict[str, str]:
        """sha256 of each data file the experiment read."""
        return dict(self.results.get("provenance", {}).get("data_hashes", {}) or {})

    @property
    def test_metrics(self) -> dict[str, float]:
        """Test metrics at the validation-chosen (published-protocol) threshold."""
        return dict(self.results.get("test_metrics", {}))

    @property
    def history(self) -> pd.DataFrame:
        """Per-epoch training history (empty frame if none was recorded)."""
        return pd.DataFrame(self.results.get("history", []) or [])


@dataclass(frozen=True)
class FailedExperiment:
    """An experiment whose folder holds ``failure.json`` (or an unreadable ``results.json``)."""

    name: str
    target: str
    seed: int | None
    error_type: str
    error: str
    time: str
    path: Path
    expected: bool = True


@dataclass
class ResultSet:
    """Everything found under one results root, sorted into finished, failed, missing and unexpected."""

    root: Path
    expected: list[Experiment]
    completed: list[ExperimentResult]
    failed: list[FailedExperiment]
    missing: list[Experiment]
    mixed: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # target -> provenance key -> names

    @property
    def analysed(self) -> list[ExperimentResult]:
        """Finished experiments inside the expected set: the ones the statistics cover."""
        return [r for r in self.completed if r.expected]

    @property
    def unexpected(self) -> list[ExperimentResult]:
        """Finished experiments outside the expected set: listed in the report, not in the statistics."""
        return [r for r in self.completed if not r.expected]

    def by_target(self) -> dict[Target, list[ExperimentResult]]:
        """Analysed experiments grouped by target (array-job order), seeds ascending."""
        out: dict[Target, list[ExperimentResult]] = {}
        for t in all_targets():
            runs = sorted((r for r in self.analysed if r.target == t), key=lambda r: r.seed)
            if runs:
                out[t] = runs
        return out

    def select(self, config_hash: str) -> ResultSet:
        """The subset produced by one configuration (e.g. to compare two configs found in one tree)."""
        keep = [r for r in self.completed if r.config_hash == config_hash]
        return ResultSet(self.root, self.expected, keep, self.failed, self.missing, {})


def expected_experiments(targets: Sequence[str | Target] | None = None,
                         seeds: Sequence[int] | None = None) -> list[Experiment]:
    """The experiments a complete run holds: every (target, seed) pair; default 9 targets x seeds 0-4."""
    return experiment_matrix(list(targets) if targets is not None else None,
                             list(seeds) if seeds is not None else None)


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


def _identify(folder: Path, info: dict[str, Any]) -> tuple[Target, int] | None:
    """(target, seed) from the JSON content, falling back to the folder name."""
    try:
        if "target" in info and "seed" in info:
            return Target.parse(str(info["target"])), int(info["seed"])
    except (ConfigError, TypeError, ValueError):
        pass
    m = EXPERIMENT_DIR.fullmatch(folder.name)
    if m:
        return Target(flare_class=m.group(1), horizon=int(m.group(2))), int(m.group(3))
    return None


def _read_predictions(folder: Path) -> tuple[pd.DataFrame | None, list[str]]:
    path = folder / "predictions.csv"
    if not path.is_file():
        return None, ["predictions.csv missing: no bootstrap, curves or calibration for this experiment"]
    head = pd.read_csv(path, nrows=0).columns
    cols = [c for c in PREDICTION_COLUMNS if c in head]
    pred = pd.read_csv(path, usecols=cols)
    notes = []
    if not {"y_true", "y_prob"} <= set(cols):
        return None, ["predictions.csv lacks y_true/y_prob: not usable"]
    if "noaa_ar" not in cols:
        notes.append("predictions.csv has no noaa_ar column: bootstrap resamples contiguous blocks of rows")
    return pred, notes


def load_experiment(folder: str | Path, expected: bool = True) -> ExperimentResult:
    """Read one finished experiment folder (``results.json`` required; other files optional)."""
    folder = Path(folder)
    res = _read_json(folder / "results.json")
    ident = _identify(folder, res.get("experiment", {}))
    if ident is None:
        raise AnalysisError(f"{folder}: cannot tell target and seed from results.json or the folder name")
    pred, notes = _read_predictions(folder)
    thr_path = folder / "threshold_optimization.csv"
    thr = pd.read_csv(thr_path) if thr_path.is_file() else None
    if (folder / "failure.json").is_file():
        notes.append("also holds a failure.json from an earlier attempt; results.json (written last) wins")
    name = res.get("experiment", {}).get("name") or Experiment(target=ident[0], seed=ident[1]).name
    return ExperimentResult(name=name, target=ident[0], seed=ident[1], path=folder, results=res, predictions=pred,
                            threshold_table=thr, expected=expected, notes=tuple(notes))


def _failure(folder: Path, expected_names: set[str]) -> FailedExperiment:
    try:
        info = _read_json(folder / "failure.json")
    except (OSError, ValueError) as err:
        info = {"error_type": "UnreadableFailure", "error": f"failure.json unreadable: {err}"}
    ident = _identify(folder, info)
    target, seed = (str(ident[0]), ident[1]) if ident else (str(info.get("target", "?")), info.get("seed"))
    name = str(info.get("experiment") or folder.name)
    return FailedExperiment(name=name, target=target, seed=seed, error_type=str(info.get("error_type", "?")),
                            error=str(info.get("error", "")), time=str(info.get("time", "")), path=folder,
                            expected=name in expected_names)


def _mixed_provenance(runs: list[ExperimentResult]) -> dict[str, list[str]]:
    """Groups of experiment names per distinct config hash / data hashes, when a target has more than one."""
    out: dict[str, list[str]] = {}
    by_config: dict[str, list[str]] = {}
    by_data: dict[str, list[str]] = {}
    for r in runs:
        by_config.setdefault(f"config {r.config_hash}", []).append(r.name)
        key = ", ".join(f"{k}={v[:12]}" for k, v in sorted(r.data_hashes.items())) or "unknown"
        by_data.setdefault(f"data {key}", []).append(r.name)
    for groups in (by_config, by_data):
        if len(groups) > 1:
            out.update(groups)
    return out


def load_results(results_dir: str | Path, targets: Sequence[str | Target] | None = None,
                 seeds: Sequence[int] | None = None, on_mixed: MixedPolicy = "raise") -> ResultSet:
    """Scan a results root and sort its experiments into finished, failed, missing and unexpected.

    ``on_mixed`` decides what happens when one target holds results of different config hashes or data
    files (e.g. a seed rerun after a config change): ``"raise"`` (default) stops with
    :class:`MixedResultsError` listing them, because averaging them would describe no configuration;
    ``"warn"`` analyses them anyway and the report lists the groups at the top.
    Raises :class:`AnalysisError` if ``results_dir`` is not a directory.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise AnalysisError(f"results_dir {str(root)!r} is not a directory; give the folder holding the "
                            "everest_<class>_<horizon>h_seed<k> experiment folders (e.g. output/results)")
    if on_mixed not in ("raise", "warn"):
        raise ConfigError(f"on_mixed must be 'raise' or 'warn', got {on_mixed!r}")
    expected = expected_experiments(targets, seeds)
    expected_names = {e.name for e in expected}
    completed: list[ExperimentResult] = []
    failed: list[FailedExperiment] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if (folder / "results.json").is_file():
            try:
                probe = load_experiment(folder, expected=True)
            except (OSError, ValueError, KeyError) as err:
                failed.append(FailedExperiment(name=folder.name, target="?", seed=None,
                                               error_type="UnreadableResults", error=f"results.json: {err}",
                                               time="", path=folder, expected=folder.name in expected_names))
                continue
            exp = Experiment(target=probe.target, seed=probe.seed)
            is_expected = exp.name in expected_names
            completed.append(probe if is_expected else _replace_expected(probe, False))
        elif (folder / "failure.json").is_file():
            failed.append(_failure(folder, expected_names))
    done = {Experiment(target=r.target, seed=r.seed).name for r in completed} | {f.name for f in failed}
    missing = [e for e in expected if e.name not in done]
    order = {e.name: i for i, e in enumerate(expected)}
    completed.sort(key=lambda r: (not r.expected, order.get(r.name, len(order)), r.name))
    failed.sort(key=lambda f: (not f.expected, order.get(f.name, len(order)), f.name))
    rs = ResultSet(root=root, expected=expected, completed=completed, failed=failed, missing=missing)
    for target, runs in rs.by_target().items():
        groups = _mixed_provenance(runs)
        if groups:
            rs.mixed[str(target)] = groups
    if rs.mixed and on_mixed == "raise":
        lines = "; ".join(f"{t}: " + " | ".join(f"{k}: {', '.join(v)}" for k, v in g.items())
                          for t, g in rs.mixed.items())
        raise MixedResultsError(
            f"results under {root} mix configurations or data files within a target ({lines}). Averaging them "
            "would describe no single configuration: move the stale folders away, rerun them, or pass "
            "on_mixed='warn' (CLI --allow-mixed) to analyse anyway with a warning in the report")
    return rs


def _replace_expected(r: ExperimentResult, expected: bool) -> ExperimentResult:
    return ExperimentResult(r.name, r.target, r.seed, r.path, r.results, r.predictions, r.threshold_table,
                            expected, r.notes)


def resampling_units(pred: pd.DataFrame, block_rows: int = 120) -> tuple[np.ndarray, str]:
    """The bootstrap unit of every test row: its active region, else contiguous blocks of ``block_rows`` rows."""
    if "noaa_ar" in pred.columns:
        return pred["noaa_ar"].to_numpy(), "region"
    return np.arange(len(pred)) // block_rows, f"block of {block_rows} rows"
