"""Small SHARP tables in the real layout, built in memory for data tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd

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


def copy_with_bad_c48(source: Path, data: Path) -> tuple[Path, str]:
    """Copy the data folder ``source`` to ``data`` with one non-numeric TOTUSJH cell in C-48's training file;
    returns that file and its good text (to write back)."""
    shutil.copytree(source, data)
    bad = data / "training_data_C_48.csv"
    good_text = bad.read_text()
    lines = good_text.splitlines()
    lines[5] = lines[5].replace(lines[5].split(",")[4], "oops", 1)
    bad.write_text("\n".join(lines) + "\n")
    return bad, good_text


def spoil_after_preflight(monkeypatch, bad: Path, good_text: str) -> None:
    """The flow's preflight reads ``bad`` holding ``good_text``, and it turns bad again right after, before
    any task reads it: a table rewritten on the shared file system while the run's jobs wait. (The preflight
    refuses a bad table before anything starts; a task must still fail alone on one that changed since.)"""
    from flows import preflight

    check = preflight.check_tables

    def check_then_spoil(params, cfg) -> None:
        current = bad.read_text()
        bad.write_text(good_text)
        try:
            check(params, cfg)
        finally:
            bad.write_text(current)

    monkeypatch.setattr(preflight, "check_tables", check_then_spoil)


# Loaded by a Python process started with spoil_in_flow_process's environment (sitecustomize runs first).
_SPOIL_HOOK = """
import os

if os.environ.get("EVEREST_TEST_SPOIL"):
    from pathlib import Path

    from prefect.context import FlowRunContext

    from flows import preflight

    table, bad, marker = (Path(p) for p in os.environ["EVEREST_TEST_SPOIL"].split(os.pathsep))
    check = preflight.check_tables

    def check_then_spoil(params, cfg):
        check(params, cfg)
        if FlowRunContext.get() is not None and marker.exists():  # the flow's own preflight, the last check
            table.write_bytes(bad.read_bytes())

    preflight.check_tables = check_then_spoil
"""


def spoil_in_flow_process(tmp: Path, table: Path, bad_text: str, env: dict[str, str]) -> tuple[dict[str, str], Path]:
    """:func:`spoil_after_preflight` for a flow that runs in another process (a command line, a deployment's
    worker): ``table`` is read good by every preflight, and becomes ``bad_text`` once the flow run's own preflight
    has read it, before a task reads it, while the returned marker file exists. Returns ``env`` with the hook that
    does it (a ``sitecustomize`` module on PYTHONPATH), and the marker."""
    (tmp / "spoil-hook").mkdir()
    (tmp / "spoil-hook" / "sitecustomize.py").write_text(_SPOIL_HOOK)
    (tmp / "spoil-bad.csv").write_text(bad_text)
    marker = tmp / "spoiling"
    marker.touch()
    path = os.pathsep.join(filter(None, (str(tmp / "spoil-hook"), env.get("PYTHONPATH"))))
    spoil = os.pathsep.join(map(str, (table, tmp / "spoil-bad.csv", marker)))
    return {**env, "PYTHONPATH": path, "EVEREST_TEST_SPOIL": spoil}, marker
