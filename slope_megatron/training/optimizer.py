"""AdamW parameter groups, the learning-rate schedule, and the lazy-adapter switch.

Groups: (0) matrices with weight decay - this includes every SlopeLinear's kept values, so
optimizer state exists only for kept entries; (1) biases and norms without decay;
(2) adapters. Adapter parameters exist from the start so that every ZeRO stage partitions
them with the rest, but before the switch they get no gradient from the model (no
compute), and their group has lr 0 and no decay, so they do not move. At the switch
their optimizer state is cleared - they start fresh while the sparse weights keep theirs - and
their group's lr becomes the scheduled one times `adapters.lr_scale` (1 by default).

A resume takes optimizer.* from its own config: DeepSpeed's checkpoint load puts the saved
groups' settings (and its wrappers' gradient clipping) back, apply_optimizer_settings puts
the config's back over them.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from ..config import Config
from ..sparsity.model_hooks import enable_adapters, is_adapter_parameter_name


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    decay, no_decay, adapters = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_adapter_parameter_name(name):
            adapters.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.optimizer.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if adapters:  # found again by its name (DeepSpeed drops empty groups, shifting indices)
        groups.append({"params": adapters, "weight_decay": 0.0, "name": "adapters",
                       "adapter_lr_scale": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """torch AdamW (fused on CUDA), handed to DeepSpeed as a client optimizer."""
    o = cfg.optimizer
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(param_groups(model, cfg), lr=o.lr, betas=(o.beta1, o.beta2),
                             eps=o.eps, fused=fused or None)


def lr_at(cfg: Config, it: int) -> float:
    """Learning rate for iteration `it` (0-based): linear warm-up, then decay to min_lr."""
    o, iters = cfg.optimizer, cfg.train.iters
    warmup = o.warmup_iters if o.warmup_iters is not None else max(1, iters // 100)
    if it < warmup:
        return o.lr * (it + 1) / warmup
    if o.schedule == "constant" or iters <= warmup:
        return o.lr
    progress = min(1.0, (it - warmup) / max(1, iters - warmup))
    if o.schedule == "linear":
        return o.lr + (o.min_lr - o.lr) * progress
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set lr on every group (the adapter group's scaled: 0 before the switch, then
    `adapters.lr_scale`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("adapter_lr_scale", 1.0)


def base_optimizer(engine_optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO 1-3, BF16_Optimizer)."""
    return getattr(engine_optimizer, "optimizer", engine_optimizer)


def adapter_group(optimizer) -> Optional[int]:
    """Index of the adapter param group in `optimizer.param_groups`, or None."""
    return next((i for i, g in enumerate(optimizer.param_groups) if g.get("name") == "adapters"),
                None)


def _adapter_state_keys(engine_optimizer) -> list[torch.Tensor]:
    """The tensors the base optimizer keys the adapter group's state by.

    ZeRO-1/2 (and no ZeRO): the group's params (flat fp32 partitions under ZeRO). ZeRO-3
    empties the groups between steps; its fp32 sub-group partitions carry the state.
    """
    base = base_optimizer(engine_optimizer)
    index = adapter_group(base)
    if index is None:
        return []
    if hasattr(engine_optimizer, "sub_group_to_group_id"):
        return [engine_optimizer.fp32_partitioned_groups_flat[sub]
                for sub, group in engine_optimizer.sub_group_to_group_id.items()
                if group == index]
    return list(base.param_groups[index]["params"])


def switch_on_adapters(model: nn.Module, engine_optimizer, cfg: Config) -> int:
    """Turn adapters on in the model and give them a fresh optimizer state."""
    switched = enable_adapters(model)
    wd = cfg.adapters.weight_decay if cfg.adapters.weight_decay is not None \
        else cfg.optimizer.weight_decay
    base = base_optimizer(engine_optimizer)
    for p in _adapter_state_keys(engine_optimizer):
        base.state.pop(p, None)  # fresh Adam moments and step count
    for opt in {id(o): o for o in (engine_optimizer, base)}.values():
        index = adapter_group(opt)
        if index is not None:
            opt.param_groups[index].update(adapter_lr_scale=cfg.adapters.lr_scale,
                                           weight_decay=wd)
    return switched


