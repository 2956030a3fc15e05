"""Write a whole directory atomically: fill a hidden temp dir beside it, then rename.

Readers (generation, export, the checkpoint picker) must never see half an artifact. A
directory rename is atomic on POSIX file systems, so a reader sees either the old directory,
the new one, or - only if the process dies between the two renames of an overwrite - no
directory at all (never a mix). Files are fsynced before the rename so a power loss after it
cannot leave empty files behind a complete-looking name.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from ..fileio import fsync_dir


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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
    """Yield a temp dir to fill; on success it replaces `out_dir`, on error it is removed.

    An existing `out_dir` is replaced only if it is empty or `ours(out_dir)` says it is an
    earlier output of the same kind (`what` names that kind in the error).
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir, ours, what)
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):  # some writers create private files; artifacts are shared
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
            if f.is_file():
                fsync_file(f)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=parent))
            os.rename(out_dir, old / out_dir.name)
        os.rename(tmp, out_dir)
        fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
