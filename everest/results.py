"""Result identity and the results on disk: one owner of "is it finished", of the ``results.json`` schema and
of the failure record.

The trainer, the baselines, the seed ensemble, the Prefect flow (cache key and cache validation), ``cluster/``
and the analysis loader all decide through this module. Layout under an output root::

    results/<name>/results.json    finished; written last; its provenance records the identity
    results/<name>/failure.json    the latest attempt failed; never beside results.json
    results/<name>/model/          weights, scaler, config, model card (trained_models/<name> links here)
    results/.superseded/<name>/<UTC time>/   earlier results moved aside by a retrain or a failure
    checkpoints/<name>.pt          the running attempt's checkpoint
    bundle/                        the study's model bundle (everest.serving.bundle), written after the analysis

The baselines (``baselines/<model>/``) and the seed ensembles (``ensemble/``, whose results file is
``ensemble.json``) are output roots of the same layout. A result is reused only when the identity it records
(experiment, config hash, data file hashes, code version; for an ensemble also its members) equals the
identity of the run asking for it. Every model's ``results.json`` is built by :func:`results_record` (the
header: model, experiment block, provenance with the identity) and written by :func:`write_results`.
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
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from everest import io
from everest.config import ConfigError, EverestConfig, Experiment, Target

log = logging.getLogger(__name__)

# Bump when the code's results change (a fix to training, evaluation or the results layout): finished
# results and checkpoints of another version are then retrained, and the flow's cache keys change.
CODE_VERSION = "everest-3"

RESULTS_FILE = "results.json"
ENSEMBLE_FILE = "ensemble.json"  # a seed ensemble's results file: named apart, an ensemble is no experiment
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
    results_file: ClassVar[str] = RESULTS_FILE  # the file whose presence, with this identity, means finished

    experiment: str  # e.g. everest_M5_72h_seed0
    config_hash: str  # EverestConfig.config_hash()
    data_hashes: dict[str, str]  # data file name -> sha256 of its content
    code_version: str  # CODE_VERSION of the code that produced (or would produce) the result

    def key(self) -> str:
        """Stable string naming this identity: ``<experiment>-<config hash>-<data digest>-<code version>``."""
        data = hashlib.sha256(json.dumps(self.data_hashes, sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.experiment}-{self.config_hash}-{data}-{self.code_version}"

    def run_key(self) -> str:
        """What the results of one run share, the identity without the experiment name, as canonical JSON:
        the seed ensemble averages members of one run key."""
        return json.dumps([self.config_hash, self.code_version, self.data_hashes], sort_keys=True)

    def provenance(self) -> dict[str, Any]:
        """The fields ``results.json`` records under ``provenance`` (the experiment is recorded by name)."""
        return self.model_dump(exclude={"experiment"})

    @classmethod
    def of_results(cls, results: Mapping[str, Any]) -> Identity | None:
        """The identity a ``results.json`` content records; None if it records none (older code) or a bad one."""
        try:
            prov = results.get("provenance") or {}
            recorded = {name: prov.get(name) for name in cls.model_fields if name != "experiment"}
            return cls(experiment=(results.get("experiment") or {}).get("name"), **recorded)
        except (ValidationError, AttributeError):
            return None


class EnsembleIdentity(Identity):
    """The identity of a seed ensemble: its members' shared configuration, data files and code version, the
    ensemble code's version, and ``ensemble_identity``, a digest of which members it averages and of their
    result files' content (:func:`ensemble_identity_for`), so a member retrained under the same identity (a
    forced rerun) makes the ensemble stale too. Its results file is :data:`ENSEMBLE_FILE`."""

    results_file: ClassVar[str] = ENSEMBLE_FILE

    ensemble_version: str  # everest.scoring.ensemble.ENSEMBLE_VERSION of the code that built it
    ensemble_identity: str  # 16 hex digits over the version, the members' run key, names and file contents

    def key(self) -> str:
        """:meth:`Identity.key` with the ensemble version and member digest appended."""
        return f"{super().key()}-{self.ensemble_version}-{self.ensemble_identity}"


def identity_for(experiment: Experiment, config: EverestConfig, data_hashes: Mapping[str, str]) -> Identity:
    """The identity of ``experiment`` trained with ``config`` on files with these content hashes, by this code.

    ``data_hashes`` maps each data file name to its sha256 (``prepare_experiment(...).file_hashes``, or the
    flow's per-target hashes of the training and testing CSV).
    """
    return Identity(experiment=experiment.name, config_hash=config.config_hash(), data_hashes=dict(data_hashes),
                    code_version=CODE_VERSION)


def model_identity(experiment: Experiment, recorded_config: Mapping[str, Any], data_hashes: Mapping[str, str],
                   model_version: str) -> Identity:
    """The identity of another model's result for ``experiment`` (a simple baseline): its config hash covers
    ``recorded_config`` (what its ``results.json`` records under ``config``), its code version is
    ``<CODE_VERSION>+<model_version>``, so a bump of either refits it."""
    blob = json.dumps(recorded_config, sort_keys=True, separators=(",", ":"))
    return Identity(experiment=experiment.name, config_hash=hashlib.sha256(blob.encode()).hexdigest()[:16],
                    data_hashes=dict(data_hashes), code_version=f"{CODE_VERSION}+{model_version}")


def ensemble_identity_for(name: str, member: Identity, version: str,
                          contents: Mapping[str, str]) -> EnsembleIdentity:
    """The identity of the ensemble ``name`` (e.g. ``everest_M5_72h_ensemble``) built by ensemble code
    ``version`` from members that share ``member``'s run (:meth:`Identity.run_key`); ``contents`` maps each
    member's folder name, in member order, to the sha256 of its result files."""
    digest = hashlib.sha256(json.dumps([version, member.run_key(), list(contents), list(contents.values())])
                            .encode()).hexdigest()[:16]
    return EnsembleIdentity(experiment=name, config_hash=member.config_hash, data_hashes=dict(member.data_hashes),
                            code_version=member.code_version, ensemble_version=version, ensemble_identity=digest)


# ---------------------------------------------------------------------- the results.json schema
def results_record(identity: Identity, model: str, target: Target, seed: int | None, sections: Mapping[str, Any],
                   provenance: Mapping[str, Any] | None = None, **described: Any) -> dict[str, Any]:
    """The ``results.json`` content of one model's result: the header every model's results carry around the
    model's own ``sections`` (scores, training, data, config, ...), in one order.

    Header: ``model``; ``experiment`` (name, flare class, horizon, target, seed, model, the array index of a
    seed below 5, then ``described``, e.g. an ensemble's member seeds); last ``provenance``: the identity's
    fields (:meth:`Identity.provenance`, what :func:`finished` compares) and ``provenance`` (environment,
    versions). ``seed`` is None for a model of no seed (the ensemble), which then has no array index.
    """
    block: dict[str, Any] = {"name": identity.experiment, "flare_class": target.flare_class,
                             "horizon_hours": target.horizon, "target": str(target), "seed": seed, "model": model}
    if seed is not None:
        block["array_index"] = Experiment(target=target, seed=seed).array_index if seed < 5 else None
    return {"model": model, "experiment": {**block, **described}, **sections,
            "provenance": {**identity.provenance(), **(provenance or {})}}


# ---------------------------------------------------------------------- layout
BUNDLE_FOLDER = "bundle"


def bundle_dir(output_dir: str | Path) -> Path:
    """``<output>/bundle``: where a study's model bundle goes unless told otherwise."""
    return Path(output_dir) / BUNDLE_FOLDER


def verdict_file(output_dir: str | Path) -> Path:
    """``<output>/analysis/verdict.csv``: the analysis's verdict per target, which a model bundle quotes."""
    return Path(output_dir) / "analysis" / "verdict.csv"


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
    """The results content (``identity.results_file``) if this identity's result finished and is on disk;
    None if it is absent (e.g. deleted), unreadable, from another identity, or the last attempt failed.

    Use it to skip finished work and to validate a cache hit before trusting it.
    """
    folder = experiment_dir(output_dir, identity.experiment)
    path = folder / identity.results_file
    if (folder / FAILURE_FILE).is_file() or not path.is_file():  # status(folder) for any results file
        return None
    try:
        res = _read_object(path)
    except (OSError, ValueError) as err:
        log.warning("%s: unreadable %s (%s); not finished", identity.experiment, path, err)
        return None
    return res if type(identity).of_results(res) == identity else None


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


def write_results(output_dir: str | Path, identity: Identity, results: Mapping[str, Any]) -> Path:
    """Mark ``identity``'s result finished: drop its failure record, then write ``results`` (atomically) as its
    results file. Call it after every other file of the result is written: the file's presence means finished.

    Raises ValueError if ``results`` records another identity (build it with :func:`results_record`).
    """
    if type(identity).of_results(results) != identity:
        raise ValueError(f"{identity.experiment}: the results record another identity than {identity.key()}")
    clear_failure(output_dir, identity.experiment)
    return io.write_json(experiment_dir(output_dir, identity.experiment) / identity.results_file, results)


def _clip(text: str) -> str:
    """The start says what failed, the end holds the last output and the log's path: keep both."""
    half = MAX_ERROR_CHARS // 2
    return text if len(text) <= MAX_ERROR_CHARS else f"{text[:half]} [...] {text[-half:]}"
