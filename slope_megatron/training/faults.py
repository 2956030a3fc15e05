"""Fault injection at named points of the trainer and checkpoint code (for reliability tests).

Driven by one environment variable, read when a point is reached; unset, every hook is a
dictionary lookup and returns at once:

    SLOPE_FAULT="kill:after_backward:iter=5"   SIGKILL this process at that point of iteration 5
    SLOPE_FAULT="nan:loss:iter=3"              the loss of iteration 3 becomes NaN (forward)
    SLOPE_FAULT="inf:loss:iter=3"              ... +Inf
    SLOPE_FAULT="nan:grad:iter=3"              the loss stays finite, its gradient is NaN
    SLOPE_FAULT="nan:loss:iter=3-5,rank=1"     iterations 3..5, global rank 1 only
    SLOPE_FAULT="signal:after_backward:iter=5,sig=SIGUSR1"   send this process SIGUSR1 there
                                               (SIGTERM by default): a scheduler's stop
    SLOPE_FAULT="pause:after_step:iter=5"      wait there (at most seconds=60) until a stop
                                               signal arrives: a run stopped from outside at a
                                               known iteration

Several faults are separated by ';'. `iter` is the 0-based training iteration for step
points and the checkpoint's iteration for save points; leave it out to fire every time.

Kill points (see POINTS): a kill is `os.kill(os.getpid(), SIGKILL)` - no handler, no
flush, no atexit, exactly what a pre-empted job gets.
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from typing import Optional

import torch

ENV = "SLOPE_FAULT"

POINTS = {
    "step_start": "top of an iteration, before anything of it ran",
    "after_backward": "during a step: first micro-batch's backward done, optimizer not stepped",
    "after_step": "optimizer stepped, metrics of the iteration not yet written",
    "before_adapter_switch": "the iteration that switches adapters on, before the switch",
    "after_adapter_switch": "adapters switched on, their first step not yet taken",
    "eval": "during evaluation (validation batches being run)",
    "save_start": "checkpoint save begun, nothing written",
    "save_after_engine": "DeepSpeed's model/optimizer files written, RNG/artifact not",
    "save_before_latest": "checkpoint and manifest complete, `latest` not yet moved",
    "save_after_latest": "`latest` moved to the new checkpoint, old ones not yet pruned",
    "convert_write": "converting a checkpoint to another layout: tensors written, not yet "
                     "published (iter: the checkpoint's)",
}


@dataclass(frozen=True)
class Fault:
    kind: str                 # kill | signal | pause | nan | inf
    point: str                # a POINTS name, or loss / grad
    first: Optional[int]      # iteration range (None: any)
    last: Optional[int]
    rank: Optional[int]
    sig: str = "SIGTERM"      # what a `signal` fault sends
    seconds: float = 60.0     # how long a `pause` waits at most

    def fires(self, iteration: Optional[int]) -> bool:
        if self.rank is not None and self.rank != int(os.environ.get("RANK", "0")):
            return False
        if self.first is None:
            return True
        return iteration is not None and self.first <= iteration <= self.last


_cache: tuple[Optional[str], tuple[Fault, ...]] = (None, ())


def parse(raw: str) -> tuple[Fault, ...]:
    faults = []
    for item in filter(None, (s.strip() for s in raw.split(";"))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or parts[0] not in ("kill", "signal", "pause", "nan", "inf"):
            raise ValueError(f"{ENV}: '{item}' must look like kill|signal|pause:<point>[:iter=N] "
                             f"or nan|inf:loss|grad[:iter=N]")
        kind, point = parts[0], parts[1]
        if kind in ("kill", "signal", "pause") and point not in POINTS:
            raise ValueError(f"{ENV}: unknown kill point '{point}'; known: {', '.join(POINTS)}")
        if kind in ("nan", "inf") and point not in ("loss", "grad"):
            raise ValueError(f"{ENV}: '{kind}' faults apply to 'loss' or 'grad', not '{point}'")
        opts = dict(kv.split("=", 1) for kv in parts[2].split(",")) if len(parts) == 3 else {}
        first = last = None
        if "iter" in opts:
            lo, _, hi = opts["iter"].partition("-")
            first, last = int(lo), int(hi or lo)
        rank = int(opts["rank"]) if "rank" in opts else None
        faults.append(Fault(kind, point, first, last, rank, opts.get("sig", "SIGTERM"),
                            float(opts.get("seconds", 60.0))))
    return tuple(faults)


def active() -> tuple[Fault, ...]:
    global _cache
    raw = os.environ.get(ENV)
    if not raw:
        return ()
    if _cache[0] != raw:
        _cache = (raw, parse(raw))
    return _cache[1]


def point(name: str, iteration: Optional[int] = None) -> None:
    """A named kill point: SIGKILL this process if a fault names it (and the iteration), or
    send it the signal a `signal` fault names (its handler runs; the code goes on)."""
    for f in active():
        if f.kind == "signal" and f.point == name and f.fires(iteration):
            os.kill(os.getpid(), getattr(signal, f.sig))
        if f.kind == "pause" and f.point == name and f.fires(iteration):
            _pause(f.seconds)
        if f.kind == "kill" and f.point == name and f.fires(iteration):
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def _pause(seconds: float) -> None:
    """Wait until this process received a stop signal, or `seconds` passed."""
    import time

    from . import stop_signals

    end = time.monotonic() + seconds
    while stop_signals.received() is None and time.monotonic() < end:
        time.sleep(0.05)


class _Midway(list):
    """A list whose iteration reaches a kill point after its first item ran (if it has two)."""

    def __init__(self, items: list, name: str, iteration: Optional[int]):
        super().__init__(items)
        self.name, self.iteration = name, iteration

    def __iter__(self):
        for i, item in enumerate(list.__iter__(self)):
            if i == min(1, len(self) - 1):
                point(self.name, self.iteration)
            yield item


def during(name: str, iteration: Optional[int], items: list) -> list:
    """`items` (e.g. the validation batches) reaching kill point `name` midway through their
    iteration, so a kill lands while they are being worked on; `items` itself when no fault
    is set."""
    return _Midway(items, name, iteration) if active() else items


class _PoisonGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def corrupt_loss(loss: torch.Tensor, iteration: int) -> torch.Tensor:
    """Apply nan/inf faults aimed at this iteration's loss or its gradient."""
    for f in active():
        if f.kind in ("nan", "inf") and f.fires(iteration):
            if f.point == "loss":
                loss = loss * float(f.kind)
            else:
                loss = _PoisonGrad.apply(loss)
    return loss
