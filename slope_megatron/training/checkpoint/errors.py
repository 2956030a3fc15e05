"""The checkpoint code's one error type."""
from __future__ import annotations

from ...errors import SlopeError


class CheckpointError(SlopeError):
    """A checkpoint that cannot be used: corrupt, incomplete or from a different run.

    `every_rank`: every rank raises the same error (the checks that read shared files, alike
    on every rank, or share their findings), so rank 0's `error:` line says it for all;
    False where one rank's own file failed (launch/pretrain.py then prints it on that rank)."""

    every_rank = True
