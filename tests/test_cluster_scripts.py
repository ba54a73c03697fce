"""The plain batch-job path in ``cluster/``: PBS Pro scripts, their SLURM twins and the submit scripts.

Tiers: text checks (syntax, shellcheck, job headers, dry-run output, argument validation) need only
bash; the job scripts are run locally with ``PBS_ARRAY_INDEX`` set, on tiny synthetic data and a tiny
model, one experiment per sub-job or a group of ``--group-width`` experiments; the ``cluster``-marked
tests submit the SLURM twin for real to the single-node SLURM of ``tests/cluster/slurm.sh up`` (skipped
only where ``sinfo`` is absent). Submissions that are not meant
to reach a scheduler go to fake ``qsub``/``sbatch`` commands that record their calls.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import set_pairs

pytestmark = pytest.mark.slow  # the job scripts run as processes, most of them training

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
PBS_SUBMIT = CLUSTER / "submit_jobs.sh"
SLURM_SUBMIT = CLUSTER / "slurm" / "submit_jobs.sh"
PBS_ARRAY = CLUSTER / "submit_production_array.pbs"
PBS_ANALYSIS = CLUSTER / "submit_analysis.pbs"
SLURM_ARRAY = CLUSTER / "slurm" / "submit_production_array.sbatch"
SLURM_ANALYSIS = CLUSTER / "slurm" / "submit_analysis.sbatch"
SHELL_FILES = [CLUSTER / "site.sh", CLUSTER / "lib.sh", PBS_SUBMIT, PBS_ARRAY, PBS_ANALYSIS,
               SLURM_SUBMIT, SLURM_ARRAY, SLURM_ANALYSIS]

TINY_MODEL = [*set_pairs(), "--epochs", "1"]  # the tiny model as "--set", "KEY=VALUE" pairs

FAKE_SCHEDULER = """#!/bin/bash
# Records its arguments (one per line, a '---' line first) and answers like the real command. With
# FAKE_SCHEDULER_FAIL=array|analysis it refuses that submission as a scheduler does: its reason on
# stderr (FAKE_SCHEDULER_ERROR), nothing on stdout, a non-zero status (FAKE_SCHEDULER_STATUS).
{ echo ---; printf '%s\\n' "$@"; } >>"$FAKE_SCHEDULER_LOG"
case "$(basename "$0") $*" in
    qsub*" -J "* | sbatch*--array=*) kind=array ;;
    *) kind=analysis ;;
esac
if [[ ${FAKE_SCHEDULER_FAIL:-} == "$kind" ]]; then
    echo "$FAKE_SCHEDULER_ERROR" >&2
    exit "${FAKE_SCHEDULER_STATUS:-170}"
fi
case "$(basename "$0") $kind" in
    "qsub array") echo "4242[].fakeserver" ;;
    qsub*) echo "4243.fakeserver" ;;
    "sbatch array") echo "4242" ;;
    *) echo "4243" ;;
esac
"""

FAKE_NVIDIA_SMI = """#!/bin/sh
# Two GPUs, listed as `nvidia-smi -L` does.
[ "$1" = -L ] || exit 9
echo "GPU 0: NVIDIA Fake GPU (UUID: GPU-00000000-0000-0000-0000-000000000000)"
echo "GPU 1: NVIDIA Fake GPU (UUID: GPU-11111111-1111-1111-1111-111111111111)"
"""


# ---------------------------------------------------------------------- helpers and fixtures
def _job_env(**extra: str) -> dict[str, str]:
    """The test's environment for the scripts: this interpreter's venv, no stale EVEREST_/PBS_/SLURM_."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVEREST_", "PBS_", "SLURM_"))}
    if (Path(sys.prefix) / "bin" / "activate").is_file():
        env["EVEREST_VENV"] = sys.prefix
    else:
        env["EVEREST_PYTHON"] = sys.executable
    env.update(extra)
    return env


