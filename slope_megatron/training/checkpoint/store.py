"""Saving, choosing, loading and pruning checkpoints (the protocols are in the package
docstring). `latest` names the newest complete checkpoint; when it is missing, unreadable or
names nothing, the newest sealed checkpoint that verifies is found by scanning, and a sealed
checkpoint newer than the one it names (a save killed just before `latest` moved) is used."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from ...disk_space import is_disk_full, no_space_error
from ...distributed import barrier, rank_and_world
from ...io import fsync_dir, torch_save, write_text_atomic
from .. import faults
from .errors import CheckpointError
from .manifest import (MANIFEST, TAG_RE, damage, tag_for, tags_newest_first, verify,
                       write_manifest)
from .rng import rng_state, set_rng_state
from .safe_load import use_safe_loading

LATEST = "latest"


CORRUPT_SUFFIX = ".corrupt"  # a checkpoint that failed verification, renamed for inspection
UNLOADED_SUFFIX = ".unloaded"  # a sealed checkpoint a run was about to overwrite, kept


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    """The tag `latest` names when that is a checkpoint directory here; None otherwise (no
    `latest`, an unreadable one, or one naming nothing: `choose` then scans)."""
    p = ckpt_dir / LATEST
    try:
        tag = p.read_text().strip() if p.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None
    if tag is None or not TAG_RE.match(tag) or not (ckpt_dir / tag).is_dir():
        return None
    return tag


def _latest_problem(ckpt_dir: Path) -> str:
    """What is wrong with `latest` when latest_tag gives None (for the warning)."""
    p = ckpt_dir / LATEST
    if not p.exists():
        return f"{p} is missing"
    try:
        return f"{p} names '{p.read_text().strip()[:80]}', which is not a checkpoint here"
    except (OSError, UnicodeDecodeError) as e:
        return f"{p} is unreadable ({e})"


def _sealed(tag_dir: Path) -> bool:
    return (tag_dir / MANIFEST).is_file()


def candidates(ckpt_dir: Path) -> tuple[list[str], Optional[str]]:
    """(the checkpoints a load tries, newest first; the tag `latest` names or None).

    Every sealed (manifested) checkpoint, and - as before scanning existed - every checkpoint
    directory at or before the one `latest` names. An unsealed directory newer than `latest`
    (or any, without a `latest`) is what an interrupted save left: never a candidate."""
    bound = latest_tag(ckpt_dir)
    tags = [t for t in tags_newest_first(ckpt_dir, None)
            if (bound is not None and t <= bound) or _sealed(ckpt_dir / t)]
    return tags, bound


def saved_identity(ckpt_dir: Path) -> Optional[tuple[Path, dict]]:
    """(checkpoint dir, manifest identity) that loading `ckpt_dir` is bound to: the first of
    `candidates` whose manifest can be read - the one `choose` checks the identity of first,
    and `verify` refuses a different identity before it looks at any file. None where there
    is none. Reads no checkpoint file but manifests; not collective."""
    try:
        tags, _ = candidates(ckpt_dir)
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
    """Save everything for `iteration`; mark it latest only once complete and sealed.

    A write that fails (a full disk, say) removes what this save wrote on the failing rank -
    `latest` and the checkpoints before stay as they were - and a full disk is raised as one
    NoSpaceError line instead of torch's or DeepSpeed's traceback."""
    tag = tag_for(iteration)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists() and latest_tag(ckpt_dir) != tag:
        _clear_for_save(tag_dir)
    barrier()
    try:
        _write(engine, ckpt_dir, tag_dir, iteration, client_state, rank, write_artifact,
               identity)
    except BaseException as e:
        if not _sealed(tag_dir):  # half-written: nothing of it may stay (a sealed one is whole)
            shutil.rmtree(tag_dir, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e, tag_dir):
            raise no_space_error(e, tag_dir) from e
        raise
    if rank == 0:
        faults.point("save_before_latest", iteration)
        write_text_atomic(ckpt_dir / LATEST, tag)
        faults.point("save_after_latest", iteration)
        prune(ckpt_dir, keep)
    barrier()
    return tag_dir


def _clear_for_save(tag_dir: Path) -> None:
    """Make room for a save into `tag_dir`, which exists but is not what `latest` names: the
    leftover of a save that a kill interrupted (no manifest) is deleted; a sealed checkpoint -
    which a load would have used or set aside, so only one from outside this run's view - is
    never deleted by a run that did not load it: it is renamed `<tag>.unloaded`."""
    if _sealed(tag_dir):
        set_aside(tag_dir, "a sealed checkpoint this run did not load, in the way of its save",
                  UNLOADED_SUFFIX)
    else:
        shutil.rmtree(tag_dir)


def _write(engine, ckpt_dir: Path, tag_dir: Path, iteration: int, client_state: dict,
           rank: int, write_artifact, identity: Optional[dict]) -> None:
    """Every file of the checkpoint, then its manifest (which seals it)."""
    faults.point("save_start", iteration)
    use_errno_saving(engine)
    engine.save_checkpoint(str(ckpt_dir), tag=tag_dir.name, client_state=client_state,
                           save_latest=False)
    faults.point("save_after_engine", iteration)
    torch_save(rng_state(), tag_dir / f"rng_rank{rank}.pt")
    if write_artifact is not None:
        write_artifact(tag_dir)  # collective under ZeRO-3: every rank calls it
    barrier()
    write_manifest(tag_dir, identity or {})


def use_errno_saving(engine) -> None:
    """Make DeepSpeed's checkpoint engine write through a Python file object (io.torch_save),
    so that a full disk surfaces as OSError(ENOSPC) naming the file, not as torch's C++
    writer's "unexpected pos" RuntimeError."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or getattr(ce.save, "_slope_errno", False):
        return

    def save_with_errno(state_dict, path):
        kwargs = {}
        if hasattr(ce, "zipfile_serialization"):
            kwargs["_use_new_zipfile_serialization"] = ce.zipfile_serialization
        torch_save(state_dict, Path(path), **kwargs)

    save_with_errno._slope_errno = True
    ce.save = save_with_errno


