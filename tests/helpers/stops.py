"""Shared by the "no run loses work" tests: one small run's arguments, its metrics without
wall-clock fields, and a launch command line for the real launchers."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from helpers.corpus import tiny_run_args
from helpers.paths import ROOT

ITERS, SAVE = 12, 4  # saves at 4, 8, 12; eval at 4, 8, 12; adapters from iteration index 9


def stop_args(corpus: Path, out: Path, *extra: str, iters: int = ITERS) -> list[str]:
    """launch/pretrain.py arguments of the small run these tests stop and resume (dropout on:
    the RNG state must come back exactly too)."""
    return tiny_run_args(corpus, corpus.parent / "cache", out, iters, SAVE, "model.dropout=0.1",
                         *extra)


def records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def comparable(out: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields: what must be bitwise equal."""
    drop = {"tokens_per_s", "time_s", "mfu", "eval_s", "resident_mem_gb", "max_mem_gb"}
    return [{k: v for k, v in r.items() if k not in drop} for r in records(out)]


def last_iter(out: Path) -> int:
    """The newest iteration metrics.jsonl has a record of (0 before the first)."""
    return max((r.get("iter", 0) for r in records(out)), default=0)


def launcher_env(**extra: str) -> dict:
    """The environment of a launcher started as a user would (launch/env.sh's settings)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "SLOPE_FAULT")}
    env.update(PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR",
                                            str(ROOT / ".torch_extensions")))
    env.update(extra)
    return env
