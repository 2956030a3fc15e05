"""Training: start-up (startup.py: config checks, run directory, data, engine, resume), the
loop (loop.py), one step (step.py), checkpoints (checkpoint/), the optimizer and the adapter
switch, metrics, and fault injection for the reliability tests."""
from .loop import TrainResult, train

__all__ = ["train", "TrainResult"]
