"""Real data: the committed SMARP excerpt imported, checked, read as samples and trained on for one epoch.

Every expected value is computed here from the source rows with pandas, independently of the importer: the
records and positives per split, the derived C and M5 labels, the 96-minute cadence, the padding rows at gaps.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny import set_args

from everest.config import Target, load_config
from everest.data.published import Fold, import_published, labels_for
from everest.data.samples import read_samples
from everest.data.tables import data_file, read_table
from everest.errors import DataError

pytestmark = [pytest.mark.slow, pytest.mark.real_data]  # every test runs the command line as a process

EXCERPT = Path(__file__).parent / "data" / "smarp_excerpt"
ROOT = Path(__file__).resolve().parents[1]
CADENCE = pd.Timedelta(minutes=96)


def source(k: int) -> pd.DataFrame:
    return pd.read_csv(EXCERPT / f"smarp_{k}.csv", keep_default_na=False)


def expected_labels(frame: pd.DataFrame, cls: str) -> np.ndarray:
    """A record's label from its flares column, by a regular expression (not the importer's parser)."""
    pattern = {"C": r"(?:^|\|)[CMX]", "M": r"(?:^|\|)[MX]", "M5": r"(?:^|\|)(?:X|M(?:[5-9]|\d\d))"}[cls]
    return frame["flares"].str.contains(pattern, regex=True).to_numpy()


def expected_padding(frame: pd.DataFrame, cap: int = 9) -> tuple[int, int]:
    """(gaps, padding rows): a gap of n missing 96-minute records gets min(n, cap) rows."""
    gaps = pad = 0
    for _, g in frame.groupby("arpnum", sort=False):
        missing = (pd.to_datetime(g["t_end"]).diff().dropna() / CADENCE).round().astype(int) - 1
        gaps += int((missing > 0).sum())
        pad += int(missing.clip(0, cap).sum())
    return gaps, pad


def expected_padded_windows(frame: pd.DataFrame, seq_len: int) -> int:
    """Windows holding padding: a region's first ``seq_len - 1`` records, and those whose ``seq_len`` records
    span more than ``seq_len - 1`` cadences (a gap inside)."""
    t = pd.to_datetime(frame["t_end"])
    first = frame.groupby("arpnum").cumcount() < seq_len - 1
    back = pd.to_datetime(frame.groupby("arpnum")["t_end"].transform(lambda s: s.shift(seq_len - 1)))
    return int((first | ((t - back) > (seq_len - 1) * CADENCE)).sum())


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smarp") / "import"
    r = subprocess.run([sys.executable, "-m", "everest", "data", "import", "smarp", str(EXCERPT), "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("read 1309 rows (cadence 96 minutes)\n")
    assert r.stdout.count("; dropped 0\n") == 10  # C-24 and M-24 of five folds: every row written
    assert r.stdout.count("M5-24: not written (no positive record in the training folds") == 5
    return out


@pytest.mark.parametrize("k", range(5))
def test_every_row_is_written_once_with_its_labels(imported: Path, k: int) -> None:
    folder = imported / f"fold_{k}"
    cfg = load_config(folder / "everest.yaml").data
    assert cfg.features == ("AREA", "USFLUX", "MEANGBZ", "R_VALUE") and cfg.region_column == "HARPNUM"
    test_src = source(k)
    train_src = pd.concat([source(j) for j in range(5) if j != k], ignore_index=True)
    record = json.loads((folder / "import.json").read_text())
    assert set(record["targets"]) == {"C-24", "M-24"} and set(record["skipped_targets"]) == {"M5-24"}
    assert not expected_labels(train_src, "M5").any()  # the excerpt has no >= M5 flare: nothing to learn
    assert not data_file(folder, Target.parse("M5-24"), "train").exists()
    for cls in ("C", "M"):
        target = Target.parse(f"{cls}-24")
        for split, src in (("test", test_src), ("train", train_src)):
            written = pd.read_csv(data_file(folder, target, split))
            records = written[written["Flare"] != "padding"]
            assert len(records) == len(src)
            assert (records["Flare"] == "P").to_numpy().tolist() == expected_labels(src, cls).tolist()
            assert records["HARPNUM"].tolist() == src["arpnum"].tolist()
            assert records["DATE__OBS"].tolist() == pd.to_datetime(src["t_end"]).dt.strftime(
                "%Y-%m-%dT%H:%M:%S").tolist()
            np.testing.assert_array_equal(records[list(cfg.features)].to_numpy(), src[list(cfg.features)].to_numpy())
            gaps, pad = expected_padding(src)
            assert (written["Flare"] == "padding").sum() == pad
            acct = record["targets"][str(target)][split]
            assert (acct["records"], acct["gaps"], acct["padding_rows"]) == (len(src), gaps, pad)
        assert record["targets"][str(target)]["dropped_rows"] == 0
    # The source's own label is the M-24 label.
    assert (expected_labels(test_src, "M") == test_src["label"].to_numpy()).all()
    regions = [set(pd.read_csv(data_file(folder, Target.parse("M-24"), s))["HARPNUM"]) for s in ("train", "test")]
    assert not regions[0] & regions[1] and (len(regions[0]), len(regions[1])) == (12, 3)


def test_padding_rows_fill_gaps_at_the_cadence(imported: Path) -> None:
    table = pd.read_csv(data_file(imported / "fold_0", Target.parse("M-24"), "test"))
    times, region = pd.to_datetime(table["DATE__OBS"]), table["HARPNUM"]
    pad = np.flatnonzero(table["Flare"] == "padding")
    assert pad.size > 0 and pad.max() + 1 < len(table)
    # Each padding row sits one cadence before the next row of its region: the gap's slots nearest its record.
    assert (region.iloc[pad + 1].to_numpy() == region.iloc[pad].to_numpy()).all()
    assert ((times.iloc[pad + 1].to_numpy() - times.iloc[pad].to_numpy()) == CADENCE.to_timedelta64()).all()
    assert table.loc[pad, ["AREA", "USFLUX", "MEANGBZ", "R_VALUE"]].eq(0).all().all()


def test_loader_statistics_equal_the_source(imported: Path) -> None:
    """Base rate, regions, cadence and padded windows as the training loader sees them."""
    folder = imported / "fold_0"
    cfg = load_config(folder / "everest.yaml")
    src = source(0)
    path = data_file(folder, Target.parse("M-24"), "test")
    samples, _, _ = read_samples(path, Target.parse("M-24"), cfg.data, cfg.model.seq_len, None)
    assert len(samples) == len(src)
    assert samples.y.mean() == pytest.approx(src["label"].mean(), abs=0)
    assert set(samples.region.tolist()) == set(src["arpnum"].tolist())
    table = read_table(path, cfg.data)
    real = table[table["label"] >= 0]
    steps = real.groupby("region")["time"].diff().dropna()
    assert steps.mode().iloc[0] == CADENCE
    assert int((~samples.valid.all(axis=1)).sum()) == expected_padded_windows(src, cfg.model.seq_len)


def test_check_accepts_and_one_epoch_trains(imported: Path, tmp_path: Path) -> None:
    folder = imported / "fold_0"
    cfg = ["--config", str(folder / "everest.yaml")]
    r = subprocess.run([sys.executable, "-m", "everest", "data", "check", str(folder), "--targets", "C-24", "M-24",
                        *cfg], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "everest", "train", "--flare-class", "M", "--time-window", "24",
                        "--data-dir", str(folder), *cfg, "--epochs", "1", *set_args(),
                        "--output-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "results" / "everest_M_24h_seed0" / "results.json").read_text())
    preds = pd.read_csv(tmp_path / "results" / "everest_M_24h_seed0" / "predictions.csv")
    assert len(preds) == len(source(0)) and preds["y_true"].sum() == source(0)["label"].sum()
    assert set(preds["noaa_ar"]) == set(source(0)["arpnum"])  # the region key: the patch number
    assert result["data"]["n_test"] == len(source(0)) and result["training"]["epochs_run"] == 1
    assert 0.0 < result["test_metrics"]["roc_auc"] <= 1.0 and np.isfinite(result["test_metrics"]["tss"])
    # The report shows how much history the model had, per file, as computed from the source.
    r = subprocess.run([sys.executable, "-m", "everest.analysis", "--results-dir", str(tmp_path / "results"),
                        "--no-plots", "--bootstrap", "200"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    report = (tmp_path / "analysis" / "production_training_report.md").read_text()
    assert "real (observed) data" in report.split("\n## ")[0]
    src = source(0)
    n, padded = len(src), expected_padded_windows(src, 10)
    row = (f"| M-24 | test | {n} | {src['label'].mean() * 100:.2f} % | 96 min | {expected_padding(src)[0]} | "
           f"{padded} ({padded / n * 100:.1f} %) |")
    assert row in report, report[report.index("## Data"):][:1500]


def test_flow_runs_on_an_import_without_edits(imported: Path, tmp_path: Path, prefect_server: str) -> None:
    """python -m flows.production --data-dir DIR --config DIR/everest.yaml: the targets the folder holds, the
    import's configuration; only the budget is cut (one seed, one epoch, the tiny network)."""
    from flows.production import ProductionParameters

    folder = imported / "fold_0"
    assert ProductionParameters(data_dir=str(folder)).targets == ["C-24", "M-24"]
    assert len(ProductionParameters().targets) == 9
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    r = subprocess.run([sys.executable, "-m", "flows.production", "--data-dir", str(folder), "--config",
                        str(folder / "everest.yaml"), "--seeds", "0", "--epochs", "1", *set_args(),
                        "--output-dir", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert "C-24, M-24 x seeds 0" in r.stdout
    report = (tmp_path / "o" / "analysis" / "production_training_report.md").read_text()
    history = report[report.index("## Data: how much history"):report.index("## Overall statistics")]
    assert history.count("| C-24 |") == 2 and history.count("| M-24 |") == 2 and "| 96 min |" in history


def _spoilt(tmp_path: Path, k: int, edit) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for j in range(5):
        text = (EXCERPT / f"smarp_{j}.csv").read_text()
        (src / f"smarp_{j}.csv").write_text(edit(text) if j == k else text)
    return src


BAD_SOURCES = {
    "label without an M flare": (lambda t: t.replace("False,,0.0,581.0", "True,,0.0,581.0", 1),
                                 r"smarp_0\.csv: column 'label' holds 'True' at line 2 .*expected the label"),
    "unknown flare class": (lambda t: t.replace(",C2.5,", ",Q2.5,", 1),
                            r"smarp_3\.csv: column 'flares' holds 'Q2\.5' at line 2 .*GOES classes"),
    "bad time": (lambda t: t.replace("2000-12-05 19:12:00,False", "yesterday,False", 1),
                 r"smarp_0\.csv: column 't_end' holds 'yesterday' at line 2 .*ISO 8601"),
    "empty feature": (lambda t: t.replace(",1.623e+21,", ",,", 1),
                      r"smarp_0\.csv: column 'USFLUX' holds '' \(an empty cell\) at line 2 .*finite number"),
    "missing column": (lambda t: t.replace("flares,", "flare_list,", 1),
                       r"smarp_0\.csv: missing required column\(s\) \['flares'\]"),
}


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_bad_source_rows_get_one_line_and_nothing_is_written(tmp_path: Path, case: str) -> None:
    edit, message = BAD_SOURCES[case]
    k = 3 if "flare class" in case else 0
    src = _spoilt(tmp_path, k, edit)
    out = tmp_path / "out"
    import_published("smarp", EXCERPT, out, folds=[1])  # an earlier import, to be kept as it is
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = subprocess.run([sys.executable, "-m", "everest", "data", "import", "smarp", str(src), "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), lines
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_regions_shared_by_two_folds_are_refused(tmp_path: Path) -> None:
    first = source(1)["arpnum"].iloc[0]
    src = _spoilt(tmp_path, 0, lambda t: t.replace("TARP,4780,", f"TARP,{first},"))
    message = rf"smarp_1\.csv: patch arpnum={first} at line 2 is also in smarp_0\.csv \(line 2\)"
    with pytest.raises(DataError, match=message):
        import_published("smarp", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_no_import_is_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "out" / "fold_0").mkdir(parents=True)
    (tmp_path / "out" / "fold_0" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="fold_0 exists and holds no import.json"):
        import_published("smarp", EXCERPT, tmp_path / "out", folds=[0])
    assert (tmp_path / "out" / "fold_0" / "notes.txt").read_text() == "mine"


def _study(folder: Path, out: Path) -> None:
    """One fold's study with the project's commands: two seeds as one group, the baselines, the ensemble, the
    analysis."""
    common = ["--flare-class", "M", "--time-window", "24", "--data-dir", str(folder), "--config",
              str(folder / "everest.yaml"), "--output-dir", str(out)]
    commands = [["everest", "train", *common, "--seed", "0", "1", "--epochs", "1", *set_args()],
                *[["everest", "baselines", *common, "--seed", s] for s in ("0", "1")],
                ["everest", "ensemble", "--output-dir", str(out), "--targets", "M-24"],
                ["everest.analysis", "--results-dir", str(out / "results"), "--targets", "M-24", "--seeds", "0", "1",
                 "--no-plots", "--bootstrap", "200"]]
    for cmd in commands:
        r = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])


def _tss(frame: pd.DataFrame) -> float:
    y, yhat = frame["y_true"].astype(bool), frame["y_pred"].astype(bool)
    return (y & yhat).sum() / y.sum() - (~y & yhat).sum() / (~y).sum()


def test_cross_fold_verdict_pools_the_folds(imported: Path, tmp_path: Path) -> None:
    folds = [tmp_path / f"fold_{k}" for k in (0, 2)]
    for k, out in zip((0, 2), folds, strict=True):
        _study(imported / f"fold_{k}", out)
    r = subprocess.run([sys.executable, "-m", "everest.analysis.folds", *map(str, folds), "--out", str(tmp_path / "x"),
                        "--target", "M-24", "--bootstrap", "200"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "EVEREST against the baselines over 2 region-disjoint folds" in r.stdout
    per_fold = pd.read_csv(tmp_path / "x" / "folds.csv")
    for out, row in zip(folds, per_fold.itertuples(), strict=True):
        verdict = pd.read_csv(out / "analysis" / "verdict.csv").iloc[0]
        assert (row.everest_tss, row.delta, row.verdict) == (verdict["everest_tss"], verdict["delta"],
                                                             verdict["verdict"])
        ensemble = pd.read_csv(out / "analysis" / "ensemble.csv").iloc[0]
        assert (row.ensemble_brier_raw, row.ensemble_ece) == (ensemble["brier_raw"], ensemble["ece"])
    pooled = pd.read_csv(tmp_path / "x" / "pooled.csv").set_index("model")
    by_seed = [pd.concat([pd.read_csv(out / "results" / f"everest_M_24h_seed{s}" / "predictions.csv") for out in folds])
               for s in (0, 1)]
    assert pooled.loc["everest", "tss"] == pytest.approx(np.mean([_tss(f) for f in by_seed]), abs=1e-12)
    assert pooled.loc["everest", "samples"] == len(source(0)) + len(source(2))
    assert pooled.loc["everest", "positives"] == source(0)["label"].sum() + source(2)["label"].sum()
    assert pooled.loc["everest", "regions"] == 6
    cmp = pd.read_csv(tmp_path / "x" / "pooled_comparison.csv")
    assert set(zip(cmp["candidate"], cmp["metric"], strict=True)) == {
        ("everest", "tss"), ("ensemble", "tss"), ("everest", "brier"), ("ensemble", "brier")}
    best = [per_fold.loc[i, "best_baseline"] for i in range(2)]
    base = [pd.concat([pd.read_csv(out / "baselines" / b / "results" / f"everest_M_24h_seed{s}" / "predictions.csv")
                       for out, b in zip(folds, best, strict=True)]) for s in (0, 1)]
    row = cmp[(cmp["candidate"] == "everest") & (cmp["metric"] == "tss")].iloc[0]
    expected = np.mean([_tss(e) - _tss(b) for e, b in zip(by_seed, base, strict=True)])
    assert row["delta"] == pytest.approx(expected, abs=1e-12) and row["ci_low"] <= row["delta"] <= row["ci_high"]
    # The same fold twice is no pair of region-disjoint folds.
    r = subprocess.run([sys.executable, "-m", "everest.analysis.folds", str(folds[0]), str(folds[0]), "--out",
                        str(tmp_path / "y")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and f"is tested in both {folds[0]} and {folds[0]}" in r.stderr
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize(("flares", "expected"), [
    ("", (False, False, False)), ("B9.9", (False, False, False)), ("C1.0", (True, False, False)),
    ("M4.9|C9.9", (True, True, False)), ("C2.0|M5.0", (True, True, True)), ("X1.0", (True, True, True)),
    ("M10", (True, True, True)), ("X17.", (True, True, True)), ("B2.0|M1.2", (True, True, False))])
def test_labels_from_the_flares_column(flares: str, expected: tuple[bool, bool, bool]) -> None:
    fold = Fold(Path("f.csv"), 0, np.zeros(1, np.int64), np.zeros(1, "datetime64[s]"),
                np.array([expected[1]]), [flares], pd.DataFrame({"USFLUX": [1.0]}), np.array([2]))
    got = tuple(bool(labels_for(fold, Target.parse(f"{c}-24"))[0]) for c in ("C", "M", "M5"))
    assert got == expected


def test_every_folder_is_checked_before_any_is_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    import_published("smarp", EXCERPT, out, folds=[0])
    before = (out / "fold_0" / "import.json").read_bytes()
    (out / "fold_3").mkdir()  # someone else's folder
    with pytest.raises(DataError, match="fold_3 exists and holds no import.json"):
        import_published("smarp", EXCERPT, out, folds=[0, 3], window=5)
    assert (out / "fold_0" / "import.json").read_bytes() == before and not any((out / "fold_3").iterdir())
    summary = import_published("smarp", EXCERPT, out, folds=[0], window=5)
    assert load_config(out / "fold_0" / "everest.yaml").model.seq_len == 5
    assert json.loads((out / "fold_0" / "import.json").read_text())["window"] == 5
    src = source(0)
    pad = summary.counts["fold_0"]["targets"]["M-24"]["test"]["padding_rows"]
    assert pad == expected_padding(src, cap=4)[1] < expected_padding(src)[1]
