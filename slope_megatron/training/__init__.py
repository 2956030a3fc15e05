"""Training: DeepSpeed engine set-up, the loop, the adapter switch, checkpoints, metrics."""
from .trainer import TrainResult, train

__all__ = ["train", "TrainResult"]
