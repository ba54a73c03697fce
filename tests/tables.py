"""Small SHARP tables in the real layout, built in memory for data tests."""

from __future__ import annotations

import shutil
import threading
import time
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


def spoil_once_checked(out: Path, table: Path, spoiled: str, timeout: float = 900.0) -> threading.Thread:
    """Rewrite ``table`` with ``spoiled`` as soon as a run started in another process has checked it and
    begun its work: the flow makes its result store (``<out>/.prefect-results``) after its preflight read
    every table and before it submits a task. For runs whose preflight cannot be reached in-process (a
    command line, a deployment); see :func:`spoil_after_preflight`."""
    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (out / ".prefect-results").is_dir():
                table.write_text(spoiled)
                return
            time.sleep(0.005)

    thread = threading.Thread(target=watch, name=f"spoil {table.name}", daemon=True)
    thread.start()
    return thread
