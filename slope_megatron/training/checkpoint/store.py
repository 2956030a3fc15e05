"""Saving, choosing, loading and pruning checkpoints (the protocols are in the package
docstring). `latest` names the newest complete checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from ...distributed import barrier, rank_and_world
from ...io import fsync_dir, write_text_atomic
from .. import faults
from .errors import CheckpointError
from .manifest import (MANIFEST, TAG_RE, damage, tag_for, tags_newest_first, verify,
                       write_manifest)
from .rng import rng_state, set_rng_state
from .safe_load import use_safe_loading

LATEST = "latest"


CORRUPT_SUFFIX = ".corrupt"  # a checkpoint that failed verification, renamed for inspection


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    """The tag `latest` names, or None when there is none."""
    p = ckpt_dir / LATEST
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    if not TAG_RE.match(tag) or not (ckpt_dir / tag).is_dir():
        raise CheckpointError(f"{p} names '{tag}', which is not a checkpoint directory; remove "
                              f"{p} to start over or restore the checkpoint")
    return tag


def _latest_or_none(ckpt_dir: Path) -> Optional[str]:
    try:
        return latest_tag(ckpt_dir)
    except CheckpointError:
        return None


def saved_identity(ckpt_dir: Path) -> Optional[tuple[Path, dict]]:
    """(checkpoint dir, manifest identity) that loading `ckpt_dir` is bound to: the newest
    checkpoint at or before `latest` whose manifest can be read - the one `choose` checks the
    identity of first, and `verify` refuses a different identity before it looks at any file
    - or without `latest`, the newest sealed one. None where there is none (no manifest can
    be read, or `latest` names no checkpoint: the load says what is wrong). Reads no
    checkpoint file but manifests; not collective."""
    try:
        bound = _latest_or_none(ckpt_dir)
        if bound is None and (ckpt_dir / LATEST).exists():
            return None
        tags = tags_newest_first(ckpt_dir, bound)
    except OSError:  # no dir, or one we cannot read: the load says so
        return None
    for tag in tags:
        try:
            manifest = json.loads((ckpt_dir / tag / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and "files" in manifest \
                and isinstance(manifest.get("identity", {}), dict):  # as `verify` reads it
            return ckpt_dir / tag, manifest.get("identity", {})
    return None


def save(engine, ckpt_dir: Path, iteration: int, client_state: dict, rank: int,
         write_artifact=None, keep: int = 2, identity: Optional[dict] = None) -> Path:
    """Save everything for `iteration`; mark it latest only once complete and sealed."""
    tag = tag_for(iteration)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists() and _latest_or_none(ckpt_dir) != tag:
        shutil.rmtree(tag_dir)  # left by a save that a kill interrupted
    barrier()
    faults.point("save_start", iteration)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    faults.point("save_after_engine", iteration)
    torch.save(rng_state(), tag_dir / f"rng_rank{rank}.pt")
    if write_artifact is not None:
        write_artifact(tag_dir)  # collective under ZeRO-3: every rank calls it
    barrier()
    write_manifest(tag_dir, identity or {})
    if rank == 0:
        faults.point("save_before_latest", iteration)
        write_text_atomic(ckpt_dir / LATEST, tag)
        faults.point("save_after_latest", iteration)
        prune(ckpt_dir, keep)
    barrier()
    return tag_dir


def choose(ckpt_dir: Path, identity: Optional[dict]) -> Optional[str]:
    """The newest checkpoint at or before `latest` that verifies (collective).

    Falls back past a corrupt `latest` with a warning, points `latest` at the one used and
    sets aside (renames) the checkpoints passed over, so that neither a later save of the
    same iteration nor pruning deletes them, and pruning never keeps one in place of the
    good one it fell back to.
    """
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    rank = rank_and_world()[0]
    candidates = tags_newest_first(ckpt_dir, tag)
    seen: list[str] = []
    failed: dict[str, list[str]] = {}
    for cand in candidates:
        problems = verify(ckpt_dir / cand, identity)
        if not problems:
            if cand != tag:
                if rank == 0:
                    print(f"warning: checkpoint {tag} is unusable ({'; '.join(seen)}); "
                          f"resuming from the previous complete checkpoint {cand}",
                          file=sys.stderr, flush=True)
                    write_text_atomic(ckpt_dir / LATEST, cand)  # before any rename: a kill
                    for bad, why in failed.items():  # between them leaves a valid `latest`
                        set_aside(ckpt_dir / bad, why[0])
                barrier()
            return cand
        seen += problems
        failed[cand] = problems
    raise CheckpointError(f"no usable checkpoint in {ckpt_dir}: " + "; ".join(seen[:10]) +
                          f". Restore the files, or move {ckpt_dir} away to start over")


def load(engine, ckpt_dir: Path, rank: int, identity: Optional[dict] = None) -> Optional[dict]:
    """Load the newest verified checkpoint into `engine`; returns its client state."""
    tag = choose(ckpt_dir, identity)
    if tag is None:
        return None
    use_safe_loading(engine)
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag,
                                                load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
    if path is None:  # one rank's files: it may be the only one that failed
        error = CheckpointError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
        error.every_rank = False
        raise error
    rng_file = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state


def set_aside(tag_dir: Path, why: str) -> Path:
    """Rename a checkpoint that failed verification to `<tag>.corrupt` (`.corrupt.N` if taken)
    and say so in one line: never deleted, so its files can be inspected, and from then on
    neither loaded, counted toward train.keep_checkpoints nor pruned. Rank 0 only."""
    dest = tag_dir.with_name(tag_dir.name + CORRUPT_SUFFIX)
    n = 0
    while dest.exists():
        n += 1
        dest = tag_dir.with_name(f"{tag_dir.name}{CORRUPT_SUFFIX}.{n}")
    os.rename(tag_dir, dest)
    fsync_dir(tag_dir.parent)
    print(f"warning: checkpoint {tag_dir.name} failed verification ({why}); moved it to "
          f"{dest.name} for inspection (not loaded, counted or pruned; delete it when done)",
          file=sys.stderr, flush=True)
    return dest


def prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the `keep` newest good checkpoints at or before `latest` (always the one it
    names); delete older good ones. Rank 0, after `latest` moved.

    Only good checkpoints count: one whose files do not match its manifest (`damage`) is
    set aside (renamed `.corrupt`), never deleted and never kept in place of a good one; one
    without a manifest (left by an interrupted save) is deleted once it is older than the
    oldest kept checkpoint, as before. Nothing newer than `latest` is touched.
    """
    current = latest_tag(ckpt_dir)
    if current is None or keep < 1:
        return
    tags = sorted(p.name for p in ckpt_dir.iterdir()
                  if p.is_dir() and TAG_RE.match(p.name) and p.name <= current)
    good, unsealed = [], []
    for tag in tags:
        problem = None if tag == current else damage(ckpt_dir / tag)
        if problem is None:
            good.append(tag)
        elif (ckpt_dir / tag / MANIFEST).exists():
            set_aside(ckpt_dir / tag, problem)
        else:
            unsealed.append(tag)
    kept = set(good[-keep:]) | {current}
    for tag in [t for t in good if t not in kept] + [t for t in unsealed if t < min(kept)]:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
