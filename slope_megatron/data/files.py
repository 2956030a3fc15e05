"""Filesystem helpers that keep the cache consistent: checksums, locks, atomic writes.

A failing or interrupted run must never damage what is already on disk, and several
processes (ranks of one job, or two jobs sharing a cache) may prepare the same data at once.
So every artefact is built under a temporary name in the same directory and renamed into
place only when complete, and builders of one artefact serialise on an fcntl lock file.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..fileio import sha256_file  # noqa: F401 - re-exported for the data modules
from .errors import DataError


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def file_lock(path: Path, shared: bool = False) -> Iterator[None]:
    """Advisory lock on ``path`` (created if needed) for the with-block.

    Exclusive for writers; ``shared`` for readers, so many ranks can verify a finished
    cache at once while still waiting for a writer to finish.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def make_cache_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data cache directory '{path}': {e.strerror}; "
                        "set data.cache_dir to a writable directory") from None
    return path


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A fresh temporary directory next to ``final``; removed if the block fails.

    The caller fills it and then calls :func:`publish_dir` inside the block.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)      # mkdtemp makes it private; caches may be shared
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_staging(final: Path) -> None:
    """Delete temporary/old siblings of ``final`` left by killed runs.

    Call only while holding ``final``'s lock: then no live run owns any of them.
    """
    for pattern in (f".tmp-{final.name}-*", f".old-{final.name}-*"):
        for p in final.parent.glob(pattern):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def publish_dir(tmp: Path, final: Path) -> None:
    """Atomically move a complete directory into place, replacing an older one if any.

    The old directory (if present) is first renamed aside, so at every moment ``final`` is
    either the complete old or the complete new version, never a mix.
    """
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and fsync, then rename into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{what} '{path}' is missing; run launch/prepare_data.py (or "
                        "prepare_data) to build it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{what} '{path}' is unreadable ({e}); delete '{path.parent}' and "
                        "prepare the data again") from None
