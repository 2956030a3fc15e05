"""Resume a run in whatever layout this launch has: the newest checkpoint loads through
DeepSpeed when it was written in this layout, and through its layout-independent snapshot
(checkpoint/universal.py) when not - converted here first, once, if it has none yet.

The layout is what a checkpoint's manifest records beside the run's identity
(run_identity.LAYOUT_KEYS: parallel.tensor / pipeline, zero.stage, the resolved
gradient-accumulation dtype, the DP size under ZeRO 1-3). A rerun whose identity differs is
refused by the checkpoint's verification as before; one whose layout differs is converted:

    resume: converted checkpoint iter_00000008 (tp=1 pp=1 ZeRO-1 dp=2) to this run's layout
    (tp=2 pp=1 ZeRO-0): weights, masks, fp32 master weights, Adam state, counters ...

Rank 0 converts (reading the checkpoint, writing checkpoints/universal/iter_N/ atomically;
the checkpoint itself is never written) while the others wait; then every rank loads its
slice. A micro-batch size change needs no conversion: DeepSpeed's files do not depend on it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from ..distributed import barrier, share_failure
from . import checkpoint
from .checkpoint.universal import (ModelFacts, convert, read_snapshot, remove_other_snapshots,
                                   snapshot_dir, usable_snapshot, write_snapshot)
from .checkpoint.universal_load import load_snapshot
from .run_identity import describe_layout, layout_diff


def _manifest_identity(tag_dir: Path) -> dict:
    return json.loads((tag_dir / checkpoint.MANIFEST).read_text()).get("identity", {})


def ensure_snapshot(ckpt_dir: Path, tag: str, facts: ModelFacts,
                    say: Callable[[str], None] = lambda *_: None) -> tuple[Path, bool]:
    """The snapshot of checkpoint `tag`: an existing one that verifies, or a new conversion.
    Returns (its directory, whether it was converted now). Not collective."""
    out, tag_dir = snapshot_dir(ckpt_dir, tag), ckpt_dir / tag
    problem = usable_snapshot(out, tag_dir)
    if problem is not None:
        if out.exists():
            say(f"resume: converting {tag} again ({problem})")
        write_snapshot(convert(tag_dir, facts), out)
    return out, problem is not None


def resume_any_layout(engine, cfg, par, ckpt_dir: Path, rank: int, world: int,
                      identity: dict, say: Callable[[str], None]) -> Optional[dict]:
    """Load the newest usable checkpoint into `engine` whatever layout wrote it (collective);
    its client state, or None when there is none."""
    bound = checkpoint.saved_identity(ckpt_dir)
    if bound is None or not layout_diff(bound[1], identity):
        return checkpoint.load(engine, ckpt_dir, rank, identity)  # DeepSpeed's own files
    tag = checkpoint.choose(ckpt_dir, identity)  # verified; refuses another run's
    if tag is None:
        return None
    saved = _manifest_identity(ckpt_dir / tag)
    if not layout_diff(saved, identity):  # fell back to an older one of this layout
        return checkpoint.load(engine, ckpt_dir, rank, identity)
    facts = ModelFacts(cfg.model.arch, cfg.model.num_layers, cfg.model.tie_embeddings)
    converted, error = False, None
    if rank == 0:
        try:
            _, converted = ensure_snapshot(ckpt_dir, tag, facts, say)
            remove_other_snapshots(ckpt_dir, keep=tag)
        except Exception as e:  # noqa: BLE001 - every rank must learn of it
            error = e
    share_failure(error, f"converting checkpoint {tag} to this run's layout")
    client = load_snapshot(engine, read_snapshot(snapshot_dir(ckpt_dir, tag)), par, rank,
                           world)
    barrier()
    how = "converted" if converted else "loaded the converted copy of"
    say(f"resume: {how} checkpoint {tag} ({describe_layout(saved)}) to this run's layout "
        f"({describe_layout(identity)}): weights, masks, fp32 master weights, Adam state, "
        f"step counters, adapter switch and data position carry over "
        f"({snapshot_dir(ckpt_dir, tag)}; the checkpoint itself is unchanged)")
    return client
