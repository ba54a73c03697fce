"""``everest data check``: partial folders, per-target status, ``--set`` and ``--targets``, run as a user runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from everest.cli import EXIT_USAGE
from everest.config import EVEREST_FEATURES, ConfigError, Target, all_targets, load_config
from everest.data.check import format_summary, summarise, summary_line
from everest.errors import DataError

REPO = Path(__file__).resolve().parents[1]
FOUR = ["USFLUX", "R_VALUE", "TOTPOT", "ABSNJZH"]  # four of the nine features the synthetic tables hold
SET_FOUR = "data.features=[" + ",".join(f'"{f}"' for f in FOUR) + "]"
OTHERS = [str(t) for t in all_targets() if str(t) != "M-24"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """The 18 tables of the ``tiny`` synthetic size (seed 0), written once for this module."""
    from everest.data import synthetic

    out = tmp_path_factory.mktemp("datacheck-synth")
    synthetic.generate(out, size="tiny", seed=0)
    return out


def _copy(src: Path, dst: Path, *names: str) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(src / name, dst / name)
    return dst


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "everest.cli", "data", "check", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def _row(stdout: str, target: str) -> str:
    return next(line for line in stdout.splitlines() if line.split() and line.split()[0] == target)


M24 = ("training_data_M_24.csv", "testing_data_M_24.csv")


@pytest.mark.slow
def test_only_one_target_present_passes(synth, tmp_path):
    res = _check(str(_copy(synth, tmp_path / "d", *M24)))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 3  # header, the M-24 row, the summary line
    assert lines[0].split()[-1] == "status" and _row(res.stdout, "M-24").split()[-1] == "ok"
    assert lines[-1] == "1 of 9 targets present and readable; absent: " + ", ".join(OTHERS)


@pytest.mark.slow
def test_one_file_of_a_target_is_an_error_naming_the_missing_file(synth, tmp_path):
    folder = _copy(synth, tmp_path / "d", M24[0])
    res = _check(str(folder))
    assert res.returncode == EXIT_USAGE
    assert _row(res.stdout, "M-24").endswith("missing testing_data_M_24.csv")
    assert res.stdout.strip().splitlines()[-1].startswith("0 of 9 targets present and readable; with errors: M-24;")
    assert f"error: {folder}:" in res.stderr and "M-24: missing testing_data_M_24.csv" in res.stderr


@pytest.mark.slow
def test_empty_or_absent_folder_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no tables here")
    res = _check(str(empty))
    assert res.returncode == EXIT_USAGE and res.stdout == ""
    assert f"error: {empty}: no SHARP tables found" in res.stderr
    assert "training_data_<CLASS>_<HOURS>.csv" in res.stderr and "training_data_M_24.csv" in res.stderr
    gone = _check(str(tmp_path / "nowhere"))
    assert gone.returncode == EXIT_USAGE and f"{tmp_path / 'nowhere'}: folder not found" in gone.stderr


@pytest.mark.slow
def test_a_malformed_file_does_not_hide_the_other_targets(synth, tmp_path):
    folder = _copy(synth, tmp_path / "d", *M24, "training_data_M_48.csv", "testing_data_M_48.csv")
    bad = folder / "testing_data_M_48.csv"
    bad.write_text(bad.read_text().replace("\nN,", "\nQ,", 1))
    res = _check(str(folder))
    assert res.returncode == EXIT_USAGE
    assert _row(res.stdout, "M-24").split()[-1] == "ok"
    m48 = _row(res.stdout, "M-48")
    assert f"{bad}: column 'Flare' has unknown label" in m48 and m48.split()[1].isdigit()  # training part read
    assert "2 of 9" not in res.stdout and "1 of 9 targets present and readable; with errors: M-48;" in res.stdout
    assert "M-48:" in res.stderr and "M-24" not in res.stderr


@pytest.mark.slow
def test_set_features_changes_what_is_read(synth, tmp_path):
    folder = tmp_path / "four"
    folder.mkdir()
    dropped = [f for f in EVEREST_FEATURES if f not in FOUR]
    assert len(dropped) == 5
    for name in M24:
        pd.read_csv(synth / name, dtype=str).drop(columns=dropped).to_csv(folder / name, index=False)
    plain = _check(str(folder))
    assert plain.returncode == EXIT_USAGE and "missing required column(s)" in plain.stderr
    assert all(f in plain.stderr for f in dropped)
    res = _check(str(folder), "--set", SET_FOUR)
    assert res.returncode == 0, res.stderr
    assert _row(res.stdout, "M-24").split()[-1] == "ok" and "1 of 9 targets present and readable" in res.stdout


@pytest.mark.slow
def test_bad_set_gives_the_config_error(synth, tmp_path):
    folder = str(_copy(synth, tmp_path / "d", *M24))
    for override in ("nosuch.key=1", "data.features=[]", "data"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [override])
        res = _check(folder, "--set", override)
        assert res.returncode == EXIT_USAGE and res.stdout == ""
        assert res.stderr.strip() == f"error: {err.value}"


@pytest.mark.slow
def test_targets_restrict_the_check(synth, tmp_path):
    res = _check(str(synth), "--targets", "M-24", "c-72", "M-24")
    assert res.returncode == 0, res.stderr
    assert [line.split()[0] for line in res.stdout.strip().splitlines()[1:-1]] == ["M-24", "C-72"]
    assert res.stdout.strip().splitlines()[-1] == "2 of 2 targets present and readable"
    # a requested target without files is an error, not absent
    folder = _copy(synth, tmp_path / "d", *M24)
    missing = _check(str(folder), "--targets", "M-24", "M5-48")
    assert missing.returncode == EXIT_USAGE
    assert _row(missing.stdout, "M5-48").endswith("missing training_data_M5_48.csv and testing_data_M5_48.csv")
    assert "1 of 2 targets present and readable; with errors: M5-48" in missing.stdout
    assert "M5-48: missing" in missing.stderr
    typo = _check(str(folder), "--targets", "X-12")
    assert typo.returncode == EXIT_USAGE and "invalid target 'X-12'" in typo.stderr


def test_summarise_in_process(synth, tmp_path):
    folder = _copy(synth, tmp_path / "d", *M24, "training_data_C_24.csv")
    cfg = load_config().data
    df = summarise(folder, cfg, 10)
    assert list(df["target"]) == [str(t) for t in all_targets()] and df.columns[-1] == "status"
    status = dict(zip(df["target"], df["status"], strict=True))
    assert status["M-24"] == "ok" and status["C-24"] == "missing testing_data_C_24.csv"
    assert {status[t] for t in OTHERS if t != "C-24"} == {"absent"}
    m24 = df.set_index("target").loc["M-24"]
    assert m24["train_samples"] > 0 and 0 < m24["test_rate"] < 1
    table = format_summary(df)
    assert "absent" not in table and len(table.splitlines()) == 3 and "-" in table
    assert summary_line(df).startswith("1 of 9 targets present and readable; with errors: C-24; absent: C-48,")
    only = summarise(folder, cfg, 10, targets=[Target.parse("M-24")])
    assert list(only["status"]) == ["ok"]
    with pytest.raises(DataError, match="no SHARP tables found"):
        summarise(tmp_path, cfg, 10)


def _relabel(path: Path, keep_positives: int = 0) -> None:
    """Relabel every positive row of ``path`` but the first ``keep_positives`` as N."""
    df = pd.read_csv(path, dtype={"Flare": str})
    positive = df.index[df.Flare == "P"]
    df.loc[positive[keep_positives:], "Flare"] = "N"
    df.to_csv(path, index=False)


@pytest.mark.slow
def test_targets_a_run_cannot_use_are_not_ok(synth, tmp_path):
    """No training positives, or too few for the validation split to choose a threshold on: an error status
    naming the file and the counts, exit 2; a test table without positives: a warning, exit 0."""
    d = _copy(synth, tmp_path / "d", *M24, "training_data_M_48.csv", "testing_data_M_48.csv",
              "training_data_C_24.csv", "testing_data_C_24.csv")
    _relabel(d / "training_data_M_24.csv")
    _relabel(d / "training_data_M_48.csv", keep_positives=5)
    res = _check(str(d))
    assert res.returncode == EXIT_USAGE
    assert _row(res.stdout, "C-24").split()[-1] == "ok"
    m24 = _row(res.stdout, "M-24")
    assert m24.split()[2] == "0" and "training_data_M_24.csv: no positive samples: all 2323 samples" in m24
    assert "the validation split" in _row(res.stdout, "M-48") and "holds 0 positive sample(s)" in res.stdout
    assert "1 of 9 targets present and readable; with errors: M-24, M-48;" in res.stdout

    _copy(synth, d, *M24, "training_data_M_48.csv")  # fixed again; now no positives in a test table
    _relabel(d / "testing_data_C_24.csv")
    res = _check(str(d))
    assert res.returncode == 0, res.stderr
    assert "warning: testing_data_C_24.csv holds no positive samples: test TSS, recall, F1 and ROC AUC will be " \
           "undefined" in _row(res.stdout, "C-24")
    assert "3 of 9 targets present and readable; with warnings: C-24; absent:" in res.stdout


def test_validation_positives_column_counts_the_split_the_trainer_makes(synth):
    from everest.data.samples import load_samples, split_validation

    cfg = load_config()
    df = summarise(synth, cfg.data, cfg.model.seq_len, ["M5-24", "C-48"])
    for target in ("M5-24", "C-48"):
        t = Target.parse(target)
        samples, _ = load_samples(synth / f"training_data_{t.flare_class}_{t.horizon}.csv", t, cfg.data, 10)
        _, val = split_validation(samples, cfg.data, seed=0)
        assert df.set_index("target").loc[target, "val_positives"] == val.n_positive >= 10
