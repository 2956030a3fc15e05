"""One run at a time in a train.output_dir: an exclusive lock held for the run's whole life.

Two runs writing one output directory interleave their metrics, overwrite each other's
checkpoints and crash on each other's half-written files. So global rank 0 takes a lock on
`<train.output_dir>/.lock` before anything in the directory is read or written, and keeps it
until the process ends; a second run stops at once with one line naming the holder (host, pid,
start time, command), which the holder wrote into the lock file. Every rank learns the outcome
before any work (`distributed.share_failure`).

Mechanism: a POSIX record lock (`fcntl.lockf`, i.e. F_SETLK on the whole file), because
- the kernel drops it when the holding process dies, however it dies (kill -9, the OOM
  killer): there is no stale lock and nothing to remove by hand;
- unlike flock(), it is not inherited by forked children (compile workers, data loaders), so a
  child outliving a killed rank 0 cannot keep the directory locked;
- it is the lock that works across nodes on shared file systems: NFSv3 (NLM, with rpc.statd
  freeing the locks of a client that reboots) and NFSv4 (part of the protocol, held on a lease
  the server drops about 90 s after a client dies without unlocking); Lustre honours it across
  nodes when mounted with `-o flock` (with `localflock` only within a node). A file system that
  refuses locks (Lustre `noflock`, some FUSE mounts) gets one warning and the run goes on
  unlocked.
The one rule that comes with POSIX locks: closing *any* descriptor of the file in the holding
process releases the lock, so nothing in a run opens `.lock` but this module, once. The file
stays after a run (its content is the last holder's), except in a directory the run created
and left holding nothing else (a start that failed before writing anything): the directory
is removed again. A taker that finds it has locked a file no longer at that path (removed
so in the meantime) takes the lock again on the new file.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ..distributed import share_failure
from ..errors import SlopeError

LOCK_NAME = ".lock"
# resolved lock path -> (the descriptor that holds its lock, the directory, created by us)
_held: dict[str, tuple[int, Path, bool]] = {}
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirectoryInUse(SlopeError):
    """Another live process holds the output directory's lock."""

    every_rank = True


def _holder_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": " ".join(sys.argv)[:300]}


def _read_holder(path: Path) -> Optional[dict]:
    """The holder record in the lock file; None while the holder has not written it yet (it
    writes right after taking the lock: a few tries bridge that moment)."""
    for _ in range(10):
        try:
            record = json.loads(path.read_text() or "null")
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict) and record.get("pid"):
            return record
        time.sleep(0.05)
    return None


def describe_holder(record: Optional[dict]) -> str:
    if not record:
        return "a process that has not recorded itself yet"
    return (f"pid {record.get('pid')} on host {record.get('host')}, started "
            f"{record.get('started')}: {record.get('command', '?')}")


def acquire(out: Path) -> None:
    """Take `out`'s lock for this process's life (again: no-op); raise RunDirectoryInUse
    naming the holder when another process has it."""
    out = Path(out)
    path = out / LOCK_NAME
    if str(path.absolute()) in _held:
        return
    created = not out.exists()
    for _ in range(100):  # a finishing run may remove the directory it created (release_all)
        out.mkdir(parents=True, exist_ok=True)
        try:
            fd = _lock_or_raise(out, path)
        except FileNotFoundError:
            continue
        if fd is None or _same_file(fd, path):
            break
        os.close(fd)  # locked the file that run removed: lock the current one
    else:
        raise SlopeError(f"could not lock train.output_dir '{out}': its lock file keeps being "
                         f"removed")
    if fd is None:
        return
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_holder_record()) + "\n").encode(), 0)
    os.fsync(fd)
    _held[str(path.absolute())] = (fd, out, created)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _lock_or_raise(out: Path, path: Path) -> Optional[int]:
    """A descriptor of `path` holding its lock; None where the file system has no locks."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EACCES, errno.EAGAIN):
            holder = _read_holder(path)
            pid = holder.get("pid") if holder else None
            stop = f" (kill -TERM {pid} on {holder.get('host')} saves a checkpoint and " \
                   f"stops it)" if pid else ""
            raise RunDirectoryInUse(
                f"train.output_dir '{out}' is in use by another run ({describe_holder(holder)})"
                f"; wait for it to end, stop it{stop}, or use another train.output_dir") from None
        if e.errno in _UNSUPPORTED:
            print(f"warning: cannot lock train.output_dir '{out}' ({os.strerror(e.errno)}: the "
                  f"file system does not support POSIX locks); make sure no other run writes "
                  f"there", file=sys.stderr, flush=True)
            return None
        raise
    return fd


def hold_run_lock(out: Path, main: bool) -> None:
    """Collective: rank 0 takes `out`'s lock; when it cannot, every rank raises the same
    RunDirectoryInUse (rank 0 prints it once)."""
    error = None
    if main:
        try:
            acquire(out)
        except Exception as e:  # noqa: BLE001 - also an OSError creating it: shared, not a hang
            error = e
    share_failure(error, "locking train.output_dir")


def release_all() -> None:
    """Drop every lock this process holds (the end of a run; the kernel does it at exit too)."""
    while _held:
        _, (fd, out, created) = _held.popitem()
        try:
            if created and os.listdir(out) == [LOCK_NAME]:  # a start that wrote nothing
                os.unlink(out / LOCK_NAME)  # still locked: a taker now retries (_same_file)
                os.rmdir(out)
        except OSError:
            pass
        try:
            os.close(fd)
        except OSError:
            pass
