"""The flow ``everest-forecast``: forecasts from a study's model bundle for the newest table of SHARP records.

It writes the forecasts as CSV and JSON (named by the input's and the bundle's content, so the same input gives
the same files) and publishes them as a table artifact on the flow run, regions most probable first, decisions
marked, each target's verdict against the baseline quoted. No Dask cluster: one process forecasts, with the code
``everest predict`` runs (:class:`everest.serving.forecaster.Forecaster`). Deployment ``everest-forecast/local``
carries a paused schedule every 12 minutes, the SHARP cadence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pandas as pd
from prefect import flow, task
from pydantic import Field

from everest.config import TargetName
from everest.errors import DataError
from everest.serving.bundle import MANIFEST, sha256
from everest.serving.forecaster import Forecaster, read_input, write_forecasts
from flows.artifacts import artifact_key
from flows.parameters import FlowParameters, flow_function


class ForecastParameters(FlowParameters):
    """Parameters of a forecast run."""

    bundle: str = Field("output/bundle", description="model bundle folder, written at the end of a study or by "
                        "`everest bundle`")
    input: str = Field("data/incoming", description="a CSV table of SHARP records in the training tables' layout (the "
                       "label column optional), or a folder whose newest .csv table is used")
    output_dir: str = Field("output/forecasts", description="folder for the forecast files (CSV and JSON)")
    model: Literal["ensemble", "baseline", "best"] = Field(
        "ensemble", description="the seed ensemble, the bundled baseline, or best: the one with the higher "
        "validation TSS in the study")
    targets: list[TargetName] | None = Field(None, description="targets to forecast, e.g. M-24 (unset: every target "
                                             "in the bundle)")


def newest_table(source: Path) -> Path:
    """``source`` if it is a file, else its newest ``.csv`` (by modification time, then name)."""
    if source.is_file():
        return source
    if not source.is_dir():
        raise DataError(f"input {source} does not exist; expected a CSV table or a folder of them")
    tables = sorted(source.glob("*.csv"), key=lambda p: (p.stat().st_mtime, p.name))
    if not tables:
        raise DataError(f"input folder {source} holds no .csv table")
    return tables[-1]


@task(name="forecast-regions")
def forecast_regions(params: ForecastParameters) -> dict[str, Any]:
    """Forecast the newest input table and write the CSV and JSON files; their paths, the rows to show (most
    probable first) and each target's verdict."""
    table = newest_table(Path(params.input))
    forecaster = Forecaster.load(params.bundle)
    forecasts = forecaster.predict(read_input(table), params.targets, model=params.model)
    name = f"forecast_{table.stem}_{sha256(table)[:10]}_{sha256(Path(params.bundle) / MANIFEST)[:10]}"
    meta = {"bundle": str(params.bundle), "input": str(table), "model": params.model}
    out = Path(params.output_dir)
    files = [str(write_forecasts(forecasts, out / f"{name}{suffix}", meta)) for suffix in (".csv", ".json")]
    shown = forecasts.sort_values("probability", ascending=False, kind="stable")
    rows = [{"target": r.target, "noaa_ar": _number(r.noaa_ar), "harpnum": _number(r.harpnum), "time": r.time,
             "probability": round(r.probability, 4),
             "decision": "FLARE" if r.decision else "-", "threshold": round(r.threshold, 4),
             "n_records": int(r.n_records), "stale": "stale" if r.stale else "", "model": r.model}
            for r in shown.itertuples()]
    verdicts = {t: forecaster.bundle.targets[t].verdict for t in forecasts["target"].unique()}
    return {"input": str(table), "files": files, "rows": rows, "verdicts": verdicts}


def _number(value: Any) -> int | None:
    """A region number for the artifact's table; None where the input lacks its column."""
    return None if pd.isna(value) else int(value)


def publish_forecasts(result: dict[str, Any]) -> None:
    """The run's table artifact: regions most probable first, decisions marked, the verdicts quoted."""
    from prefect.artifacts import create_table_artifact
    from prefect.context import FlowRunContext

    rows = result["rows"]
    quoted = " ".join(f"{t}: {v.get('sentence') or v.get('verdict')}" for t, v in result["verdicts"].items())
    run = FlowRunContext.get().flow_run
    create_table_artifact(table=rows, key=artifact_key("everest-forecast", run.name),
                          description=f"Forecasts for {result['input']}; FLARE marks a probability at or above the "
                          f"validated threshold. The study's verdict against the baseline: {quoted}")


def run_forecast(params: ForecastParameters) -> dict[str, Any]:
    """The flow's body: forecast, publish; the files written and the number of forecasts."""
    result = forecast_regions(params)
    publish_forecasts(result)
    return {"input": result["input"], "files": result["files"], "forecasts": len(result["rows"])}


everest_forecast = flow(flow_function(ForecastParameters, run_forecast, "everest_forecast",
                                      "Forecast flares from a model bundle for the newest SHARP table."),
                        name="everest-forecast")
