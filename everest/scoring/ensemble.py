"""The seed ensemble: the mean of a target's seeds' raw probabilities, scored as a forecast of its own.

The members of an experiment share one validation split (``data.split_seed``; the seed controls
initialisation, batch order, dropout and augmentation only), so the ensemble's calibration map and threshold
are fitted, by :func:`everest.scoring.forecast.score_forecast`, on validation regions none of its members trained
on. Members that were validated on different samples (``data.split_seed = None``) are refused: their
validation predictions cannot be averaged without leaking training regions into the ensemble's validation.

A target's ensemble averages its finished seeds of one identity (config hash, code version, data files): the
identity most finished seeds share; others are listed as excluded. Results go to ``<output>/ensemble/results/``
with EVEREST's prediction files (``everest_M_24h_ensemble/{ensemble.json, predictions.csv, val_predictions.csv,
...}``); ``ensemble.json`` is a ``results.json`` (:func:`everest.results.results_record`) named apart because an
ensemble is no experiment. Its identity is an :class:`everest.results.EnsembleIdentity`, so it is rebuilt only
when its members change, and :func:`everest.results.finished` says whether it is current.

Building is a step of its own, before the analysis: :func:`build_ensembles` (the command line: ``everest
ensemble --output-dir output``; the batch analysis job and the flow run it first). The analysis only reads
(:func:`read_ensembles`), and says why a target has no ensemble, e.g. that it was not built.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from everest.config import EverestConfig, Experiment, Target, all_targets
from everest.errors import DataError
from everest.results import (
    ENSEMBLE_FILE,
    RESULTS_FILE,
    EnsembleIdentity,
    Identity,
    ensemble_identity_for,
    experiment_dir,
    finished,
    results_record,
    write_results,
)
from everest.scoring.forecast import Predictions, final_metrics_row, score_forecast, write_forecast

log = logging.getLogger(__name__)

ENSEMBLE_FOLDER = "ensemble"
# Bump when an ensemble's results change (averaging, outputs): every ensemble is then rebuilt.
ENSEMBLE_VERSION = "ensemble-1"
SPLIT_FILES = {"validation": "val_predictions.csv", "test": "predictions.csv"}  # a member's predictions


class EnsembleError(DataError):
    """The members' result files cannot form an ensemble; the message names the members and the reason."""


def ensemble_root(output_dir: str | Path) -> Path:
    """``<output>/ensemble``: a results root (``results/<name>/``) like EVEREST's and the baselines'."""
    return Path(output_dir) / ENSEMBLE_FOLDER


def ensemble_name(target: Target) -> str:
    """Folder and experiment name of a target's ensemble, e.g. ``everest_M5_72h_ensemble``."""
    return f"everest_{target.flare_class}_{target.horizon}h_ensemble"


@dataclass(frozen=True)
class EnsemblePlan:
    """What a target's ensemble averages, found without writing anything: the members used (seed, folder,
    results, ascending seeds), the finished seeds left out (another identity) and the ensemble's identity."""

    target: Target
    used: list[tuple[int, Path, dict[str, Any]]]
    excluded: list[str]
    identity: EnsembleIdentity

    @property
    def names(self) -> list[str]:
        """The members' folder names, in seed order."""
        return [folder.name for _, folder, _ in self.used]


def _members(results_dir: Path, target: Target) -> list[tuple[int, Path, dict[str, Any]]]:
    """Finished seeds of ``target`` under ``results_dir``: (seed, folder, results), ascending seeds."""
    found = []
    prefix = Experiment(target=target, seed=0).name[: -len("0")]
    for folder in sorted(results_dir.glob(f"{prefix}*")):
        seed_text = folder.name[len(prefix):]
        if seed_text.isdigit() and (folder / RESULTS_FILE).is_file():
            try:
                res = json.loads((folder / RESULTS_FILE).read_text())
            except (OSError, ValueError):  # unreadable: the analysis lists it as failed
                continue
            if res.get("model", "everest") != "everest":
                raise EnsembleError(f"{folder} holds {res['model']!r} results: the seed ensemble is EVEREST's")
            found.append((int(seed_text), folder, res))
    return sorted(found, key=lambda m: m[0])


