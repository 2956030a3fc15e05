"""A checkpoint's manifest: the size and sha256 of every file plus the run identity, written
last (so a checkpoint without one is incomplete) and verified before any byte is loaded.

Collective where it hashes: the ranks share the files between them.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

from ...distributed import all_gather_object, rank_and_world
from ...io import fsync_dir, sha256_file, write_text_atomic
from ..run_identity import identity_diff, with_added_keys
from .errors import CheckpointError

MANIFEST = "manifest.json"


TAG_RE = re.compile(r"^iter_(\d{8})$")


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:08d}"


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
    rank, world = rank_and_world()
    files = _files(tag_dir)
    mine = {rel: _describe(tag_dir, rel, sync=True) for rel in files[rank::world]}
    parts = all_gather_object(mine)
    if rank == 0:
        entries = {}
        for part in parts:
            entries.update(part)
        for sub in {tag_dir / Path(rel).parent for rel in files}:
            fsync_dir(sub)
        write_text_atomic(tag_dir / MANIFEST, json.dumps(
            {"format": 1, "identity": identity, "files": entries}, indent=1, sort_keys=True))


def tags_newest_first(ckpt_dir: Path, at_most: Optional[str]) -> list[str]:
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
    rank, world = rank_and_world()
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
    return sorted({p for part in all_gather_object(problems) for p in part})


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
