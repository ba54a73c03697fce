"""A study's trained models as one verified folder, to forecast with after the study.

Per target the bundle holds the seed ensemble (each member's weights and scaler, the ensemble's calibration map
and validated threshold), the best simple baseline, and what the study found: test metrics and the verdict
against that baseline. Layout::

    <bundle>/manifest.json              format, code version, targets; every other file with its size and SHA-256
    <bundle>/MODEL_CARD.md              what the models are, how they were chosen and scored, what not to use them for
    <bundle>/M_24/target.json           features, window and padding rule, configuration and hash, data identity,
                                        members, calibration, threshold, metrics, verdict, baseline
    <bundle>/M_24/member_seed0.npz      a member's weights as plain arrays
    <bundle>/M_24/baseline.json, .npz   the best baseline (:class:`everest.scoring.portable.PortableBaseline`)

Nothing is unpickled: weights are ``.npz`` files read with ``allow_pickle=False``, the rest is JSON. A bundle is
written into a temporary folder and renamed into place, so a reader never sees half of one. Loading checks every
file against the manifest and the code version, and refuses a changed, truncated, missing or extra file by name.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from everest import io
from everest.config import EverestConfig, Target, all_targets
from everest.data.samples import Scaler
from everest.errors import DataError
from everest.results import (
    CODE_VERSION,
    RESULTS_FILE,
    bundle_dir,
    experiment_dirs,
    experiment_from_name,
    verdict_file,
)
from everest.scoring.calibration import Calibrator
from everest.scoring.ensemble import ensemble_name, plan_ensemble, read_ensembles
from everest.scoring.portable import PortableBaseline

BUNDLE_FORMAT = "everest-bundle-1"
MANIFEST = "manifest.json"
TARGET_FILE = "target.json"
BASELINE_MODEL_DIR = "model"  # a baseline's exported model, beside its results.json
# How a window is formed; the forecaster applies the training's window builder, so this only documents it.
PADDING_RULE = ("each window holds a region's record and up to seq_len - 1 earlier records of the same region, oldest "
                "first; missing history is zero steps at the front, masked out of attention; rows labelled 'padding' "
                "serve as history only; n_records counts the real records in a window")
VERDICT_FIELDS = ("verdict", "sentence", "best_baseline", "delta", "ci_low", "ci_high", "p_holm", "everest_tss",
                  "ensemble_tss", "best_baseline_tss")


class BundleError(DataError):
    """A bundle that cannot be written or trusted; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Member:
    """One seed of a target's ensemble: its weights (solo state dict as arrays) and the scaler of its training split."""

    seed: int
    scaler: Scaler
    state: dict[str, np.ndarray]


@dataclass(frozen=True)
class BaselinePart:
    """The bundled baseline of one target: its fitted model, scaler, calibration map and validated threshold."""

    model: str
    seed: int
    scaler: Scaler
    calibrator: Calibrator
    threshold: float  # calibrated scale
    threshold_raw: float
    validation_tss: float
    predictor: PortableBaseline


