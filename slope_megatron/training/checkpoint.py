"""Checkpoints: DeepSpeed's engine files + per-rank RNG + the SLoPe inference artifact,
sealed by a manifest, loaded safely.

Layout: <output_dir>/checkpoints/iter_XXXXXXXX/ holds DeepSpeed's model/optimizer files
(the kept values, masks and column masks are ordinary parameters and buffers, the layer
counters and adapter switch are module extra state), `rng_rank{r}.pt` for every rank,
`slope_model/` (the consolidated inference artifact, written by rank 0) and
`manifest.json` (size and sha256 of every other file, plus the run identity: model,
sparsity, adapters, data, layout, ZeRO stage, DP size under ZeRO 1-3).

Save protocol: leftovers of a save a kill interrupted are removed; everything is written;
every file is fsynced and hashed (the ranks share the work); rank 0 writes the manifest
atomically; only then is `checkpoints/latest` atomically replaced (temporary file, fsync,
rename, directory fsync). DeepSpeed is told not to write its own `latest`. A kill at any
moment therefore leaves `latest` naming a complete checkpoint. Old checkpoints are pruned
to the `train.keep_checkpoints` newest good ones, never the one `latest` names; one whose
files do not match its manifest's list and sizes does not count and is set aside.

Load protocol: the checkpoint `latest` names is verified against its manifest (every
file present with its size and sha256, the run identity equal) before DeepSpeed reads a
byte. A file that is missing, truncated or changed makes us fall back to the newest older
checkpoint that verifies, with a warning naming the file (and `latest` is moved back to
it); the checkpoints passed over are set aside: renamed `iter_XXXXXXXX.corrupt` (kept for
inspection, never loaded, counted or pruned). If none verifies the run stops with a
CheckpointError listing the problems. A checkpoint of a different model/sparsity/layout
is refused with the differing keys.
DeepSpeed's own loader calls torch.load(weights_only=False); we replace it on our engine
with torch.load(weights_only=True) and an explicit allow-list of the few DeepSpeed
classes its files hold, so loading a checkpoint never executes pickled code.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config.history import fill_added_flat as with_added_keys  # a saved identity, completed
from ..errors import SlopeError
from ..fileio import fsync_dir, sha256_file, write_text_atomic
from . import faults
from .distributed import barrier

LATEST = "latest"
MANIFEST = "manifest.json"
TAG_RE = re.compile(r"^iter_(\d{8})$")
CORRUPT_SUFFIX = ".corrupt"  # a checkpoint that failed verification, renamed for inspection


class CheckpointError(SlopeError):
    """A checkpoint that cannot be used: corrupt, incomplete or from a different run.

    `every_rank`: every rank raises the same error (the checks that read shared files, alike
    on every rank, or share their findings), so rank 0's `error:` line says it for all;
    False where one rank's own file failed (launch/pretrain.py then prints it on that rank)."""

    every_rank = True


# Keys inside the identity sections that change neither the math nor the files: which kernel
# buffers are kept, and where the data cache lives (the data's identity is its source,
# tokenizer and preparation settings). Left out of identities, and ignored where a saved
# identity (a run_config.yaml, or a manifest written while they counted) still has them.
NOT_IDENTITY_KEYS = ("sparsity.keep_compressed", "data.cache_dir")
# Identity keys holding a path: the same file or folder however it is spelt (relative paths
# are taken from the current directory, as the run itself takes them).
PATH_IDENTITY_KEYS = ("data.path", "data.tiktoken_file")


def _same(key: str, old, new) -> bool:
    if old == new:
        return True
    if key in PATH_IDENTITY_KEYS and isinstance(old, str) and isinstance(new, str):
        return Path(old).expanduser().resolve() == Path(new).expanduser().resolve()
    return False


def identity_diff(old: dict, new: dict) -> list[str]:
    """Sorted keys whose values differ between a saved identity and this run's."""
    old = with_added_keys(old, new)
    keys = (old.keys() | new.keys()) - set(NOT_IDENTITY_KEYS)
    return sorted(k for k in keys if not _same(k, old.get(k), new.get(k)))


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:08d}"


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


