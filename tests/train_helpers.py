"""Shared by model tests: a few optimizer steps on one fixed batch, returning the losses;
one step's loss and gradients."""

import torch

from slope_megatron.sparsity import after_optimizer_step


def fixed_batch_losses(model, steps: int = 5, vocab: int = 96) -> list[float]:
    """AdamW (lr 3e-3) steps of `model` on one random (4, 16)-token batch; SLoPe's per-step
    hook runs after each step, as the trainer does."""
    ids = torch.randint(0, vocab, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        after_optimizer_step(model)
        losses.append(loss.item())
    return losses


def loss_and_grads(model, x, y):
    """One forward + backward from zeroed gradients -> (loss, {parameter name: gradient})."""
    model.zero_grad(set_to_none=True)
    loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}
