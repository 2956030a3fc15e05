"""Checkpoints: DeepSpeed's engine files + per-rank RNG + the SLoPe inference artifact.

Layout: <output_dir>/checkpoints/iter_XXXXXXXX/ holds DeepSpeed's model/optimizer files
(the kept values, masks and column masks are ordinary parameters and buffers, the layer
counters and adapter switch are module extra state), `rng_rank{r}.pt` for every rank, and
`slope_model/` (the consolidated inference artifact, written by rank 0).

A checkpoint becomes the one to resume from only when all of that is on disk: DeepSpeed
is told not to write its `latest` file, and after a barrier rank 0 atomically replaces
`checkpoints/latest` (write to a temporary file, fsync, rename). A run killed mid-save
therefore resumes from the previous complete checkpoint.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .distributed import barrier

LATEST = "latest"
TAG_RE = re.compile(r"^iter_(\d{8})$")


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:08d}"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    """The newest complete checkpoint's tag, or None when there is none."""
    p = ckpt_dir / LATEST
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    if not TAG_RE.match(tag) or not (ckpt_dir / tag).is_dir():
        raise RuntimeError(f"{p} names '{tag}', which is not a checkpoint directory; remove "
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


def save(engine, ckpt_dir: Path, iteration: int, client_state: dict, rank: int,
         write_artifact=None, keep: int = 2) -> Path:
    """Save everything for `iteration`; mark it latest only once complete."""
    tag = tag_for(iteration)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    if write_artifact is not None:
        write_artifact(ckpt_dir / tag)  # collective under ZeRO-3: every rank calls it
    barrier()
    if rank == 0:
        write_text_atomic(ckpt_dir / LATEST, tag)
        prune(ckpt_dir, keep)
    barrier()
    return ckpt_dir / tag


def load(engine, ckpt_dir: Path, rank: int) -> Optional[dict]:
    """Load the latest complete checkpoint into `engine`; returns its client state."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag,
                                                load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rng_file = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints; never the one `latest` names."""
    current = latest_tag(ckpt_dir)
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))
    done = [t for t in tags if t <= (current or "")]
    for tag in done[:-keep] if keep > 0 else []:
        if tag != current:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
