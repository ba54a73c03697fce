"""Bad input matrix: every case is refused with a message naming the problem, a non-zero exit, nothing written.

Data cases call the ``python -m everest.train`` entry point (``everest.train.main``, in-process for speed)
on a copy of the tiny synthetic tables with one file spoiled; parameter cases call ``python -m
flows.production``'s ``main`` (refused before any server, cluster or job starts). Tolerated cases (extra
columns, a one-row region, a split without positives) must train.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from everest import train
from flows import production

TINY = ["--set=model.embed_dim=16", "--set=model.ff_dim=32", "--set=model.num_blocks=1", "--set=model.num_heads=2",
        "--epochs", "1"]
TRAIN = "training_data_M_24.csv"
TEST = "testing_data_M_24.csv"


def _edit(file: str, change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        df = pd.read_csv(d / file, dtype={"Flare": str})
        change(df).to_csv(d / file, index=False)
    return apply


def _set(row: int, col: str, value) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def change(df: pd.DataFrame) -> pd.DataFrame:
        df = df.astype({col: object})
        df.loc[row, col] = value
        return df
    return change


def _write(file: str, text: str) -> Callable[[Path], None]:
    return lambda d: (d / file).write_text(text)


def _first_region_rows(df: pd.DataFrame) -> pd.Index:
    return df.index[df.NOAA_AR == df.NOAA_AR.iloc[0]]


# (case, how to spoil the data folder, expected message fragments); all must exit 2 and write nothing.
DATA_CASES = [
    ("missing file", lambda d: (d / TRAIN).unlink(), ["data file not found", TRAIN]),
    ("empty file", _write(TRAIN, ""), ["file is empty", TRAIN]),
    ("header only", lambda d: (d / TRAIN).write_text((d / TRAIN).read_text().splitlines()[0] + "\n"),
     ["no data rows", TRAIN]),
    ("missing required column", _edit(TRAIN, lambda df: df.drop(columns=["USFLUX"])),
     ["missing required column", "USFLUX"]),
    ("non-numeric value", _edit(TEST, _set(7, "TOTPOT", "12e3x")), ["'TOTPOT'", "'12e3x'", "line 9", TEST]),
    ("NaN value", _edit(TRAIN, _set(3, "R_VALUE", float("nan"))), ["'R_VALUE'", "finite", "line 5"]),
    ("inf value", _edit(TRAIN, _set(4, "ABSNJZH", "inf")), ["'ABSNJZH'", "inf", "line 6"]),
    ("unknown label", _edit(TRAIN, _set(2, "Flare", "X")), ["unknown label 'X'", "line 4"]),
    ("unsorted time within a region", _edit(TRAIN, lambda df: df.iloc[[0, 2, 1, *range(3, len(df))]]),
     ["out of time order", "line 4"]),
    ("duplicate rows", _edit(TRAIN, lambda df: pd.concat([df.iloc[:5], df.iloc[[4]], df.iloc[5:]])),
     ["out of time order", "line 7"]),
    ("gigantic values", _edit(TRAIN, _set(6, "USFLUX", 1e300)), ["'USFLUX'", "1e+300", "float32 range"]),
]


@pytest.fixture
def spoiled(tiny_data, tmp_path) -> Path:
    d = tmp_path / "data"
    shutil.copytree(tiny_data, d)
    return d


class Result:
    """Exit status and captured output of one command-line call."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _call(main: Callable[[list[str]], int], argv: list[str], capsys) -> Result:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    out = capsys.readouterr()
    return Result(code, out.out, out.err)


@pytest.fixture
def run_train(capsys):
    def _run(data: Path, out: Path, *extra: str) -> Result:
        return _call(train.main, ["--flare_class", "M", "--time_window", "24", "--data-dir", str(data),
                                  "--output-dir", str(out), *TINY, *extra], capsys)
    return _run


@pytest.fixture
def run_flow_cli(capsys):
    return lambda argv: _call(production.main, argv, capsys)


