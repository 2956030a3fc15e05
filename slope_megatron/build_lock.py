"""JIT kernel builds never hang on a lock left behind by a dead process.

torch.utils.cpp_extension.load - through which DeepSpeed builds its ops (on a CPU, the shared-
memory communication op that deepspeed.init_distributed loads in every run) and we build the
cuSPARSELt binding (kernels/cslt_loader.py) - serializes the builds of one extension with
torch.utils.file_baton.FileBaton: a file `<build dir>/lock` created with O_EXCL and removed
when the build ends. A process killed while it holds it leaves the file behind, and every later
run then waits in FileBaton.wait, silently and forever.

`install()` replaces the baton torch uses with BuildLock:
- the taker writes its host, pid and the pid's start time into the lock file and touches the
  file every HEARTBEAT_S while it builds;
- a waiter clears the lock, saying so in one line, when its holder is dead: on this host when
  the pid is gone, reused (another start time) or a zombie; on another host (a shared
  TORCH_EXTENSIONS_DIR) when the heartbeat has stopped for STALE_S. A lock without holder
  information (taken by a process that did not install this: torch's own FileBaton, an older
  version) is cleared when no process on this host has it open and it lies on a local file
  system, or on a shared one once it is older than LEGACY_STALE_S;
- a live holder is waited for, with a progress line every PROGRESS_S, for at most
  SLOPE_BUILD_LOCK_TIMEOUT seconds (default 1800); then BuildLockTimeout names the lock file,
  its holder and what to do, in one line.
Clearing is serialized between waiters (an fcntl lock on `<lock>.clear`), and re-checks that
the file is still the one judged stale, so that two waiters never both clear and then build.
After a stale lock is cleared the build runs again from the start (torch would otherwise
load the module the dead process never finished).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from .errors import SlopeError

HEARTBEAT_S = 5.0
STALE_S = 30.0  # a remote holder's heartbeat unchanged this long: dead
LEGACY_STALE_S = 120.0
PROGRESS_S = 30.0
POLL_S = 0.2
TIMEOUT_ENV = "SLOPE_BUILD_LOCK_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


class BuildLockTimeout(SlopeError):
    """A live process has held a kernel build lock for longer than the timeout."""


class _StaleLockCleared(Exception):
    """Raised from BuildLock.wait after clearing a dead holder's lock: build again."""


