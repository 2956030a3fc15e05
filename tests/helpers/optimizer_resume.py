"""A resume's optimizer settings: a tiny model trained a few steps with OLD settings, saved, and
resumed with NEW ones (shared by the CPU tests and the bf16 GPU test)."""
from __future__ import annotations

import torch

from slope_megatron.config import config_from_dict
from slope_megatron.training.optimizer import apply_optimizer_settings, base_optimizer


OLD = {"weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "grad_clip": 1.0}


NEW = {"weight_decay": 0.0, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "grad_clip": 0.5}


def _cfg(stage: int, optimizer: dict, dtype: str = "fp32"):
    return config_from_dict({
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "seq_len": 16,
                  "vocab_size": 64},
        "sparsity": {"backend": "reference"},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "dtype": dtype, "iters": 8},
        "zero": {"stage": stage},
        "optimizer": dict(optimizer)})


def settings(engine_optimizer) -> dict:
    """{group name: (weight_decay, beta1, beta2, eps)} of every param group the engine's
    optimizer and the torch optimizer under it hold, and the wrapper's clip_grad."""
    out = {}
    for opt in (engine_optimizer, base_optimizer(engine_optimizer)):
        for g in opt.param_groups:
            out[g["name"]] = (g["weight_decay"], float(g["betas"][0]), float(g["betas"][1]),
                              g["eps"])
    out["clip_grad"] = getattr(engine_optimizer, "clip_grad", None)
    return out


def _step(engine, gen):
    for _ in range(engine.gradient_accumulation_steps()):
        x = torch.randint(0, 64, (2, 16), generator=gen)
        engine.backward(engine(x, x))
        engine.step()


def _resume_worker(stage: int, ckpt_dir: str, dtype: str = "fp32"):
    """Train one step with OLD settings (adapters switched on) and save; build an engine with
    NEW settings, load, re-apply. Returns the settings after the load and after re-applying,
    the notes, and whether a step after that was taken."""
    from pathlib import Path

    from slope_megatron.sparsity import adapters_active
    from slope_megatron.training import checkpoint, engine as engine_mod
    from slope_megatron.distributed import init_distributed
    from slope_megatron.training.optimizer import switch_on_adapters

    info = init_distributed()
    if dtype == "bf16":  # DeepSpeed's BF16_Optimizer on CPU: our resolve_dtype allows a GPU only
        engine_mod.resolve_dtype = lambda cfg: "bf16"
    gen = torch.Generator().manual_seed(info.rank)
    torch.manual_seed(0)
    old = _cfg(stage, OLD, dtype)
    model, engine, optimizer = engine_mod.build_engine(old, None, info.world_size)
    switch_on_adapters(model, optimizer, old)
    _step(engine, gen)
    checkpoint.save(engine, Path(ckpt_dir), 1, {"iteration": 1}, info.rank)
    saved = settings(optimizer)
    engine.destroy()

    torch.manual_seed(0)
    new = _cfg(stage, NEW, dtype)
    model, engine, optimizer = engine_mod.build_engine(new, None, info.world_size)
    built = settings(optimizer)
    client = checkpoint.load(engine, Path(ckpt_dir), info.rank)
    assert client["iteration"] == 1
    loaded = settings(optimizer)
    notes = apply_optimizer_settings(optimizer, new, adapters_active(model))
    applied = settings(optimizer)
    _step(engine, gen)  # still trains
    stepped = engine.was_step_applied()
    engine.destroy()
    return {"saved": saved, "built": built, "loaded": loaded, "applied": applied,
            "notes": notes, "type": type(optimizer).__name__, "stepped": stepped}


def _expected(values: dict, clip) -> dict:
    wd = values["weight_decay"]
    groups = {"decay": wd, "no_decay": 0.0, "adapters": wd}  # adapters on: optimizer's decay
    out = {name: (d, values["beta1"], values["beta2"], values["eps"])
           for name, d in groups.items()}
    out["clip_grad"] = clip
    return out
