"""One training step and one evaluation pass, for the plain and the pipeline engine.

DeepSpeed's plain engine is driven micro-batch by micro-batch (forward, backward, step;
it steps the optimizer at the accumulation boundary); its pipeline engine takes the whole
step's micro-batches at once and schedules them 1F1B over the stages. Both return the
mean loss over this rank's micro-batches (the pipeline engine broadcasts it to all stages).
"""
from __future__ import annotations

import torch

from ..config import Config


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
