"""A private local Prefect server for command-line runs that have no ``PREFECT_API_URL``.

Without a real server every Dask worker process would start its own temporary server on the same
SQLite file. It serves the UI while the run lasts and binds 127.0.0.1 unless told otherwise (batch runs
bind the address the compute nodes reach, and then require a per-run password,
``PREFECT_API_AUTH_STRING``, which the worker jobs read from a file only the user can read: never from
their job script, which the batch system keeps readable to its administrators and tools). It keeps its
database under ``PREFECT_HOME``, so run history survives and can be browsed later with ``prefect server start``.
The server runs in its own session; :func:`stop_server` ends it with every process it started.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Credentials of the Prefect API. Batch jobs get them through a private file (:func:`write_private`), never in
# their job script: PBS keeps a job's script readable (`printjob -s`, the mom's spool, the server database).
API_SECRETS = ("PREFECT_API_AUTH_STRING", "PREFECT_API_KEY")


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` so that only this user can read it: created mode 0600 (never readable by
    others, not even for a moment) as a temporary file in the same folder, then renamed over ``path``, so a
    reader sees the old or the new content, never half of it. The folder is made (mode 0700) if missing."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # O_EXCL, mode 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _healthy(url: str, auth: str | None) -> bool:
    request = urllib.request.Request(f"{url}/health")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def is_loopback(host: str) -> bool:
    """An address of this machine only: a literal 127.x / ::1 address or the name localhost.

    Host names are not resolved: many login nodes map their own name to 127.0.1.1 in /etc/hosts, while
    the compute nodes resolve it to the cluster address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@contextlib.contextmanager
def prefect_api(host: str = "127.0.0.1", timeout: float = 90.0) -> Iterator[str]:
    """Yield a Prefect API URL: the configured one, else a private server started for the block on ``host``."""
    existing = os.environ.get("PREFECT_API_URL")
    if existing:
        yield existing
        return
    port = _free_port(host)
    url = f"http://{host}:{port}/api"
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))
    home.mkdir(parents=True, exist_ok=True)
    logfile = open(home / "everest-server.log", "ab")  # noqa: SIM115 - closed in finally
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port),
           "--analytics-off"]
    # Reachable from other machines: only clients holding this run's password may use it.
    auth = None if is_loopback(host) else f"everest:{secrets.token_urlsafe(24)}"
    # The UI's pages call the API at PREFECT_UI_API_URL, which otherwise names the default port 4200.
    env = {**os.environ, "PREFECT_UI_API_URL": url, **({"PREFECT_SERVER_API_AUTH_STRING": auth} if auth else {})}
    print(f"starting a private Prefect server on {host}:{port} for this run, with its UI (history kept in "
          f"{home}; this takes 10-60 s) ...", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url, auth):
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with status {proc.returncode}; see {logfile.name}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not answer at {url} within {timeout:.0f} s; see {logfile.name}")
            time.sleep(0.5)
        log.info("started a private Prefect server at %s (history kept in %s)", url, home)
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        # Inherited by Dask worker processes started later, and passed into batch jobs (pass_env).
        os.environ["PREFECT_API_URL"] = url
        updates: dict[Any, str] = {PREFECT_API_URL: url}
        if auth:
            os.environ["PREFECT_API_AUTH_STRING"] = auth
            updates[PREFECT_API_AUTH_STRING] = auth
        with temporary_settings(updates=updates):
            try:
                yield url
            finally:
                from prefect.logging.handlers import APILogWorker

                APILogWorker.drain_all(timeout=10)  # ship buffered run logs before the server goes away
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        if auth:
            os.environ.pop("PREFECT_API_AUTH_STRING", None)
        stop_server(proc)
        logfile.close()


def stop_server(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """End the server and every process it started (its own session's process group): SIGTERM, then
    SIGKILL after ``timeout`` seconds. A second Ctrl-C or signal while it shuts down still leaves nothing
    running: the group is killed before the interruption goes on."""

    def signal_group(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    signal_group(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass  # killed below
    finally:  # also after an interruption: whatever is left of the group, a child that outlived the server too
        signal_group(signal.SIGKILL)
        proc.wait()
