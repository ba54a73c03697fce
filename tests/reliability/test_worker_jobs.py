"""Worker jobs that cannot start or die before their Dask worker connects end the wait, in the scheduler's words;
the site checks compare the values the nodes offer with what a job asks.

SLURM tests use the real single-node SLURM (``tests/cluster/slurm.sh up``, CI starts it) with the profile's real
SLURMCluster and the flow's real waiting functions; they create two hidden partitions that can never run the
jobs (one DOWN, one whose time limit is below the jobs' walltime) and remove them afterwards. PBS Pro cannot be
installed here: PBS tests put shell scripts named ``qsub``/``qstat``/``pbsnodes``/``qdel`` on PATH that print
OpenPBS's own replies (``..._mock_pbs``); the PBSCluster and the waiting functions are real.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from distributed import Client
from distributed import wait as dask_wait
from profiles_for_tests import for_test_machine
from tiny import overrides

from everest.errors import ConfigError
from flows import jobwatch
from flows.batch import BatchProfile
from flows.production import ProductionParameters, make_flow
from flows.profiles import load_profile
from flows.run import SubmissionFailed, next_settled, settle

HAS_SLURM = shutil.which("sinfo") is not None
slurm_only = [pytest.mark.cluster, pytest.mark.skipif(not HAS_SLURM, reason="SLURM is not installed (no sinfo)")]

JOB_NAME = "everest-watch"  # not the shipped everest-worker: other tests cancel stale jobs of that name
DOWN, SHORT = "everest-test-down", "everest-test-short"


@pytest.fixture(autouse=True)
def _fast_watch(monkeypatch):
    """Ask the scheduler every second (20 s in production) and start each test with no recorded failure."""
    monkeypatch.setattr(jobwatch, "POLL_SECONDS", 1.0)
    jobwatch.clear_submission_failures()
    yield
    jobwatch.clear_submission_failures()


class DaskFuture:
    """The slice of a Prefect future that ``next_settled``/``settle`` use, around a real Dask future."""

    def __init__(self, future):
        self.wrapped_future = future

    def result(self):
        return self.wrapped_future.result()

    def wait(self, timeout=None):
        try:
            dask_wait(self.wrapped_future, timeout=timeout)
        except TimeoutError:
            pass


def _double(x: int) -> int:
    return 2 * x


def _wait_for_verdict(profile: BatchProfile, use_settle: bool = False, timeout: float = 150) -> tuple[str, float]:
    """Start the profile's cluster, ask for one worker, wait with the flow's functions; (message, seconds)."""
    with profile.make_cluster() as cluster, Client(cluster) as client:
        cluster.scale(1)
        fut = DaskFuture(client.submit(_double, 21, pure=False))
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:  # next_settled returns at once with a verdict, else when the task ends; bound the test
            if use_settle:
                with pytest.raises(SubmissionFailed) as err:
                    settle(fut, poll_seconds=0.5)
                return str(err.value), time.monotonic() - t0
            key, _, result, error = next_settled({"only": fut}, poll_seconds=0.2)
            assert time.monotonic() < deadline, "no verdict in time"
            assert isinstance(error, SubmissionFailed), (result, error)
            return str(error), time.monotonic() - t0


# --------------------------------------------------------------------------------------------------
# Real SLURM


def _scontrol(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def never_partitions():
    """Two hidden partitions on the CI node that never start a 10-minute job: one DOWN, one with a 1-minute limit
    (EnforcePartLimits=NO: sbatch accepts the job, which then pends with reason PartitionTimeLimit)."""
    state = subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%t"], capture_output=True, text=True)
    if state.returncode or not state.stdout.strip():
        pytest.fail(f"SLURM is installed but not usable ({state.stderr.strip()!r}); run tests/cluster/slurm.sh up")
    made = []
    for name, extra in ((DOWN, "State=DOWN"), (SHORT, "MaxTime=1 State=UP")):
        if _scontrol("show", "partition", name).returncode:
            res = _scontrol("create", f"PartitionName={name}", "Nodes=localhost", "Hidden=YES", *extra.split())
            assert res.returncode == 0, res.stderr
            made.append(name)
    yield
    for name in made:
        _scontrol("delete", f"PartitionName={name}")


def _slurm_profile(tmp_path: Path, **changes) -> BatchProfile:
    profile = for_test_machine(load_profile("slurm"), **({"log_directory": str(tmp_path / "logs"),
                                                           "job_name": JOB_NAME, "queue": "debug"} | changes))
    assert isinstance(profile, BatchProfile)
    return profile


def _no_jobs_left(job_name: str = JOB_NAME) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = subprocess.run(["squeue", "-h", "-n", job_name, "-o", "%i %T"], capture_output=True, text=True).stdout
        if not left.strip():
            return
        time.sleep(0.5)
    pytest.fail(f"worker jobs left behind: {left}")


@pytest.mark.parametrize(("partition", "reason"), [(SHORT, "Partition(Config|TimeLimit)"), (DOWN, "PartitionDown")])
@pytest.mark.usefixtures("never_partitions")
@pytest.mark.cluster
@pytest.mark.skipif(not HAS_SLURM, reason="SLURM is not installed (no sinfo)")
def test_slurm_job_that_can_never_start_ends_the_wait_with_slurms_reason(tmp_path, partition, reason):
    message, seconds = _wait_for_verdict(_slurm_profile(tmp_path, queue=partition))
    assert re.search(f"can never start: SLURM says state PENDING, reason {reason};", message), message
    assert "worker job " in message and "cluster profile" in message and "slurm.yaml" in message
    assert seconds < 30, f"reported after {seconds:.0f} s"
    assert jobwatch.submission_failures()[-1] == message
    _no_jobs_left()


@pytest.mark.parametrize(
    ("changes", "status", "words"),
    [({"prologue": ["echo 'site setup failed: no such module cuda/12.4' >&2", "exit 3"]}, "3:0",
      "site setup failed: no such module cuda/12.4"),
     ({"python": "/nonexistent/venv/bin/python"}, "127:0", "/nonexistent/venv/bin/python: No such file or directory")],
    ids=["failing-prologue", "missing-python"],
)
@pytest.mark.cluster
@pytest.mark.skipif(not HAS_SLURM, reason="SLURM is not installed (no sinfo)")
def test_slurm_job_that_dies_before_its_worker_connects_is_reported_with_its_error_file(tmp_path, changes, status,
                                                                                       words):
    message, _ = _wait_for_verdict(_slurm_profile(tmp_path, **changes))
    assert "ended before its Dask worker connected: SLURM state FAILED" in message, message
    assert f", ExitCode {status}; last lines of" in message and words in message, message
    assert f"last lines of {tmp_path / 'logs'}/{JOB_NAME}-" in message
    _no_jobs_left()


@pytest.mark.cluster
@pytest.mark.skipif(not HAS_SLURM, reason="SLURM is not installed (no sinfo)")
def test_slurm_job_still_queued_at_the_deadline_ends_the_wait_with_its_reason(tmp_path, caplog):
    """A reason that clears by itself (here BeginTime: the job may start in an hour) waits for the deadline,
    logging what it waits for meanwhile; settle (the baselines' wait) ends the same way."""
    caplog.set_level(logging.INFO, logger="everest.jobwatch")
    profile = _slurm_profile(tmp_path, extra_directives=["--begin=now+3600"], worker_start_deadline="00:00:04")
    message, seconds = _wait_for_verdict(profile, use_settle=True)
    assert "is still queued after 00:00:04 (worker_start_deadline of cluster profile" in message, message
    assert "SLURM says state PENDING, reason BeginTime" in message
    assert 4 <= seconds < 30
    waiting = [r.getMessage() for r in caplog.records if "no Dask worker connected yet" in r.getMessage()]
    assert waiting and "reason BeginTime" in waiting[0], caplog.text
    _no_jobs_left()


@pytest.mark.cluster
@pytest.mark.skipif(not HAS_SLURM, reason="SLURM is not installed (no sinfo)")
def test_slurm_site_check_refuses_more_cpus_or_memory_than_any_node_has():
    cpus, mem = subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%c %m"], capture_output=True,
                               text=True).stdout.split()[:2]
    profile = load_profile("slurm").with_overrides(queue="debug", job_cpus=int(cpus) + 62, job_memory="1G")
    with pytest.raises(ConfigError) as err:
        profile.check_site()
    text = str(err.value)
    assert "slurm.yaml" in text and "no node of SLURM partition debug can run a worker job" in text
    assert f"job_cpus {int(cpus) + 62} asks --cpus-per-task={int(cpus) + 62}, but the most CPUs any node offers " \
           f"is {cpus}" in text, text
    with pytest.raises(ConfigError, match=rf"job_memory 4T asks --mem=4T \(4194304 MB\), but the most memory any node "
                                          rf"offers is {mem} MB"):
        profile.with_overrides(job_cpus=1, job_memory="4T").check_site()
    profile.with_overrides(job_cpus=1, job_memory="1G").check_site()