def mark_adapters_active(engine_optimizer, cfg: Config) -> None:
    """After loading a checkpoint taken past the switch: keep the adapter group's lr on."""
    for opt in (engine_optimizer, base_optimizer(engine_optimizer)):
        index = adapter_group(opt)
        if index is not None:
            opt.param_groups[index]["adapter_lr_scale"] = cfg.adapters.lr_scale


def _adapter_weight_decay(cfg: Config) -> tuple[str, float]:
    """(the config key that sets it, value): the adapter group's weight decay once they are on."""
    if cfg.adapters.weight_decay is not None:
        return "adapters.weight_decay", cfg.adapters.weight_decay
    return "optimizer.weight_decay", cfg.optimizer.weight_decay


def _group_settings(group: dict, cfg: Config, adapters_on: bool) -> dict[str, tuple[str, Any]]:
    """What the config says one param group (built by `param_groups`) holds:
    {group key: (config key, value)}; betas are split into beta1 and beta2 below."""
    o = cfg.optimizer
    out: dict[str, tuple[str, Any]] = {"betas": ("optimizer.beta1/beta2", (o.beta1, o.beta2)),
                                       "eps": ("optimizer.eps", o.eps)}
    name = group.get("name")
    if name == "decay":
        out["weight_decay"] = ("optimizer.weight_decay", o.weight_decay)
    elif name == "no_decay":
        out["weight_decay"] = ("optimizer.weight_decay", 0.0)  # never decayed: no key sets it
    elif name == "adapters":
        out["weight_decay"] = _adapter_weight_decay(cfg) if adapters_on \
            else ("adapters.weight_decay", 0.0)  # off: lr 0 and no decay, they do not move
    return out


def _plain(value):
    """A setting as a number (a tensor beta or eps - torch allows them - read as a float)."""
    return value.item() if torch.is_tensor(value) else value


def apply_optimizer_settings(engine_optimizer, cfg: Config, adapters_on: bool) -> list[str]:
    """Put the config's optimizer settings back after a checkpoint load; returns one line per
    config key whose value the checkpoint had changed, e.g.
    "optimizer.weight_decay: 0.1 (checkpoint) -> 0.0 (config)".

    DeepSpeed's load puts the checkpoint's param-group settings back (torch's
    Optimizer.load_state_dict keeps the saved groups' values: weight decay, betas, eps) and,
    in its BF16_Optimizer, ZeRO 1-2 and fp16 wrappers, the saved gradient clipping
    (`clip_grad`). A resume may change optimizer.* (only the lr is set every iteration, by
    set_lr), so without this the checkpoint's values would silently stay. Sets, on every group
    of the engine's optimizer (and of the torch optimizer under DeepSpeed's wrapper; the same
    dicts under ZeRO and BF16_Optimizer): betas, eps, and the weight decay `param_groups` and
    `switch_on_adapters` give the group (`adapters_on`: the adapters are on in the loaded
    model); and the wrapper's `clip_grad` (ZeRO-0 in fp32 clips with the engine's config,
    which this run built). The adapter group's lr scale: `mark_adapters_active`."""
    o = cfg.optimizer
    changed: dict[str, tuple[Any, Any]] = {}

    def note(key: str, old, new) -> None:
        if old != new and key not in changed:
            changed[key] = (old, new)

    groups = {id(g): g for opt in (engine_optimizer, base_optimizer(engine_optimizer))
              for g in getattr(opt, "param_groups", [])}
    for group in groups.values():
        for field, (key, value) in _group_settings(group, cfg, adapters_on).items():
            old = group.get(field)
            if field == "betas":
                old = tuple(_plain(b) for b in old) if old is not None else (None, None)
                note("optimizer.beta1", old[0], value[0])
                note("optimizer.beta2", old[1], value[1])
                value = tuple(value)
            else:
                note(key, _plain(old), value)
            group[field] = value
    for opt in {id(x): x for x in (engine_optimizer, base_optimizer(engine_optimizer))}.values():
        if hasattr(opt, "clip_grad") and not isinstance(opt, torch.optim.Optimizer):
            note("optimizer.grad_clip", _plain(opt.clip_grad), o.grad_clip)
            opt.clip_grad = o.grad_clip
    order = ["optimizer.weight_decay", "adapters.weight_decay", "optimizer.beta1",
             "optimizer.beta2", "optimizer.eps", "optimizer.grad_clip"]
    return [f"{key}: {changed[key][0]!r} (checkpoint) -> {changed[key][1]!r} (config)"
            for key in sorted(changed, key=order.index)]