def _proc_start(pid: int) -> Optional[tuple[str, int]]:
    """(state, start time in clock ticks since boot) of `pid`; None when there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def _holder_record() -> dict:
    started = _proc_start(os.getpid())
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "start_ticks": started[1] if started else None, "command": " ".join(sys.argv)[:200]}


def _read(lock: Path) -> Optional[tuple[int, Optional[dict], float]]:
    """(inode, holder record or None, mtime) of the lock file; None when there is none."""
    try:
        st = lock.stat()
        text = lock.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return 0, None, time.time()
    try:
        record = json.loads(text) if text.strip() else None
    except ValueError:
        record = None
    return st.st_ino, record if isinstance(record, dict) else None, st.st_mtime


def _local_openers(lock: Path) -> list[int]:
    """Pids on this host with `lock` open (a torch FileBaton keeps its descriptor open for the
    whole build). Only the processes we may inspect."""
    target, pids = os.path.realpath(lock), []
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                if os.readlink(fd.path) == target:
                    pids.append(int(entry.name))
                    break
        except OSError:
            continue
    return pids


_LOCAL_FILE_SYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs",
                       "f2fs", "reiserfs", "jfs", "ramfs", "vfat"}


def _on_local_disk(path: Path) -> bool:
    """Whether `path` lies on a file system only this host sees (from /proc/mounts: the
    longest mount point above it); False where unsure (a shared file system may be held from
    another node)."""
    target, best, kind = os.path.realpath(path), "", None
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) \
                and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind in _LOCAL_FILE_SYSTEMS


def describe(record: Optional[dict]) -> str:
    if not record:
        return "a process that recorded nothing (not started by this version)"
    return f"pid {record.get('pid')} on host {record.get('host')} ({record.get('command', '?')})"


class _Watch:
    """What one waiter has seen of a lock: for a remote holder, when its heartbeat last moved."""

    def __init__(self):
        self.key = None
        self.changed_at = time.monotonic()

    def dead_reason(self, seen: tuple[int, Optional[dict], float], lock: Path) -> Optional[str]:
        """Why the holder of the lock as `seen` is dead; None while it may be alive."""
        ino, record, mtime = seen
        if record is None:
            if _local_openers(lock):
                return None
            if _on_local_disk(lock):  # no other host can hold it
                return "it has no holder information and no process has it open"
            age = time.time() - mtime
            return (f"it has no holder information, no process on this host has it open and it "
                    f"is {age:.0f} s old") if age > LEGACY_STALE_S else None
        if record.get("host") == socket.gethostname():
            pid = int(record.get("pid", 0))
            proc = _proc_start(pid) if pid > 0 else None
            if proc is None:
                return f"its holder, pid {pid} on this host, is no longer running"
            if proc[0] == "Z":
                return f"its holder, pid {pid} on this host, has exited (a zombie)"
            if record.get("start_ticks") not in (None, proc[1]):
                return (f"its holder, pid {pid} on this host, has exited (the pid is another "
                        f"process's now)")
            return None
        key = (ino, mtime)
        if key != self.key:
            self.key, self.changed_at = key, time.monotonic()
            return None
        quiet = time.monotonic() - self.changed_at
        return (f"its holder on host {record.get('host')} has not touched it for {quiet:.0f} s"
                if quiet > STALE_S else None)


@contextlib.contextmanager
def _clearing(lock: Path):
    """Serialize clearing between waiters (an fcntl lock, dropped by the kernel if we die)."""
    with open(f"{lock}.clear", "a+") as f:
        fcntl.lockf(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f.fileno(), fcntl.LOCK_UN)


def clear_if_stale(lock: Path, watch: Optional[_Watch] = None) -> bool:
    """Remove `lock` when its holder is dead (one line says so); whether it was removed."""
    lock = Path(lock)
    watch = watch or _Watch()
    seen = _read(lock)
    if seen is None or watch.dead_reason(seen, lock) is None:
        return False
    with _clearing(lock):
        again = _read(lock)  # the same file, still dead? (another waiter may have cleared it)
        if again is None or again[:2] != seen[:2]:
            return False
        why = watch.dead_reason(again, lock)
        if why is None:
            return False
        os.unlink(lock)
    print(f"kernel build: removed the stale lock {lock} ({why})", file=sys.stderr, flush=True)
    return True


def _timeout_s() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def _quiet() -> bool:
    """Only one process per host reports waiting (the ranks all wait for the same build)."""
    return os.environ.get("LOCAL_RANK", "0") != "0"


def wait_for(lock: Path) -> None:
    """Wait until `lock` is gone. Raises _StaleLockCleared after clearing a dead holder's lock,
    BuildLockTimeout when a live one holds it past the timeout."""
    lock, watch = Path(lock), _Watch()
    start = last_said = time.monotonic()
    timeout = _timeout_s()
    while True:
        seen = _read(lock)
        if seen is None:
            return
        if clear_if_stale(lock, watch):
            raise _StaleLockCleared(str(lock))
        now = time.monotonic()
        holder = describe(seen[1])
        if now - start > timeout:
            raise BuildLockTimeout(
                f"waited {now - start:.0f} s for the kernel build lock {lock}, held by {holder}; "
                f"let that build finish (raise {TIMEOUT_ENV}), or if it is stuck, stop it and "
                f"remove {lock}")
        if now - last_said >= PROGRESS_S and not _quiet():
            print(f"kernel build: waiting {now - start:.0f} s for {holder} to finish building "
                  f"in {lock.parent} (lock {lock}; gives up after {timeout:.0f} s)",
                  file=sys.stderr, flush=True)
            last_said = now
        time.sleep(POLL_S)


def _baton_class():
    from torch.utils.file_baton import FileBaton

    class BuildLock(FileBaton):
        """torch's FileBaton that says who holds it, keeps a heartbeat while held and does not
        wait for the dead (see the module docstring)."""

        def try_acquire(self):
            try:
                fd = os.open(self.lock_file_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            os.write(fd, (json.dumps(_holder_record()) + "\n").encode())
            self.fd = fd
            self._stop = threading.Event()
            threading.Thread(target=self._heartbeat, daemon=True,
                             name="slope-build-lock-heartbeat").start()
            return True

        def _heartbeat(self):
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    os.utime(self.lock_file_path)
                except OSError:
                    return

        def wait(self):
            wait_for(Path(self.lock_file_path))

        def release(self):
            if getattr(self, "_stop", None) is not None:
                self._stop.set()
            super().release()

    return BuildLock


def _retrying(original):
    """torch's _jit_compile, run again from the start after a dead holder's lock is cleared
    (with the extension's version forgotten, so that it builds instead of loading)."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def jit_compile(*args, **kwargs):
        import torch.utils.cpp_extension as cpp

        bound = signature.bind(*args, **kwargs).arguments
        lock = Path(bound["build_directory"]) / "lock"
        for _ in range(5):
            clear_if_stale(lock)  # the usual case: a lock left by a killed run, cleared at once
            try:
                return original(*args, **kwargs)
            except _StaleLockCleared:
                versions = getattr(cpp.JIT_EXTENSION_VERSIONER, "entries", {})
                versions.pop(bound["name"], None)
        return original(*args, **kwargs)

    jit_compile._slope_build_lock = True
    return jit_compile


def install() -> None:
    """Make torch.utils.cpp_extension use BuildLock (idempotent; before any JIT build)."""
    import torch.utils.cpp_extension as cpp

    if getattr(cpp._jit_compile, "_slope_build_lock", False):
        return
    cpp.FileBaton = _baton_class()
    cpp._jit_compile = _retrying(cpp._jit_compile)