def _make_fake_scheduler(root: Path) -> tuple[dict[str, str], Path]:
    """(environment with fake qsub/sbatch first on PATH, the file recording their calls), under ``root``."""
    bindir = root / "fakebin"
    bindir.mkdir()
    for name in ("qsub", "sbatch"):
        (bindir / name).write_text(FAKE_SCHEDULER)
        (bindir / name).chmod(0o755)
    log = root / "scheduler_calls.txt"
    log.touch()
    home = root / "home"
    home.mkdir()
    (home / "canary").write_text("still here")
    env = _job_env(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", FAKE_SCHEDULER_LOG=str(log), HOME=str(home))
    return env, log


@pytest.fixture
def fake_scheduler(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """(environment with fake qsub/sbatch first on PATH, the file recording their calls)."""
    return _make_fake_scheduler(tmp_path)


def _calls(log: Path) -> list[list[str]]:
    """The recorded scheduler calls, each as its argument list."""
    text = log.read_text()
    return [chunk.strip("\n").split("\n") for chunk in text.split("---\n")[1:]]


def _submit(script: Path, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def _indices(out: str) -> list[int]:
    """The experiment indices of a submit script's '# experiment indices:' line."""
    m = re.search(r"^# experiment indices: ([\d ]+)$", out, flags=re.MULTILINE)
    assert m, out
    return [int(k) for k in m.group(1).split()]


def _variables(call: list[str], option: str = "-v") -> dict[str, str]:
    """The job environment of a recorded qsub call (``-v A=1,B=2``) as a dict."""
    return dict(v.split("=", 1) for v in call[call.index(option) + 1].split(","))


def _line(out: str, start: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith(start)]
    assert len(lines) == 1, out
    return lines[0]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from everest.data import synthetic

    d = tmp_path_factory.mktemp("tiny_data")
    synthetic.generate(d, size="tiny", seed=0)
    return d


# ---------------------------------------------------------------------- the scripts as text
@pytest.mark.parametrize("script", SHELL_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_script_syntax(script: Path):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian package 'shellcheck')")
    res = subprocess.run(["shellcheck", "-x", *[str(p.relative_to(ROOT)) for p in SHELL_FILES]], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_job_headers():
    pbs = PBS_ARRAY.read_text()
    for line in ("#PBS -J 1-45", "#PBS -l select=1:ncpus=4:mem=32gb:ngpus=1", "#PBS -l walltime=12:00:00"):
        assert f"\n{line}\n" in pbs
    analysis = PBS_ANALYSIS.read_text()
    assert "#PBS -l select=" in analysis and "ngpus" not in analysis
    slurm = SLURM_ARRAY.read_text()
    for line in ("#SBATCH --array=1-45", "#SBATCH --gres=gpu:1", "#SBATCH --time=12:00:00"):
        assert f"\n{line}\n" in slurm
    assert "--gres" not in SLURM_ANALYSIS.read_text()
    for script in (PBS_ARRAY, PBS_ANALYSIS, SLURM_ARRAY, SLURM_ANALYSIS):
        text = script.read_text()
        # The first implementation ended with `exit 0` and hid every failure.
        assert not re.search(r"exit 0\b", text), script
        assert text.rstrip().endswith('exit "$status"'), script


# ---------------------------------------------------------------------- dry runs
@pytest.mark.parametrize("script", [PBS_SUBMIT, SLURM_SUBMIT], ids=["pbs", "slurm"])
def test_dry_run_all_45(script: Path, fake_scheduler, tmp_path: Path):
    env, log = fake_scheduler
    res = _submit(script, ["--dry-run", "--output-dir", "out"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert _indices(out) == list(range(1, 46))
    array = _line(out, "ARRAY_ID=$(")
    analysis = _line(out, "qsub -N everest-analysis" if script == PBS_SUBMIT else "sbatch --parsable --job-name=ever")
    if script == PBS_SUBMIT:
        assert " -J 1-45 " in array
        assert _line(out, "#   indices.txt:") == "#   indices.txt:   " + " ".join(map(str, range(1, 46)))
        assert ' -W depend=afterany:"$ARRAY_ID" ' in analysis
        assert "qstat -t" in out
    else:
        assert " --array=1-45 " in array
        assert ' --dependency=afterany:"$ARRAY_ID" ' in analysis
        assert "squeue" in out
    assert "dry run: nothing written, nothing submitted" in out
    assert _calls(log) == []
    assert not (tmp_path / "out").exists()


def test_dry_run_target_subset_pbs(fake_scheduler, tmp_path: Path):
    env, log = fake_scheduler
    res = _submit(PBS_SUBMIT, ["--dry-run", "--targets", "M-48", "C-24", "--seeds", "0", "1"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    # C-24 is target 0 (indices 1-5), M-48 target 4 (indices 21-25); seeds 0 and 1 are the first two.
    assert _indices(res.stdout) == [1, 2, 21, 22]
    assert _line(res.stdout, "#   indices.txt:") == "#   indices.txt:   1 2 21 22"
    assert " -J 1-4 " in _line(res.stdout, "ARRAY_ID=$(")
    assert "EVEREST_INDEX_FILE=" in _line(res.stdout, "ARRAY_ID=$(")
    assert _line(res.stdout, "#   analysis.args:") == "#   analysis.args: --targets M-48 C-24 --seeds 0 1"
    assert _calls(log) == []


def test_dry_run_target_subset_slurm(fake_scheduler, tmp_path: Path):
    env, log = fake_scheduler
    res = _submit(SLURM_SUBMIT, ["--dry-run", "--targets", "M-48", "C-24", "--seeds", "0", "1"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    assert _indices(res.stdout) == [1, 2, 21, 22]
    assert " --array=1-2,21-22 " in _line(res.stdout, "ARRAY_ID=$(")
    assert _calls(log) == []


def test_dry_run_single_experiment_pads_the_pbs_array(fake_scheduler, tmp_path: Path):
    """PBS Pro refuses `-J 1-1`: one experiment becomes a two-slot array whose second slot is a no-op."""
    env, _ = fake_scheduler
    res = _submit(PBS_SUBMIT, ["--dry-run", "--targets", "M5-72", "--seeds", "4", "--no-analysis"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    assert _indices(res.stdout) == [45]
    assert " -J 1-2 " in _line(res.stdout, "ARRAY_ID=$(")
    assert _line(res.stdout, "#   indices.txt:") == "#   indices.txt:   45 skip"
    assert "everest-analysis" not in res.stdout


def test_dry_run_group_width(fake_scheduler, tmp_path: Path):
    """W=2 over 5 selected experiments: 3 sub-jobs; line K of indices.txt holds sub-job K's group."""
    env, log = fake_scheduler
    args = ["--dry-run", "--targets", "M-48", "C-24", "--seeds", "0", "2", "4", "--indices", "1", "3", "5", "21", "25"]
    res = _submit(PBS_SUBMIT, [*args, "--group-width", "2"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    assert _indices(res.stdout) == [1, 3, 5, 21, 25]  # target-major, seeds inner
    assert _line(res.stdout, "#   indices.txt:") == "#   indices.txt:   1 3 | 5 21 | 25"
    array = _line(res.stdout, "ARRAY_ID=$(")
    assert " -J 1-3 " in array and ",EVEREST_GROUP_WIDTH=2," in array
    assert "5 experiment(s) in 3 sub-job(s), up to 2 per sub-job" in res.stdout
    assert re.findall(r"^#\s+(\d+) ->\s+(\d+) ", res.stdout, flags=re.MULTILINE) == [
        ("1", "1"), ("1", "3"), ("2", "5"), ("2", "21"), ("3", "25")]

    # SLURM: the task ids become sub-job numbers over an index list; the site setting gives W.
    res = _submit(SLURM_SUBMIT, args, {**env, "EVEREST_GROUP_WIDTH": "2"}, tmp_path)
    assert res.returncode == 0, res.stderr
    array = _line(res.stdout, "ARRAY_ID=$(")
    assert " --array=1-3 " in array and ",EVEREST_GROUP_WIDTH=2," in array
    assert re.search(r",EVEREST_INDEX_FILE=/\S+/indices\.txt ", array), array
    # --group-width 1 on the command line wins over the site setting: today's task id = experiment index.
    res = _submit(SLURM_SUBMIT, [*args, "--group-width", "1"], {**env, "EVEREST_GROUP_WIDTH": "2"}, tmp_path)
    array = _line(res.stdout, "ARRAY_ID=$(")
    assert " --array=1,3,5,21,25 " in array and ",EVEREST_GROUP_WIDTH=1,EVEREST_INDEX_FILE= " in array
    assert _calls(log) == []


def test_dry_run_one_group_pads_the_pbs_array(fake_scheduler, tmp_path: Path):
    """A group as wide as the selection is one sub-job: PBS Pro gets the padding slot, SLURM does not."""
    env, _ = fake_scheduler
    args = ["--dry-run", "--targets", "M5-72", "--seeds", "3", "4", "--group-width", "8", "--no-analysis"]
    res = _submit(PBS_SUBMIT, args, env, tmp_path)
    assert res.returncode == 0, res.stderr
    assert " -J 1-2 " in _line(res.stdout, "ARRAY_ID=$(")
    assert _line(res.stdout, "#   indices.txt:") == "#   indices.txt:   44 45 | skip"
    res = _submit(SLURM_SUBMIT, args, env, tmp_path)
    assert res.returncode == 0, res.stderr
    assert " --array=1-1 " in _line(res.stdout, "ARRAY_ID=$(")
    assert _line(res.stdout, "#   indices.txt:") == "#   indices.txt:   44 45"


def test_help(fake_scheduler, tmp_path: Path):
    env, log = fake_scheduler
    for script in (PBS_SUBMIT, SLURM_SUBMIT):
        res = _submit(script, ["-h"], env, tmp_path)
        assert res.returncode == 0 and "--targets" in res.stdout and "afterany" in res.stdout
    assert _calls(log) == []


# ---------------------------------------------------------------------- real submissions to fake schedulers
def test_pbs_submission_sequence(fake_scheduler, tiny_data: Path, tmp_path: Path):
    env, log = fake_scheduler
    res = _submit(PBS_SUBMIT, ["--targets", "M-48", "C-24", "--seeds", "0", "1", "--data-dir", str(tiny_data),
                               "--output-dir", "out", "--epochs", "2", "--set", "train.batch_size=64"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    array, analysis = _calls(log)
    assert array[:6] == ["-N", "everest-train", "-J", "1-4", "-j", "oe"]
    variables = dict(v.split("=", 1) for v in array[array.index("-v") + 1].split(","))
    assert variables["EVEREST_OUTPUT_DIR"] == str(tmp_path / "out")
    assert variables["EVEREST_DATA_DIR"] == str(tiny_data)
    assert Path(variables["EVEREST_INDEX_FILE"]).read_text() == "1\n2\n21\n22\n"
    assert Path(variables["EVEREST_TRAIN_ARGS_FILE"]).read_text().splitlines() == [
        "--epochs", "2", "--set", "train.batch_size=64"]
    assert array[-1] == str(PBS_ARRAY)
    assert "depend=afterany:4242[].fakeserver" in analysis
    assert analysis[-1] == str(PBS_ANALYSIS)
    run_dir = Path(variables["EVEREST_INDEX_FILE"]).parent
    assert (run_dir / "analysis.args").read_text().split() == ["--targets", "M-48", "C-24", "--seeds", "0", "1"]
    assert (run_dir / "jobs.txt").read_text() == "array\t4242[].fakeserver\nanalysis\t4243.fakeserver\n"
    assert (tmp_path / "out" / "logs").is_dir()
    assert "qstat -t 4242[].fakeserver" in res.stdout
    # PBS's own output files go to the output's submissions/ directory, not to where qsub ran: a path
    # ending in "/" is a directory to PBS Pro, which writes <job id>.OU there.
    submissions = f"{tmp_path / 'out' / 'submissions'}/"
    for call in (array, analysis):
        assert call[call.index("-o") + 1] == submissions and call[call.index("-e") + 1] == submissions
    assert Path(submissions).is_dir()


def test_unfinished_leaves_out_finished_experiments(fake_scheduler, tiny_data: Path, tmp_path: Path):
    from everest import results
    from everest.config import Experiment, Target, load_config
    from everest.data.tables import file_hash

    env, log = fake_scheduler
    target = Target.parse("C-24")
    hashes = {n: file_hash(tiny_data / n) for n in ("training_data_C_24.csv", "testing_data_C_24.csv")}
    for seed, config_hash in ((1, load_config().config_hash()), (2, "0123456789abcdef")):  # seed 2: stale
        exp = Experiment(target=target, seed=seed)
        identity = results.identity_for(exp, load_config(), hashes).model_copy(update={"config_hash": config_hash})
        folder = tmp_path / "out" / "results" / exp.name
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({"experiment": {"name": exp.name},
                                                         "provenance": identity.provenance()}))
    res = _submit(SLURM_SUBMIT, ["--targets", "C-24", "--unfinished", "--data-dir", str(tiny_data),
                                 "--output-dir", "out", "--depend", "afterok"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    array, analysis = _calls(log)
    assert "--array=1,3-5" in array  # seed 1 is finished with this configuration; seed 2's results are stale
    assert "--dependency=afterok:4242" in analysis and "--kill-on-invalid-dep=yes" in analysis


def test_slurm_job_output_goes_to_the_output_directory(fake_scheduler, tiny_data: Path, tmp_path: Path):
    """SLURM's --output is the per-task log itself (failure.json quotes its last lines): under <output>/logs."""
    env, log = fake_scheduler
    res = _submit(SLURM_SUBMIT, ["--targets", "C-24", "--seeds", "0", "1", "--data-dir", str(tiny_data),
                                 "--output-dir", "out"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    array, analysis = _calls(log)
    logs = tmp_path / "out" / "logs"
    assert f"--output={logs}/train_%A_%a.log" in array
    assert f"--output={logs}/analysis_%j.log" in analysis


@pytest.mark.parametrize(("script", "failing", "message"), [
    (PBS_SUBMIT, "array", "qsub: Unknown queue"),
    (PBS_SUBMIT, "analysis", "qsub: illegal -W value"),
    (SLURM_SUBMIT, "array", "sbatch: error: Batch job submission failed: Invalid partition name specified"),
    (SLURM_SUBMIT, "analysis", "sbatch: error: Batch job submission failed: Job dependency problem"),
], ids=["pbs-array", "pbs-analysis", "slurm-array", "slurm-analysis"])
def test_refused_submission_reports_the_schedulers_reason(script: Path, failing: str, message: str,
                                                          fake_scheduler, tiny_data: Path, tmp_path: Path):
    """The scheduler explains a refusal on stderr; the error must carry it (it once ended in ': ')."""
    env, log = fake_scheduler
    env.update(FAKE_SCHEDULER_FAIL=failing, FAKE_SCHEDULER_ERROR=message, FAKE_SCHEDULER_STATUS="170")
    res = _submit(script, ["--targets", "C-24", "--seeds", "0", "1", "--data-dir", str(tiny_data),
                           "--output-dir", "out"], env, tmp_path)
    assert res.returncode != 0
    command = "qsub" if script == PBS_SUBMIT else "sbatch"
    if failing == "array":
        assert f"submitting the training array failed: {command} exited with status 170: {message}" in res.stderr
        assert len(_calls(log)) == 1 and "training array:" not in res.stdout
    else:
        assert ("is submitted, but submitting the analysis job failed: "
                f"{command} exited with status 170: {message}") in res.stderr
        assert "submit it by hand: " + command in res.stderr
        assert len(_calls(log)) == 2


def _without_environment(env: dict[str, str]) -> dict[str, str]:
    """No EVEREST_VENV/EVEREST_PYTHON/VIRTUAL_ENV: a user who only activated a venv, or not even that."""
    if not (Path(sys.prefix) / "bin" / "activate").is_file():
        pytest.skip("the test interpreter is not in a virtual environment with bin/activate")
    return {k: v for k, v in env.items() if k not in ("EVEREST_VENV", "EVEREST_PYTHON", "VIRTUAL_ENV")}


def test_jobs_get_the_active_virtual_environment(fake_scheduler, tiny_data: Path, tmp_path: Path):
    """PBS Pro does not pass the submitting shell's environment on: only VIRTUAL_ENV set -> EVEREST_VENV in -v."""
    env, log = fake_scheduler
    env = {**_without_environment(env), "VIRTUAL_ENV": sys.prefix}
    res = _submit(PBS_SUBMIT, ["--targets", "C-24", "--seeds", "0", "1", "--data-dir", str(tiny_data),
                               "--output-dir", "out"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    for call in _calls(log):
        variables = dict(v.split("=", 1) for v in call[call.index("-v") + 1].split(","))
        assert variables["EVEREST_VENV"] == sys.prefix
    assert (f"# environment of the jobs: EVEREST_VENV={sys.prefix} (the active virtual environment"
            in res.stdout)


def test_jobs_get_the_environment_of_the_python_on_path(fake_scheduler, tiny_data: Path, tmp_path: Path):
    """No venv activated, but the python3 first on PATH imports everest: its environment goes to the jobs."""
    env, log = fake_scheduler
    env = _without_environment(env)
    bindir = env["PATH"].split(os.pathsep)[0]  # the fake qsub/sbatch
    env["PATH"] = os.pathsep.join([bindir, str(Path(sys.prefix) / "bin"), "/usr/bin", "/bin"])
    res = _submit(PBS_SUBMIT, ["--targets", "C-24", "--seeds", "0", "--data-dir", str(tiny_data), "--output-dir",
                               "out", "--no-analysis"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    (array,) = _calls(log)
    assert f"EVEREST_VENV={sys.prefix}," in array[array.index("-v") + 1]
    assert f"environment of the jobs: EVEREST_VENV={sys.prefix} (the environment of {sys.prefix}/bin/python3" \
        in res.stdout


BAD_ARGUMENTS = {
    "injection": (["--targets", "C-24; rm -rf ~"], "invalid target 'C-24; rm -rf ~'"),
    "unknown target": (["--targets", "C-24", "X-99"], "invalid target 'X-99'"),
    "no targets": (["--targets", "--seeds", "0"], "--targets needs at least one value"),
    "seed outside 0-4": (["--seeds", "5"], "seed 5 has no array index"),
    "seed not a number": (["--seeds", "one"], "invalid seed 'one'"),
    "index outside 1..45": (["--indices", "46"], "invalid array index 46"),
    "index outside selection": (["--targets", "C-24", "--indices", "6"], "6 (C-48 seed 0) is outside"),
    "epochs": (["--epochs", "0"], "--epochs: Input should be greater than or equal to 1 (got 0)"),
    "training table without positives": (["--targets", "M-24", "--data-dir", "NOPOS"],
                                         "training_data_M_24.csv: no positive samples"),
    "config key": (["--set", "model.no_such_key=1"], "no_such_key"),
    "config value": (["--set", "model.num_heads=0"], "num_heads"),
    "queue": (["--queue", "gpu;reboot"], "invalid --queue"),
    "account": (["--account", "$(id)"], "invalid --account"),
    "dependency": (["--depend", "afterfoo"], "invalid --depend 'afterfoo'"),
    "group width zero": (["--group-width", "0"], "invalid group width '0'"),
    "group width not a number": (["--group-width", "two"], "invalid group width 'two'"),
    "unknown option": (["--targts", "C-24"], "unknown argument '--targts'"),
    "missing value": (["--queue"], "--queue needs a value"),
    "comma in path": (["--output-dir", "a,b"], "contains a comma"),
    "missing data": (["--data-dir", "no/such/dir"], "data file(s) not found"),
}


# Both submit scripts share the validation (cluster/lib.sh, cluster/plan.py): all cases on PBS, a few on SLURM.
SLURM_BAD = ["injection", "seed outside 0-4", "unknown option", "missing data", "group width zero"]


@pytest.mark.parametrize(("case", "script"), [(c, PBS_SUBMIT) for c in BAD_ARGUMENTS]
                         + [(c, SLURM_SUBMIT) for c in SLURM_BAD],
                         ids=[f"pbs-{c}" for c in BAD_ARGUMENTS] + [f"slurm-{c}" for c in SLURM_BAD])
def test_bad_arguments_submit_nothing(case: str, script: Path, fake_scheduler, tiny_data: Path, tmp_path: Path):
    env, log = fake_scheduler
    args, message = BAD_ARGUMENTS[case]
    if "NOPOS" in args:  # the tiny tables with every P of M-24's training table relabelled N
        nopos = tmp_path / "nopos"
        shutil.copytree(tiny_data, nopos)
        table = nopos / "training_data_M_24.csv"
        table.write_text(re.sub(r"^P,", "N,", table.read_text(), flags=re.MULTILINE))
        args = [str(nopos) if a == "NOPOS" else a for a in args]
    defaults = {"--data-dir": str(tiny_data), "--output-dir": str(tmp_path / "out")}
    for option, value in defaults.items():
        if option not in args:
            args = [*args, option, value]
    res = _submit(script, args, env, tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr
    assert "nothing submitted" in res.stderr
    assert _calls(log) == []
    assert not (tmp_path / "out").exists()
    assert (Path(env["HOME"]) / "canary").is_file()


def test_all_errors_reported_at_once(fake_scheduler, tiny_data: Path, tmp_path: Path):
    env, log = fake_scheduler
    res = _submit(PBS_SUBMIT, ["--targets", "Q-1", "--seeds", "9", "--queue", "a b", "--data-dir", str(tiny_data)],
                  env, tmp_path)
    assert res.returncode == 2
    for message in ("invalid target 'Q-1'", "seed 9 has no array index", "invalid --queue 'a b'"):
        assert message in res.stderr
    assert _calls(log) == []


# ---------------------------------------------------------------------- the job scripts, run locally
def _run_pbs_job(script: Path, out: Path, data: Path, env_extra: dict[str, str], args: list[str],
                 cwd: Path) -> subprocess.CompletedProcess:
    env = _job_env(EVEREST_DATA_DIR=str(data), EVEREST_OUTPUT_DIR=str(out), PBS_O_WORKDIR=str(cwd), **env_extra)
    return subprocess.run(["bash", str(script), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_pbs_sub_job_trains_its_experiment(tiny_data: Path, tmp_path: Path):
    """Sub-job 2 of an array over the index list [5, 21] trains experiment 21 (M-48 seed 0)."""
    out = tmp_path / "out"
    index_file = tmp_path / "indices.txt"
    index_file.write_text("5\n21\n")
    res = _run_pbs_job(PBS_ARRAY, out, tiny_data, {"PBS_ARRAY_INDEX": "2", "PBS_JOBID": "77[2].server",
                                                   "EVEREST_INDEX_FILE": str(index_file)},
                       [*TINY_MODEL, "--device", "cpu"], tmp_path)
    log = out / "logs" / "train_77_21_everest_M_48h_seed0.log"
    assert res.returncode == 0, res.stdout + res.stderr + (log.read_text() if log.exists() else "")
    results = json.loads((out / "results" / "everest_M_48h_seed0" / "results.json").read_text())
    assert results["experiment"]["name"] == "everest_M_48h_seed0"
    assert not (out / "results" / "everest_C_24h_seed4").exists()
    assert "--array-index 21" in log.read_text()
    assert str(log) in res.stdout


def test_pbs_sub_job_failure_exits_non_zero_and_writes_failure_json(tiny_data: Path, tmp_path: Path):
    out = tmp_path / "out"
    earlier = out / "results" / "everest_C_48h_seed1"  # results of an earlier configuration
    earlier.mkdir(parents=True)
    (earlier / "results.json").write_text('{"experiment": {"name": "everest_C_48h_seed1"}}')
    res = _run_pbs_job(PBS_ARRAY, out, tiny_data, {"PBS_ARRAY_INDEX": "7", "PBS_JOBID": "78[7].server"},
                       ["--set", "model.num_heads=0"], tmp_path)
    assert res.returncode == 2
    failure = json.loads((out / "results" / "everest_C_48h_seed1" / "failure.json").read_text())
    assert {k: failure[k] for k in ("experiment", "target", "seed", "error_type")} == {
        "experiment": "everest_C_48h_seed1", "target": "C-48", "seed": 1, "error_type": "ExitStatus2"}
    assert "num_heads" in failure["error"] and "train_78_7_everest_C_48h_seed1.log" in failure["error"]
    assert failure["time"]
    # The earlier results were moved aside: the folder shows the failure alone.
    assert sorted(p.name for p in earlier.iterdir()) == ["failure.json"]
    assert len(list((out / "results" / ".superseded" / "everest_C_48h_seed1").glob("*/results.json"))) == 1

    # The analysis job lists the failure; with nothing finished it fails loudly (exit 1).
    res = _run_pbs_job(PBS_ANALYSIS, out, tiny_data, {"PBS_JOBID": "79.server"}, ["--no-plots"], tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    log = (out / "logs" / "analysis_79.log").read_text()
    assert "0/45 experiments analysed (1 failed, 44 missing)" in log
    report = (out / "analysis" / "production_training_report.md").read_text()
    assert "everest_C_48h_seed1" in report and "ExitStatus2" in report


@pytest.mark.parametrize("script", [PBS_ANALYSIS, SLURM_ANALYSIS], ids=["pbs", "slurm"])
def test_analysis_job_builds_the_seed_ensembles_before_the_analysis(script: Path, tiny_data: Path, tmp_path: Path):
    """`everest ensemble` runs first; the analysis, which only reads ensembles, then reports the one it built."""
    import numpy as np
    import pandas as pd
    from test_ensemble import _predictions, _split, write_member

    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    (yv, tv, rv), (yt, tt, rt) = _split(rng, 400, 100), _split(rng, 300, 900)
    for seed in (0, 1):
        write_member(out / "results", seed, _predictions(yv, tv, rv), _predictions(yt, tt, rt))
    res = _run_pbs_job(script, out, tiny_data, {"PBS_JOBID": "81.server", "SLURM_JOB_ID": "81"},
                       ["--no-plots", "--targets", "M-24", "--seeds", "0", "1"], tmp_path)
    text = res.stdout + res.stderr + "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    assert res.returncode == 0, text
    assert "M-24: ensemble of seeds [0, 1]" in text
    assert (out / "ensemble" / "results" / "everest_M_24h_ensemble" / "ensemble.json").is_file()
    assert pd.read_csv(out / "analysis" / "ensemble.csv").set_index("target").loc["M-24", "members"] == 2


def test_pbs_sub_job_forwards_sigterm_to_the_training(tiny_data: Path, tmp_path: Path):
    """The walltime's SIGTERM to the job script reaches the training, which checkpoints and exits 4."""
    out = tmp_path / "out"
    env = _job_env(EVEREST_DATA_DIR=str(tiny_data), EVEREST_OUTPUT_DIR=str(out), PBS_O_WORKDIR=str(tmp_path),
                   PBS_ARRAY_INDEX="7", PBS_JOBID="80[7].server")
    args = [*TINY_MODEL[:-2], "--epochs", "500", "--device", "cpu"]
    proc = subprocess.Popen(["bash", str(PBS_ARRAY), *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = out / "logs" / "train_80_7_everest_C_48h_seed1.log"
    try:
        deadline = time.monotonic() + 60
        while not (log.is_file() and "epoch 1/500" in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=5)
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # the job script only, as a scheduler may do
        status = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status == 4, log.read_text()
    assert "stopped by SIGTERM" in log.read_text()
    assert (out / "checkpoints" / "everest_C_48h_seed1.pt").is_file()
    failure = json.loads((out / "results" / "everest_C_48h_seed1" / "failure.json").read_text())
    assert failure["error_type"] == "ExitStatus4" and "resubmit to resume" in failure["error"]


@pytest.mark.parametrize(("slot", "status", "message"), [
    ("2", 0, "placeholder of a one-sub-job submission"),
    ("3", 2, "array slot 3 has no experiment index"),
    ("", 2, "no array index"),
])
def test_pbs_sub_job_slots_without_an_experiment(slot: str, status: int, message: str, tiny_data: Path,
                                                 tmp_path: Path):
    index_file = tmp_path / "indices.txt"
    index_file.write_text("45\nskip\n")
    res = _run_pbs_job(PBS_ARRAY, tmp_path / "out", tiny_data,
                       {"PBS_ARRAY_INDEX": slot, "EVEREST_INDEX_FILE": str(index_file)}, [], tmp_path)
    assert res.returncode == status, res.stderr
    assert message in res.stderr
    assert not (tmp_path / "out" / "results").exists()


# ---------------------------------------------------------------------- groups: W experiments per sub-job
@pytest.fixture(scope="module")
def pbs_group_run(tiny_data: Path, tmp_path_factory) -> dict:
    """``--group-width 2`` over C-24 seeds 0-2 submitted to the fake qsub, then both sub-jobs run at once as
    PBS would run them (the recorded ``-v`` environment plus ``PBS_ARRAY_INDEX``)."""
    root = tmp_path_factory.mktemp("group")
    env, log = _make_fake_scheduler(root)
    res = _submit(PBS_SUBMIT, ["--targets", "C-24", "--seeds", "0", "1", "2", "--group-width", "2", "--data-dir",
                               str(tiny_data), "--output-dir", "out", *TINY_MODEL, "--device", "cpu",
                               "--no-analysis"], env, root)
    assert res.returncode == 0, res.stdout + res.stderr
    (array,) = _calls(log)
    variables = _variables(array)
    jobs = {slot: subprocess.Popen(["bash", array[-1]], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env={**env, **variables, "PBS_O_WORKDIR": str(root),
                                                   "PBS_ARRAY_INDEX": slot, "PBS_JOBID": f"4242[{slot}].server"})
            for slot in ("1", "2")}
    status = {slot: (proc.wait(timeout=240), *proc.communicate()) for slot, proc in jobs.items()}
    return {"root": root, "submit": res, "array": array, "variables": variables, "status": status}


def test_group_width_2_over_3_experiments_trains_all_3_in_2_sub_jobs(pbs_group_run: dict):
    out = pbs_group_run["root"] / "out"
    array, variables = pbs_group_run["array"], pbs_group_run["variables"]
    assert array[:4] == ["-N", "everest-train", "-J", "1-2"]
    assert Path(variables["EVEREST_INDEX_FILE"]).read_text() == "1 2\n3\n"
    assert variables["EVEREST_GROUP_WIDTH"] == "2"
    logs = {p.name: p.read_text() for p in (out / "logs").iterdir()}
    for slot, (status, stdout, stderr) in pbs_group_run["status"].items():
        assert status == 0, (slot, stdout, stderr, logs)
    assert set(logs) == {"train_4242_1+2.log", "train_4242_3_everest_C_24h_seed2.log"}
    assert "--array-index 1 2 " in logs["train_4242_1+2.log"]
    assert "group of 2: experiments 1 = everest_C_24h_seed0, 2 = everest_C_24h_seed1" in logs["train_4242_1+2.log"]
    for seed in (0, 1, 2):
        name = f"everest_C_24h_seed{seed}"
        results = json.loads((out / "results" / name / "results.json").read_text())
        assert results["experiment"]["name"] == name
        assert f"{name}: test TSS " in "".join(logs.values())  # the single-experiment result line
    assert not list((out / "results").glob("*/failure.json"))


def test_group_sub_job_skips_its_finished_member_and_records_one_failing_alone(pbs_group_run: dict, tiny_data: Path,
                                                                              tmp_path: Path):
    """The group (1 2 21) after the run above, with seed 1's results deleted and the M-48 table unreadable:
    seed 0 (finished) is left alone, seed 1 is trained, M-48 seed 0 fails alone with its own failure.json,
    and the sub-job exits 2 (bad input)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "training_data_M_48.csv").write_text("not,a,sharp,table\n1,2,3,4\n")  # C-24's tables unchanged
    out = tmp_path / "out"
    shutil.copytree(pbs_group_run["root"] / "out", out, symlinks=True)
    shutil.rmtree(out / "results" / "everest_C_24h_seed1")
    for p in (out / "checkpoints").glob("everest_C_24h_seed1*"):
        p.unlink()
    done = out / "results" / "everest_C_24h_seed0" / "results.json"
    before = (done.read_bytes(), done.stat().st_mtime_ns)
    index_file = tmp_path / "indices.txt"
    index_file.write_text("1 2 21\n")
    env = {**_job_env(), **pbs_group_run["variables"], "EVEREST_DATA_DIR": str(data), "EVEREST_OUTPUT_DIR": str(out),
           "EVEREST_INDEX_FILE": str(index_file), "EVEREST_GROUP_WIDTH": "3", "PBS_O_WORKDIR": str(tmp_path),
           "PBS_ARRAY_INDEX": "1", "PBS_JOBID": "4300[1].server"}
    res = subprocess.run(["bash", str(PBS_ARRAY)], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=180)
    log = (out / "logs" / "train_4300_1+2+21.log").read_text()
    assert res.returncode == 2, res.stdout + res.stderr + log
    assert (done.read_bytes(), done.stat().st_mtime_ns) == before
    assert (out / "results" / "everest_C_24h_seed1" / "results.json").is_file()
    assert "everest_C_24h_seed0: test TSS " in log and "everest_C_24h_seed1: test TSS " in log
    assert not list((out / "results").glob("everest_C_24h_seed*/failure.json"))
    failure = json.loads((out / "results" / "everest_M_48h_seed0" / "failure.json").read_text())
    # The training's own record of the member (its error), not the job script's ExitStatus record.
    assert (failure["experiment"], failure["error_type"]) == ("everest_M_48h_seed0", "DataError")
    assert "missing required column" in failure["error"] and "group of 3" in failure["error"]
    assert not (out / "results" / "everest_M_48h_seed0" / "results.json").exists()
    assert "experiment 21 = everest_M_48h_seed0 failed on its own" in log
    assert "experiment 2 = everest_C_24h_seed1: finished" in log


def test_hand_submitted_group_array_uses_the_site_group_width(tiny_data: Path, tmp_path: Path):
    """No index list and EVEREST_GROUP_WIDTH=20: slot 3 trains 41-45, slot 4 nothing. A group stopped as a
    whole (here before training, by a bad --set) leaves an ExitStatus record for every member."""
    out = tmp_path / "out"
    res = _run_pbs_job(PBS_ARRAY, out, tiny_data, {"PBS_ARRAY_INDEX": "4", "EVEREST_GROUP_WIDTH": "20"}, [],
                       tmp_path)
    assert res.returncode == 0, res.stderr
    assert "past the last group" in res.stderr and "need slots 1-3" in res.stderr
    res = _run_pbs_job(PBS_ARRAY, out, tiny_data, {"PBS_ARRAY_INDEX": "3", "PBS_JOBID": "4500[3].server",
                                                   "EVEREST_GROUP_WIDTH": "20"}, ["--set", "model.num_heads=0"],
                       tmp_path)
    log = (out / "logs" / "train_4500_41+42+43+44+45.log").read_text()
    assert res.returncode == 2, res.stderr + log
    for seed in range(5):
        failure = json.loads((out / "results" / f"everest_M5_72h_seed{seed}" / "failure.json").read_text())
        assert failure["error_type"] == "ExitStatus2", failure
        assert "for its group of 5 (array indices 41 42 43 44 45)" in failure["error"]
        assert "num_heads" in failure["error"] and "train_4500_41+42+43+44+45.log" in failure["error"]


@pytest.mark.parametrize("script", [PBS_ARRAY, PBS_ANALYSIS, SLURM_ARRAY, SLURM_ANALYSIS],
                         ids=lambda p: p.name)
def test_job_fails_loudly_when_the_environment_is_broken(script: Path, tiny_data: Path, tmp_path: Path):
    env = {"PBS_ARRAY_INDEX": "1", "SLURM_ARRAY_TASK_ID": "1", "EVEREST_VENV": str(tmp_path / "no-venv")}
    res = _run_pbs_job(script, tmp_path / "out", tiny_data, env, [], tmp_path)
    assert res.returncode == 1
    assert "no bin/activate" in res.stderr and "activation failed" in res.stderr


@pytest.mark.parametrize(("script", "module"), [(PBS_ARRAY, "everest.training.train"),
                                                (PBS_ANALYSIS, "everest.analysis")], ids=["array", "analysis"])
def test_job_fails_loudly_when_everest_cannot_be_imported(script: Path, module: str, tiny_data: Path,
                                                          tmp_path: Path):
    """An environment whose python lacks the project: status 1 and a clear line, not a traceback later."""
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text(f'PATH="{venv}:$PATH"\n')
    (venv / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')  # -S: no site-packages
    (venv / "python").chmod(0o755)
    env = {"PBS_ARRAY_INDEX": "1", "EVEREST_VENV": str(venv.parent)}
    res = _run_pbs_job(script, tmp_path / "out", tiny_data, env, [], tmp_path)
    assert res.returncode == 1
    text = res.stderr + "".join(p.read_text() for p in (tmp_path / "out" / "logs").glob("*.log"))
    assert f"cannot import {module}" in text
    assert not (tmp_path / "out" / "results").exists()


# ---------------------------------------------------------------------- GPU pinning without site isolation
CLAIM_GPU = """
source "$EVEREST_CLUSTER_DIR/lib.sh"
everest_claim_gpu
echo "${CUDA_VISIBLE_DEVICES-unset} ${CUDA_DEVICE_ORDER-unset}" >"$1.tmp" && mv "$1.tmp" "$1"
while [ ! -e "$2" ]; do sleep 0.05; done   # holds the GPU until told to end
"""


@pytest.fixture
def fake_gpu_node(tmp_path: Path) -> dict[str, str]:
    """The environment of a job on a node with two GPUs and no GPU isolation (no CUDA_VISIBLE_DEVICES)."""
    bindir = tmp_path / "gpubin"
    bindir.mkdir()
    (bindir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bindir / "nvidia-smi").chmod(0o755)
    (tmp_path / "locks").mkdir()
    env = {k: v for k, v in _job_env().items() if not k.startswith("CUDA_")}
    # Lock files of this test only: other checkouts on the machine may run it at the same time.
    env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", EVEREST_CLUSTER_DIR=str(CLUSTER),
               EVEREST_GPU_LOCK_DIR=str(tmp_path / "locks"), EVEREST_GPU_POLL_SECONDS="0.1")
    return env


def _wait_for(path: Path, proc: subprocess.Popen, what: str = "") -> str:
    deadline = time.monotonic() + 20
    while not (path.is_file() and what in path.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=5)
        time.sleep(0.05)
    return path.read_text()


def test_concurrent_jobs_pin_themselves_to_different_gpus(fake_gpu_node: dict[str, str], tmp_path: Path):
    def start(name: str) -> subprocess.Popen:
        with open(tmp_path / f"{name}.err", "w") as err:  # the job keeps its own copy of the descriptor
            return subprocess.Popen(["bash", "-c", CLAIM_GPU, name, str(tmp_path / f"{name}.gpu"),
                                     str(tmp_path / f"{name}.end")], env=fake_gpu_node, stderr=err, text=True)

    jobs = {name: start(name) for name in ("a", "b")}
    try:
        gpus = {name: _wait_for(tmp_path / f"{name}.gpu", proc).split() for name, proc in jobs.items()}
        assert sorted(g[0] for g in gpus.values()) == ["0", "1"]
        assert {g[1] for g in gpus.values()} == {"PCI_BUS_ID"}  # the numbering of nvidia-smi
        assert "pinned to GPU" in (tmp_path / "a.err").read_text()

        # A third job on the full node waits for a GPU instead of sharing one, and gets the freed one.
        jobs["c"] = start("c")
        _wait_for(tmp_path / "c.err", jobs["c"], "waiting for one")
        assert not (tmp_path / "c.gpu").exists()
        (tmp_path / "a.end").touch()
        assert jobs["a"].wait(timeout=20) == 0
        assert _wait_for(tmp_path / "c.gpu", jobs["c"]).split()[0] == gpus["a"][0]
    finally:
        for name, proc in jobs.items():
            (tmp_path / f"{name}.end").touch()
            proc.wait(timeout=20)


@pytest.mark.parametrize("visible", ["3", ""], ids=["set", "set-empty"])
def test_gpu_set_by_the_site_is_left_alone(visible: str, fake_gpu_node: dict[str, str], tmp_path: Path):
    (tmp_path / "end").touch()
    res = subprocess.run(["bash", "-c", CLAIM_GPU, "x", str(tmp_path / "gpu"), str(tmp_path / "end")],
                         env={**fake_gpu_node, "CUDA_VISIBLE_DEVICES": visible}, capture_output=True, text=True,
                         timeout=20)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "gpu").read_text() == f"{visible} unset\n"
    assert not list((tmp_path / "locks").iterdir()) and res.stderr == ""


def test_pbs_sub_job_pins_its_gpu_before_the_training_starts(fake_gpu_node: dict[str, str], tiny_data: Path,
                                                             tmp_path: Path):
    out = tmp_path / "out"
    env = {**fake_gpu_node, "EVEREST_DATA_DIR": str(tiny_data), "EVEREST_OUTPUT_DIR": str(out),
           "PBS_O_WORKDIR": str(tmp_path), "PBS_ARRAY_INDEX": "7", "PBS_JOBID": "81[7].server"}
    # An invalid model stops the training at once (status 2): only what happens before it matters here.
    probe = ["--set", "model.num_heads=0"]
    res = subprocess.run(["bash", str(PBS_ARRAY), *probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    log = (out / "logs" / "train_81_7_everest_C_48h_seed1.log").read_text()
    assert res.returncode == 2, log
    assert "pinned to GPU 0 of" in log and ", GPUs: 0, " in log
    assert (tmp_path / "locks" / "everest-gpu-0.lock").is_file()
    # Asked for the CPU: no GPU claimed.
    res = subprocess.run(["bash", str(PBS_ARRAY), *probe, "--device", "cpu"], env={**env, "PBS_JOBID": "82[7].s"},
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    log = (out / "logs" / "train_82_7_everest_C_48h_seed1.log").read_text()
    assert res.returncode == 2 and "pinned" not in log and ", GPUs: none, " in log


# ---------------------------------------------------------------------- the SLURM twin on a real SLURM
def _scontrol_jobs(job_id: str) -> list[dict[str, str]]:
    """`scontrol -o show job ID` as one dict per job (an array job gives one per task)."""
    res = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=20)
    assert res.returncode == 0, res.stderr
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in res.stdout.splitlines() if line.strip()]


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}


def _submit_to_real_slurm(tiny_data: Path, tmp_path: Path, corrupt: str, args: list[str]) -> tuple[str, str]:
    """Submit to the real SLURM with the ``corrupt`` table unreadable; wait for the analysis job to end.
    Returns (array job id, analysis job id)."""
    state = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%t"], capture_output=True, text=True)
    if state.returncode or state.stdout.strip().rstrip("*~#") not in {"idle", "mix", "alloc"}:
        pytest.fail(f"SLURM is installed but not usable (sinfo: {state.stdout.strip() or state.stderr.strip()!r});"
                    " start it with `tests/cluster/slurm.sh up`")
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    small = {f"EVEREST_{job}_{what}": value for job in ("TRAIN", "ANALYSIS")
             for what, value in (("CPUS", "1"), ("MEM", "1G"), ("WALLTIME", "00:10:00"))}
    env = _job_env(**small)
    # The jobs queue in a partition that is down while the table is rewritten (the submission read it intact
    # and would refuse it broken): the training cannot load it, exit status 2.
    hold = "everest-hold"
    deadline = time.monotonic() + 60  # a previous test's cancelled jobs may still be leaving the partition
    while subprocess.run(["scontrol", "show", "partition", hold], capture_output=True).returncode == 0:
        subprocess.run(["scontrol", "delete", f"PartitionName={hold}"], capture_output=True)
        left = subprocess.run(["squeue", "-h", "-p", hold], capture_output=True, text=True).stdout
        assert time.monotonic() < deadline, f"partition {hold} cannot be deleted; its jobs: {left}"
        time.sleep(0.5)
    subprocess.run(["scontrol", "create", f"PartitionName={hold}", "Nodes=localhost", "Hidden=YES", "State=DOWN"],
                   check=True, capture_output=True)
    try:
        res = _submit(SLURM_SUBMIT, [*args, "--data-dir", "data", "--output-dir", "out", "--queue", hold,
                                     *TINY_MODEL, "--device", "cpu"], env, tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        (data / corrupt).write_text("not,a,sharp,table\n1,2,3,4\n")
        subprocess.run(["scontrol", "update", f"PartitionName={hold}", "State=UP"], check=True, capture_output=True)
    except BaseException:
        subprocess.run(["scontrol", "delete", f"PartitionName={hold}"], capture_output=True)
        raise
    array_id = re.search(r"^training array: (\d+)$", res.stdout, flags=re.MULTILINE).group(1)
    analysis_id = re.search(r"^analysis job: (\d+) \(afterany on \d+\)$", res.stdout, flags=re.MULTILINE).group(1)
    try:
        deadline = time.monotonic() + 150
        while True:
            (analysis,) = _scontrol_jobs(analysis_id)
            if analysis["JobState"] in FINAL_STATES:
                break
            assert time.monotonic() < deadline, f"analysis job still {analysis['JobState']}"
            time.sleep(1)
    finally:
        subprocess.run(["scancel", array_id, analysis_id], capture_output=True)
        subprocess.run(["scontrol", "delete", f"PartitionName={hold}"], capture_output=True)
    return array_id, analysis_id


@pytest.mark.cluster
@pytest.mark.skipif(shutil.which("sinfo") is None, reason="SLURM is not installed (no sinfo on PATH)")
def test_slurm_array_and_analysis_on_real_slurm(tiny_data: Path, tmp_path: Path):
    """Two experiments, one of which cannot read its data: FAILED task, COMPLETED task and analysis."""
    array_id, analysis_id = _submit_to_real_slurm(tiny_data, tmp_path, "training_data_M_48.csv",
                                                  ["--targets", "C-24", "M-48", "--seeds", "0"])
    (analysis,) = _scontrol_jobs(analysis_id)
    out = tmp_path / "out"
    logs = {p.name: p.read_text() for p in (out / "logs").iterdir()}
    tasks = {int(t["ArrayTaskId"]): t for t in _scontrol_jobs(array_id)}
    assert sorted(tasks) == [1, 21]
    assert (tasks[1]["JobState"], tasks[1]["ExitCode"]) == ("COMPLETED", "0:0"), logs
    assert (tasks[21]["JobState"], tasks[21]["ExitCode"]) == ("FAILED", "2:0"), logs
    assert (analysis["JobState"], analysis["ExitCode"]) == ("COMPLETED", "0:0"), logs
    # afterany: the analysis started only after both tasks had ended.
    assert analysis["StartTime"] >= max(t["EndTime"] for t in tasks.values())

    assert (out / "results" / "everest_C_24h_seed0" / "results.json").is_file()
    failure = json.loads((out / "results" / "everest_M_48h_seed0" / "failure.json").read_text())
    assert failure["error_type"] == "ExitStatus2" and "missing required column" in failure["error"]
    assert f"train_{array_id}_21.log" in failure["error"]
    assert set(logs) == {f"train_{array_id}_1.log", f"train_{array_id}_21.log", f"analysis_{analysis_id}.log"}
    assert "1/2 experiments analysed (1 failed, 0 missing)" in logs[f"analysis_{analysis_id}.log"]
    report = (out / "analysis" / "production_training_report.md").read_text()
    assert "everest_M_48h_seed0" in report and "ExitStatus2" in report


@pytest.mark.cluster
@pytest.mark.skipif(shutil.which("sinfo") is None, reason="SLURM is not installed (no sinfo on PATH)")
def test_slurm_group_array_on_real_slurm(tiny_data: Path, tmp_path: Path):
    """``--group-width 2`` over C-24, C-48, M-48 seed 0: task 1 trains (1 6), task 2 (21). C-24's table is
    unreadable: task 1 fails (exit 2) with C-48 finished beside it; the analysis counts 2 finished, 1 failed."""
    array_id, analysis_id = _submit_to_real_slurm(tiny_data, tmp_path, "training_data_C_24.csv",
                                                  ["--targets", "C-24", "C-48", "M-48", "--seeds", "0",
                                                   "--group-width", "2"])
    (analysis,) = _scontrol_jobs(analysis_id)
    out = tmp_path / "out"
    logs = {p.name: p.read_text() for p in (out / "logs").iterdir()}
    tasks = {int(t["ArrayTaskId"]): t for t in _scontrol_jobs(array_id)}
    assert sorted(tasks) == [1, 2]
    assert (tasks[1]["JobState"], tasks[1]["ExitCode"]) == ("FAILED", "2:0"), logs
    assert (tasks[2]["JobState"], tasks[2]["ExitCode"]) == ("COMPLETED", "0:0"), logs
    assert (analysis["JobState"], analysis["ExitCode"]) == ("COMPLETED", "0:0"), logs
    assert "--array-index 1 6 " in logs[f"train_{array_id}_1.log"]
    for name in ("everest_C_48h_seed0", "everest_M_48h_seed0"):
        assert (out / "results" / name / "results.json").is_file(), logs
    failure = json.loads((out / "results" / "everest_C_24h_seed0" / "failure.json").read_text())
    assert failure["error_type"] == "DataError" and "missing required column" in failure["error"]
    assert "2/3 experiments analysed (1 failed, 0 missing)" in logs[f"analysis_{analysis_id}.log"]
