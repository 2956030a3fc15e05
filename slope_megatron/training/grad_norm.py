"""The global gradient norm of a ZeRO-0 step that DeepSpeed steps our client optimizer in.

DeepSpeed's engine reports `get_global_grad_norm()` by copying its optimizer's
`_global_grad_norm` after each step (`DeepSpeedEngine._take_model_step`). Its ZeRO optimizers
(stages 1-3) and its ZeRO-0 wrappers of a bf16/fp16 model (FP16_UnfusedOptimizer;
BF16_Optimizer under PP) set that attribute; in fp32 without ZeRO the optimizer is our torch
AdamW, which has none, so the engine reports None. We give it one, computed as DeepSpeed
counts it for stage 0 (`deepspeed.runtime.utils.clip_grad_norm_`: a gradient counts on
model-parallel rank 0, or everywhere when its parameter is flagged model-parallel - see
model/pipeline.py's mark_for_grad_norm - summed over the model-parallel group):

- gradient clipping on: the engine already computes the norm every step
  (`clip_fp32_gradients`) and drops it; we keep it. No extra work.
- clipping off: one pass over the gradients (DeepSpeed's `get_global_norm_of_tensors`), on
  the steps the caller asks for (the logged ones) only.

A step the overflow guard skips reports inf, as DeepSpeed's optimizers do.
"""
from __future__ import annotations

from typing import Optional

import torch


class ClientGradNorm:
    """Sets `_global_grad_norm` on the engine's client optimizer (before clipping) for
    DeepSpeed to report. `wanted`: whether the next step must compute it where clipping is
    off (set it on the steps that are logged; the same on every rank - it is collective)."""

    def __init__(self, engine):
        from deepspeed.runtime.utils import clip_grad_norm_

        self.engine, self.wanted = engine, False
        self.clipping = engine.gradient_clipping() > 0.0
        opt = engine.optimizer
        opt._global_grad_norm = None
        if self.clipping:
            def clip_fp32_gradients():  # DeepSpeedEngine.clip_fp32_gradients, keeping the norm
                opt._global_grad_norm = clip_grad_norm_(
                    parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                    mpu=engine.mpu)
            engine.clip_fp32_gradients = clip_fp32_gradients
        step = opt.step

        def step_with_norm(*args, **kwargs):
            if not self.clipping:
                opt._global_grad_norm = self._norm() if self.wanted else None
            result = step(*args, **kwargs)
            if getattr(opt, "overflow", False):
                opt._global_grad_norm = float("inf")
            return result

        opt.step = step_with_norm

    @classmethod
    def attach(cls, engine) -> ClientGradNorm | None:
        """The tracker where DeepSpeed steps our torch optimizer itself (ZeRO-0 in fp32);
        None where its optimizer wrapper computes the norm."""
        opt = engine.optimizer
        if not isinstance(opt, torch.optim.Optimizer) or hasattr(opt, "_global_grad_norm"):
            return None
        return cls(engine)

    def _norm(self) -> torch.Tensor:
        from deepspeed.runtime.utils import (
            get_global_norm_of_tensors,
            is_model_parallel_parameter,
        )

        mpu = self.engine.mpu
        counted = mpu is None or mpu.get_model_parallel_rank() == 0
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None
                 and (counted or is_model_parallel_parameter(p))]
        # a rank with nothing to count still joins the model-parallel all-reduce
        return get_global_norm_of_tensors(grads or [torch.zeros(1, device=self.engine.device)],
                                          mpu=mpu)


def global_grad_norm(engine) -> Optional[float]:
    """The global gradient norm (before clipping) of the engine's last optimizer step, as
    DeepSpeed's optimizers compute it (ZeRO 1-3 and ZeRO-0's bf16/fp16 wrappers, pipeline
    included; ZeRO-0 in fp32 through grad_norm.ClientGradNorm, on logged steps); None where
    none was computed. Read at log intervals only: on a GPU it is a device tensor, and
    reading it waits for the step."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)
