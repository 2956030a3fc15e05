"""A small tmpfs mounted for one test (a full disk, a read-only file system), unmounted after.

Mounting needs root: where it cannot be done the test is skipped, saying why."""
import contextlib
import subprocess

import pytest


def _mount(path, *args):
    return subprocess.run(["mount", "-t", "tmpfs", *args, "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)


@contextlib.contextmanager
def tmpfs(path, options: str = "size=64k"):
    """Mount a tmpfs with `options` at `path` (created if missing) for the block."""
    path.mkdir(exist_ok=True)
    mounted = _mount(path, "-o", options)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def resize(path, size: int) -> None:
    """Grow or shrink the tmpfs mounted at `path` to `size` bytes."""
    result = _mount(path, "-o", f"remount,size={size}")
    assert result.returncode == 0, result.stderr
