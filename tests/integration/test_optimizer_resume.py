"""A resume takes optimizer.* from this run's config, not from the checkpoint.

DeepSpeed's checkpoint load puts the saved param-group settings back (weight decay, betas,
eps: torch's Optimizer.load_state_dict keeps the saved groups' values) and, in its ZeRO 1-2,
BF16_Optimizer and fp16 wrappers, the saved gradient clipping. Only the lr was set again
(every iteration, by set_lr). optimizer.apply_optimizer_settings puts the config's values
back and says what the checkpoint had."""
from __future__ import annotations

import pytest
import torch

from helpers.dist import run_distributed
from slope_megatron.config import config_from_dict, load_config
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


@pytest.mark.slow
@pytest.mark.parametrize("stage,world,wrapper", [(0, 1, "AdamW"),
                                                 (1, 1, "DeepSpeedZeroOptimizer"),
                                                 (2, 2, "DeepSpeedZeroOptimizer"),
                                                 (3, 1, "DeepSpeedZeroOptimizer_Stage3")])
def test_a_resume_takes_the_configs_optimizer_settings(tmp_path, stage, world, wrapper):
    results = run_distributed(_resume_worker, world, stage, str(tmp_path / "checkpoints"))
    # ZeRO-0 in fp32 has no wrapper (the engine clips with its own config); ZeRO-3 keeps the
    # clip_grad it was built with; ZeRO 1-2 put the checkpoint's back
    restores_clip = stage in (1, 2)
    clip_old, clip_new = (None, None) if stage == 0 else (OLD["grad_clip"], NEW["grad_clip"])
    for r in results:
        assert r["type"] == wrapper
        assert r["saved"] == _expected(OLD, clip_old)
        assert r["built"]["decay"] == _expected(NEW, clip_new)["decay"]
        # what DeepSpeed's load leaves: the checkpoint's settings (the bug this guards)
        assert r["loaded"] == _expected(OLD, clip_old if restores_clip else clip_new)
        assert r["applied"] == _expected(NEW, clip_new)
        assert r["notes"][:4] == ["optimizer.weight_decay: 0.1 (checkpoint) -> 0.0 (config)",
                                  "optimizer.beta1: 0.9 (checkpoint) -> 0.8 (config)",
                                  "optimizer.beta2: 0.95 (checkpoint) -> 0.99 (config)",
                                  "optimizer.eps: 1e-08 (checkpoint) -> 1e-06 (config)"]
        assert r["notes"][4:] == (["optimizer.grad_clip: 1.0 (checkpoint) -> 0.5 (config)"]
                                  if restores_clip else [])
        assert r["stepped"]


@pytest.mark.slow
def test_bf16_optimizer_takes_the_configs_gradient_clipping(tmp_path):
    """BF16_Optimizer (DeepSpeed's choice for bf16 at ZeRO-1 with fp32 accumulation, the GPU
    default) restores `clip_grad` from the checkpoint. Run on CPU in bf16 where DeepSpeed
    allows it."""
    try:
        r = run_distributed(_resume_worker, 1, 1, str(tmp_path / "checkpoints"), "bf16")[0]
    except RuntimeError as e:  # a CPU DeepSpeed without bf16 support
        pytest.skip(f"BF16_Optimizer does not run here: {str(e).splitlines()[-1]}")
    assert r["type"] == "BF16_Optimizer"
    assert r["loaded"]["clip_grad"] == OLD["grad_clip"]
    assert r["applied"] == _expected(NEW, NEW["grad_clip"])
    assert "optimizer.grad_clip: 1.0 (checkpoint) -> 0.5 (config)" in r["notes"]


class _Wrapper:
    """A DeepSpeed-like wrapper: clip_grad, and param_groups forwarded to `.optimizer`."""

    def __init__(self, optimizer, clip):
        self.optimizer, self.clip_grad = optimizer, clip

    @property
    def param_groups(self):
        return self.optimizer.param_groups


