"""Forecasts from a model bundle: SHARP records in the project's table layout -> one row per region, time, target.

Each region's window ends at its latest record (every record with ``all_times``) and is built by the training's
window builder (:func:`everest.data.samples.build_samples`), so a region with fewer records than the window is
front-padded as in training, and ``n_records`` says how many real records the window holds. The ensemble's
forecast is computed as the study computed it: each member scales the windows with its own scaler, the members'
raw probabilities are averaged, the ensemble's calibration map gives ``probability``, and ``decision`` is the raw
mean at or above the validated raw threshold. ``everest predict`` and the ``everest-forecast`` flow run this code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from everest import io
from everest.config import ConfigError, DataConfig, Target
from everest.data.samples import SampleSet, build_samples
from everest.data.tables import LABEL_COLUMN, LABELS, MAX_ABS_VALUE, MAX_REGION, TIME_COLUMN, region_meaning
from everest.errors import DataError
from everest.serving.bundle import BaselinePart, Bundle, BundleError, TargetBundle, load_bundle

NOAA_COLUMN, HARP_COLUMN = "NOAA_AR", "HARPNUM"
ModelChoice = Literal["ensemble", "baseline", "best"]
MODEL_CHOICES: tuple[str, ...] = ("ensemble", "baseline", "best")
COLUMNS: tuple[str, ...] = (
    "target", "model", "noaa_ar", "harpnum", "time", "probability", "probability_raw", "decision", "threshold",
    "threshold_raw", "spread", "aleatoric", "epistemic", "n_records", "latest_record", "stale")
OUTPUT_SUFFIXES = (".csv", ".json")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


# ---------------------------------------------------------------------------------------------- input records
def read_input(path: str | Path) -> pd.DataFrame:
    """A CSV table of SHARP records, every cell as written (validated by :func:`records_from_frame`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected a CSV table of SHARP records")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot be read as a CSV table ({' '.join(str(err).split())}); expected a "
                        "comma-separated text table with a header line") from None
    frame.columns = [str(c).strip().removeprefix("\ufeff") for c in frame.columns]
    frame.attrs["source"] = str(path)
    return frame


def records_from_frame(frame: pd.DataFrame, data: DataConfig, source: str | None = None) -> pd.DataFrame:
    """Validate a table of SHARP records and give the window builder's columns, sorted by region and time.

    Columns: ``label`` (0, or -1 for rows labelled 'padding': history only), ``time``, ``region`` (the configured
    region column), ``noaa_ar`` and ``harpnum`` (empty where the table lacks the column) and the features. The
    label column is optional and otherwise ignored; extra columns are ignored. Errors name ``source`` (the
    file), the column, the value and its line (the header is line 1).
    """
    source = source or frame.attrs.get("source", "the input table")
    if len(frame) == 0:
        raise DataError(f"{source}: no records (only a header, or nothing); expected one row per SHARP record")
    columns = {}
    missing = []
    region_column = data.region_column
    for name in (TIME_COLUMN, region_column, *data.features):
        names = [name] + [alias for alias, canon in data.feature_aliases.items() if canon == name]
        hit = next((n for n in names if n in frame.columns), None)
        missing += [name] if hit is None else []
        columns[name] = hit
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; the bundle's models read {list(data.features)} "
                        f"with {TIME_COLUMN} and {region_column} (the table has {list(frame.columns)[:30]})")

    def bad(column: str, mask: np.ndarray, expected: str) -> DataError:
        i = int(np.flatnonzero(mask)[0])
        return DataError(f"{source}: column {column!r} holds {str(frame[column].iloc[i])!r} at line {i + 2} "
                         f"({int(mask.sum())} such row(s) in all); expected {expected}")

    out: dict[str, Any] = {}
    if LABEL_COLUMN in frame.columns:
        text = frame[LABEL_COLUMN].astype(str).str.strip()
        if (unknown := ~text.isin([*LABELS, ""]).to_numpy()).any():
            raise bad(LABEL_COLUMN, unknown, f"one of {list(LABELS)} or empty (the label is ignored; 'padding' rows "
                      "serve as history only)")
        out["label"] = np.where(text == "padding", LABELS["padding"], 0).astype(np.int8)
    else:
        out["label"] = np.zeros(len(frame), np.int8)
    time = pd.to_datetime(frame[columns[TIME_COLUMN]], errors="coerce", format="ISO8601", utc=True)
    if (nat := time.isna().to_numpy()).any():
        raise bad(columns[TIME_COLUMN], nat, "an ISO 8601 time such as 2010-05-04T23:12:00")
    out["time"] = time.dt.tz_localize(None).to_numpy("datetime64[s]")
    region = pd.to_numeric(frame[columns[region_column]], errors="coerce").to_numpy(np.float64)
    if (wrong := ~((region >= 0) & (region <= MAX_REGION) & (region == np.round(region)))).any():
        raise bad(columns[region_column], wrong, f"{region_meaning(region_column)} (a whole number, 0 to {MAX_REGION})")
    out["region"] = region.astype(np.int64)
    for name in (NOAA_COLUMN, HARP_COLUMN):
        number = (pd.to_numeric(frame[name], errors="coerce") if name in frame.columns
                  else pd.Series(np.nan, index=frame.index))
        out[name.lower()] = number.round().astype("Int64").to_numpy()
    for feature in data.features:
        values = pd.to_numeric(frame[columns[feature]], errors="coerce").to_numpy(np.float64)
        if (wrong := ~(np.isfinite(values) & (np.abs(values) <= MAX_ABS_VALUE))).any():
            raise bad(columns[feature], wrong, f"a finite number (at most {MAX_ABS_VALUE:.0e} in size)")
        out[feature] = values
    records = pd.DataFrame(out).sort_values(["region", "time"], kind="stable", ignore_index=True)
    twice = (records["region"].diff() == 0) & (records["time"].diff() == pd.Timedelta(0))
    if twice.any():
        r = records[twice.to_numpy()].iloc[0]
        raise DataError(f"{source}: region {region_column}={r['region']} has two records at "
                        f"{pd.Timestamp(r['time']).strftime(TIME_FORMAT)}; expected one record per region and time")
    if (records["label"] != LABELS["padding"]).sum() == 0:
        raise DataError(f"{source}: every row is labelled 'padding'; expected at least one record to forecast from")
    return records


