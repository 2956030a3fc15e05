"""Capture a fixed-shape function once in a CUDA graph and replay it (CUDA only).

Why: an eager decode step is hundreds of kernel launches, each costing host time, for a token
whose GPU work is a few hundred microseconds (docs/INFERENCE.md, "What is and is not fast"). A
CUDA graph replays the whole step with one launch. Capturing requires a function whose tensors
keep their addresses and shapes from call to call and which never reads a tensor's value on
the host; `static_decode.StaticDecoder.step` is written to be one.

Warm-up runs on a side stream first, as torch's documentation asks: the first calls build
cuSPARSELt plans, compile Triton kernels and fill the allocator, none of which may happen
during capture. The warm-up calls run the function for real, so the caller must be able to
reset whatever state they advance (the decoder resets its state before every generation).
"""
from __future__ import annotations

from typing import Callable

import torch


def graphs_available(device: torch.device) -> bool:
    """Whether CUDA graphs can be used on `device` (a CUDA device with a working runtime)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


class GraphedCall:
    """`fn()` captured once on the current CUDA stream; calling the object replays it."""

    def __init__(self, fn: Callable[[], None], device: torch.device, warmup: int = 2):
        if not graphs_available(device):
            raise RuntimeError(f"CUDA graphs need a CUDA device, got {device}")
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                fn()

    def __call__(self) -> None:
        self.graph.replay()
