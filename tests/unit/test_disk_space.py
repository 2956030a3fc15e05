"""disk_space: a full disk recognised whichever writer met it, and said in one line."""
from __future__ import annotations

import errno

import pytest
import torch
from helpers.tmpfs import tmpfs

from slope_megatron import disk_space
from slope_megatron.io import torch_save, write_text_atomic


@pytest.fixture
def full_disk(tmp_path):
    with tmpfs(tmp_path / "disk") as disk:
        yield disk


def test_every_writer_s_full_disk_is_recognised_and_named(full_disk):
    big = {"w": torch.zeros(100_000)}
    with pytest.raises(RuntimeError) as by_path:  # torch's C++ writer: no errno at all
        torch.save(big, full_disk / "a.pt")
    assert disk_space.is_disk_full(by_path.value, full_disk)
    (full_disk / "a.pt").unlink()
    with pytest.raises(OSError) as ours:
        torch_save(big, full_disk / "b.pt")
    assert ours.value.errno == errno.ENOSPC and ours.value.filename == str(full_disk / "b.pt")
    (full_disk / "b.pt").unlink()
    with pytest.raises(OSError) as atomic:
        write_text_atomic(full_disk / "metrics.jsonl", "x" * 200_000)
    assert atomic.value.filename == str(full_disk / "metrics.jsonl")
    assert list(full_disk.iterdir()) == []  # no temporary file left
    said = str(disk_space.no_space_error(atomic.value, full_disk))
    assert said == (f"no space left on device writing {full_disk / 'metrics.jsonl'}: free "
                    f"space or set train.output_dir elsewhere")


def test_other_failures_are_not_a_full_disk(tmp_path):
    assert not disk_space.is_disk_full(PermissionError(errno.EACCES, "denied"))
    assert not disk_space.is_disk_full(RuntimeError("unexpected pos 1 vs 2"), tmp_path)
    assert disk_space.is_disk_full(OSError("No space left on device (os error 28)"))
    quota = disk_space.no_space_error(OSError(errno.EDQUOT, "quota", "/x/y"), tmp_path)
    assert str(quota).startswith("disk quota exceeded writing /x/y")


def test_free_space_is_checked_before_a_write_that_cannot_fit(tmp_path):
    disk_space.check_free_space(tmp_path, 1, "a byte")
    with pytest.raises(disk_space.NoSpaceError, match="for the next checkpoint in"):
        disk_space.check_free_space(tmp_path, 1 << 62, "the next checkpoint")
