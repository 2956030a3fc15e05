"""Model-wide operations on every SlopeLinear: the adapter switch and the per-step hook.

The training loop calls these; they are separate from the layer so that the same calls
work whether a model is plain, wrapped by DeepSpeed, or split into pipeline stages.
"""
from __future__ import annotations

from typing import Iterator

from torch import nn

from .linear import SlopeLinear


def slope_layers(model: nn.Module) -> Iterator[SlopeLinear]:
    """Every SlopeLinear in `model` (in module order)."""
    return (m for m in model.modules() if isinstance(m, SlopeLinear))


def is_adapter_parameter_name(name: str) -> bool:
    return name.endswith("adapter_a") or name.endswith("adapter_b")


def enable_adapters(model: nn.Module) -> int:
    """Switch every created adapter on; returns how many layers switched."""
    switched = 0
    for layer in slope_layers(model):
        if layer.adapter_a is not None and not layer.adapter_active:
            layer.enable_adapter()
            switched += 1
    return switched


def adapters_active(model: nn.Module) -> bool:
    return any(layer.adapter_active for layer in slope_layers(model))


def after_optimizer_step(model: nn.Module) -> None:
    """Advance every layer's step counter and refresh kernel-side caches."""
    for layer in slope_layers(model):
        layer.after_optimizer_step()
