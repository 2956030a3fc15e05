"""Atomic, durable file and directory writes, used by data preparation, checkpoints, metrics
and the inference artifact alike.

Why one module: a failing or killed run must never leave a half-written file or directory
under a name a reader trusts. Every writer here builds under a temporary name beside the
target, fsyncs what it wrote, renames into place (atomic on POSIX file systems) and fsyncs
the directory, so after a crash or power loss a reader sees the complete old version or the
complete new one, never a mix and never an empty file behind a complete-looking name.
Temporary names start with `.tmp-<name>-` and set-aside old versions with `.old-<name>-`,
so `remove_stale_staging` can clear what a killed writer left.
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
from typing import Callable, Iterator


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (shards and weights can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a crash (best effort: some file
    systems refuse to open or sync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".tmp-{path.name}-{os.getpid()}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: temporary file, fsync, rename, fsync of the directory. On
    any error (a full disk, say) the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = _temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise_with_path(e, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def torch_save(obj, path: Path, **kwargs) -> None:
    """torch.save into a Python file object rather than to a path: torch's C++ writer, given a
    path, reports a full disk as a RuntimeError without errno ("unexpected pos ..."); through a
    file object the OSError(ENOSPC) and the file name reach the caller (disk_space.py)."""
    import torch

    try:
        with open(path, "wb") as f:
            torch.save(obj, f, **kwargs)
    except (OSError, RuntimeError) as e:
        # torch's zip writer may replace the write's OSError with its own RuntimeError
        cause = e if isinstance(e, OSError) else (e.__cause__ or e.__context__)
        if isinstance(cause, OSError) and cause.filename is None:
            raise OSError(cause.errno, cause.strerror, str(path)) from e
        raise


def raise_with_path(error: OSError, path: Path) -> None:
    """Raise `error`, with the file name a failed write() leaves out (ENOSPC from write or
    close) when it has none."""
    if error.filename is not None:
        raise error
    raise OSError(error.errno, error.strerror, str(path)) from error


def write_text_atomic(path: Path, text: str) -> None:
    """write_bytes_atomic of `text` in UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: dict) -> None:
    """write_text_atomic of `data` as indented JSON with sorted keys and a final newline."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def file_lock(path: Path, shared: bool = False) -> Iterator[None]:
    """Advisory fcntl lock on `path` (created if needed) for the with-block: exclusive for
    writers, `shared` for readers (many ranks verify a finished cache at once, all waiting
    for a writer). The kernel drops it when its holder dies: no stale locks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def staging_dir(final: Path, private: bool = False) -> Iterator[Path]:
    """A fresh temporary directory beside `final`, removed if it is still there when the
    block ends (the caller fills it and calls `publish_dir` inside the block). Its mode
    follows the umask unless `private` (mkdtemp's 0700)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    if not private:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; caches may be shared
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_staging(final: Path) -> None:
    """Delete temporary and set-aside siblings of `final` left by killed writers. Call only
    while holding `final`'s lock (or owning its parent): then no live writer owns them."""
    for pattern in (f".tmp-{final.name}-*", f".old-{final.name}-*"):
        for p in final.parent.glob(pattern):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a complete directory into place, replacing an older one if any: every file in it
    is fsynced, the old directory is renamed aside first, so at every moment `final` is the
    complete old or the complete new version (or, only if the process dies between the two
    renames of an overwrite, absent), and the parent directory is fsynced."""
    for f in tmp.rglob("*"):
        if f.is_file():
            fsync_file(f)
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_replaceable(out_dir: Path, ours: Callable[[Path], bool], what: str) -> None:
    """Refuse to replace anything but an empty dir or an earlier output of ours (`ours`):
    a mistyped --out must never delete a user's directory."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"'{out_dir}' exists and is not a directory")
    if any(out_dir.iterdir()) and not ours(out_dir):
        raise FileExistsError(f"'{out_dir}' exists and is not an earlier {what}; refusing to "
                              "replace it (remove it or choose another output path)")


@contextlib.contextmanager
def atomic_directory(out_dir: Path, ours: Callable[[Path], bool], what: str) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces `out_dir` (publish_dir),
    on error it is removed. An existing `out_dir` is replaced only if it is empty or
    `ours(out_dir)` says it is an earlier output of the same kind (`what` names that kind in
    the error). Files and folders are made readable by all: artifacts are shared."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir, ours, what)
    with staging_dir(out_dir, private=True) as tmp:
        yield tmp
        for f in tmp.rglob("*"):  # some writers create private files
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        os.chmod(tmp, 0o755)
        publish_dir(tmp, out_dir)
