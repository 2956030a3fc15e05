"""A full disk (or an exhausted quota) said as one line, whichever writer met it.

Why a module of its own: the writers of a run fail in different ways when the disk is full -
Python's file objects raise OSError(ENOSPC) with the file name, safetensors (Rust) says "No
space left on device (os error 28)" in its message, and torch.save given a *path* raises a
RuntimeError with no errno at all ("unexpected pos ... vs ...", from its C++ stream writer).
`is_disk_full` recognises all of them, so each caller can turn the failure into
`NoSpaceError` - `error: no space left on device writing <path>: free space or set
train.output_dir elsewhere` (exit status 2) - instead of a traceback. `check_free_space`
refuses a write that cannot fit before it starts (start-up, before any iteration runs).
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Optional

from .errors import SlopeError

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28",
               "os error 122")
# torch.save to a path: its C++ writer reports a short write without errno; what it says
_SHORT_WRITE_TEXTS = ("unexpected pos", "iostream error", "failed writing")
_ALMOST_FULL_BYTES = 16 << 20  # below this, a short write is taken for a full disk


class NoSpaceError(SlopeError):
    """The disk (or quota) holding the output is full: what was being written and the fix."""


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def free_bytes(path: Path) -> Optional[int]:
    """Free bytes on the file system holding `path` (its nearest existing ancestor); None
    where that cannot be asked."""
    path = Path(path)
    probe = next((p for p in (path, *path.parents) if p.exists()), None)
    try:
        return shutil.disk_usage(probe).free if probe is not None else None
    except OSError:
        return None


def is_disk_full(error: BaseException, path: Optional[Path] = None) -> bool:
    """Whether `error` (or one it was raised from) says the disk or quota is full. A short
    write without errno (torch.save to a path) counts when `path` is given and its file
    system has less than 16 MiB left."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        text = str(e).lower()
        if any(t in text for t in _FULL_TEXTS):
            return True
    if path is not None and any(t in str(e).lower() for e in _chain(error)
                                for t in _SHORT_WRITE_TEXTS):
        free = free_bytes(path)
        return free is not None and free < _ALMOST_FULL_BYTES
    return False


def written_path(error: BaseException, default: Path) -> Path:
    """The file an OSError names (the deepest one that does), else `default`."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.filename:
            return Path(e.filename)
    return Path(default)


def no_space_error(error: BaseException, default: Path) -> NoSpaceError:
    """The one-line NoSpaceError for `error`, naming the file it was writing."""
    kind = "disk quota exceeded" if any(
        isinstance(e, OSError) and e.errno == errno.EDQUOT for e in _chain(error)) \
        else "no space left on device"
    return NoSpaceError(f"{kind} writing {written_path(error, default)}: free space or set "
                        f"train.output_dir elsewhere")


def check_free_space(path: Path, needed: int, what: str) -> None:
    """Raise NoSpaceError when the file system of `path` has fewer than `needed` bytes free
    for `what` (a sentence fragment: "the next checkpoint (as large as iter_00000010)")."""
    free = free_bytes(path)
    if free is not None and free < needed:
        raise NoSpaceError(f"no space left on device for {what} in {path}: it needs about "
                           f"{_size(needed)}, {_size(free)} are free; free space or set "
                           f"train.output_dir elsewhere")


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def dir_bytes(path: Path) -> int:
    """Bytes the files under `path` take (their sizes; 0 for what cannot be read)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total
