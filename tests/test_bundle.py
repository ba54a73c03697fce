"""The model bundle and the forecaster: a real tiny study (two seeds of M-24, both baselines, the ensemble, the
analysis) is bundled; forecasting its own test table reproduces the ensemble's test predictions; a changed bundle
is refused; bad input gets one clear line."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny import overrides

from everest.analysis.analyzer import run_analysis
from everest.config import EverestConfig, Experiment, Target
from everest.errors import ConfigError, DataError
from everest.scoring.baselines import BASELINES, baseline_root, fit_baseline
from everest.scoring.ensemble import build_ensembles, ensemble_name, ensemble_root
from everest.serving.bundle import MANIFEST, BundleError, load_bundle, sha256, write_bundle
from everest.serving.forecaster import COLUMNS, Forecaster, read_input, records_from_frame
from everest.training.train import ProductionTrainer

pytestmark = pytest.mark.slow  # trains a two-seed study

REPO = Path(__file__).resolve().parents[1]
TARGET = Target.parse("M-24")
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def study(tiny_data, tmp_path_factory) -> Path:
    """A finished tiny study of M-24: seeds 0 and 1, both baselines, the ensemble and the analysis."""
    out = tmp_path_factory.mktemp("study")
    cfg = EverestConfig().with_overrides(overrides("train.epochs=2", "train.num_threads=1"))
    for seed in SEEDS:
        exp = Experiment(target=TARGET, seed=seed)
        ProductionTrainer(exp, config=cfg, data_dir=tiny_data, output_dir=out).train()
        for model in BASELINES:
            fit_baseline(model, exp, cfg, tiny_data, out)
    build_ensembles(out / "results", out, [TARGET])
    run_analysis(out / "results", out, targets=[str(TARGET)], seeds=list(SEEDS), n_bootstrap=200, make_plots=False)
    return out


@pytest.fixture(scope="module")
def bundle(study) -> Path:
    return write_bundle(study).path


@pytest.fixture(scope="module")
def test_table(tiny_data) -> pd.DataFrame:
    return read_input(tiny_data / "testing_data_M_24.csv")


def _ensemble_predictions(study: Path) -> pd.DataFrame:
    return pd.read_csv(ensemble_root(study) / "results" / ensemble_name(TARGET) / "predictions.csv")


def test_forecasting_the_test_table_reproduces_the_ensembles_predictions(study, bundle, test_table):
    forecasts = Forecaster.load(bundle).predict(test_table, all_times=True)
    assert list(forecasts.columns) == list(COLUMNS)
    ens = _ensemble_predictions(study)
    merged = ens.merge(forecasts, on=["noaa_ar", "time"], how="left", validate="one_to_one")
    assert merged["probability"].notna().all(), "a test sample has no forecast"
    np.testing.assert_allclose(merged["probability"], merged["y_prob"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(merged["probability_raw"], merged["y_prob_raw"], rtol=0, atol=1e-6)
    assert (merged["decision"].astype(int) == merged["y_pred"]).all()
    assert (merged["model"] == "ensemble").all()
    assert (merged["spread"] >= 0).all() and merged["spread"].max() > 0  # two seeds that differ
    assert (merged["aleatoric"] > 0).all() and (merged["epistemic"] > 0).all()


def test_the_bundle_holds_what_the_study_found(study, bundle):
    manifest = json.loads((bundle / MANIFEST).read_text())
    files = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == files
    for rel, entry in manifest["files"].items():
        assert entry["sha256"] == sha256(bundle / rel) and entry["bytes"] == (bundle / rel).stat().st_size
    assert manifest["targets"] == ["M-24"]
    rec = json.loads((bundle / "M_24" / "target.json").read_text())
    ens = json.loads((ensemble_root(study) / "results" / ensemble_name(TARGET) / "ensemble.json").read_text())
    assert rec["config_hash"] == ens["provenance"]["config_hash"]
    assert rec["data_hashes"] == ens["provenance"]["data_hashes"]
    assert [m["seed"] for m in rec["members"]] == list(SEEDS)
    assert rec["threshold"]["selected_raw"] == ens["threshold"]["selected_raw"]
    assert rec["test_metrics"]["tss"] == ens["test_metrics"]["tss"]
    assert rec["seq_len"] == EverestConfig().model.seq_len and rec["features"] == list(EverestConfig().data.features)
    verdict = pd.read_csv(study / "analysis" / "verdict.csv").iloc[0]
    assert rec["verdict"]["verdict"] == verdict["verdict"] and rec["verdict"]["sentence"] == verdict["sentence"]
    assert rec["baseline"]["model"] == verdict["best_baseline"]
    assert rec["baseline"]["seed"] == 0
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "## M-24" in card and str(verdict["verdict"]) in card
    assert not list(bundle.rglob("*.pt")) and not list(bundle.rglob("*.pkl"))  # no pickle files in a bundle


def test_loading_and_forecasting_never_unpickle(bundle, test_table, monkeypatch):
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    forecasts = Forecaster.load(bundle).predict(test_table, model="baseline")
    assert len(forecasts) > 0


def test_the_baseline_forecast_is_the_baselines_test_predictions(study, bundle, test_table):
    rec = json.loads((bundle / "M_24" / "target.json").read_text())
    model = rec["baseline"]["model"]
    forecasts = Forecaster.load(bundle).predict(test_table, all_times=True, model="baseline")
    theirs = pd.read_csv(baseline_root(study, model) / "results" / "everest_M_24h_seed0" / "predictions.csv")
    merged = theirs.merge(forecasts, on=["noaa_ar", "time"], how="left", validate="one_to_one")
    np.testing.assert_allclose(merged["probability"], merged["y_prob"], rtol=0, atol=1e-6)
    assert (merged["decision"].astype(int) == merged["y_pred"]).all()
    assert (forecasts["model"] == f"baseline:{model}").all() and forecasts["spread"].isna().all()


def test_best_is_the_model_with_the_higher_validation_tss(bundle, test_table):
    rec = json.loads((bundle / "M_24" / "target.json").read_text())
    ensemble_wins = rec["validation_metrics"]["tss"] >= rec["baseline"]["validation_tss"]
    best = Forecaster.load(bundle).predict(test_table, model="best")
    assert set(best["model"]) == {"ensemble" if ensemble_wins else f"baseline:{rec['baseline']['model']}"}


def test_one_row_per_region_at_its_latest_record_and_what_the_window_holds(bundle, test_table):
    forecaster = Forecaster.load(bundle)
    seq_len = forecaster.bundle.targets["M-24"].config.model.seq_len
    latest = forecaster.predict(test_table)
    records = records_from_frame(test_table, EverestConfig().data)
    records = records[records["label"] != -1]  # rows labelled 'padding' are history, never a forecast's time
    counts = records.groupby("region").size()
    last = records.groupby("region")["time"].max().dt.strftime("%Y-%m-%dT%H:%M:%S")
    assert sorted(latest["noaa_ar"]) == sorted(counts.index)
    for _, row in latest.iterrows():
        assert row["time"] == last[row["noaa_ar"]] == row["latest_record"]
        assert row["n_records"] == min(counts[row["noaa_ar"]], seq_len)
    # A region with three records: its window is front-padded as in training, and says so.
    one = records["region"].iloc[0]
    short = test_table[pd.to_numeric(test_table["NOAA_AR"]) == one].head(3)
    row = forecaster.predict(short).iloc[0]
    assert row["n_records"] == 3 and row["time"] == pd.Timestamp(short["DATE__OBS"].iloc[-1]).strftime(
        "%Y-%m-%dT%H:%M:%S")


def test_labels_are_ignored_but_padding_rows_stay_history_and_a_stale_region_is_flagged(bundle, test_table):
    forecaster = Forecaster.load(bundle)
    records = test_table[test_table["Flare"] != "padding"]
    with_labels = forecaster.predict(records)
    flipped = forecaster.predict(records.assign(Flare=records["Flare"].map({"N": "P", "P": "N"})))
    without = forecaster.predict(records.drop(columns=["Flare"]).assign(Flare_note="an extra column"))
    pd.testing.assert_frame_equal(with_labels, flipped)
    pd.testing.assert_frame_equal(with_labels, without)
    # A row labelled 'padding' is history only, as in training: never a forecast's time, masked in windows.
    padded = forecaster.predict(test_table, all_times=True)
    assert len(padded) == (test_table["Flare"] != "padding").sum()
    # Three regions whose latest records are 0 h, 23 h and 25 h older than the input's newest: the last is stale.
    regions = pd.to_numeric(records["NOAA_AR"])
    three = regions.unique()[:3]
    newest = pd.Timestamp("2012-03-07T12:00:00")
    parts = []
    for region, age in zip(three, (0, 23, 25), strict=True):
        rows = records[regions == region].copy()
        times = pd.to_datetime(rows["DATE__OBS"])
        rows["DATE__OBS"] = (times - times.max() + newest - pd.Timedelta(hours=age)).dt.strftime("%Y-%m-%dT%H:%M:%S")
        parts.append(rows)
    stale = forecaster.predict(pd.concat(parts)).set_index("noaa_ar")["stale"]
    assert stale.loc[list(three)].tolist() == [False, False, True]


@pytest.mark.parametrize(("change", "fragments"), [
    (lambda t: t.drop(columns=["USFLUX"]), ["missing column(s) ['USFLUX']"]),
    (lambda t: t.assign(TOTUSJH=t["TOTUSJH"].where(t.index != 4, "abc")), ["'TOTUSJH'", "'abc'", "line 6"]),
    (lambda t: t.assign(DATE__OBS=t["DATE__OBS"].where(t.index != 2, "yesterday")), ["'DATE__OBS'", "line 4"]),
    (lambda t: t.head(0), ["no records"]),
    (lambda t: pd.concat([t.head(3), t.head(1)]), ["two records at"]),
], ids=["missing feature", "non-numeric", "bad time", "no records", "duplicate record"])
def test_bad_input_is_refused_by_name(bundle, test_table, change, fragments):
    with pytest.raises(DataError) as err:
        Forecaster.load(bundle).predict(change(test_table.copy()))
    for fragment in fragments:
        assert fragment in str(err.value)


def test_a_target_the_bundle_lacks_is_refused(bundle, test_table):
    with pytest.raises(ConfigError, match=r"target M5-72 is not in bundle .* \(it holds M-24\)"):
        Forecaster.load(bundle).predict(test_table, targets=["M5-72"])


def _copy(bundle: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("spoil", "fragment"), [
    (lambda b: _flip_byte(b / "M_24" / "member_seed1.npz"), "member_seed1.npz: its SHA-256 differs"),
    (lambda b: (b / "M_24" / "member_seed0.npz").write_bytes((b / "M_24" / "member_seed0.npz").read_bytes()[:999]),
     "member_seed0.npz: 999 bytes, the manifest says"),
    (lambda b: (b / "M_24" / "target.json").unlink(), "target.json: missing"),
    (lambda b: (b / "M_24" / "notes.txt").write_text("x"), "file M_24/notes.txt is not in the manifest"),
    (lambda b: (b / MANIFEST).write_text(json.dumps({**json.loads((b / MANIFEST).read_text()),
                                                     "code_version": "everest-0"})),
     "bundle made by everest code version 'everest-0'"),
    (lambda b: (b / MANIFEST).unlink(), "is not a model bundle"),
], ids=["changed weights", "truncated weights", "missing file", "extra file", "foreign version", "no manifest"])
def test_a_changed_bundle_is_refused_by_name(bundle, tmp_path, spoil, fragment):
    copy = _copy(bundle, tmp_path)
    spoil(copy)
    with pytest.raises(BundleError, match=None) as err:
        load_bundle(copy)
    assert fragment in str(err.value)


def test_a_rewrite_replaces_the_bundle_and_never_a_foreign_folder(study, tmp_path):
    target = tmp_path / "b"
    first = write_bundle(study, target)
    before = (target / MANIFEST).read_text()
    assert write_bundle(study, target).path == first.path and (target / MANIFEST).read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary folder was left behind"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(BundleError, match="exists and is no bundle"):
        write_bundle(study, foreign)
    assert (foreign / "thesis.tex").read_text() == "keep me"


def test_bundle_without_an_ensemble_says_why(tmp_path):
    with pytest.raises(BundleError, match="no target has a built seed ensemble"):
        write_bundle(tmp_path, targets=[TARGET])


# ---------------------------------------------------------------------------------------------- the commands
def _everest(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "everest", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_predict_command_writes_csv_and_json_and_the_same_input_gives_the_same_bytes(bundle, tiny_data, tmp_path):
    table = tiny_data / "testing_data_M_24.csv"
    for name in ("a.csv", "b.csv", "a.json", "b.json"):
        r = _everest("predict", "--bundle", str(bundle), "--input", str(table), "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    doc = json.loads((tmp_path / "a.json").read_text())
    assert list(doc["forecasts"][0]) == list(COLUMNS)
    csv = pd.read_csv(tmp_path / "a.csv")
    assert len(csv) == len(doc["forecasts"]) == csv["noaa_ar"].nunique()


def test_predict_command_prints_a_table_most_probable_first(bundle, tiny_data):
    r = _everest("predict", "--bundle", str(bundle), "--input", str(tiny_data / "testing_data_M_24.csv"),
                 "--all-times")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = lines[0].split()
    assert header[:5] == ["target", "noaa_ar", "harpnum", "time", "probability"]
    probs = [float(line.split()[4]) for line in lines[1:] if line.split()[0] == "M-24"]
    assert probs == sorted(probs, reverse=True) and len(probs) == 40
    assert "more row(s)" in lines[-1]


def test_predict_command_refuses_a_changed_bundle_and_writes_nothing(bundle, tiny_data, tmp_path):
    copy = _copy(bundle, tmp_path)
    _flip_byte(copy / "M_24" / "member_seed0.npz")
    out = tmp_path / "f.csv"
    r = _everest("predict", "--bundle", str(copy), "--input", str(tiny_data / "testing_data_M_24.csv"), "--out",
                 str(out))
    assert r.returncode == 2 and not out.exists()
    assert r.stderr.count("\n") == 1 and "member_seed0.npz: its SHA-256 differs" in r.stderr


@pytest.mark.parametrize(("args", "fragment"), [
    (["--targets", "C-72"], "target C-72 is not in bundle"),
    (["--out", "forecast.txt"], "expected a file name ending in .csv or .json"),
    (["--model", "forest"], "invalid choice: 'forest'"),
], ids=["target not bundled", "bad output suffix", "unknown model"])
def test_predict_command_refuses_bad_options(bundle, tiny_data, tmp_path, args, fragment):
    r = _everest("predict", "--bundle", str(bundle), "--input", str(tiny_data / "testing_data_M_24.csv"), *args,
                 cwd=tmp_path)
    assert r.returncode == 2 and fragment in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())


def test_bundle_command(study, tmp_path):
    r = _everest("bundle", "--output-dir", str(study), "--out", str(tmp_path / "b"), "--targets", "M-24", "C-24")
    assert r.returncode == 0, r.stderr
    assert "bundled M-24" in r.stdout and "C-24: left out" in r.stdout
    assert load_bundle(tmp_path / "b").manifest["targets"] == ["M-24"]


# ---------------------------------------------------------------------------------------------- the flow
def test_forecast_flow_writes_files_publishes_the_table_and_is_idempotent(prefect_server, bundle, tiny_data,
                                                                          tmp_path):
    import shutil
    import time

    from prefect.client.orchestration import get_client

    from flows.forecast import everest_forecast

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    shutil.copy(tiny_data / "testing_data_C_24.csv", incoming / "older.csv")
    time.sleep(0.05)
    shutil.copy(tiny_data / "testing_data_M_24.csv", incoming / "newest.csv")
    out = tmp_path / "forecasts"
    states = [everest_forecast(bundle=str(bundle), input=str(incoming), output_dir=str(out), return_state=True)
              for _ in range(2)]
    assert all(s.is_completed() for s in states), states[0].message
    first, second = (s.result() for s in states)
    assert first == second and first["input"] == str(incoming / "newest.csv")
    assert sorted(Path(f).suffix for f in first["files"]) == [".csv", ".json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(f).name for f in first["files"])  # the same files
    csv = pd.read_csv(next(f for f in first["files"] if f.endswith(".csv")))
    assert len(csv) == first["forecasts"] == csv["noaa_ar"].nunique()
    with get_client(sync_client=True) as client:
        arts = [a for a in client.read_artifacts() if (a.key or "").startswith("everest-forecast")]
    assert len(arts) >= 1
    table = arts[-1].data if isinstance(arts[-1].data, list) else json.loads(arts[-1].data)
    probs = [row["probability"] for row in table]
    assert probs == sorted(probs, reverse=True) and {row["decision"] for row in table} <= {"FLARE", "-"}
    assert "verdict against the baseline" in arts[-1].description


def test_forecast_deployment_has_a_paused_schedule_at_the_sharp_cadence():
    import yaml

    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    forecast = [d for d in deployments if d["entrypoint"] == "flows.forecast:everest_forecast"]
    assert [d["name"] for d in forecast] == ["local"]
    (schedule,) = forecast[0]["schedules"]
    assert schedule["interval"] == 720 and schedule["active"] is False


def test_predict_command_refuses_bad_records_by_name_and_writes_nothing(bundle, tiny_data, tmp_path):
    table = (tiny_data / "testing_data_M_24.csv").read_text().splitlines()
    table[3] = table[3].replace(table[3].split(",")[8], "4.4e22x", 1)  # USFLUX of the third record
    bad = tmp_path / "records.csv"
    bad.write_text("\n".join(table) + "\n")
    out = tmp_path / "f.json"
    r = _everest("predict", "--bundle", str(bundle), "--input", str(bad), "--out", str(out))
    assert r.returncode == 2 and not out.exists(), r.stderr
    assert r.stderr.count("\n") == 1 and f"{bad}: column 'USFLUX' holds '4.4e22x' at line 4" in r.stderr
