"""Determinism, provenance, and safe defaults."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import TINY_MODEL, set_args

from flows.profiles import load_profile

ROOT = Path(__file__).resolve().parents[2]
TINY = [*set_args(TINY_MODEL), "--epochs", "2"]


def _train_cli(data: Path, out: Path, seed: int = 0) -> Path:
    r = subprocess.run([sys.executable, "-m", "everest", "train", "--flare_class", "C", "--time_window", "48", "--seed",
                        str(seed), "--data-dir", str(data), "--output-dir", str(out), *TINY],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out / "results" / f"everest_C_48h_seed{seed}"


@pytest.mark.slow
def test_same_seed_same_machine_gives_identical_metrics_and_predictions(tiny_data, tmp_path):
    a, b = _train_cli(tiny_data, tmp_path / "a"), _train_cli(tiny_data, tmp_path / "b")
    assert (a / "predictions.csv").read_bytes() == (b / "predictions.csv").read_bytes()
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    timing = ("latency_ms", "latency_single_ms")
    assert {k: v for k, v in ra["test_metrics"].items() if k not in timing} == \
        {k: v for k, v in rb["test_metrics"].items() if k not in timing}
    assert [h["val_loss"] for h in ra["history"]] == [h["val_loss"] for h in rb["history"]]


@pytest.mark.slow
def test_every_result_records_its_provenance(tiny_data, tmp_path):
    res = json.loads((_train_cli(tiny_data, tmp_path) / "results.json").read_text())
    prov = res["provenance"]
    assert re.fullmatch(r"[0-9a-f]{16}", prov["config_hash"])
    assert set(prov["data_hashes"]) == {"training_data_C_48.csv", "testing_data_C_48.csv"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in prov["data_hashes"].values())
    for key in ("everest", "git_commit", "python", "torch", "numpy", "pandas", "scipy", "scikit_learn", "device",
                "device_name", "host"):
        assert key in prov, key
    assert res["config"]["train"]["epochs"] == 2  # the full effective configuration travels with the result


@pytest.mark.slow
def test_analysis_never_mixes_configs_within_a_target_without_saying_so(tiny_data, tmp_path):
    from everest.analysis import ProductionAnalyzer

    _train_cli(tiny_data, tmp_path, seed=0)
    r = subprocess.run([sys.executable, "-m", "everest", "train", "--flare_class", "C", "--time_window", "48", "--seed",
                        "1", "--data-dir", str(tiny_data), "--output-dir", str(tmp_path), *TINY,
                        "--set=train.learning_rate=0.001"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = ProductionAnalyzer(tmp_path / "results", tmp_path, targets=["C-48"], seeds=[0, 1], n_bootstrap=200,
                                 make_plots=False).run_complete_analysis()
    # One result per configuration: the newer one is the run's, the older one is stale and out of the statistics.
    assert list(summary.stale) == ["everest_C_48h_seed0"] and "config" in summary.stale["everest_C_48h_seed0"]
    assert summary.n_completed == 1
    report = Path(summary.report).read_text()
    assert "Stale results" in report and "everest_C_48h_seed0" in report


def test_model_files_are_never_unpickled():
    calls = []
    for path in [*ROOT.glob("everest/**/*.py"), *ROOT.glob("flows/**/*.py")]:
        for line in path.read_text().splitlines():
            if "torch.load(" in line:
                calls.append((path.name, line.strip()))
                assert "weights_only=True" in line, f"{path}: {line.strip()}"
            assert "pickle.load" not in line, f"{path} unpickles: {line.strip()}"
    assert calls, "expected the trainer to load weights somewhere"


def test_local_prefect_server_binds_loopback_only(prefect_server):
    host, port = re.match(r"http://([^:/]+):(\d+)", prefect_server).groups()
    assert host == "127.0.0.1"
    listening = _listening_addresses(int(port))
    assert listening == {"127.0.0.1"}, listening


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket in LISTEN state on ``port`` (from /proc/net/tcp{,6})."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                raw = bytes.fromhex(addr)
                found.add(socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6,
                                           raw[::-1] if width == 8 else raw))
    return found


@pytest.mark.parametrize("kind", ["pbs", "slurm"])
def test_job_scripts_carry_no_credentials(kind, monkeypatch):
    monkeypatch.setenv("PREFECT_API_KEY", "pnu_supersecret")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    script = load_profile(kind).job_script()
    assert "supersecret" not in script and "PREFECT_API_KEY" not in script
    assert "http://127.0.0.1:4200/api" in script  # only the API address is passed on


@pytest.mark.slow
@pytest.mark.parametrize("value", ["C-24; rm -rf ~", "$(touch /tmp/pwned)", "`id`", "C-24\nM-48"])
def test_shell_text_never_reaches_a_command_or_job_script(value, tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("alive")
    for cmd in ([sys.executable, "-m", "flows.production", "--targets", value, "--output-dir", str(tmp_path / "o")],
                ["bash", str(ROOT / "cluster" / "submit_jobs.sh"), "--dry-run", "--targets", value],
                ["bash", str(ROOT / "cluster" / "slurm" / "submit_jobs.sh"), "--dry-run", "--targets", value]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                           env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                                "EVEREST_PYTHON": sys.executable})
        assert r.returncode != 0, (cmd, r.stdout)
        assert "invalid target" in (r.stderr + r.stdout), (cmd, r.stderr, r.stdout)
    assert canary.read_text() == "alive" and not Path("/tmp/pwned").exists()
