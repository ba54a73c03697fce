"""Shared fixtures (files on disk, tiny synthetic data, one real Prefect server per test run) and the tier rules."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

SLOW_FIXTURES = frozenset({"prefect_server"})
"""Fixtures whose set-up alone takes many seconds (a real Prefect server): a test that uses one is ``slow``."""


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by ``-m``, so the added marks count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put tests that start a Prefect server or batch jobs in the ``slow`` tier; skip ``gpu`` tests without CUDA.

    The two ``slow`` rules follow from what a test uses, so a new test of that kind cannot land in
    ``make test-fast`` by a forgotten decorator: every ``cluster`` test starts SLURM or PBS jobs, and every
    user of :data:`SLOW_FIXTURES` waits for a server. Torch is imported only if a ``gpu`` test exists.
    """
    for item in items:
        cluster = item.get_closest_marker("cluster") is not None
        if cluster or SLOW_FIXTURES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.slow)
        if cluster:  # one SLURM for all: under pytest-xdist (make test) these run one at a time, in one process
            item.add_marker(pytest.mark.xdist_group("slurm"))
    # The SLURM tests first: the longest chain (one process, one at a time) starts while the others share the rest.
    items.sort(key=lambda item: item.get_closest_marker("cluster") is None)
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu:
        item.add_marker(skip)


@pytest.fixture
def write_csv(tmp_path: Path):
    """Write a DataFrame (or raw text) as a CSV file under tmp_path and return its path."""

    def _write(content: pd.DataFrame | str, name: str = "training_data_M_24.csv") -> Path:
        path = tmp_path / name
        if isinstance(content, str):
            path.write_text(content)
        else:
            content.to_csv(path, index=False)
        return path

    return _write


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real ``prefect server`` for the whole test run (127.0.0.1, its own PREFECT_HOME)."""
    import os

    from flows.server import prefect_api

    home = tmp_path_factory.mktemp("prefect-home")
    old = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(home)
    try:
        with prefect_api() as url:
            yield url
    finally:
        if old is None:
            os.environ.pop("PREFECT_HOME", None)
        else:
            os.environ["PREFECT_HOME"] = old


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The 18 tables of the generator's ``tiny`` size (seed 0), written once per test run."""
    from everest.data import synthetic

    out = tmp_path_factory.mktemp("tiny-data")
    synthetic.generate(out, size="tiny", seed=0)
    return out
