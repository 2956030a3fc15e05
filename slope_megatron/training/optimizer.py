"""AdamW parameter groups, the learning-rate schedule, and the lazy-adapter switch.

Groups: (0) matrices with weight decay - this includes every SlopeLinear's kept values, so
optimizer state exists only for kept entries; (1) biases and norms without decay;
(2) adapters. Adapter parameters exist from the start so that every ZeRO stage partitions
them with the rest, but before the switch they get no gradient from the model (no
compute), and their group has lr 0 and no decay, so they do not move. At the switch
their optimizer state is cleared - they start fresh while the sparse weights keep theirs - and
their group's lr becomes the scheduled one times `adapters.lr_scale` (1 by default).
"""
from __future__ import annotations

import math
from typing import Optional

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