def _content_digest(folder: Path) -> str:
    """sha256 of a member's results and predictions: a member retrained under the same identity (--force, a rerun
    after a crash) rewrites them."""
    names = (RESULTS_FILE, SPLIT_FILES["validation"], SPLIT_FILES["test"])
    return hashlib.sha256(b"".join((folder / n).read_bytes() for n in names if (folder / n).is_file())).hexdigest()


def plan_ensemble(results_dir: str | Path, target: Target | str) -> EnsemblePlan:
    """Find the members of ``target``'s ensemble under ``results_dir`` and its identity; reads, never writes.

    Needs at least two finished seeds of one identity, each with its validation and test predictions
    (:class:`EnsembleError` otherwise, naming the members and the reason).
    """
    target = Target.parse(target)
    members = _members(Path(results_dir), target)
    if not members:
        raise EnsembleError(f"{target}: no finished seed under {results_dir}")
    ids = {folder: Identity.of_results(res) for _, folder, res in members}
    counts = Counter(i.run_key() for i in ids.values() if i is not None)
    key = max(counts, key=lambda k: (counts[k], k)) if counts else None
    used = [m for m in members if ids[m[1]] is not None and ids[m[1]].run_key() == key]
    excluded = [m[1].name for m in members if m not in used]
    if len(used) < 2:
        raise EnsembleError(f"{target}: {len(used)} finished seed(s) of one configuration under {results_dir}; an "
                            "ensemble needs at least two")
    for split in ("validation", "test"):
        for _, folder, _ in used:
            if not (folder / SPLIT_FILES[split]).is_file():
                raise EnsembleError(f"{folder / SPLIT_FILES[split]} is missing: the member was written by an older "
                                    "version or by another tool; retrain it to include it in the ensemble")
    contents = {folder.name: _content_digest(folder) for _, folder, _ in used}
    identity = ensemble_identity_for(ensemble_name(target), ids[used[0][1]], ENSEMBLE_VERSION, contents)
    return EnsemblePlan(target, used, excluded, identity)


def _read(path: Path) -> Predictions:
    try:
        return Predictions.read(path)
    except ValueError as err:
        raise EnsembleError(str(err)) from err


def _same_samples(parts: list[Predictions], names: list[str], split: str) -> None:
    first = parts[0]
    for name, p in zip(names[1:], parts[1:], strict=True):
        if not (np.array_equal(p.region, first.region) and np.array_equal(p.row, first.row)
                and np.array_equal(p.y, first.y)):
            hint = (" (each seed drew its own validation split: data.split_seed is None; set it, e.g. to 0, and "
                    "retrain)") if split == "validation" else ""
            raise EnsembleError(f"{names[0]} and {name} hold different {split} samples{hint}; "
                                "an ensemble averages forecasts of the same samples")


def _mean_forecasts(plan: EnsemblePlan) -> tuple[Predictions, Predictions]:
    """The members' mean validation and test forecasts (EnsembleError if they cover different samples)."""
    means = []
    for split in ("validation", "test"):
        parts = [_read(folder / SPLIT_FILES[split]) for _, folder, _ in plan.used]
        _same_samples(parts, plan.names, split)
        p = parts[0]
        means.append(Predictions(p.y, np.mean([q.prob for q in parts], axis=0), p.region, p.row, p.time))
    return means[0], means[1]


