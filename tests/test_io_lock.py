"""``io.exclusive_lock``: flock where the file system has it, an ``O_EXCL`` lock file where it has not."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from everest import io


@pytest.fixture
def no_flock(monkeypatch):
    """Simulates a file system mounted without flock (Lustre/GPFS without -o flock): ENOLCK."""
    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", refuse)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_flock_lock_names_its_holder(tmp_path: Path):
    lock = tmp_path / ".everest.lock"
    with io.exclusive_lock(lock, "output directory X"):
        # flock locks belong to the open file, so a second open in this process conflicts too.
        with pytest.raises(io.LockedError, match=f"output directory X is in use by pid {os.getpid()} on "):
            with io.exclusive_lock(lock, "output directory X"):
                pass
    with io.exclusive_lock(lock, "output directory X"):  # free again
        pass
    assert not lock.with_name(".everest.lock.excl").exists()


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_fs_without_flock_falls_back_to_an_exclusive_lock_file(code: int, tmp_path: Path, monkeypatch):
    def refuse(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", refuse)
    lock = tmp_path / "out" / ".everest.lock"
    excl = lock.with_name(".everest.lock.excl")
    with io.exclusive_lock(lock, "output directory out") as held:
        assert held == lock
        holder = json.loads(excl.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == platform.node()
        assert holder["user"] and holder["since"]
        with pytest.raises(io.LockedError) as err:
            with io.exclusive_lock(lock, "output directory out"):
                pass
        message = str(err.value)
        assert f"output directory out is in use by pid {os.getpid()} on {platform.node()}" in message
        assert str(excl) in message and "stale" not in message
        assert excl.is_file()  # the refused attempt left the holder's file alone
    assert not excl.exists()
    with io.exclusive_lock(lock, "output directory out"):  # free again
        assert excl.is_file()
    assert not excl.exists()


def test_fs_without_flock_lock_file_is_removed_when_the_block_fails(no_flock, tmp_path: Path):
    lock = tmp_path / ".everest.lock"
    with pytest.raises(RuntimeError, match="boom"), io.exclusive_lock(lock, "output directory"):
        raise RuntimeError("boom")
    assert not lock.with_name(".everest.lock.excl").exists()


def test_fs_without_flock_stale_lock_file_on_this_host_is_named_not_taken_over(no_flock, tmp_path: Path):
    lock = tmp_path / ".everest.lock"
    excl = lock.with_name(".everest.lock.excl")
    pid = _dead_pid()
    stale = {"user": "someone", "host": platform.node(), "pid": pid, "since": "2024-01-01T00:00:00", "token": "x"}
    excl.write_text(json.dumps(stale))
    with pytest.raises(io.LockedError) as err:
        with io.exclusive_lock(lock, "output directory out"):
            pass
    message = str(err.value)
    assert "stale" in message and f"pid {pid}" in message and "no longer running" in message
    assert f"Delete {excl} and start again" in message
    assert json.loads(excl.read_text()) == stale  # never removed behind the user's back
    excl.unlink()
    with io.exclusive_lock(lock, "output directory out"):
        pass


def test_fs_without_flock_lock_of_another_host_is_not_called_stale(no_flock, tmp_path: Path):
    lock = tmp_path / ".everest.lock"
    excl = lock.with_name(".everest.lock.excl")
    excl.write_text(json.dumps({"user": "u", "host": "other-node-7", "pid": _dead_pid(), "since": "then"}))
    with pytest.raises(io.LockedError, match="is in use by pid [0-9]+ on other-node-7 \\(user u\\)") as err:
        with io.exclusive_lock(lock, "output directory out"):
            pass
    assert "stale" not in str(err.value) and f"delete {excl}" in str(err.value)


def test_fs_without_flock_unreadable_lock_file_still_refuses(no_flock, tmp_path: Path):
    lock = tmp_path / ".everest.lock"
    excl = lock.with_name(".everest.lock.excl")
    excl.write_text("")  # a holder that crashed between creating and writing it
    with pytest.raises(io.LockedError, match="names no holder"):
        with io.exclusive_lock(lock, "output directory out"):
            pass
    assert excl.exists()


def test_fs_without_flock_does_not_remove_a_lock_file_that_is_no_longer_its_own(no_flock, tmp_path: Path):
    lock = tmp_path / ".everest.lock"
    excl = lock.with_name(".everest.lock.excl")
    with io.exclusive_lock(lock, "output directory out"):
        excl.unlink()  # a user deleted it, and another run created its own
        excl.write_text(json.dumps({"user": "u", "host": "h", "pid": 1, "since": "now", "token": "theirs"}))
    assert json.loads(excl.read_text())["token"] == "theirs"
