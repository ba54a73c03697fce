"""Experiment identity and the results on disk: one owner of "is it finished" and of the failure record.

The trainer, the Prefect flow (cache key and cache validation), ``cluster/`` and the analysis loader all
decide through this module. Layout under an output root::

    results/<name>/results.json    finished; written last; its provenance records the identity
    results/<name>/failure.json    the latest attempt failed; never beside results.json
    results/<name>/model/          weights, scaler, config, model card (trained_models/<name> links here)
    results/.superseded/<name>/<UTC time>/   earlier results moved aside by a retrain or a failure
    checkpoints/<name>.pt          the running attempt's checkpoint

An experiment's result is reused only when the identity it records (experiment, config hash, data file
hashes, code version) equals the identity of the run asking for it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from everest import io
from everest.config import ConfigError, EverestConfig, Experiment, Target

log = logging.getLogger(__name__)

# Bump when the code's results change (a fix to training, evaluation or the results layout): finished
# results and checkpoints of another version are then retrained, and the flow's cache keys change.
CODE_VERSION = "everest-3"

RESULTS_FILE = "results.json"
FAILURE_FILE = "failure.json"
SUPERSEDED_DIR = ".superseded"  # under results/; holds no results.json of its own, so the analysis skips it
EXPERIMENT_NAME = re.compile(r"everest_(C|M5|M)_(24|48|72)h_seed(\d+)")
MAX_ERROR_CHARS = 2000

Status = Literal["finished", "failed", "none"]


class Identity(BaseModel):
    """What makes a finished result reusable: the same experiment, configuration, data files and code.

    ``key()`` is the Prefect cache key; ``provenance()`` is what ``results.json`` records of it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    experiment: str  # e.g. everest_M5_72h_seed0
    config_hash: str  # EverestConfig.config_hash()
    data_hashes: dict[str, str]  # data file name -> sha256 of its content
    code_version: str  # CODE_VERSION of the code that produced (or would produce) the result

    def key(self) -> str:
        """Stable string naming this identity: ``<experiment>-<config hash>-<data digest>-<code version>``."""
        data = hashlib.sha256(json.dumps(self.data_hashes, sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.experiment}-{self.config_hash}-{data}-{self.code_version}"

    def provenance(self) -> dict[str, Any]:
        """The fields ``results.json`` records under ``provenance`` (the experiment is recorded by name)."""
        return {"config_hash": self.config_hash, "data_hashes": dict(self.data_hashes),
                "code_version": self.code_version}

    @classmethod
    def of_results(cls, results: Mapping[str, Any]) -> Identity | None:
        """The identity a ``results.json`` content records; None if it records none (older code) or a bad one."""
        prov = results.get("provenance") or {}
        try:
            return cls(experiment=(results.get("experiment") or {}).get("name"), config_hash=prov.get("config_hash"),
                       data_hashes=prov.get("data_hashes"), code_version=prov.get("code_version"))
        except (ValidationError, AttributeError):
            return None


def identity_for(experiment: Experiment, config: EverestConfig, data_hashes: Mapping[str, str]) -> Identity:
    """The identity of ``experiment`` trained with ``config`` on files with these content hashes, by this code.

    ``data_hashes`` maps each data file name to its sha256 (``prepare_experiment(...).file_hashes``, or the
    flow's per-target hashes of the training and testing CSV).
    """
    return Identity(experiment=experiment.name, config_hash=config.config_hash(), data_hashes=dict(data_hashes),
                    code_version=CODE_VERSION)


# ---------------------------------------------------------------------- layout
def experiment_dir(output_dir: str | Path, name: str) -> Path:
    """``<output_dir>/results/<name>``: everything about one experiment."""
    return Path(output_dir) / "results" / name


def experiment_dirs(output_dir: str | Path, experiment: Experiment) -> tuple[Path, Path, Path]:
    """(results dir, model dir, checkpoint file) of one experiment.

    The model files live with the results (``results/<name>/model/``), so one folder holds everything
    about an experiment; ``trained_models/<name>`` (the design document's path) links to them.
    """
    results = experiment_dir(output_dir, experiment.name)
    return results, results / "model", Path(output_dir) / "checkpoints" / f"{experiment.name}.pt"


def link_trained_model(output_dir: str | Path, experiment: Experiment, model_dir: Path) -> Path:
    """Point ``trained_models/<name>`` at the model folder (a relative symlink, replaced atomically);
    where the file system has no symlinks, copy the folder instead."""
    link = _trained_model_link(output_dir, experiment.name)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.path.relpath(model_dir, link.parent), target_is_directory=True)
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)
        shutil.copytree(model_dir, link, dirs_exist_ok=True)
    return link