@dataclass(frozen=True)
class TargetBundle:
    """Everything the bundle holds for one target (``record`` is its ``target.json``)."""

    target: Target
    config: EverestConfig
    members: list[Member]
    calibrator: Calibrator
    threshold: float  # calibrated scale
    threshold_raw: float
    baseline: BaselinePart | None
    record: dict[str, Any] = field(repr=False)

    @property
    def validation_tss(self) -> float:
        return float(self.record["validation_metrics"]["tss"])

    @property
    def verdict(self) -> dict[str, Any]:
        return self.record["verdict"]


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its folder, manifest and targets (by canonical name, e.g. ``"M-24"``)."""

    path: Path
    manifest: dict[str, Any]
    targets: dict[str, TargetBundle]


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _folder(target: Target) -> str:
    return target.file_suffix


def load_bundle(path: str | Path) -> Bundle:
    """Verify the bundle at ``path`` against its manifest and this code version, then read it (no unpickling)."""
    path = Path(path)
    manifest = _verified_manifest(path)
    targets = {}
    for name in manifest["targets"]:
        target = Target.parse(name)
        targets[str(target)] = _read_target(path / _folder(target), target)
    return Bundle(path, manifest, targets)


def _verified_manifest(path: Path) -> dict[str, Any]:
    where = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"bundle {path} is not a folder; expected the folder `everest bundle` wrote")
    if not where.is_file():
        raise BundleError(f"{path} is not a model bundle: it has no {MANIFEST} (make one with `everest bundle`)")
    try:
        manifest = json.loads(where.read_text())
        files, version, fmt = manifest["files"], manifest["code_version"], manifest["format"]
        manifest["targets"] = [str(Target.parse(t)) for t in manifest["targets"]]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise BundleError(f"{where}: not a readable bundle manifest ({type(err).__name__}: {err})") from None
    if fmt != BUNDLE_FORMAT:
        raise BundleError(f"{where}: bundle format {fmt!r}; this code reads {BUNDLE_FORMAT!r}")
    if version != CODE_VERSION:
        raise BundleError(f"{path}: bundle made by everest code version {version!r}, this code is {CODE_VERSION!r}; "
                          "its models may compute differently here: bundle the study again with this code "
                          "(`everest bundle --output-dir <study output>`)")
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    if extra := sorted(present - set(files)):
        raise BundleError(f"{path}: file {extra[0]} is not in the manifest ({len(extra)} such file(s)); a bundle "
                          "holds exactly the files its manifest lists")
    for rel, entry in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            raise BundleError(f"{f}: missing; the manifest lists it")
        if f.stat().st_size != entry["bytes"]:
            raise BundleError(f"{f}: {f.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated or "
                              "changed since the bundle was written)")
        if sha256(f) != entry["sha256"]:
            raise BundleError(f"{f}: its SHA-256 differs from the manifest's: the file changed since the bundle "
                              "was written; refusing to forecast with it")
    return manifest


def _read_target(folder: Path, target: Target) -> TargetBundle:
    where = folder / TARGET_FILE
    try:
        rec = json.loads(where.read_text())
        cfg = EverestConfig.model_validate(rec["config"])
        members = [Member(int(m["seed"]), Scaler.from_dict(m["scaler"]), _arrays(folder / m["weights"]))
                   for m in rec["members"]]
        calibrator = Calibrator.from_dict(rec["calibration"])
        threshold, threshold_raw = float(rec["threshold"]["selected"]), float(rec["threshold"]["selected_raw"])
        baseline = _read_baseline(folder, rec["baseline"]) if rec.get("baseline") else None
    except BundleError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise BundleError(f"{where}: not a readable target record ({type(err).__name__}: {err})") from None
    if not members:
        raise BundleError(f"{where}: no ensemble members")
    return TargetBundle(target, cfg, members, calibrator, threshold, threshold_raw, baseline, rec)


def _read_baseline(folder: Path, rec: Mapping[str, Any]) -> BaselinePart:
    return BaselinePart(rec["model"], int(rec["seed"]), Scaler.from_dict(rec["scaler"]),
                        Calibrator.from_dict(rec["calibration"]), float(rec["threshold"]["selected"]),
                        float(rec["threshold"]["selected_raw"]), float(rec["validation_tss"]),
                        PortableBaseline.load(folder))


def _arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:
        raise BundleError(f"{path}: not a readable weights file ({err})") from None


# ---------------------------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class BundleSummary:
    """What :func:`write_bundle` did: the folder, the targets bundled, and why others were left out."""

    path: Path
    targets: list[str]
    skipped: dict[str, str]


def write_bundle(output_dir: str | Path, out: str | Path | None = None,
                 targets: list[Target] | None = None) -> BundleSummary:
    """Bundle every requested target (default: all nine) whose seed ensemble is built and current.

    Targets without one are left out with the reason (:class:`BundleSummary`); none at all is a
    :class:`BundleError`. The bundle replaces an older bundle at ``out`` in one rename; any other folder there
    is refused, never overwritten.
    """
    output_dir = Path(output_dir)
    out = Path(out) if out is not None else bundle_dir(output_dir)
    if out.exists() and not (out / MANIFEST).is_file():
        raise BundleError(f"{out} exists and is no bundle (no {MANIFEST}); choose another --out, nothing was written")
    results_dir = output_dir / "results"
    wanted = targets or all_targets()
    ensembles = read_ensembles(results_dir, output_dir, wanted)
    ready = {t: e for t, e in ensembles.items() if isinstance(e, dict)}
    skipped = {t: e for t, e in ensembles.items() if isinstance(e, str)}
    if not ready:
        reasons = "; ".join(f"{t}: {why}" for t, why in skipped.items())
        raise BundleError(f"{output_dir}: no target has a built seed ensemble to bundle ({reasons})")
    verdicts = _verdicts(output_dir)
    with io.staged_dir(out) as tmp:
        records = {t: _write_target(tmp / _folder(Target.parse(t)), output_dir, Target.parse(t), ens,
                                    verdicts.get(t)) for t, ens in ready.items()}
        io.write_text(tmp / "MODEL_CARD.md", model_card(records, output_dir))
        files = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        io.write_json(tmp / MANIFEST, {"format": BUNDLE_FORMAT, "code_version": CODE_VERSION,
                                       "study": str(output_dir), "targets": list(records), "files": files})
    return BundleSummary(out, list(records), skipped)



def _verdicts(output_dir: Path) -> dict[str, dict[str, Any]]:
    """The analysis's verdict row per target (``analysis/verdict.csv``), if the analysis ran."""
    path = verdict_file(output_dir)
    if not path.is_file():
        return {}
    table = pd.read_csv(path)
    return {str(row["target"]): {k: _plain(row.get(k)) for k in VERDICT_FIELDS} for _, row in table.iterrows()}


