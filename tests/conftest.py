"""Shared fixtures: small SHARP tables written to real files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from everest.config import EVEREST_FEATURES

ALL_COLUMNS = ["Flare", "DATE__OBS", "NOAA_AR", "HARPNUM", "TOTUSJH", "Cdec", "TOTUSJZ", "Chis1d", "USFLUX",
               "MEANALP", "R_VALUE", "TOTPOT", "Chis", "SAVNCPP", "AREA_ACR", "Edec", "Xmax1d", "ABSNJZH"]


def make_table(rows: list[tuple[str, int, float]], start: str = "2012-01-01T00:00:00") -> pd.DataFrame:
    """A table in the real layout from (label, region, value) rows; every feature of a row holds `value`.

    Times advance 12 minutes per row within a region.
    """
    records = []
    t0 = pd.Timestamp(start)
    step: dict[int, int] = {}
    for label, region, value in rows:
        k = step.get(region, 0)
        step[region] = k + 1
        rec = {c: 0.0 for c in ALL_COLUMNS}
        rec.update(Flare=label, DATE__OBS=(t0 + pd.Timedelta(minutes=12 * k) + pd.Timedelta(days=region % 7))
                   .strftime("%Y-%m-%dT%H:%M:%S"), NOAA_AR=region, HARPNUM=region + 1000)
        for f in EVEREST_FEATURES:
            rec[f] = value
        records.append(rec)
    return pd.DataFrame(records, columns=ALL_COLUMNS)


@pytest.fixture
def write_csv(tmp_path: Path):
    """Write a DataFrame (or raw text) as a CSV file under tmp_path and return its path."""

    def _write(content: pd.DataFrame | str, name: str = "training_data_M_24.csv") -> Path:
        path = tmp_path / name
        if isinstance(content, str):
            path.write_text(content)
        else:
            content.to_csv(path, index=False)
        return path

    return _write


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real ``prefect server`` for the whole test run (127.0.0.1, its own PREFECT_HOME)."""
    import os

    from flows.server import prefect_api

    home = tmp_path_factory.mktemp("prefect-home")
    old = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(home)
    try:
        with prefect_api() as url:
            yield url
    finally:
        if old is None:
            os.environ.pop("PREFECT_HOME", None)
        else:
            os.environ["PREFECT_HOME"] = old


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The 18 tables of the generator's ``tiny`` size (seed 0), written once per test run."""
    from everest import synthetic

    out = tmp_path_factory.mktemp("tiny-data")
    synthetic.generate(out, size="tiny", seed=0)
    return out