def build_ensemble(results_dir: str | Path, target: Target | str, output_dir: str | Path,
                   force: bool = False) -> dict[str, Any]:
    """Average the finished seeds of ``target`` in ``results_dir``, score and save; return ``ensemble.json``.

    An ensemble already built from the same members (:func:`everest.results.finished`) is returned as it is
    unless ``force``. Needs at least two members of one identity, validated and tested on the same samples.
    """
    plan = plan_ensemble(results_dir, target)
    target, root = plan.target, ensemble_root(output_dir)
    done = None if force else finished(root, plan.identity)
    if done is not None:
        return done
    val, test = _mean_forecasts(plan)
    first = plan.used[0][2]
    scored = score_forecast(val, test, EverestConfig.model_validate(first["config"]))
    sections = {
        **scored.sections,
        "members": [{"name": f.name, "seed": s, "test_tss": r["test_metrics"]["tss"],
                     "validation_tss": r["validation_metrics"]["tss"], "test_brier": r["test_metrics"]["brier"],
                     "test_brier_raw": r["test_metrics"].get("brier_raw", r["test_metrics"]["brier"])}
                    for s, f, r in plan.used],
        "excluded": plan.excluded,
        "data": {k: v for k, v in first.get("data", {}).items() if k != "scaler"},
        "config": first["config"],
    }
    results = results_record(plan.identity, "ensemble", target, None, sections, {"members_dir": str(results_dir)},
                             members=[s for s, _, _ in plan.used])
    write_forecast(experiment_dir(root, plan.identity.experiment), scored, val, test,
                   final_metrics_row(results, model="ensemble"))
    write_results(root, plan.identity, results)  # last: its presence marks the ensemble built
    log.info("%s: ensemble of %d seeds, test TSS %.3f, Brier %.4f", target, len(plan.used),
             results["test_metrics"]["tss"], results["test_metrics"]["brier"])
    return results


def build_ensembles(results_dir: str | Path, output_dir: str | Path,
                    targets: list[Target] | None = None) -> dict[str, dict[str, Any] | str]:
    """Build every target's ensemble that can be built: results by target, or the reason it was not.

    The step before the analysis (which only reads them): ``targets`` defaults to all nine.
    """
    out: dict[str, dict[str, Any] | str] = {}
    for t in targets or all_targets():
        try:
            out[str(t)] = build_ensemble(results_dir, t, output_dir)
        except EnsembleError as err:
            out[str(t)] = str(err)
        except (ValueError, KeyError) as err:  # a member's files of an older layout: say so, build the others
            out[str(t)] = _unreadable(err)
    return out


def read_ensembles(results_dir: str | Path, output_dir: str | Path,
                   targets: list[Target] | None = None) -> dict[str, dict[str, Any] | str]:
    """Each target's built ensemble (its ``ensemble.json``) if it is current for the finished seeds under
    ``results_dir``, else the reason there is none: it cannot be built (the reason :func:`build_ensembles`
    would give), was not built, or was built from members that changed since. Reads, never writes: what the
    analysis reports."""
    out: dict[str, dict[str, Any] | str] = {}
    for t in targets or all_targets():
        try:
            plan = plan_ensemble(results_dir, t)
            done = finished(ensemble_root(output_dir), plan.identity)
            if done is None:
                _mean_forecasts(plan)  # raises the reason it cannot be built, if there is one
            out[str(t)] = done if done is not None else _not_built(plan, results_dir, output_dir)
        except EnsembleError as err:
            out[str(t)] = str(err)
        except (ValueError, KeyError) as err:
            out[str(t)] = _unreadable(err)
    return out


def _not_built(plan: EnsemblePlan, results_dir: str | Path, output_dir: str | Path) -> str:
    command = f"everest ensemble --output-dir {output_dir}"
    if Path(results_dir).resolve() != (Path(output_dir) / "results").resolve():
        command += f" --results-dir {results_dir}"
    if (experiment_dir(ensemble_root(output_dir), plan.identity.experiment) / ENSEMBLE_FILE).is_file():
        return (f"out of date: its members' results changed since it was built (now seeds "
                f"{[s for s, _, _ in plan.used]}); rebuild it with `{command}` before the analysis")
    return f"not built: `{command}` builds it before the analysis"


def _unreadable(err: Exception) -> str:
    return f"cannot read the members' results ({type(err).__name__}: {err})"
