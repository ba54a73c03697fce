"""Bad input matrix: every case is refused with a message naming the problem, a non-zero exit, nothing written.

Data cases call the ``everest train`` command (``everest.cli.main``, in-process for speed)
on a copy of the tiny synthetic tables with one file spoiled; parameter cases call ``python -m
flows.production``'s ``main`` (refused before any server, cluster or job starts). Tolerated cases (extra
columns, a one-row region, a split without positives) must train. File-format cases (bytes, encoding,
structure, values) run the real ``everest data check`` command in a subprocess, and a few the trainer's:
refused ones end in exactly one ``error:`` line and exit status 2, tolerated ones read as the clean file.
Those processes share nothing, so the ``matrix`` fixture starts them side by side, one per core.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pytest
from tiny import TINY_MODEL, set_args

from everest import cli
from flows import production, terminal

TINY = [*set_args(TINY_MODEL), "--epochs", "1"]
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


def _few_positives(df: pd.DataFrame) -> pd.DataFrame:
    """Keep the first 5 positive rows only: one flaring region, which the validation split cannot share."""
    positive = df.index[df.Flare == "P"]
    return df.assign(Flare=df.Flare.where(~df.index.isin(positive[5:]), "N"))


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
    ("training table without positives (P relabelled N)",
     _edit(TRAIN, lambda df: df.assign(Flare=df.Flare.replace("P", "N"))),
     [TRAIN, "no positive samples", "all 2323 samples are labelled 'N'", "nothing to learn"]),
    ("validation split too poor in positives to choose a threshold", _edit(TRAIN, _few_positives),
     [TRAIN, "the validation split", "holds 0 positive sample(s)", "at least 10 are needed to choose a decision"]),
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
        return _call(cli.main, ["train", "--flare_class", "M", "--time_window", "24", "--data-dir", str(data),
                                  "--output-dir", str(out), *TINY, *extra], capsys)
    return _run


@pytest.fixture
def run_flow_cli(capsys, monkeypatch):
    """``python -m flows.production``'s main, in-process. It quiets Prefect's and Dask's console logs through
    the environment (its worker processes read it): restored after each call, so later runs of this test
    process still log to their job files."""
    import dask

    quieted = ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "DASK_LOGGING__DISTRIBUTED")
    monkeypatch.setattr(terminal.TERMINAL, "active", False)

    def run(argv: list[str]) -> Result:
        saved = {name: os.environ.get(name) for name in quieted}
        try:
            return _call(production.main, argv, capsys)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            dask.config.refresh()
    return run


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
@pytest.mark.slow
def test_extra_columns_are_fine(spoiled, tmp_path, run_train):
    _edit(TRAIN, lambda df: df.assign(NOTES="x", EXTRA=1.0))(spoiled)
    assert run_train(spoiled, tmp_path / "out").returncode == 0


@pytest.mark.slow
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
    assert m["tp"] == 0 and m["fn"] == 0
    for name in ("recall", "tss", "roc_auc"):  # undefined without positives: NaN, never a number
        assert m[name] != m[name], (name, m[name])
    assert m["specificity"] == m["tn"] / (m["tn"] + m["fp"]) and m["brier"] >= 0.0  # defined ones stay numbers
    assert "test TSS undefined" in r.stdout and "ROC AUC undefined" in r.stdout, r.stdout


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
    ("invalid override that a later option replaces", ["--set", "train.epochs=abc", "--epochs", "1"],
     "invalid override train.epochs='abc'"),
    ("invalid epochs that a later --epochs replaces", ["--epochs", "0", "--epochs", "1"],
     "epochs: Input should be greater than or equal to 1 (got 0)"),
    ("invalid target that a later --targets replaces", ["--targets", "X-12", "--targets", "C-24"],
     "invalid target 'X-12'"),
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
    assert r.returncode == 2, r.stderr
    assert f"output folder {blocker / 'out'} cannot be created: {blocker} is a file" in r.stderr
    assert "Traceback" not in r.stderr and blocker.read_text() == ""


# Refused by the flow's command line before anything starts (no Prefect server, no Dask cluster, nothing
# written): the tables of every requested target are read by the trainer's own reader, the output folder is
# checked without being created. (case, how to spoil the data folder, output folder under tmp_path, fragments)
FLOW_PREFLIGHT_CASES = [
    ("training table without positives", DATA_CASES[-2][1], "out", [TRAIN, "no positive samples"]),
    ("table missing a feature column", _edit(TRAIN, lambda df: df.drop(columns=["R_VALUE"])), "out",
     [TRAIN, "missing required column(s) ['R_VALUE']"]),
    ("validation split without enough positives", DATA_CASES[-1][1], "out", [TRAIN, "at least 10 are needed"]),
    ("output folder that is a file", lambda d: None, "a-file", ["output folder", "a-file is a file"]),
    ("output folder under a file", lambda d: None, "a-file/out", ["a-file/out cannot be created", "is a file"]),
]


@pytest.mark.parametrize(("case", "spoil", "output", "fragments"), FLOW_PREFLIGHT_CASES,
                         ids=[c[0] for c in FLOW_PREFLIGHT_CASES])
def test_flow_refuses_before_any_server_starts(case, spoil, output, fragments, spoiled, tmp_path, run_flow_cli):
    spoil(spoiled)
    (tmp_path / "a-file").write_text("keep me")
    out = tmp_path / output
    r = run_flow_cli(["--targets", "C-24", "M-24", "--seeds", "0", "--epochs", "1", "--data-dir", str(spoiled),
                      "--output-dir", str(out)])
    assert r.returncode == 2, (case, r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    for frag in fragments:
        assert frag in errors[0], (frag, errors[0])
    assert "Prefect server" not in r.stdout + r.stderr and "everest-production:" not in r.stdout  # nothing started
    assert (tmp_path / "a-file").read_text() == "keep me"
    assert not out.is_dir() or not any(out.rglob("*")), "something was written"


# Batch-system refusals, also before any server (PBS: canned replies of OpenPBS 23's qstat and pbsnodes, as PBS
# itself cannot be installed here; SLURM: the real single-node scheduler). (case, profile, fake PBS commands
# {name: shell body} or None for real SLURM, fragments)
PBS_NODE = ("echo node1; echo '     resources_available.ncpus = 64'; echo '     resources_available.mem = {mem}';"
            " echo '     resources_available.ngpus = {gpus}'")
SITE_CASES = [
    ("PBS queue that does not exist (mock PBS)", "kind: pbs\nqueue: gpux\n",
     {"qstat": 'echo "qstat: Unknown queue destination $2" >&2; exit 170',
      "pbsnodes": PBS_NODE.format(mem="256gb", gpus=4)},
     ["queue 'gpux' is refused by the PBS server", "qstat: Unknown queue destination gpux"]),
    ("PBS nodes without GPUs (ngpus = 0, mock PBS)", "kind: pbs\nqueue: gpu\n",
     {"qstat": "exit 0", "pbsnodes": PBS_NODE.format(mem="256gb", gpus=0)},
     ["gpus_per_job 1 asks ngpus=1, but the most any node offers is resources_available.ngpus = 0"]),
    ("PBS nodes with less memory than a job asks (mock PBS)", "kind: pbs\nqueue: gpu\njob_memory: 512G\n",
     {"qstat": "exit 0", "pbsnodes": PBS_NODE.format(mem="256gb", gpus=4)},
     ["job_memory 512G asks mem=512gb, but the most any node offers is resources_available.mem = 256gb"]),
    ("SLURM partition that does not exist", "kind: slurm\npartition: nosuch\ngpus_per_job: 0\n", None,
     ["SLURM has no partition 'nosuch'"]),
    ("SLURM job asking more cores than any node has", "kind: slurm\npartition: debug\ngpus_per_job: 0\n"
     "job_cpus: 64\njob_memory: 1G\n", None, ["job_cpus 64 asks --cpus-per-task=64, but the most CPUs any node"]),
]


@pytest.mark.parametrize(("case", "profile", "commands", "fragments"), SITE_CASES, ids=[c[0] for c in SITE_CASES])
def test_batch_site_refusals_come_before_any_server(case, profile, commands, fragments, tiny_data, tmp_path,
                                                    monkeypatch, run_flow_cli):
    if commands is None and shutil.which("sinfo") is None:
        pytest.skip("SLURM is not installed (tests/cluster/slurm.sh up)")
    if commands is not None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for name, body in {"qsub": "exit 0", **commands}.items():
            (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
            (bin_dir / name).chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    site = tmp_path / "site.yaml"
    site.write_text(profile + "interface: lo\ntls: false\n")  # loopback: no cluster network needed here
    out = tmp_path / "out"
    r = run_flow_cli(["--profile", str(site), "--targets", "C-24", "--seeds", "0", "--data-dir", str(tiny_data),
                      "--output-dir", str(out)])
    assert r.returncode == 2, (case, r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(site) in errors[0] and "Traceback" not in r.stderr, r.stderr
    for frag in fragments:
        assert frag in errors[0], (frag, errors[0])
    assert "Prefect server" not in r.stdout + r.stderr and not out.exists()


def test_flow_checks_each_table_once_per_content(spoiled, tmp_path, monkeypatch):
    """The preflight reads each table once; a second check of the same content and settings reads nothing,
    and the samples it built are the cache the training reads."""
    from everest.config import EverestConfig, experiment_matrix
    from everest.data import check as datacheck
    from everest.data import samples

    reads: list[str] = []
    real = samples.read_table
    monkeypatch.setattr(samples, "read_table", lambda path, cfg: reads.append(Path(path).name) or real(path, cfg))
    cfg, cache = EverestConfig(), tmp_path / "cache"
    experiments = experiment_matrix(["C-24", "M-24"], [0, 1, 2])
    datacheck.check_experiments(spoiled, experiments, cfg.data, cfg.model.seq_len, cache)
    assert sorted(reads) == sorted(f"{s}_data_{t}.csv" for t in ("C_24", "M_24") for s in ("training", "testing"))
    assert len(list(cache.glob("*.npz"))) == 4
    reads.clear()
    datacheck.check_experiments(spoiled, experiments, cfg.data, cfg.model.seq_len, cache)
    assert reads == []  # the sample cache holds the content: no table is parsed again


# File-format matrix: one table spoiled at the byte, encoding, structure or value level, read by the real
# commands in a subprocess. FILE is the first table `everest data check` reads; line numbers are as an editor
# shows them (line 1 is the header; line 6 is a P row of region 11067 in the tiny tables).
FILE = "training_data_C_24.csv"
EVEREST = ([str(Path(sys.executable).with_name("everest"))] if Path(sys.executable).with_name("everest").is_file()
           else [sys.executable, "-m", "everest.cli"])
TEXT_TABLE = "expected a comma-separated text table"


def _bytes(change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        (d / FILE).write_bytes(change((d / FILE).read_bytes()))
    return apply


def _text(change: Callable[[str], str], encoding: str = "utf-8") -> Callable[[Path], None]:
    """Edit FILE as text and save it in ``encoding``."""
    return _bytes(lambda b: change(b.decode()).encode(encoding))


def _lines(change: Callable[[list[str]], list[str]]) -> Callable[[Path], None]:
    """Edit the text lines (line ends kept) of FILE."""
    return _text(lambda t: "".join(change(t.splitlines(keepends=True))))


def _set_cell(line: int, column: str, text: str) -> Callable[[str], str]:
    """Write ``text`` verbatim as the cell of ``column`` on editor line ``line``."""
    def change(table: str) -> str:
        lines = table.splitlines(keepends=True)
        fields = lines[line - 1].rstrip("\n").split(",")
        fields[lines[0].rstrip("\n").split(",").index(column)] = text
        return "".join([*lines[:line - 1], ",".join(fields) + "\n", *lines[line:]])
    return change


def _cell(line: int, column: str, text: str) -> Callable[[Path], None]:
    return _text(_set_cell(line, column, text))


def _header(old: str, new: str) -> Callable[[Path], None]:
    return _lines(lambda ls: [ls[0].replace(old, new, 1), *ls[1:]])


def _as_directory(d: Path) -> None:
    (d / FILE).unlink()
    (d / FILE).mkdir()


FORMAT_CASES = [
    # bytes and encoding
    ("binary garbage", _bytes(lambda b: bytes(range(256)) * 64), ["NUL bytes", "line 1", TEXT_TABLE]),
    ("NUL bytes in a row", _lines(lambda ls: [*ls[:5], "\0\0" + ls[5], *ls[6:]]), ["NUL bytes", "line 6"]),
    ("Latin-1 encoded header", _text(lambda t: t.replace("HARPNUM", "HARPNUM_\u00e9"), "latin-1"),
     ["not UTF-8", "byte 0xe9", "line 1", TEXT_TABLE]),
    ("Windows-1252 quotes in a row", _text(_set_cell(6, "HARPNUM", "\u201c4\u201d"), "cp1252"),
     ["not UTF-8", "byte 0x93", "line 6", TEXT_TABLE]),
    ("UTF-16 with a byte-order mark", _bytes(lambda b: b.decode().encode("utf-16")), ["UTF-16", "save it as UTF-8"]),
    ("gzip-compressed file named .csv", _bytes(gzip.compress), ["gzip-compressed", "gunzip", TEXT_TABLE]),
    ("Excel workbook named .csv", _bytes(lambda b: b"PK\x03\x04\x14\x00\x06\x00" + b"\0" * 64), ["Excel .xlsx"]),
    ("Git LFS pointer", _bytes(lambda b: b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64
                               + b"\nsize 4567891\n"), ["Git LFS pointer", "git lfs pull"]),
    ("HTML page saved as CSV", _bytes(lambda b: b"<!DOCTYPE html>\n<html><body>Sign in</body></html>\n"),
     ["HTML page", TEXT_TABLE]),
    # structure
    ("directory named like the CSV", _as_directory, ["is a directory", "expected a SHARP table"]),
    ("header of whitespace only", _bytes(lambda b: b"   \r\n\r\n"), ["file is empty"]),
    ("row with too many fields", _cell(6, "ABSNJZH", "8.6,0"),
     ["line 6 has 19 field(s)", "the header (line 1) has 18", "expected 18 comma-separated fields"]),
    ("row with too few fields", _lines(lambda ls: [*ls[:5], ls[5].rsplit(",", 1)[0] + "\n", *ls[6:]]),
     ["line 6 has 17 field(s)", "expected 18 comma-separated fields"]),
    ("ragged row after blank lines", _lines(lambda ls: [*ls[:3], "\n", "  \n", *ls[3:6], "N,1\n", *ls[6:]]),
     ["line 9 has 2 field(s)"]),
    ("unterminated quote", _cell(6, "TOTPOT", '"5.4e22'), ["quoted field opened at line 6 is never closed"]),
    ("stray quote inside a field", _cell(6, "HARPNUM", '4"'), ["stray '\"' at line 6", "enclose a whole field"]),
    ("duplicate column names", _header("Cdec", "USFLUX"),
     ["column 'USFLUX' appears 2 times in the header", "expected each column once"]),
    ("missing required column", _header("NOAA_AR", "NOAA"), ["missing required column(s) ['NOAA_AR']"]),
    ("empty name for a required column", _header("USFLUX", ""), ["missing required column(s) ['USFLUX']"]),
    ("semicolon-delimited", _bytes(lambda b: b.replace(b",", b";")), ["separated by ';'", "expected commas"]),
    ("tab-delimited", _bytes(lambda b: b.replace(b",", b"\t")), ["separated by '\\t'", "expected commas"]),
    ("tables joined with cat (repeated header)", _lines(lambda ls: [*ls[:8], ls[0], *ls[8:]]),
     ["unknown label 'Flare' at line 9", "repeated header line"]),
    # values, quoted as written
    ("extremely long number", _cell(6, "TOTPOT", "9" * 5_000_000),
     ["'TOTPOT' holds '999999999999999999999999999999'... (5000000 characters) at line 6", "beyond 1e+37"]),
    ("thousands separator", _cell(6, "TOTPOT", '"54,038"'), ["found '54,038' at line 6", "no thousands separators"]),
    ("decimal comma", _cell(6, "R_VALUE", '"0,5"'), ["found '0,5' at line 6", "'.' decimal point"]),
    ("nan", _cell(6, "TOTPOT", "nan"), ["'TOTPOT' must hold finite numbers; found 'nan' at line 6"]),
    ("NaN", _cell(6, "TOTPOT", "NaN"), ["found 'NaN' at line 6"]),
    ("inf", _cell(6, "USFLUX", "inf"), ["'USFLUX' must hold finite numbers; found 'inf' at line 6"]),
    ("-inf", _cell(6, "USFLUX", "-inf"), ["found '-inf' at line 6"]),
    ("1e400 (overflows to inf)", _cell(6, "USFLUX", "1e400"), ["'USFLUX' holds '1e400' at line 6", "beyond 1e+37"]),
    ("empty feature cell", _cell(6, "SAVNCPP", ""), ["'SAVNCPP' must hold finite numbers; found '' (an empty cell)"]),
    ("empty label", _cell(6, "Flare", ""), ["unknown label '' (an empty cell) at line 6", "expected one of"]),
    ("empty region", _cell(6, "NOAA_AR", ""),
     ["'NOAA_AR' holds '' (an empty cell) at line 6", "expected a NOAA active-region number"]),
    ("fractional region number", _cell(6, "NOAA_AR", "11067.5"), ["'NOAA_AR' holds '11067.5' at line 6"]),
    ("negative region number", _cell(6, "NOAA_AR", "-11067"), ["'NOAA_AR' holds '-11067' at line 6"]),
    ("empty time", _cell(6, "DATE__OBS", ""), ["'DATE__OBS' holds '' (an empty cell) at line 6", "ISO 8601"]),
    ("time in another format", _cell(6, "DATE__OBS", "05/05/2010 00:12"),
     ["'DATE__OBS' holds '05/05/2010 00:12' at line 6", "expected an ISO 8601 time"]),
    ("JSOC TAI time", _cell(6, "DATE__OBS", "2010.05.05_00:12:00_TAI"), ["'2010.05.05_00:12:00_TAI' at line 6"]),
]


def _environment() -> dict[str, str]:
    """The commands' environment. Read it in the main thread: copying os.environ while pytest rewrites
    PYTEST_CURRENT_TEST in another thread can fail."""
    return {**os.environ, "PYTHONWARNINGS": "default"}


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env or _environment(), capture_output=True, text=True, timeout=300)


def _assert_one_line_error(r: subprocess.CompletedProcess, fragments: list[str], exact: bool = True) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    if exact:  # `data check` logs nothing else
        assert r.stderr.strip() == errors[0], r.stderr
    for frag in [FILE, *fragments]:
        assert frag in errors[0], (frag, errors[0])


class Run(NamedTuple):
    """One matrix case's command-line process and the spoiled data folder it read."""

    process: subprocess.CompletedProcess
    data: Path