def _trained_model_link(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / "trained_models" / name


def experiment_from_name(name: str) -> Experiment:
    """Inverse of ``Experiment.name``: ``everest_M5_72h_seed0`` -> M5-72 seed 0 (ConfigError otherwise)."""
    m = EXPERIMENT_NAME.fullmatch(name)
    if not m:
        raise ConfigError(f"invalid experiment name {name!r}: expected everest_<C|M|M5>_<24|48|72>h_seed<k>, "
                          "e.g. everest_M5_72h_seed0")
    return Experiment(target=Target(flare_class=m.group(1), horizon=int(m.group(2))), seed=int(m.group(3)))


# ---------------------------------------------------------------------- reading
def status(folder: str | Path) -> Status:
    """What an experiment folder says: ``failed`` if it holds ``failure.json`` (whatever else it holds: the
    latest attempt failed), ``finished`` if it holds ``results.json``, else ``none``."""
    folder = Path(folder)
    if (folder / FAILURE_FILE).is_file():
        return "failed"
    return "finished" if (folder / RESULTS_FILE).is_file() else "none"


def read_results(folder: str | Path) -> dict[str, Any]:
    """The ``results.json`` of an experiment folder (OSError or ValueError if absent or unreadable)."""
    return _read_object(Path(folder) / RESULTS_FILE)


def read_failure(folder: str | Path) -> dict[str, Any]:
    """The ``failure.json`` of an experiment folder (OSError or ValueError if absent or unreadable)."""
    return _read_object(Path(folder) / FAILURE_FILE)


def _read_object(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def finished(output_dir: str | Path, identity: Identity) -> dict[str, Any] | None:
    """The ``results.json`` content if this identity's experiment finished and its results are on disk;
    None if they are absent (e.g. deleted), unreadable, from another identity, or the last attempt failed.

    Use it to skip finished work and to validate a cache hit before trusting it.
    """
    folder = experiment_dir(output_dir, identity.experiment)
    if status(folder) != "finished":
        return None
    try:
        res = read_results(folder)
    except (OSError, ValueError) as err:
        log.warning("%s: unreadable %s (%s); not finished", identity.experiment, folder / RESULTS_FILE, err)
        return None
    return res if Identity.of_results(res) == identity else None


def _failure_identity(folder: Path) -> Identity | None:
    try:
        recorded = read_failure(folder).get("identity")
        return Identity.model_validate(recorded) if recorded else None
    except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
        return None


# ---------------------------------------------------------------------- writing
def begin_attempt(output_dir: str | Path, identity: Identity, *, force: bool = False) -> Path | None:
    """Prepare the experiment folder for a (re)training of ``identity``; call it before training starts.

    Results of another identity (or any results, with ``force``), and a failure recorded for another
    identity, are moved to ``results/.superseded/<name>/<UTC time>/``, so a retrain that then fails can
    never leave them looking current. A failure of this identity (or of an unknown one) stays until the
    attempt succeeds. Returns where the folder went, or None if nothing moved.
    """
    folder = experiment_dir(output_dir, identity.experiment)
    if (folder / RESULTS_FILE).is_file():
        stale = force or finished(output_dir, identity) is None
    else:
        recorded = _failure_identity(folder) if (folder / FAILURE_FILE).is_file() else None
        stale = recorded is not None and recorded != identity
    return supersede(output_dir, identity.experiment) if stale else None


def supersede(output_dir: str | Path, name: str) -> Path | None:
    """Move ``results/<name>`` aside to ``results/.superseded/<name>/<UTC time>/`` and drop the
    ``trained_models/<name>`` link to it; returns the new place (None if there was no folder)."""
    folder = experiment_dir(output_dir, name)
    if not folder.is_dir():
        return None
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    dest = folder.parent / SUPERSEDED_DIR / name / stamp
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(folder, dest)
    link = _trained_model_link(output_dir, name)
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():  # a copy where the file system has no symlinks
        shutil.rmtree(link)
    log.info("%s: earlier results moved to %s", name, dest)
    return dest


def record_failure(output_dir: str | Path, experiment: Experiment, error_type: str, message: str,
                   identity: Identity | None = None) -> dict[str, Any]:
    """Write ``results/<name>/failure.json`` atomically and return the record.

    Results already in the folder are superseded first: the folder shows the latest attempt, never a
    failure beside earlier numbers. ``message`` is clipped to its first and last 1000 characters;
    ``identity`` (when known) lets a later attempt of another identity move the record aside.
    """
    if (experiment_dir(output_dir, experiment.name) / RESULTS_FILE).is_file():
        supersede(output_dir, experiment.name)
    rec = {"experiment": experiment.name, "target": str(experiment.target), "seed": experiment.seed,
           "error_type": error_type, "error": _clip(message),
           "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
           "identity": identity.model_dump() if identity else None}
    io.write_json(experiment_dir(output_dir, experiment.name) / FAILURE_FILE, rec)
    return rec


def clear_failure(output_dir: str | Path, name: str) -> None:
    """Remove a failure record: the attempt succeeded (call before writing ``results.json``)."""
    (experiment_dir(output_dir, name) / FAILURE_FILE).unlink(missing_ok=True)


def _clip(text: str) -> str:
    """The start says what failed, the end holds the last output and the log's path: keep both."""
    half = MAX_ERROR_CHARS // 2
    return text if len(text) <= MAX_ERROR_CHARS else f"{text[:half]} [...] {text[-half:]}"
