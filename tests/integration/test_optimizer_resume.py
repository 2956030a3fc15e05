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
from helpers.optimizer_resume import NEW, OLD, _expected, _resume_worker
from slope_megatron.config import load_config
from slope_megatron.training.optimizer import apply_optimizer_settings


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
