"""The seed ensemble: the mean of a target's seeds' raw probabilities, scored as a forecast of its own.

The members of an experiment share one validation split (``data.split_seed``; the seed controls
initialisation, batch order, dropout and augmentation only), so the ensemble's calibration map and threshold
are fitted, by :func:`everest.scoring.forecast.score_forecast`, on validation regions none of its members trained
on. Members that were validated on different samples (``data.split_seed = None``) are refused: their
validation predictions cannot be averaged without leaking training regions into the ensemble's validation.

Only members of one identity (config hash, code version, data files) are averaged: the identity most
finished seeds share; others are listed as excluded. Results go to ``<output>/ensemble/results/`` with
EVEREST's prediction files (``everest_M_24h_ensemble/{ensemble.json, predictions.csv, val_predictions.csv, ...}``;
``ensemble.json`` has the ``results.json`` schema, named apart because an ensemble is no experiment)
and are rebuilt only when their members change. Command line: ``everest ensemble --output-dir output``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from everest import io
from everest.config import EverestConfig, Experiment, Target, all_targets
from everest.errors import DataError
from everest.results import RESULTS_FILE, experiment_dir
from everest.scoring.forecast import Predictions, final_metrics_row, score_forecast, write_forecast

log = logging.getLogger(__name__)

ENSEMBLE_FOLDER = "ensemble"
ENSEMBLE_VERSION = "ensemble-1"
ENSEMBLE_FILE = "ensemble.json"  # written last: its presence marks the ensemble built


class EnsembleError(DataError):
    """The members' result files cannot form an ensemble; the message names the members and the reason."""


def ensemble_root(output_dir: str | Path) -> Path:
    """``<output>/ensemble``: a results root (``results/<name>/``) like EVEREST's and the baselines'."""
    return Path(output_dir) / ENSEMBLE_FOLDER


def ensemble_name(target: Target) -> str:
    """Folder and experiment name of a target's ensemble, e.g. ``everest_M5_72h_ensemble``."""
    return f"everest_{target.flare_class}_{target.horizon}h_ensemble"


def _members(results_dir: Path, target: Target,
             folders: list[Path] | None = None) -> list[tuple[int, Path, dict[str, Any]]]:
    """Finished seeds of ``target`` (under ``results_dir``, or the ``folders`` given): (seed, folder, results)."""
    found = []
    prefix = Experiment(target=target, seed=0).name[: -len("0")]
    for folder in sorted(folders if folders is not None else results_dir.glob(f"{prefix}*")):
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


def _identity_key(res: dict[str, Any]) -> str:
    p = res.get("provenance", {})
    return json.dumps([p.get("config_hash"), p.get("code_version"), p.get("data_hashes")], sort_keys=True)


def _read(path: Path) -> Predictions:
    if not path.is_file():
        raise EnsembleError(f"{path} is missing: the member was written by an older version or by another tool; "
                            "retrain it to include it in the ensemble")
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


def build_ensemble(results_dir: str | Path, target: Target | str, output_dir: str | Path, force: bool = False,
                   members: list[Path] | None = None) -> dict[str, Any]:
    """Average the finished seeds of ``target`` in ``results_dir``, score and save; return ``ensemble.json``.

    ``members`` names the member folders (the analysis passes the seeds it analyses); by default every
    finished seed found. Needs at least two members of one identity, validated and tested on the same samples.
    """
    target = Target.parse(target)
    members = _members(Path(results_dir), target, members)
    if not members:
        raise EnsembleError(f"{target}: no finished seed under {results_dir}")
    counts = Counter(_identity_key(r) for _, _, r in members)
    key = max(counts, key=lambda k: (counts[k], k))
    used = [m for m in members if _identity_key(m[2]) == key]
    excluded = [m[1].name for m in members if _identity_key(m[2]) != key]
    if len(used) < 2:
        raise EnsembleError(f"{target}: {len(used)} finished seed(s) of one configuration under {results_dir}; an "
                            "ensemble needs at least two")
    names = [folder.name for _, folder, _ in used]
    provenance = used[0][2]["provenance"]
    # A member retrained under the same identity (--force, a rerun after a crash) rewrites its files: hash them.
    content = [hashlib.sha256(b"".join((f / name).read_bytes() for name in (RESULTS_FILE, "val_predictions.csv",
                                                                           "predictions.csv")
                                       if (f / name).is_file())).hexdigest() for _, f, _ in used]
    identity = hashlib.sha256(json.dumps([ENSEMBLE_VERSION, key, names, content]).encode()).hexdigest()[:16]
    folder = experiment_dir(ensemble_root(output_dir), ensemble_name(target))
    done = folder / ENSEMBLE_FILE
    if not force and done.is_file():
        old = json.loads(done.read_text())
        if old.get("provenance", {}).get("ensemble_identity") == identity:
            return old

    vals = [_read(f / "val_predictions.csv") for _, f, _ in used]
    tests = [_read(f / "predictions.csv") for _, f, _ in used]
    _same_samples(vals, names, "validation")
    _same_samples(tests, names, "test")

    def mean_of(parts: list[Predictions]) -> Predictions:
        p = parts[0]
        return Predictions(p.y, np.mean([q.prob for q in parts], axis=0), p.region, p.row, p.time)

    val, test = mean_of(vals), mean_of(tests)
    cfg = EverestConfig.model_validate(used[0][2]["config"])
    scored = score_forecast(val, test, cfg)
    results = {
        "model": "ensemble",
        "experiment": {"name": ensemble_name(target), "flare_class": target.flare_class,
                       "horizon_hours": target.horizon, "target": str(target), "seed": None, "model": "ensemble",
                       "members": [s for s, _, _ in used]},
        **scored.sections,
        "members": [{"name": f.name, "seed": s, "test_tss": r["test_metrics"]["tss"],
                     "validation_tss": r["validation_metrics"]["tss"], "test_brier": r["test_metrics"]["brier"],
                     "test_brier_raw": r["test_metrics"].get("brier_raw", r["test_metrics"]["brier"])}
                    for s, f, r in used],
        "excluded": excluded,
        "data": {k: v for k, v in used[0][2].get("data", {}).items() if k != "scaler"},
        "config": used[0][2]["config"],
        "provenance": {"config_hash": provenance.get("config_hash"), "code_version": provenance.get("code_version"),
                       "data_hashes": provenance.get("data_hashes"), "ensemble_version": ENSEMBLE_VERSION,
                       "ensemble_identity": identity, "members_dir": str(results_dir)},
    }
    write_forecast(folder, scored, val, test, final_metrics_row(results, model="ensemble"))
    io.write_json(done, results)  # last: its presence marks the ensemble built
    log.info("%s: ensemble of %d seeds, test TSS %.3f, Brier %.4f", target, len(used),
             results["test_metrics"]["tss"], results["test_metrics"]["brier"])
    return results


def build_ensembles(results_dir: str | Path, output_dir: str | Path, targets: list[Target] | None = None,
                    members: dict[Target, list[Path]] | None = None) -> dict[str, dict[str, Any] | str]:
    """Build every target's ensemble that can be built: results by target, or the reason it was not.

    ``members`` maps a target to its member folders (default: every finished seed found).
    """
    out: dict[str, dict[str, Any] | str] = {}
    for t in targets or all_targets():
        try:
            out[str(t)] = build_ensemble(results_dir, t, output_dir,
                                         members=None if members is None else members.get(t, []))
        except EnsembleError as err:
            out[str(t)] = str(err)
        except (ValueError, KeyError) as err:  # a member's files of an older layout: say so, build the others
            out[str(t)] = f"cannot read the members' results ({type(err).__name__}: {err})"
    return out