def _plain(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    return value.item() if isinstance(value, np.generic) else value


def _write_target(folder: Path, output_dir: Path, target: Target, ensemble: dict[str, Any],
                  verdict: dict[str, Any] | None) -> dict[str, Any]:
    """Write one target's folder; return its record (``target.json``)."""
    plan = plan_ensemble(output_dir / "results", target)
    cfg = EverestConfig.model_validate(ensemble["config"])
    members = []
    for seed, results_folder, results in plan.used:
        model_dir = experiment_dirs(output_dir, experiment_from_name(results_folder.name))[1]
        weights = f"member_seed{seed}.npz"
        io.write_npz(folder / weights, **_state_arrays(model_dir / "model_weights.pt"))
        members.append({"seed": seed, "name": results_folder.name, "weights": weights,
                        "scaler": json.loads((model_dir / "scaler.json").read_text()),
                        "validation_tss": results["validation_metrics"]["tss"],
                        "test_tss": results["test_metrics"]["tss"]})
    prov = ensemble["provenance"]
    record = {
        "target": str(target), "ensemble": ensemble_name(target), "features": list(cfg.data.features),
        "seq_len": cfg.model.seq_len, "padding": PADDING_RULE, "horizon_hours": target.horizon,
        "config": ensemble["config"], "config_hash": prov["config_hash"], "data_hashes": prov["data_hashes"],
        "code_version": CODE_VERSION, "synthetic_data": bool(ensemble.get("data", {}).get("synthetic", False)),
        "members": members,
        "calibration": {k: v for k, v in ensemble["calibration"].items() if k in Calibrator.__dataclass_fields__},
        "threshold": {k: ensemble["threshold"][k] for k in ("selected", "selected_raw", "source")},
        "validation_metrics": ensemble["validation_metrics"], "test_metrics": ensemble["test_metrics"],
        "verdict": verdict or {"verdict": "not analysed", "sentence": "the study's analysis had not run when this "
                               "bundle was written: no verdict against the baselines"},
        "baseline": _write_baseline(folder, output_dir, target, verdict),
    }
    io.write_json(folder / TARGET_FILE, record)
    return record


def _state_arrays(weights: Path) -> dict[str, np.ndarray]:
    """A member's saved state dict (written by this project's trainer; tensors only) as plain arrays."""
    import torch

    state = torch.load(weights, map_location="cpu", weights_only=True)
    return {name: t.detach().numpy() for name, t in state.items()}


def _write_baseline(folder: Path, output_dir: Path, target: Target,
                    verdict: dict[str, Any] | None) -> dict[str, Any] | None:
    """Copy the best baseline's exported model (its lowest finished seed) into ``folder``; its record, or None.

    The best is the analysis's (chosen on validation TSS); without an analysis, the model with the higher mean
    validation TSS over its finished seeds.
    """
    found: dict[str, list[tuple[int, Path, dict[str, Any]]]] = {}
    for root in sorted((output_dir / "baselines").glob("*")):
        for res_file in sorted((root / "results").glob(f"everest_{target.file_suffix}h_seed*/{RESULTS_FILE}")):
            res = json.loads(res_file.read_text())
            if (res_file.parent / BASELINE_MODEL_DIR).is_dir():
                found.setdefault(root.name, []).append((int(res["experiment"]["seed"]), res_file.parent, res))
    if not found:
        return None
    best = (verdict or {}).get("best_baseline")
    if best not in found:
        best = max(found, key=lambda m: (np.mean([r["validation_metrics"]["tss"] for _, _, r in found[m]]), m))
    seed, res_folder, res = min(found[best], key=lambda m: m[0])
    PortableBaseline.load(res_folder / BASELINE_MODEL_DIR).save(folder)
    return {"model": best, "seed": seed, "scaler": res["data"]["scaler"],
            "calibration": {k: v for k, v in res["calibration"].items() if k in Calibrator.__dataclass_fields__},
            "threshold": {k: res["threshold"][k] for k in ("selected", "selected_raw", "source")},
            "validation_tss": res["validation_metrics"]["tss"], "test_metrics": res["test_metrics"]}


# ---------------------------------------------------------------------------------------------- model card
def model_card(records: Mapping[str, Mapping[str, Any]], output_dir: Path) -> str:
    """The bundle's ``MODEL_CARD.md``: one section per target, from the records written."""
    first = next(iter(records.values()))
    lines = ["# EVEREST model bundle", "",
             f"Trained by the study in `{output_dir}` (code version {CODE_VERSION}, configuration hash "
             f"{first['config_hash']}), on {'synthetic' if first['synthetic_data'] else 'real (observed)'} tables.", "",
             "Each target's forecast is the mean of its seeds' raw probabilities, mapped by a calibration fitted on "
             "validation regions none of the seeds trained on, and decided at the threshold of the highest "
             "validation TSS. The test metrics below were computed once, on the study's test table; nothing was "
             "tuned on them.", "",
             f"Windows: {first['seq_len']} records of features {', '.join(first['features'])}; {PADDING_RULE}.", "",
             "Intended use: research forecasts of whether a region produces a flare of at least the target's class "
             "within its horizon. Not an operational warning service: the models know only the regions and the "
             "period they were trained on, and a region whose latest record is older than the horizon is flagged, "
             "not trusted.", ""]
    for name, rec in records.items():
        m, v, b = rec["test_metrics"], rec["verdict"], rec["baseline"]
        lines += [f"## {name}", "",
                  f"* members: seeds {', '.join(str(x['seed']) for x in rec['members'])}",
                  f"* threshold: {rec['threshold']['selected']:.4g} (calibrated; raw "
                  f"{rec['threshold']['selected_raw']:.4g})",
                  f"* test: TSS {_num(m.get('tss'))}, Brier {_num(m.get('brier'))}, ROC AUC {_num(m.get('roc_auc'))}",
                  f"* validation TSS: {_num(rec['validation_metrics'].get('tss'))}",
                  f"* verdict against the best baseline: {v.get('verdict')} ({v.get('sentence')})",
                  f"* bundled baseline: {b['model']} (seed {b['seed']}, validation TSS {_num(b['validation_tss'])})"
                  if b else "* bundled baseline: none (no exported baseline model in the study)", ""]
    return "\n".join(lines)


def _num(value: Any) -> str:
    return "undefined" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{float(value):.3f}"