@pytest.mark.cluster
@pytest.mark.skipif(not HAS_SLURM, reason="SLURM is not installed (no sinfo)")
@pytest.mark.usefixtures("never_partitions")
def test_flow_run_on_slurm_ends_failed_when_its_worker_job_can_never_start(prefect_server, tiny_data, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    site = _slurm_profile(tmp_path, queue=SHORT, maximum_jobs=1)
    params = ProductionParameters(targets=["C-24"], seeds=[0], data_dir=str(tiny_data),
                                  output_dir=str(tmp_path / "out"), profile="slurm", overrides=overrides(),
                                  baselines=False)
    t0 = time.monotonic()
    state = make_flow(site)(**params.flow_parameters(), return_state=True)
    assert state.is_failed()
    # Right after submission SLURM may still say PartitionConfig, then PartitionTimeLimit: both never clear.
    assert re.search(r"can never start: SLURM says state PENDING, reason Partition(Config|TimeLimit)", state.message), \
        state.message
    assert time.monotonic() - t0 < 120
    _no_jobs_left()


# --------------------------------------------------------------------------------------------------
# PBS through canned OpenPBS replies

QSTAT_NEVER = """Job Id: {id}.pbsserver
    Job_Name = everest-worker
    Job_Owner = flare@login1
    job_state = Q
    queue = workq
    server = pbsserver
    Checkpoint = u
    ctime = Sat Dec  5 10:02:11 2026
    Error_Path = login1:{logs}/
    Hold_Types = n
    Join_Path = n
    Keep_Files = n
    Mail_Points = a
    mtime = Sat Dec  5 10:02:11 2026
    Output_Path = login1:{logs}/
    Priority = 0
    qtime = Sat Dec  5 10:02:11 2026
    Rerunable = True
    Resource_List.mem = 1gb
    Resource_List.ncpus = 1
    Resource_List.ngpus = 1
    Resource_List.nodect = 1
    Resource_List.place = pack
    Resource_List.select = 1:ncpus=1:mem=1gb:ngpus=1
    Resource_List.walltime = 00:10:00
    substate = 10
    Variable_List = PBS_O_HOME=/home/flare,PBS_O_LANG=C.UTF-8,
\tPBS_O_LOGNAME=flare,PBS_O_PATH=/usr/bin:/bin,PBS_O_SHELL=/bin/bash,
\tPBS_O_WORKDIR=/home/flare,PBS_O_SYSTEM=Linux,PBS_O_QUEUE=workq
    comment = Can Never Run: Insufficient amount of resource: ngpus (R: 1 A: 0
\t T: 0)
    etime = Sat Dec  5 10:02:11 2026
    eligible_time = 00:00:00
    Submit_arguments = /tmp/tmp8d0c2f.sh
    project = _pbs_project_default
    Submit_Host = login1
"""

QSTAT_FINISHED = """Job Id: {id}.pbsserver
    Job_Name = everest-worker
    Job_Owner = flare@login1
    resources_used.cpupercent = 0
    resources_used.cput = 00:00:00
    resources_used.walltime = 00:00:01
    job_state = F
    queue = workq
    server = pbsserver
    Error_Path = login1:{logs}/
    exec_host = node1/0
    Hold_Types = n
    Output_Path = login1:{logs}/
    Resource_List.select = 1:ncpus=1:mem=1gb
    stime = Sat Dec  5 10:05:40 2026
    session_id = 48211
    substate = 92
    comment = Job run at Sat Dec 05 at 10:05 on (node1:ncpus=1:mem=1048576kb) and fa
\tiled
    Exit_status = 1
    Submit_arguments = /tmp/tmp8d0c2f.sh
"""

QSTAT_WAITING = """Job Id: {id}.pbsserver
    Job_Name = everest-worker
    job_state = Q
    queue = workq
    comment = Not Running: Insufficient amount of resource: ncpus (R: 1 A: 0 T: 64)
    Resource_List.select = 1:ncpus=1:mem=1gb
"""


def _fake_pbs(tmp_path: Path, monkeypatch, qstat: str, qstat_status: int = 0, job_id: int = 12) -> Path:
    """qsub prints ``<job_id>.pbsserver``; qstat prints ``qstat`` (formatted with the id and log folder) and
    exits ``qstat_status``; qdel succeeds. Returns the log folder."""
    logs, bin_dir = tmp_path / "logs", tmp_path / "bin"
    logs.mkdir(exist_ok=True)
    bin_dir.mkdir(exist_ok=True)
    (tmp_path / "qstat.txt").write_text(qstat.format(id=job_id, logs=logs))
    scripts = {
        "qsub": f'echo "$@" >> {tmp_path}/qsub.log; echo "{job_id}.pbsserver"',
        "qstat": f'echo "$@" >> {tmp_path}/qstat.log; cat {tmp_path}/qstat.txt; exit {qstat_status}',
        "qdel": f'echo "$@" >> {tmp_path}/qdel.log',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return logs


def _pbs_profile(tmp_path: Path, **changes) -> BatchProfile:
    profile = for_test_machine(load_profile("pbs"), log_directory=str(tmp_path / "logs"), **changes)
    assert isinstance(profile, BatchProfile)
    return profile


def test_pbs_job_that_can_never_run_ends_the_wait_with_pbss_comment_mock_pbs(tmp_path, monkeypatch):
    _fake_pbs(tmp_path, monkeypatch, QSTAT_NEVER)
    message, seconds = _wait_for_verdict(_pbs_profile(tmp_path))
    assert message.startswith('worker job 12 can never start: PBS says job_state = Q, comment = "Can Never Run: '
                              'Insufficient amount of resource: ngpus (R: 1 A: 0 T: 0)"'), message
    assert "pbs.yaml" in message and seconds < 15
    assert (tmp_path / "qstat.log").read_text().splitlines()[0] == "-x -f 12"
    assert "12" in (tmp_path / "qdel.log").read_text()  # the cluster cancelled its job on closing


def test_pbs_job_that_ended_before_its_worker_connected_reports_exit_status_and_error_file_mock_pbs(tmp_path,
                                                                                                 monkeypatch):
    logs = _fake_pbs(tmp_path, monkeypatch, QSTAT_FINISHED, job_id=13)
    (logs / "13.pbsserver.ER").write_text(
        "Traceback (most recent call last):\n  File \"<frozen runpy>\", line 189, in _run_module_as_main\n"
        "ModuleNotFoundError: No module named 'distributed'\n")
    message, _ = _wait_for_verdict(_pbs_profile(tmp_path))
    assert message.startswith("worker job 13 ended before its Dask worker connected: PBS job_state = F"), message
    assert "and failed\", Exit_status = 1; last lines of" in message
    assert f"last lines of {logs}/13.pbsserver.ER: Traceback (most recent call last): |" in message
    assert message.endswith("ModuleNotFoundError: No module named 'distributed'")


def test_pbs_job_still_queued_at_the_deadline_ends_the_wait_with_its_comment_mock_pbs(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="everest.jobwatch")
    _fake_pbs(tmp_path, monkeypatch, QSTAT_WAITING)
    message, seconds = _wait_for_verdict(_pbs_profile(tmp_path, worker_start_deadline="00:00:03"))
    assert message.startswith("worker job 12 is still queued after 00:00:03 (worker_start_deadline of cluster "
                              "profile"), message
    assert message.endswith('PBS says job_state = Q, comment = "Not Running: Insufficient amount of resource: ncpus '
                            '(R: 1 A: 0 T: 64)"')
    assert 3 <= seconds < 15
    assert any("no Dask worker connected yet" in r.getMessage() and "Not Running" in r.getMessage()
               for r in caplog.records), caplog.text


def test_failing_qstat_is_logged_and_the_wait_goes_on_until_the_deadline_mock_pbs(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="everest.jobwatch")
    _fake_pbs(tmp_path, monkeypatch, "", qstat_status=2)
    (tmp_path / "qstat.txt").write_text("")
    (tmp_path / "bin" / "qstat").write_text("#!/bin/sh\necho 'Connection refused' >&2\n"
                                            "echo 'qstat: cannot connect to server pbsserver (errno=15010)' >&2\n"
                                            "exit 2\n")
    message, seconds = _wait_for_verdict(_pbs_profile(tmp_path, worker_start_deadline="00:00:04"))
    assert seconds >= 4, "a failing query must not end the run by itself"
    assert message.startswith("no Dask worker connected from worker job 12 within 00:00:04"), message
    assert "qstat -f 12` exited 2: Connection refused" in message
    assert any("cannot ask PBS about the worker jobs" in r.getMessage() for r in caplog.records), caplog.text


def test_jobs_the_cluster_closes_and_jobs_with_a_worker_are_not_reported_mock_pbs(tmp_path, monkeypatch):
    _fake_pbs(tmp_path, monkeypatch, QSTAT_FINISHED)
    with _pbs_profile(tmp_path).make_cluster() as cluster:
        cluster.scale(1)
        cluster.sync(cluster._correct_state)
        job = next(iter(cluster.workers.values()))
        assert job.job_id == "12" and job.submitted_at is not None
        time.sleep(1.1)
        cluster.worker_seen = True  # as if a worker had connected: nothing is watched any more
        assert cluster.watch_worker_jobs() is None
        cluster.worker_seen = False
        job.closing = True  # cancelled by adaptive scaling: its end is no failure
        assert cluster.watch_worker_jobs() is None
        assert jobwatch.submission_failures() == []
        del job


def test_flow_run_ends_failed_with_the_can_never_run_comment_mock_pbs(prefect_server, tiny_data, tmp_path,
                                                                     monkeypatch):
    """The whole flow on a PBSCluster whose only job PBS can never run: the run ends Failed within seconds."""
    _fake_pbs(tmp_path, monkeypatch, QSTAT_NEVER, job_id=0)
    (tmp_path / "bin" / "pbsnodes").write_text("#!/bin/sh\nprintf 'node1\\n     resources_available.ncpus = 64\\n'\n")
    (tmp_path / "bin" / "pbsnodes").chmod(0o755)
    site = _pbs_profile(tmp_path, gpus_per_job=0)
    params = ProductionParameters(targets=["C-24"], seeds=[0], data_dir=str(tiny_data),
                                  output_dir=str(tmp_path / "out"), profile="pbs", overrides=overrides())
    t0 = time.monotonic()
    state = make_flow(site)(**params.flow_parameters(), return_state=True)
    assert state.is_failed()
    assert "worker job 0 can never start: PBS says job_state = Q, comment = \"Can Never Run: Insufficient amount " \
           "of resource: ngpus (R: 1 A: 0 T: 0)\"" in state.message, state.message
    assert time.monotonic() - t0 < 90


# --------------------------------------------------------------------------------------------------
# PBS site check with node values (canned `pbsnodes -a`)

PBSNODES = """node{n}
     Mom = node{n}.cluster
     ntype = PBS
     state = free
     pcpus = {cpus}
     resources_available.arch = linux
     resources_available.host = node{n}
     resources_available.mem = {mem}
     resources_available.ncpus = {cpus}
     resources_available.ngpus = {gpus}
     resources_available.vnode = node{n}
     resources_assigned.mem = 0kb
     resources_assigned.ncpus = 0
     resources_assigned.ngpus = 0
     resv_enable = True
     sharing = default_shared
     license = l
"""


def _nodes(*specs: tuple[int, str, int]) -> str:
    return "\n".join(PBSNODES.format(n=i, cpus=c, mem=m, gpus=g) for i, (c, m, g) in enumerate(specs, 1))


@pytest.mark.parametrize(
    ("nodes", "changes", "fragments"),
    [
        ([(64, "263687680kb", 0)], {}, ["gpus_per_job 1 asks ngpus=1, but the most any node offers is "
                                        "resources_available.ngpus = 0"]),
        ([(64, "16777216kb", 4), (8, "8gb", 2)], {},
         ["job_memory 32G asks mem=32gb, but the most any node offers is resources_available.mem = 16777216kb (16G)"]),
        ([(2, "263687680kb", 4)], {}, ["job_cpus 4 asks ncpus=4, but the most any node offers is "
                                       "resources_available.ncpus = 2"]),
        ([(2, "263687680kb", 4), (64, "263687680kb", 0)], {},
         ["no single node offers select=1:ncpus=4:mem=32gb:ngpus=1 together"]),
        ([(64, "263687680kb", 4)], {"job_cpus": 128, "job_memory": "1T"},
         ["job_cpus 128 asks ncpus=128", "= 64", "job_memory 1T asks mem=1tb", "= 263687680kb (251G)"]),
    ],
    ids=["no-gpus", "small-memory", "few-cpus", "not-together", "two-at-once"],
)
def test_pbs_site_check_compares_node_values_mock_pbs(tmp_path, monkeypatch, nodes, changes, fragments):
    _fake_pbs(tmp_path, monkeypatch, "")
    (tmp_path / "bin" / "qstat").write_text("#!/bin/sh\nexit 0\n")  # qstat -Q gpu: the queue exists
    (tmp_path / "pbsnodes.txt").write_text(_nodes(*nodes))
    (tmp_path / "bin" / "pbsnodes").write_text(f"#!/bin/sh\ncat {tmp_path}/pbsnodes.txt\n")
    (tmp_path / "bin" / "pbsnodes").chmod(0o755)
    profile = load_profile("pbs").with_overrides(**changes)
    with pytest.raises(ConfigError) as err:
        profile.check_site()
    text = str(err.value)
    assert "\n" not in text and "pbs.yaml" in text and "no PBS node can run a worker job (pbsnodes -a)" in text
    for fragment in fragments:
        assert fragment in text, text
    (tmp_path / "pbsnodes.txt").write_text(_nodes((8, "8gb", 0), (64, "263687680kb", 4)))
    profile.with_overrides(job_cpus=4, job_memory="32G").check_site()  # node2 takes it


def test_pbs_site_check_compares_gpu_type_mock_pbs(tmp_path, monkeypatch):
    _fake_pbs(tmp_path, monkeypatch, "")
    (tmp_path / "bin" / "qstat").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "bin" / "pbsnodes").write_text(
        "#!/bin/sh\nprintf 'node1\\n     resources_available.ncpus = 64\\n     resources_available.ngpus = 4\\n"
        "     resources_available.gpu_type = A100\\n'\n")
    (tmp_path / "bin" / "pbsnodes").chmod(0o755)
    profile = load_profile("pbs")
    profile.with_overrides(gpu_type="A100").check_site()
    with pytest.raises(ConfigError, match=r"gpu_type L40S asks gpu_type=L40S, but the nodes offer "
                                          r"resources_available.gpu_type \['A100'\]"):
        profile.with_overrides(gpu_type="L40S").check_site()


def test_qstat_parser_joins_wrapped_values_and_reads_torque_style_output():
    jobs = jobwatch.parse_qstat_f(QSTAT_NEVER.format(id=7, logs="/l") + "\n" + "Job Id:\t8\n\tjob_state = C\n")
    assert jobs["7"]["comment"] == "Can Never Run: Insufficient amount of resource: ngpus (R: 1 A: 0 T: 0)"
    assert jobs["7"]["Variable_List"].endswith("PBS_O_QUEUE=workq") and jobs["7"]["Job Id"] == "7.pbsserver"
    assert jobs["8"]["job_state"] == "C"


def test_node_value_parsers():
    from flows.sitecheck import gres_gpus, pbs_size_bytes

    assert gres_gpus("gpu:a100:4(S:0-1),gpu:h100:2") == 6
    assert gres_gpus("gpu:a100:4(S:0-1),gpu:h100:2", "h100") == 2 and gres_gpus("(null)") == 0
    assert gres_gpus("gpu:2,mps:100") == 2
    assert pbs_size_bytes("263687680kb") == 263687680 * 1024 and pbs_size_bytes("16gb") == 16 * 1024**3
    assert pbs_size_bytes("1048576") == 1048576 and pbs_size_bytes("lots") is None
