"""Shared by model tests: a few optimizer steps on one fixed batch, returning the losses;
one step's loss and gradients, and how far two such gradient sets are apart."""

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


def worst_grad_rel(got: dict, want: dict) -> tuple[float, str]:
    """(largest relative L2 error over the gradients, its parameter name); same names needed."""
    assert got.keys() == want.keys(), set(got) ^ set(want)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
    return max((rel(got[n], want[n]), n) for n in want)
