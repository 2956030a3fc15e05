"""build_lock: when a kernel build lock's holder counts as dead, and what a waiter says."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from slope_megatron import build_lock


def _record(**kw):
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": None,
                       "command": "test", **kw})


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_lock_of_a_dead_pid_on_this_host_is_cleared(tmp_path, capfd):
    lock = tmp_path / "lock"
    lock.write_text(_record(pid=_dead_pid()))
    assert build_lock.clear_if_stale(lock)
    assert not lock.exists()
    assert "is no longer running" in capfd.readouterr().err


def test_a_reused_pid_is_not_the_holder(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text(_record(start_ticks=1))  # our pid, another start time
    assert build_lock.clear_if_stale(lock)


def test_a_live_holder_is_kept_waited_for_with_progress_then_named(tmp_path, capfd,
                                                                    monkeypatch):
    lock = tmp_path / "lock"
    lock.write_text(_record())  # this process: alive
    assert not build_lock.clear_if_stale(lock)
    monkeypatch.setattr(build_lock, "PROGRESS_S", 0.3)
    monkeypatch.setenv(build_lock.TIMEOUT_ENV, "1")
    with pytest.raises(build_lock.BuildLockTimeout, match=f"held by pid {os.getpid()} on host"):
        build_lock.wait_for(lock)
    assert "kernel build: waiting" in capfd.readouterr().err
    assert lock.exists()


def test_a_remote_holder_is_dead_once_its_heartbeat_stops(tmp_path, monkeypatch):
    lock = tmp_path / "lock"
    lock.write_text(_record(host="another-node"))
    monkeypatch.setattr(build_lock, "STALE_S", 0.3)
    monkeypatch.setattr(build_lock, "POLL_S", 0.05)
    with pytest.raises(build_lock._StaleLockCleared):
        build_lock.wait_for(lock)
    assert not lock.exists()


def test_a_lock_without_holder_on_a_shared_file_system_waits_for_its_age(tmp_path,
                                                                          monkeypatch):
    lock = tmp_path / "lock"
    lock.write_text("")  # torch's own FileBaton writes nothing
    monkeypatch.setattr(build_lock, "_on_local_disk", lambda path: False)
    assert not build_lock.clear_if_stale(lock)  # another node may be building
    os.utime(lock, (0, 0))  # ... but not for decades
    assert build_lock.clear_if_stale(lock)


def test_a_lock_held_open_by_a_local_process_is_kept(tmp_path):
    lock = tmp_path / "lock"
    with open(lock, "w"):  # a torch build keeps its lock open while it builds
        assert not build_lock.clear_if_stale(lock)
    assert build_lock.clear_if_stale(lock)