@pytest.mark.parametrize(("case", "spoil", "fragments"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_is_refused(case, spoil, fragments, spoiled, tmp_path, run_train):
    spoil(spoiled)
    out = tmp_path / "out"
    r = run_train(spoiled, out)
    assert r.returncode == 2, (case, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    for frag in fragments:
        assert frag in r.stderr, (case, frag, r.stderr)
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*")), "something was written"


# Inputs that are unusual but valid: they must train, and say what happened.
def test_extra_columns_are_fine(spoiled, tmp_path, run_train):
    _edit(TRAIN, lambda df: df.assign(NOTES="x", EXTRA=1.0))(spoiled)
    assert run_train(spoiled, tmp_path / "out").returncode == 0


def test_region_with_a_single_row_is_fine(spoiled, tmp_path, run_train):
    def one_row_region(df: pd.DataFrame) -> pd.DataFrame:
        rows = _first_region_rows(df)
        return df.drop(index=rows[1:])
    _edit(TRAIN, one_row_region)(spoiled)
    assert run_train(spoiled, tmp_path / "out").returncode == 0


def test_all_negatives_in_the_test_split_are_handled(spoiled, tmp_path, run_train):
    _edit(TEST, lambda df: df.assign(Flare=df.Flare.where(df.Flare == "padding", "N")))(spoiled)
    r = run_train(spoiled, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "out" / "results" / "everest_M_24h_seed0" / "results.json").read_text())
    m = res["test_metrics"]
    assert m["tp"] == 0 and m["fn"] == 0 and m["recall"] == 0.0  # documented value for "no positives"
    assert m["roc_auc"] != m["roc_auc"]  # NaN: undefined with one class, not a crash


# Parameters: refused by the flow's command line before anything starts.
PARAM_CASES = [
    ("unknown target", ["--targets", "X-12"], "invalid target 'X-12'"),
    ("horizon 36", ["--targets", "M-36"], "invalid target 'M-36'"),
    ("negative seed", ["--seeds", "-1"], "distinct non-negative"),
    ("duplicate seeds", ["--seeds", "1", "1"], "distinct non-negative"),
    ("empty target list", ["--targets"], "expected at least one argument"),
    ("epochs 0", ["--epochs", "0"], "epochs: Input should be greater than or equal to 1 (got 0)"),
    ("batch size 0", ["--set", "train.batch_size=0"], "train.batch_size"),
    ("unknown profile", ["--profile", "lsf"], "lsf"),
    ("shell text in a target", ["--targets", "C-24; rm -rf ~"], "invalid target 'C-24; rm -rf ~'"),
]


@pytest.mark.parametrize(("case", "args", "fragment"), PARAM_CASES, ids=[c[0] for c in PARAM_CASES])
def test_bad_parameters_are_refused(case, args, fragment, tmp_path, run_flow_cli):
    out = tmp_path / "out"
    r = run_flow_cli([*args, "--data-dir", str(tmp_path / "d"), "--output-dir", str(out)])
    assert r.returncode == 2, (case, r.stderr)
    assert fragment in r.stderr and "Traceback" not in r.stderr, (case, r.stderr)
    assert not out.exists()


PROFILE_CASES = [
    ("walltime 25:99:00", "kind: pbs\nwalltime: '25:99:00'\n", "walltime"),
    ("unknown profile key", "kind: slurm\nqueues: gpu\n", "queues"),
    ("shell text in a queue", "kind: pbs\nqueue: 'gpu; rm -rf ~'\n", "queue"),
]


@pytest.mark.parametrize(("case", "text", "fragment"), PROFILE_CASES, ids=[c[0] for c in PROFILE_CASES])
def test_bad_profiles_are_refused(case, text, fragment, tmp_path, run_flow_cli):
    profile = tmp_path / "site.yaml"
    profile.write_text(text)
    out = tmp_path / "out"
    r = run_flow_cli(["--profile", str(profile), "--output-dir", str(out)])
    assert r.returncode == 2, (case, r.stderr)
    assert fragment in r.stderr and str(profile) in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_unwritable_output_directory_is_refused(spoiled, tmp_path, run_train):
    # A regular file where the output folder should be: refused even for root (permissions would not be).
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    r = run_train(spoiled, blocker / "out")
    assert r.returncode == 5, r.stderr
    assert "cannot read or write" in r.stderr and "not-a-dir" in r.stderr and "Traceback" not in r.stderr