# ---------------------------------------------------------------------------------------------- forecasting
@dataclass(frozen=True)
class _Forecast:
    """One model's forecast of a target's windows."""

    model: str
    raw: np.ndarray
    probability: np.ndarray
    threshold: float
    threshold_raw: float
    spread: np.ndarray
    aleatoric: np.ndarray
    epistemic: np.ndarray


class Forecaster:
    """A loaded, verified bundle that forecasts: ``Forecaster.load(path).predict(frame)``."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self._models: dict[str, list[Any]] = {}

    @classmethod
    def load(cls, path: str | Path) -> Forecaster:
        """Verify and read the bundle at ``path`` (:func:`everest.serving.bundle.load_bundle`)."""
        return cls(load_bundle(path))

    @property
    def targets(self) -> list[str]:
        """The bundle's targets, e.g. ``["M-24"]``."""
        return list(self.bundle.targets)

    def select(self, targets: list[str] | None) -> list[TargetBundle]:
        """The bundled targets asked for (all when None); a target the bundle lacks is an error naming it."""
        if targets is None:
            return list(self.bundle.targets.values())
        chosen = []
        for name in targets:
            key = str(Target.parse(name))
            if key not in self.bundle.targets:
                raise ConfigError(f"target {key} is not in bundle {self.bundle.path} (it holds "
                                  f"{', '.join(self.targets)}); bundle a study that trained it")
            chosen.append(self.bundle.targets[key])
        return chosen

    def predict(self, frame: pd.DataFrame, targets: list[str] | None = None, all_times: bool = False,
                model: ModelChoice = "ensemble") -> pd.DataFrame:
        """Forecasts for the SHARP records in ``frame`` (the table layout; see :func:`records_from_frame`).

        One row per region (per record with ``all_times``) and target, columns :data:`COLUMNS`. ``model``:
        the seed ensemble, the bundled baseline, or ``best``, the one with the higher validation TSS in the study.
        """
        if model not in MODEL_CHOICES:
            raise ConfigError(f"model {model!r}: expected one of {', '.join(MODEL_CHOICES)}")
        chosen = self.select(targets)
        data = chosen[0].config.data
        records = records_from_frame(frame, data)
        parts = [self._target_rows(tb, records, all_times, model) for tb in chosen]
        return pd.concat(parts, ignore_index=True)[list(COLUMNS)]

    def _target_rows(self, tb: TargetBundle, records: pd.DataFrame, all_times: bool, model: str) -> pd.DataFrame:
        cfg = tb.config
        samples = build_samples(records, cfg.data.features, cfg.model.seq_len, zero_filter=False)
        if not all_times:
            last = pd.Series(np.arange(len(samples))).groupby(samples.region).max().to_numpy()
            samples = samples.subset(np.sort(last))
        use_baseline = model == "baseline" or (model == "best" and tb.baseline is not None
                                               and tb.baseline.validation_tss > tb.validation_tss)
        if use_baseline and tb.baseline is None:
            raise BundleError(f"{self.bundle.path}: target {tb.target} has no bundled baseline (the study exported "
                              "none); use --model ensemble")
        fc = self._baseline(tb.baseline, samples) if use_baseline else self._ensemble(tb, samples)
        real = records["label"].to_numpy() != LABELS["padding"]
        latest = records[real].groupby("region")["time"].max()
        region_latest = latest.reindex(samples.region).to_numpy().astype("datetime64[s]")
        as_of = records.loc[real, "time"].to_numpy().astype("datetime64[s]").max()  # the input's newest record
        return pd.DataFrame({
            "target": str(tb.target), "model": fc.model, "noaa_ar": records["noaa_ar"].to_numpy()[samples.row],
            "harpnum": records["harpnum"].to_numpy()[samples.row],
            "time": pd.to_datetime(samples.time).strftime(TIME_FORMAT),
            "probability": fc.probability, "probability_raw": fc.raw, "decision": fc.raw >= fc.threshold_raw,
            "threshold": fc.threshold, "threshold_raw": fc.threshold_raw, "spread": fc.spread,
            "aleatoric": fc.aleatoric, "epistemic": fc.epistemic, "n_records": samples.valid.sum(axis=1),
            "latest_record": pd.to_datetime(region_latest).strftime(TIME_FORMAT),
            "stale": (as_of - region_latest) > np.timedelta64(tb.target.horizon, "h"),
        })

    def _ensemble(self, tb: TargetBundle, samples: SampleSet) -> _Forecast:
        import torch

        from everest.scoring.inference import predict

        raws, alea, epis = [], [], []
        for member, net in zip(tb.members, self._networks(tb), strict=True):
            out = predict(net, member.scaler.transform(samples), torch.device("cpu"))
            raws.append(out["y_prob"])
            alea.append(out.get("aleatoric", np.full(len(samples), np.nan)))
            epis.append(out.get("epistemic", np.full(len(samples), np.nan)))
        raw = np.mean(raws, axis=0)  # as the ensemble builder averages its members' raw probabilities
        return _Forecast("ensemble", raw, tb.calibrator.apply(raw), tb.threshold, tb.threshold_raw,
                         np.std(raws, axis=0), np.mean(alea, axis=0), np.mean(epis, axis=0))

    @staticmethod
    def _baseline(b: BaselinePart, samples: SampleSet) -> _Forecast:
        scaled = b.scaler.transform(samples)
        raw = b.predictor.predict_proba(scaled.x, scaled.valid)
        nan = np.full(len(samples), np.nan)
        return _Forecast(f"baseline:{b.model}", raw, b.calibrator.apply(raw), b.threshold, b.threshold_raw,
                         nan, nan, nan)

    def _networks(self, tb: TargetBundle) -> list[Any]:
        """The members' networks, built on first use (weights from the bundle's arrays)."""
        key = str(tb.target)
        if key not in self._models:
            import torch

            from everest.model.network import EverestModel

            nets = []
            for member in tb.members:
                net = EverestModel(tb.config.model, n_features=len(tb.config.data.features))
                try:
                    net.load_state_dict({k: torch.from_numpy(v) for k, v in member.state.items()}, strict=True)
                except RuntimeError as err:
                    raise BundleError(f"{self.bundle.path}: target {key}, seed {member.seed}: the weights do not fit "
                                      f"the network its configuration builds ({str(err).splitlines()[0]})") from None
                nets.append(net.eval())
            self._models[key] = nets
        return self._models[key]


