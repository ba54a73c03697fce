"""Find and read what a results root holds: finished, stale, failed, missing and unexpected experiments.

A results root holds one folder per experiment (``everest_M5_72h_seed0``, the layout of :mod:`everest.results`,
which also decides a folder's status): a folder with ``failure.json`` failed (its latest attempt), one with
``results.json`` finished; an expected experiment with neither is missing. A finished result whose identity
(config hash, code version, data files) is not the run's is stale: listed, kept out of the statistics.
Partial results are normal: everything found is read, nothing is dropped, and the gaps are listed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from everest import results as R
from everest.config import ConfigError, Experiment, Target, all_targets, experiment_matrix

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("y_true", "y_prob", "y_pred", "noaa_ar")


class AnalysisError(ValueError):
    """The results cannot be analysed as asked; the message says what was found and what to do."""


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
    def code_version(self) -> str:
        """Version of the code that produced this result ('unknown' if not recorded: older code)."""
        return str(self.results.get("provenance", {}).get("code_version", "unknown"))

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
    """An experiment whose folder holds ``failure.json`` (or an unreadable ``results.json``).

    A ``failure.json`` means the latest attempt failed, even beside an older ``results.json``.
    """

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
    """Everything found under one results root, sorted into finished, stale, failed, missing and unexpected."""

    root: Path
    expected: list[Experiment]
    completed: list[ExperimentResult]
    failed: list[FailedExperiment]
    missing: list[Experiment]
    stale: dict[str, str] = field(default_factory=dict)  # experiment name -> why it is not the run's result

    @property
    def analysed(self) -> list[ExperimentResult]:
        """Current finished experiments inside the expected set: the ones the statistics cover."""
        return [r for r in self.completed if r.expected and r.name not in self.stale]

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
        return ResultSet(self.root, self.expected, keep, self.failed, self.missing,
                         _stale_reasons([r for r in keep if r.expected]))


def expected_experiments(targets: Sequence[str | Target] | None = None,
                         seeds: Sequence[int] | None = None) -> list[Experiment]:
    """The experiments a complete run holds: every (target, seed) pair; default 9 targets x seeds 0-4."""
    return experiment_matrix(list(targets) if targets is not None else None,
                             list(seeds) if seeds is not None else None)


def _identify(folder: Path, info: dict[str, Any]) -> tuple[Target, int] | None:
    """(target, seed) from the JSON content, falling back to the folder name."""
    try:
        if "target" in info and "seed" in info:
            return Target.parse(str(info["target"])), int(info["seed"])
    except (ConfigError, TypeError, ValueError):
        pass
    try:
        exp = R.experiment_from_name(folder.name)
    except ConfigError:
        return None
    return exp.target, exp.seed


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
    res = R.read_results(folder)
    ident = _identify(folder, res.get("experiment", {}))
    if ident is None:
        raise AnalysisError(f"{folder}: cannot tell target and seed from results.json or the folder name")
    pred, notes = _read_predictions(folder)
    thr_path = folder / "threshold_optimization.csv"
    thr = pd.read_csv(thr_path) if thr_path.is_file() else None
    name = res.get("experiment", {}).get("name") or Experiment(target=ident[0], seed=ident[1]).name
    return ExperimentResult(name=name, target=ident[0], seed=ident[1], path=folder, results=res, predictions=pred,
                            threshold_table=thr, expected=expected, notes=tuple(notes))


def _failure(folder: Path, expected_names: set[str]) -> FailedExperiment:
    try:
        info = R.read_failure(folder)
    except (OSError, ValueError) as err:
        info = {"error_type": "UnreadableFailure", "error": f"failure.json unreadable: {err}"}
    ident = _identify(folder, info)
    target, seed = (str(ident[0]), ident[1]) if ident else (str(info.get("target", "?")), info.get("seed"))
    name = str(info.get("experiment") or folder.name)
    return FailedExperiment(name=name, target=target, seed=seed, error_type=str(info.get("error_type", "?")),
                            error=str(info.get("error", "")), time=str(info.get("time", "")), path=folder,
                            expected=name in expected_names)


def _written(r: ExperimentResult) -> float:
    try:
        return (r.path / R.RESULTS_FILE).stat().st_mtime
    except OSError:
        return 0.0


def _majority(runs: list[ExperimentResult], key: Callable[[ExperimentResult], Any]) -> Any:
    """The ``key`` most runs share; a tie goes to the group with the newest ``results.json`` (a partial
    retrain writes the newest results)."""
    groups: dict[Any, list[ExperimentResult]] = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    return max(groups, key=lambda k: (len(groups[k]), max(_written(r) for r in groups[k])))


def _data_key(r: ExperimentResult) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(r.data_hashes.items()))


def _stale_reasons(runs: list[ExperimentResult]) -> dict[str, str]:
    """Why each stale run is stale: its config hash or code version is not the run's (the one most results
    share), or it read other data files than most current results of its target."""
    if not runs:
        return {}
    config, code = _majority(runs, lambda r: (r.config_hash, r.code_version))
    out: dict[str, str] = {}
    for r in runs:
        why = [f"config {r.config_hash} (the run's: {config})"] if r.config_hash != config else []
        why += [f"code version {r.code_version} (the run's: {code})"] if r.code_version != code else []
        if why:
            out[r.name] = "; ".join(why)
    current = [r for r in runs if r.name not in out]
    for target in dict.fromkeys(r.target for r in current):
        same = [r for r in current if r.target == target]
        data = dict(_majority(same, _data_key))
        for r in same:
            differ = sorted(f for f in data.keys() | r.data_hashes.keys() if data.get(f) != r.data_hashes.get(f))
            if differ:
                out[r.name] = f"data files {', '.join(differ)} differ from the other seeds of {target}"
    return out


def load_results(results_dir: str | Path, targets: Sequence[str | Target] | None = None,
                 seeds: Sequence[int] | None = None) -> ResultSet:
    """Scan a results root and sort its experiments into finished, stale, failed, missing and unexpected.

    Results of another config hash, code version or data files than the run's (e.g. seeds left over from
    before a partial retrain) are stale: :attr:`ResultSet.stale` says why, and the statistics leave them out,
    because averaging them would describe no single configuration.
    Raises :class:`AnalysisError` if ``results_dir`` is not a directory.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise AnalysisError(f"results_dir {str(root)!r} is not a directory; give the folder holding the "
                            "everest_<class>_<horizon>h_seed<k> experiment folders (e.g. output/results)")
    expected = expected_experiments(targets, seeds)
    expected_names = {e.name for e in expected}
    completed: list[ExperimentResult] = []
    failed: list[FailedExperiment] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        state = R.status(folder)
        if state == "failed":
            failed.append(_failure(folder, expected_names))
        elif state == "finished":
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
    done = {Experiment(target=r.target, seed=r.seed).name for r in completed} | {f.name for f in failed}
    missing = [e for e in expected if e.name not in done]
    order = {e.name: i for i, e in enumerate(expected)}
    completed.sort(key=lambda r: (not r.expected, order.get(r.name, len(order)), r.name))
    failed.sort(key=lambda f: (not f.expected, order.get(f.name, len(order)), f.name))
    return ResultSet(root=root, expected=expected, completed=completed, failed=failed, missing=missing,
                     stale=_stale_reasons([r for r in completed if r.expected]))


def _replace_expected(r: ExperimentResult, expected: bool) -> ExperimentResult:
    return ExperimentResult(r.name, r.target, r.seed, r.path, r.results, r.predictions, r.threshold_table,
                            expected, r.notes)


def resampling_units(pred: pd.DataFrame, block_rows: int = 120) -> tuple[np.ndarray, str]:
    """The bootstrap unit of every test row: its active region, else contiguous blocks of ``block_rows`` rows."""
    if "noaa_ar" in pred.columns:
        return pred["noaa_ar"].to_numpy(), "region"
    return np.arange(len(pred)) // block_rows, f"block of {block_rows} rows"