def choose(ckpt_dir: Path, identity: Optional[dict]) -> Optional[str]:
    """The newest of `candidates` that verifies (collective); None when there is none at all.

    Which one that is, is said when it is not the one `latest` names - `latest` missing or
    naming nothing (found by scanning), a sealed checkpoint newer than it, or a fallback past
    a damaged one - and `latest` is pointed at it. The candidates passed over are set aside
    (renamed `.corrupt`), so that neither a later save of the same iteration nor pruning
    deletes them, and pruning never keeps one in place of the good one used. Nothing is
    deleted here, and a directory whose checkpoints all fail stops the run instead of
    starting it over.
    """
    tags, bound = candidates(ckpt_dir)
    if not tags:
        if (ckpt_dir / LATEST).exists() and bound is None:
            raise CheckpointError(
                f"{_latest_problem(ckpt_dir)}, and {ckpt_dir} holds no other checkpoint; "
                f"restore the checkpoints, or start over in a new train.output_dir")
        return None
    rank = rank_and_world()[0]
    seen: list[str] = []
    failed: dict[str, list[str]] = {}
    for cand in tags:
        problems = verify(ckpt_dir / cand, identity)
        if not problems:
            if cand != bound:
                if rank == 0:
                    print(_choice_warning(ckpt_dir, cand, bound, seen), file=sys.stderr,
                          flush=True)
                    write_text_atomic(ckpt_dir / LATEST, cand)  # before any rename: a kill
                    for bad, why in failed.items():  # between them leaves a valid `latest`
                        set_aside(ckpt_dir / bad, why[0])
                barrier()
            return cand
        seen += problems
        failed[cand] = problems
    raise CheckpointError(f"no usable checkpoint in {ckpt_dir}: " + "; ".join(seen[:10]) +
                          f". Restore the files, or move {ckpt_dir} away to start over")


def _choice_warning(ckpt_dir: Path, chosen: str, bound: Optional[str], seen: list[str]) -> str:
    """The one line that says why the checkpoint used is not the one `latest` names."""
    skipped = f" (newer ones are unusable: {'; '.join(seen[:3])})" if seen else ""
    if bound is None:
        return (f"warning: {_latest_problem(ckpt_dir)}; resuming from the newest verified "
                f"checkpoint, {chosen}{skipped}")
    if chosen > bound:
        return (f"warning: resuming from {chosen}, a complete checkpoint newer than the one "
                f"{ckpt_dir / LATEST} names ({bound}): its save was stopped just before "
                f"`latest` moved{skipped}")
    return (f"warning: checkpoint {bound} is unusable ({'; '.join(seen)}); resuming from the "
            f"previous complete checkpoint {chosen}")


def load(engine, ckpt_dir: Path, rank: int, identity: Optional[dict] = None) -> Optional[dict]:
    """Load the newest verified checkpoint into `engine`; returns its client state."""
    tag = choose(ckpt_dir, identity)
    if rank == 0:
        remove_unsealed_leftovers(ckpt_dir, tag)
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


def set_aside(tag_dir: Path, why: str, suffix: str = CORRUPT_SUFFIX) -> Path:
    """Rename a checkpoint that failed verification to `<tag>.corrupt` (`.corrupt.N` if taken;
    `suffix` for other reasons) and say so in one line: never deleted, so its files can be
    inspected, and from then on neither loaded, counted toward train.keep_checkpoints nor
    pruned. Rank 0 only."""
    dest = tag_dir.with_name(tag_dir.name + suffix)
    n = 0
    while dest.exists():
        n += 1
        dest = tag_dir.with_name(f"{tag_dir.name}{suffix}.{n}")
    os.rename(tag_dir, dest)
    fsync_dir(tag_dir.parent)
    what = "failed verification" if suffix == CORRUPT_SUFFIX else "is set aside"
    print(f"warning: checkpoint {tag_dir.name} {what} ({why}); moved it to "
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


def remove_unsealed_leftovers(ckpt_dir: Path, loaded: Optional[str]) -> None:
    """Delete the directories that interrupted saves left newer than the checkpoint a run
    loads (`loaded`): no manifest, so nothing a load could ever use, and
    space a disk that filled up during a save needs back. Rank 0, at start-up, under the run
    directory's lock."""
    if loaded is None:  # nothing loaded: a save of the same iteration clears its own
        return
    for tag in tags_newest_first(ckpt_dir, None):
        if tag > loaded and not _sealed(ckpt_dir / tag):
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