# ---------------------------------------------------------------------------------------------- output
def check_output(path: str | Path) -> Path:
    """Refuse an output file whose suffix is neither .csv nor .json, before anything is computed."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--out {path}: expected a file name ending in .csv or .json")
    io.check_writable_dir(path.parent, "the output file's folder")
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; expected a file name ending in .csv or .json")
    return path


def write_forecasts(forecasts: pd.DataFrame, path: str | Path, meta: dict[str, Any]) -> Path:
    """Write forecasts as CSV, or as JSON (``meta`` and the rows), atomically; the same forecasts give the same
    bytes."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        rows = forecasts.astype(object).where(forecasts.notna(), None).to_dict(orient="records")
        return io.write_json(path, {**meta, "forecasts": rows})
    return io.write_csv(path, forecasts)


def terminal_table(forecasts: pd.DataFrame, limit: int = 40) -> str:
    """The forecasts as a fixed-width table, most probable first (at most ``limit`` rows)."""
    shown = forecasts.sort_values(["probability", "target", "noaa_ar"], ascending=[False, True, True],
                                  kind="stable").head(limit)
    text = _shown(shown).to_string(index=False)
    more = len(forecasts) - len(shown)
    return text + (f"\n... and {more} more row(s): write them all with --out FILE.csv" if more > 0 else "")


def _shown(frame: pd.DataFrame) -> pd.DataFrame:
    """The terminal's columns, rounded: probabilities to 3 decimals, the decision as 'FLARE' or '-'."""
    out = frame[["target", "noaa_ar", "harpnum", "time", "probability", "decision", "threshold", "spread",
                 "n_records", "stale"]].copy()
    for column in ("probability", "threshold", "spread"):
        out[column] = out[column].round(3)
    out["decision"] = np.where(out["decision"], "FLARE", "-")
    out["stale"] = np.where(out["stale"], "stale", "")
    return out