def rng_state() -> dict:
    """RNG states as tensors/ints only, so they load with torch.load(weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- collectives (no-ops in a world of one) -------------------------------------------

def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj) -> list:
    import torch.distributed as dist

    world = _world()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ---- manifest -------------------------------------------------------------------------

def _files(tag_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def _describe(tag_dir: Path, rel: str, sync: bool) -> dict:
    path = tag_dir / rel
    if sync:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(tag_dir: Path, identity: dict) -> None:
    """Collective: fsync + hash every file (shared among ranks), rank 0 writes the manifest."""
    rank, world = _world()
    files = _files(tag_dir)
    mine = {rel: _describe(tag_dir, rel, sync=True) for rel in files[rank::world]}
    parts = _all_gather(mine)
    if rank == 0:
        entries = {}
        for part in parts:
            entries.update(part)
        for sub in {tag_dir / Path(rel).parent for rel in files}:
            fsync_dir(sub)
        write_text_atomic(tag_dir / MANIFEST, json.dumps(
            {"format": 1, "identity": identity, "files": entries}, indent=1, sort_keys=True))


def _tags_newest_first(ckpt_dir: Path, at_most: Optional[str]) -> list[str]:
    """The checkpoint dirs (iter_*) in `ckpt_dir`, newest first; only those at or before
    `at_most` where it is given."""
    return sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)
                   and (at_most is None or p.name <= at_most)), reverse=True)


def check_identity(tag_dir: Path, saved: dict, identity: dict) -> None:
    """Refuse a checkpoint whose manifest identity `saved` differs from this run's."""
    old = with_added_keys(saved, identity)
    diff = identity_diff(old, identity)
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} (checkpoint) vs {identity.get(k)!r} "
                          f"(this run)" for k in diff[:8])
        raise CheckpointError(f"checkpoint {tag_dir} belongs to a different run ({shown}); "
                              f"use a new train.output_dir or the original settings")


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
        tags = _tags_newest_first(ckpt_dir, bound)
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


def _size_problem(path: Path, size: int) -> Optional[str]:
    """A file of a checkpoint missing or of another size than its manifest says (what `verify`
    checks before hashing, and `damage` instead of it)."""
    if not path.is_file():
        return f"{path} is missing"
    if path.stat().st_size != size:
        return (f"{path} has {path.stat().st_size} bytes, the manifest says {size} (truncated "
                f"or overwritten)")
    return None


def verify(tag_dir: Path, identity: Optional[dict]) -> list[str]:
    """Problems with a checkpoint (empty: usable). Collective: ranks share the hashing."""
    rank, world = _world()
    problems: list[str] = []
    manifest_file = tag_dir / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        manifest, files = None, {}
        problems.append(f"{manifest_file} is missing (the save did not finish, or the "
                        f"checkpoint predates manifests)")
    except (OSError, ValueError, KeyError, TypeError) as e:
        manifest, files = None, {}
        problems.append(f"{manifest_file} is unreadable: {e}")
    if manifest is not None and identity is not None:
        check_identity(tag_dir, manifest.get("identity", {}), identity)
    for rel in sorted(files)[rank::world]:
        path, want = tag_dir / rel, files[rel]
        problem = _size_problem(path, want["size"])
        if problem:
            problems.append(problem)
        elif sha256_file(path) != want["sha256"]:
            problems.append(f"{path} does not match its sha256 in the manifest (corrupted)")
    if manifest is not None and rank == 0:
        extra = [rel for rel in _files(tag_dir) if rel not in files and rel.endswith(".pt")]
        problems += [f"{tag_dir / rel} is not in the manifest" for rel in extra]
    return sorted({p for part in _all_gather(problems) for p in part})


# ---- safe loading ---------------------------------------------------------------------

def _safe_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19.8 pickles into its checkpoint files."""
    out = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        out += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        out.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        out.append(fragment_address)
    except ImportError:
        pass
    import argparse
    import collections
    out += [argparse.Namespace, collections.OrderedDict, set]
    return out


def safe_torch_load(path, map_location=None):
    """torch.load with weights_only=True, allowing only DeepSpeed's plain-data classes."""
    import pickle

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        error = CheckpointError(f"{path} holds objects that are not plain tensors/data, so it "
                                f"is not loaded (torch.load weights_only=True): "
                                f"{str(e).splitlines()[0]}")
    # rank 0 reads the first model-parallel rank's model file as every rank of a data-parallel
    # run does (and says so for them); any other file - a ZeRO optimizer shard, another
    # model-parallel rank's - is read by the rank that failed alone, which has to say so
    error.every_rank = Path(path).name == "mp_rank_00_model_states.pt"
    raise error


def use_safe_loading(engine) -> None:
    """Make this engine's DeepSpeed checkpoint engine load with weights_only=True."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None:
        return
    ce.load = safe_torch_load


# ---- save / load / prune --------------------------------------------------------------

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


def _latest_or_none(ckpt_dir: Path) -> Optional[str]:
    try:
        return latest_tag(ckpt_dir)
    except CheckpointError:
        return None


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
    rank = _world()[0]
    candidates = _tags_newest_first(ckpt_dir, tag)
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


def damage(tag_dir: Path) -> Optional[str]:
    """What is wrong with a checkpoint at a glance (None: nothing seen): its manifest missing
    or unreadable, a listed file missing or of another size. No hashing - `verify` does that
    before a load; this is what pruning can afford at every save."""
    try:
        files = json.loads((tag_dir / MANIFEST).read_text())["files"]
        for rel in sorted(files):
            problem = _size_problem(tag_dir / rel, files[rel]["size"])
            if problem:
                return problem
    except FileNotFoundError:
        return f"{tag_dir / MANIFEST} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{tag_dir / MANIFEST} is unreadable: {e}"
    return None


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
