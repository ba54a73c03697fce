"""Everything that can refuse a production run before a server starts or a job is submitted, cheapest first.

Run by the command line before the private Prefect server starts, and again by the flow itself (a deployment
run has no command line): the parameters and configuration, the data folder, the output folder, the Prefect
API's address, the batch system (queue, resources and their values), then every table the experiments read.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from everest import io
from everest.config import EverestConfig, Target, all_targets
from everest.data.tables import data_file, file_hash
from everest.errors import ConfigError, DataError
from flows.profiles import Profile
from flows.server import is_loopback

if TYPE_CHECKING:
    from flows.production import ProductionParameters


def preflight(params: ProductionParameters, site: Profile, api_url: str | None) -> EverestConfig:
    """Check a production run on ``site``, all before anything starts; returns the run's configuration."""
    cfg = params.effective_config()
    check_data_dir(params)
    if params.embedded_demo and not site.workers_on_this_host:
        raise ConfigError(f"cluster profile {site.source} runs workers on other machines: give a data folder on "
                          "the shared file system (--data-dir / data_dir); the embedded demo runs on one machine")
    out = Path(params.output_dir)
    io.check_writable_dir(out, "output folder")
    check_api_reachable(site, api_url)
    site.check_run_dir(out)
    site.check_site()
    check_tables(params, cfg)
    return cfg


def check_data_dir(params: ProductionParameters) -> None:
    """Refuse a data folder that is missing or lacks a table the targets need, naming what is expected.

    Only the embedded demo (no data folder given) may be generated; any other folder is read as it is,
    so a typo or an unmounted file system never turns into training on synthetic data.
    """
    if params.embedded_demo:
        return
    folder = params.data_path
    expected = [data_file(folder, t, split) for t in params.target_list for split in ("train", "test")]
    names = ", ".join(f.name for f in expected)
    if not folder.is_dir():
        raise DataError(f"data folder {_shown(folder)} does not exist; expected the SHARP tables {names} there")
    missing = [f.name for f in expected if not f.is_file()]
    if missing:
        raise DataError(f"data folder {_shown(folder)} lacks {len(missing)} of the {len(expected)} tables the "
                        f"targets need: {', '.join(missing)}")


def _shown(folder: Path) -> str:
    """A folder as given, plus its absolute path when relative (a relative path resolves per machine)."""
    return str(folder) if folder.is_absolute() else f"{folder} ({folder.absolute()})"


def check_api_reachable(site: Profile, api_url: str | None) -> None:
    """Refuse a Prefect API on a loopback address when the workers run on other machines.

    A batch job on a compute node resolves 127.0.0.1 to itself: every task would fail to reach the API.
    """
    host = urlsplit(api_url).hostname if api_url else None
    if host and not site.workers_on_this_host and is_loopback(host):
        raise ConfigError(
            f"PREFECT_API_URL={api_url} is a loopback address, which the compute nodes of cluster profile "
            f"{site.source} cannot reach: set PREFECT_API_URL to the server's address on the cluster network "
            "(e.g. http://<login node>:4200/api), or unset it and the run starts a private server on the "
            "profile's interface"
        )


def check_tables(params: ProductionParameters, cfg: EverestConfig) -> None:
    """Read and validate every table of the run's experiments with the reader training uses (columns, values,
    labels, enough positives), once per content; the embedded demo's tables are checked once generated."""
    from everest.data.check import check_experiments

    if params.embedded_demo and not demo_tables_present(params.data_path):
        return
    check_experiments(params.data_path, params.experiments, cfg.data, cfg.model.seq_len,
                      cache_dir=Path(params.output_dir) / "cache")


def demo_tables_present(folder: Path) -> bool:
    """Whether the embedded demo's 18 tables exist in ``folder`` (else the flow generates them)."""
    return all(data_file(folder, t, s).is_file() for t in all_targets() for s in ("train", "test"))


def data_hashes(data_dir: Path, targets: list[Target]) -> dict[Target, dict[str, str]]:
    """Content hash of every data file the run needs, per target; names each missing file."""
    out, missing = {}, []
    for t in targets:
        files = [data_file(data_dir, t, s) for s in ("train", "test")]
        missing += [str(f) for f in files if not f.is_file()]
        if not missing:
            out[t] = {f.name: file_hash(f) for f in files}
    if missing:
        raise DataError(f"data files not found: {missing} (generate demo data with `everest data synth "
                        f"--size demo --out {data_dir}` or point --data-dir at the SHARP tables)")
    return out