def _data_check(data: Path) -> list[str]:
    return [*EVEREST, "data", "check", str(data)]


def _trainer(data: Path) -> list[str]:
    return [sys.executable, "-m", "everest", "train", "--flare_class", "C", "--time_window", "24", "--seed", "0",
            "--data-dir", str(data), "--output-dir", str(_out(data)), *TINY]


def _out(data: Path) -> Path:
    """The trainer's output folder for ``data``: beside it, so a refused run can be seen to write nothing."""
    return data.parent / "out"


def _runs(command: Callable[[Path], list[str]]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Mark a matrix test: each of its cases runs ``command`` on its own spoiled copy, started by ``matrix``."""
    def mark(test: Callable[..., None]) -> Callable[..., None]:
        test.command = command  # type: ignore[attr-defined]
        # Under pytest-xdist every process that runs a matrix test would start the whole matrix: keep them in one.
        return pytest.mark.xdist_group("bad-input-matrix")(test)
    return mark


def _spoil_and_run(source: Path, case_dir: Path, spoil: Callable[[Path], None],
                   command: Callable[[Path], list[str]], env: dict[str, str]) -> Run:
    data = case_dir / "data"
    shutil.copytree(source, data)
    spoil(data)
    return Run(_run(command(data), case_dir, env), data)


@pytest.fixture(scope="module")
def matrix(request: pytest.FixtureRequest, tiny_data: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, str], Future[Run]]]:
    """The command-line run of every selected matrix case, keyed by (test name, case), all started at once.

    Why: each case is a fresh process that spends seconds importing the stack before it reads a table; the
    cases share nothing, so running one per core side by side shortens the suite, while each test still
    asserts on its own process's exit status and output. Only the cases this session selected are run.
    """
    root = tmp_path_factory.mktemp("matrix")
    cases = [item for item in request.session.items
             if isinstance(item, pytest.Function) and item.module is request.module
             and hasattr(item.function, "command")]
    env = _environment()
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        yield {(item.originalname, item.callspec.params["case"]):
               pool.submit(_spoil_and_run, tiny_data, root / str(i), item.callspec.params["spoil"],
                           item.function.command, env)
               for i, item in enumerate(cases)}


@pytest.mark.slow
@pytest.mark.parametrize(("case", "spoil", "fragments"), FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
@_runs(_data_check)
def test_malformed_table_is_one_line_error_from_data_check(case, spoil, fragments, matrix, request):
    _assert_one_line_error(matrix[request.node.originalname, case].result().process, fragments)


TRAINER_CASES = [c for c in FORMAT_CASES if c[0] in ("Windows-1252 quotes in a row", "unterminated quote",
                                                     "row with too many fields", "1e400 (overflows to inf)")]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "spoil", "fragments"), TRAINER_CASES, ids=[c[0] for c in TRAINER_CASES])
@_runs(_trainer)
def test_malformed_table_is_one_line_error_from_the_trainer(case, spoil, fragments, matrix, request):
    run = matrix[request.node.originalname, case].result()
    _assert_one_line_error(run.process, fragments, exact=False)
    out = _out(run.data)
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*")), "something was written"


# Variants a user would expect to work: `data check` must print exactly what it prints for the clean file.
TOLERATED_CASES = [
    ("UTF-8 byte-order mark", _bytes(lambda b: b"\xef\xbb\xbf" + b)),
    ("CRLF line ends", _bytes(lambda b: b.replace(b"\n", b"\r\n"))),
    ("CR-only line ends", _bytes(lambda b: b.replace(b"\n", b"\r"))),
    ("CR CR LF line ends (text-mode write on Windows)", _bytes(lambda b: b.replace(b"\n", b"\r\r\n"))),
    ("trailing blank lines", _bytes(lambda b: b + b"\n\n  \n")),
    ("no line break after the last row", _bytes(lambda b: b.rstrip(b"\n"))),
    ("spaces around column names", _header("USFLUX", " USFLUX ")),
    ("every cell quoted", _lines(lambda ls: [",".join(f'"{f}"' for f in x.rstrip("\n").split(",")) + "\n"
                                             for x in ls])),
    ("unnamed index column (pandas to_csv default)", _lines(lambda ls: [f"{i - 1 if i else ''},{x}"
                                                                        for i, x in enumerate(ls)])),
    ("extremely long cell in an unused column", _cell(6, "Cdec", "1" * 5_000_000)),
    ("region written as 11067.0", _cell(6, "NOAA_AR", "11067.0")),
    ("time with a UTC offset", _cell(6, "DATE__OBS", "2010-05-05T02:00:00+02:00")),
]


@pytest.fixture(scope="module")
def clean_check(tiny_data, tmp_path_factory) -> str:
    r = _run([*EVEREST, "data", "check", str(tiny_data)], tmp_path_factory.mktemp("clean"))
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("case", "spoil"), TOLERATED_CASES, ids=[c[0] for c in TOLERATED_CASES])
@_runs(_data_check)
def test_tolerated_table_variant_reads_as_the_clean_file(case, spoil, matrix, request, clean_check):
    r = matrix[request.node.originalname, case].result().process
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == clean_check
