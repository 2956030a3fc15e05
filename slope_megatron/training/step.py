"""One training step and one evaluation pass, for the plain and the pipeline engine, and the
guard that makes a non-finite loss or gradient on any rank skip the step as a whole.

DeepSpeed's plain engine is driven micro-batch by micro-batch (forward, backward, step;
it steps the optimizer at the accumulation boundary); its pipeline engine takes the whole
step's micro-batches at once and schedules them 1F1B over the stages. Both return the
mean loss over this rank's micro-batches (the pipeline engine broadcasts it to all stages).

DeepSpeed's ZeRO optimizers check the gradients for overflow and skip such a step; without
ZeRO (and in fp32) DeepSpeed steps our torch AdamW unchecked, so `guard_client_optimizer`
gives it the same check. `guarded_train_step` drives one step and makes a non-finite loss on
any rank reach that check (the loop then logs the skip and stops after too many).
"""
from __future__ import annotations

import math

import torch

from ..config import Config
from ..distributed import any_rank
from . import faults


def make_batch(dataset, indices, device) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dataset[int(i)] for i in indices))
    return torch.stack(xs).to(device), torch.stack(ys).to(device)


def is_pipelined(engine) -> bool:
    return hasattr(engine, "train_batch") and hasattr(engine, "is_pipe_parallel") \
        and engine.is_pipe_parallel


def train_step(engine, batches: list) -> float:
    if is_pipelined(engine):
        return engine.train_batch(iter(batches)).item()
    losses = []
    for x, y in batches:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    return torch.stack(losses).float().mean().item()  # one host sync per step


@torch.no_grad()
def eval_loss(engine, batches: list) -> float:
    if is_pipelined(engine):
        return engine.eval_batch(iter(batches), num_micro_batches=len(batches)).item()
    engine.eval()
    losses = torch.stack([engine(x, y).float() for x, y in batches])
    engine.train()
    return losses.mean().item()


def eval_indices(cfg: Config, num_val: int, dp_rank: int, dp_size: int) -> list[list[int]]:
    """This rank's validation micro-batches.

    The set is the first eval_iters global batches of validation windows (fewer if the split
    is smaller, in whole global batches), so every evaluation - and every parallel layout,
    since the global batch is fixed - measures the same windows.
    """
    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    total = min(cfg.train.eval_iters * gbs, num_val // gbs * gbs)
    per_rank = total // dp_size
    start = dp_rank * per_rank
    return [list(range(start + i, start + i + mbs)) for i in range(0, per_rank, mbs)]


def guard_client_optimizer(engine) -> None:
    """Without ZeRO (and in fp32) DeepSpeed steps our torch AdamW with no overflow check.

    Give it the check DeepSpeed's ZeRO optimizers have: before stepping, look for a
    non-finite gradient on any rank; if there is one, do nothing and report `overflow`, so
    the engine counts the step as skipped (was_step_applied() is False) and zeroes the
    gradients. Parameters, Adam moments and step counts stay bit-identical.
    """
    opt = engine.optimizer
    if not isinstance(opt, torch.optim.Optimizer) or getattr(opt, "_slope_guarded", False):
        return
    step = opt.step

    def guarded_step(*args, **kwargs):
        finite = [torch.isfinite(p.grad).all() for g in opt.param_groups for p in g["params"]
                  if p.grad is not None]
        bad = bool(finite) and not bool(torch.stack(finite).all())  # one device sync
        opt.overflow = any_rank(bad)
        if opt.overflow:
            return None
        return step(*args, **kwargs)

    opt.step, opt.overflow, opt._slope_guarded = guarded_step, False, True


def guarded_train_step(engine, batches: list, it: int) -> tuple[float, bool]:
    """One optimizer step -> (mean loss, whether any rank saw a non-finite loss).

    A non-finite loss on any rank makes every ZeRO stage skip the step.

    The plain engine is driven micro-batch by micro-batch; before the last backward the
    ranks agree (one all-reduce) whether any loss of this step was non-finite, and if so
    the last loss is multiplied by NaN, so every gradient is NaN and DeepSpeed's overflow
    check (ZeRO 1-3) or ours (guard_client_optimizer, no ZeRO) discards the whole step.
    The pipeline engine runs the step inside train_batch; there we rely on the gradient
    check alone (a NaN loss gives NaN gradients) and stop if a non-finite loss was applied.
    """
    if is_pipelined(engine):
        loss_fn = engine.module.loss_fn
        if faults.active() and loss_fn is not None:  # injection only: wrap the last stage's loss
            engine.module.loss_fn = lambda out, y: faults.corrupt_loss(loss_fn(out, y), it)
        try:
            loss = train_step(engine, batches)
        finally:
            engine.module.loss_fn = loss_fn
        return loss, not math.isfinite(loss)
    losses: list = []
    for i, (x, y) in enumerate(batches):
        loss = faults.corrupt_loss(engine(x, y), it)
        losses.append(loss.detach())
        if i == len(batches) - 1:
            # The step's one host sync (not one per micro-batch: each would drain the GPU).
            values = torch.stack(losses).float().tolist()
            bad_any = any_rank(not all(math.isfinite(v) for v in values))
            if bad_any:
                loss = loss * float("nan")
        engine.backward(loss)
        if i == 0:
            faults.point("after_backward", it)
        engine.step()
    return (float("nan") if bad_any else sum(values) / len(values)), bad_any
