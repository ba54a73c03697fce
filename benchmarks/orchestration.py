"""Row 5: Prefect's per-task overhead with no-op experiments, on the thread pool and on a LocalCluster."""

from __future__ import annotations

import logging
import os
import time

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # before prefect is imported: keep the table readable

from prefect import flow, task  # noqa: E402 - after the logging setting
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402
from prefect_dask import DaskTaskRunner  # noqa: E402

from flows.server import prefect_api  # noqa: E402


@task(name="noop-experiment", retries=2, retry_delay_seconds=10)
def noop_experiment(index: int) -> dict[str, int]:
    """Stands in for train_experiment: same submission path, no work."""
    return {"experiment": index}


def _fan_out(n: int) -> int:
    futures = [noop_experiment.submit(i) for i in range(n)]
    return len([f.result() for f in futures])


def noop_seconds(counts: list[int]) -> list[tuple[int, float, float]]:
    """(n, thread-pool seconds, LocalCluster seconds) of a flow fanning out ``n`` no-op tasks, per count."""
    logging.getLogger("distributed").setLevel(logging.ERROR)
    out = []
    with prefect_api():
        runners = {
            "threads": lambda: ThreadPoolTaskRunner(max_workers=8),
            "cluster": lambda: DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1,
                                                              "processes": True, "dashboard_address": ":0"}),
        }
        for n in counts:
            seconds = {}
            for name, make in runners.items():
                run = flow(_fan_out, name=f"noop-{name}", task_runner=make(), log_prints=False)
                t0 = time.perf_counter()
                assert run(n) == n
                seconds[name] = time.perf_counter() - t0
            out.append((n, seconds["threads"], seconds["cluster"]))
    return out
