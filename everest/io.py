"""File handling shared by every module: atomic writes (a reader sees the old file or the complete new one,
never half of one), the output-folder lock, and the one reader of YAML/TOML settings files."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from everest.errors import ConfigError


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and move the result to ``path`` atomically."""
    with _atomic_path(Path(path)) as tmp:
        writer(tmp)
    return Path(path)


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out`` to fill; on success it replaces ``out`` by renames (an older
    ``out`` is moved aside, then removed), so a reader sees the old folder or the new one, never half of one."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old.exists():
                os.replace(old, out)  # the old folder back in its place
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable_dir(path: str | Path, what: str) -> None:
    """Refuse (:class:`ConfigError`) a folder that is not one, or cannot be created or written, without
    creating anything: the folder itself when it exists, else its nearest existing parent, is checked."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise ConfigError(f"{what} {path} {where}; expected a folder, or a path where one can be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise ConfigError(f"{what} {path} {where} by this user; choose a folder you can write")


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=True) + "\n")


def write_csv(path: str | Path, frame: pd.DataFrame) -> Path:
    return atomic_write(path, lambda p: frame.to_csv(p, index=False))


def write_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    def _save(p: Path) -> None:
        with open(p, "wb") as fh:  # a file object keeps numpy from appending ".npz" to the temp name
            np.savez(fh, **arrays)

    return atomic_write(path, _save)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


class LockedError(RuntimeError):
    """Another process holds the lock; the message says who."""


@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` for the block, or raise :class:`LockedError` naming the holder.

    Normally an advisory ``flock``: it dies with its process (no stale lock after a crash) and works on
    local file systems and NFSv4; the file records the holder for the message. Lustre and GPFS mounted
    without flock support refuse it (ENOLCK, EOPNOTSUPP, ENOSYS, ...); then the lock is the existence
    of ``<path>.excl``, created with ``O_EXCL`` and holding user, host, pid and start time, removed at
    the end of the block. A crash leaves that file behind. It is never taken over automatically: a
    dead pid on this host proves little where containers share a host name and a file system, and two
    processes removing the same stale file would both believe they hold the lock. Instead the error
    says it is stale (same host, pid gone) and which file to delete. Lustre mounted with ``localflock``
    grants flock per node only: there, start each output folder's runs from one login node.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:  # closing releases the lock
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise LockedError(f"{what} is in use by {holder}; wait for it to finish or use another output "
                              f"directory (lock file {path})") from None
        except OSError as err:  # this file system has no flock
            flock_error = err
        else:
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {_host()} since {_now()}\n")
            fh.flush()
            yield path
            return
    with _exclusive_file(path.with_name(path.name + ".excl"), what, flock_error):
        yield path


@contextlib.contextmanager
def _exclusive_file(lock: Path, what: str, flock_error: OSError) -> Iterator[None]:
    """The lock as a file that only one process can create (``O_EXCL``), removed on exit."""
    import logging
    import uuid

    holder = {"user": _user(), "host": _host(), "pid": os.getpid(), "since": _now(), "token": uuid.uuid4().hex}
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise LockedError(_held_message(lock, what)) from None
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(holder) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        lock.unlink(missing_ok=True)
        raise
    logging.getLogger(__name__).info("%s: no flock on this file system (%s); locked by creating %s",
                                     what, flock_error.strerror or flock_error, lock)
    try:
        yield
    finally:
        # Only our own file: someone may have deleted a lock they took for stale and made their own.
        if _read_holder(lock).get("token") == holder["token"]:
            lock.unlink(missing_ok=True)


def _held_message(lock: Path, what: str) -> str:
    info = _read_holder(lock)
    try:
        pid = int(info["pid"])
        host, user, since = str(info["host"]), str(info.get("user", "?")), str(info.get("since", "?"))
        if pid <= 0:
            raise ValueError(pid)
    except (KeyError, TypeError, ValueError):
        return (f"{what} is locked by {lock}, which names no holder (being written, or left by a crash); "
                f"if no EVEREST run uses it, delete {lock} and start again")
    if host == _host() and not _pid_alive(pid):
        return (f"{what} is locked by a stale lock file: pid {pid} of user {user} on this host ({host}), "
                f"started {since}, is no longer running. Delete {lock} and start again")
    return (f"{what} is in use by pid {pid} on {host} (user {user}) since {since}; wait for it to finish or "
            f"use another output directory. This file system has no flock, so a run that crashed leaves "
            f"its lock behind: only if that run is gone, delete {lock}")


def _read_holder(lock: Path) -> dict[str, Any]:
    try:
        info = json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _host() -> str:
    import platform

    return platform.node()


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, as in some containers
        return str(os.getuid())


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def write_torch(path: str | Path, obj: Any) -> Path:
    """``torch.save`` atomically; serialised in memory first so a full disk raises a plain OSError."""
    import io as _io

    import torch

    buffer = _io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write(path, lambda p: p.write_bytes(buffer.getbuffer()))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    dupes = sorted({str(k) for k in keys if keys.count(k) > 1})
    if dupes:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {dupes}", node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """Read a settings file (``.toml``, else YAML) into a mapping; a missing file, a syntax error, a
    duplicated key or a non-mapping raises :class:`ConfigError` naming ``what`` and the file.

    TOML refuses duplicate keys by its specification; YAML's loaders would keep the last one silently.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    text = p.read_text()
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot parse {what} {p}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p} must hold a mapping of keys, got {type(data).__name__}")
    return data
