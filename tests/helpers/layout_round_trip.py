"""A checkpoint's round trip through another layout: convert it, load the snapshot into an engine
of that layout (as a resume does), let DeepSpeed save that engine's files at once, convert
those again. Nothing trained in between, so the second snapshot must equal the first bit for
bit - fp32 master weights, Adam moments, step counts, masks, layer state and client state -
whatever optimizer wrapper (torch AdamW, FP16_UnfusedOptimizer, BF16_Optimizer, ZeRO 1/2/3)
read and wrote them.
"""
from __future__ import annotations

from pathlib import Path

import torch


def round_trip(argv: list[str], ckpt_dir: str, out_dir: str) -> dict:
    """On every rank of a launched world: load `ckpt_dir`'s newest checkpoint into an engine
    configured by pretrain's `argv` (--config FILE --set ...: the source run's settings with
    the new layout), save it under `out_dir`; rank 0 returns {"first": snapshot, "again":
    snapshot} as dicts."""
    from slope_megatron.config import load_config
    from slope_megatron.distributed import barrier, init_distributed
    from slope_megatron.parallel import initialize_parallel
    from slope_megatron.training.checkpoint import latest_tag, rng_state
    from slope_megatron.training.checkpoint.universal import (ModelFacts, convert,
                                                              read_snapshot, snapshot_dir)
    from slope_megatron.training.engine import build_engine
    from slope_megatron.training.layout_resume import resume_any_layout
    from slope_megatron.training.run_identity import run_identity

    config, overrides = argv[1], argv[3:]
    assert argv[0] == "--config" and argv[2] == "--set", argv
    cfg = load_config(config, overrides)
    d = init_distributed()
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    par = initialize_parallel(tp, pp) if tp * pp > 1 else None
    dp = par.dp_size if par else d.world_size
    ckpts, out = Path(ckpt_dir), Path(out_dir)
    _, engine, _ = build_engine(cfg, par, dp)
    client = resume_any_layout(engine, cfg, par, ckpts, d.rank, d.world_size,
                               run_identity(cfg, dp), print)
    tag = latest_tag(ckpts)
    engine.save_checkpoint(str(out), tag=tag, client_state=client, save_latest=False)
    torch.save(rng_state(), out / tag / f"rng_rank{d.rank}.pt")
    barrier()
    if d.rank != 0:
        return {}
    facts = ModelFacts(cfg.model.arch, cfg.model.num_layers, cfg.model.tie_embeddings)
    (out / tag / "manifest.json").write_text("{}")  # convert() fingerprints the source
    first = snapshot_dir(ckpts, tag)
    snaps = {"first": read_snapshot(first) if first.exists() else convert(ckpts / tag, facts),
             "again": convert(out / tag, facts)}
    return {k: {"model": s.model, "exp_avg": s.exp_avg, "exp_avg_sq": s.exp_avg_sq,
                **{f: s.state[f] for f in ("step", "extra_state", "client_state",
                                           "param_groups")}}
            for k, s in snaps.items()}


def assert_same_snapshot(got: dict, want: dict) -> None:
    """Bitwise equal tensors; equal steps, layer state, client state and group settings."""
    for what in ("model", "exp_avg", "exp_avg_sq"):
        assert got[what].keys() == want[what].keys(), (what, set(got[what]) ^ set(want[what]))
        for key, value in want[what].items():
            assert torch.equal(got[what][key], value), (what, key)
    for what in ("step", "extra_state", "param_groups"):
        assert got[what] == want[what], what
    keep = {k: v for k, v in want["client_state"].items() if k != "log_window"}
    assert {k: got["client_state"].get(k) for k in keep} == keep