def _groups(adapter_decay):
    p = [torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(3)]
    return [{"params": [p[0]], "weight_decay": 0.1, "name": "decay"},
            {"params": [p[1]], "weight_decay": 0.0, "name": "no_decay"},
            {"params": [p[2]], "weight_decay": adapter_decay, "name": "adapters",
             "adapter_lr_scale": 0.0}]


def test_nothing_changed_says_nothing():
    cfg = load_config(None, ["optimizer.weight_decay=0.1", "optimizer.grad_clip=1.0"])
    opt = _Wrapper(torch.optim.AdamW(_groups(0.0), lr=1e-3, betas=(0.9, 0.95), eps=1e-8), 1.0)
    assert apply_optimizer_settings(opt, cfg, adapters_on=False) == []


def test_the_adapter_group_follows_its_own_decay_once_on():
    cfg = load_config(None, ["optimizer.weight_decay=0.1", "adapters.weight_decay=0.01"])
    opt = torch.optim.AdamW(_groups(0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    notes = apply_optimizer_settings(opt, cfg, adapters_on=True)
    assert notes == ["adapters.weight_decay: 0.1 (checkpoint) -> 0.01 (config)"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.01]
    # before the switch the adapter group does not decay, whatever the config says
    assert apply_optimizer_settings(opt, cfg, adapters_on=False) == [
        "adapters.weight_decay: 0.01 (checkpoint) -> 0.0 (config)"]
    assert opt.param_groups[2]["weight_decay"] == 0.0


def test_one_note_per_key_and_the_wrapper_and_base_groups_both_set():
    cfg = load_config(None, ["optimizer.weight_decay=0.05", "optimizer.beta2=0.999",
                             "optimizer.grad_clip=0"])
    base = torch.optim.AdamW(_groups(0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    opt = _Wrapper(base, 1.0)
    notes = apply_optimizer_settings(opt, cfg, adapters_on=True)
    assert notes == ["optimizer.weight_decay: 0.1 (checkpoint) -> 0.05 (config)",
                     "optimizer.beta2: 0.95 (checkpoint) -> 0.999 (config)",
                     "optimizer.grad_clip: 1.0 (checkpoint) -> 0.0 (config)"]
    assert opt.clip_grad == 0.0
    assert [g["weight_decay"] for g in base.param_groups] == [0.05, 0.0, 0.05]
    assert all(g["betas"] == (0.9, 0.999) for g in base.param_groups)


# ---- end to end: a killed run resumed with other optimizer settings -----------------------

@pytest.mark.slow
def test_a_killed_run_resumed_with_other_optimizer_settings_uses_them(tmp_path, capfd):
    import signal

    from helpers.corpus import tiny_run_args, write_corpus
    from helpers.forked_runs import launch

    from slope_megatron.training import checkpoint

    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "run"

    def argv(*extra):
        return tiny_run_args(corpus, tmp_path / "cache", out, 4, 2, "zero.stage=1", *extra)

    old = ("optimizer.weight_decay=0.1", "optimizer.beta2=0.95", "optimizer.grad_clip=1.0")
    new = ("optimizer.weight_decay=0.0", "optimizer.beta2=0.99", "optimizer.grad_clip=0.5")
    assert launch(argv(*old), 1, "kill:after_step:iter=2") == [-signal.SIGKILL]
    capfd.readouterr()
    assert launch(argv(*new)) == [0]
    cap = capfd.readouterr()
    said = cap.out + cap.err
    for line in ("optimizer.weight_decay: 0.1 (checkpoint) -> 0.0 (config)",
                 "optimizer.beta2: 0.95 (checkpoint) -> 0.99 (config)",
                 "optimizer.grad_clip: 1.0 (checkpoint) -> 0.5 (config)"):
        assert said.count(line) == 1, said
    state = checkpoint.safe_torch_load(out / "checkpoints" / checkpoint.tag_for(4) /
                                       "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    opt = state["optimizer_state_dict"]
    assert opt["clip_grad"] == 0.5
    groups = {g["name"]: g for g in opt["base_optimizer_state"]["param_groups"]}
    assert groups["decay"]["weight_decay"] == 0.0
    assert all(tuple(g["betas"]) == (0.9, 0.99) for g in groups.values())
