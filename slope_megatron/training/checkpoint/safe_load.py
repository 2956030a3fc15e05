"""Loading DeepSpeed's checkpoint files without executing pickled code.

DeepSpeed's own loader calls torch.load(weights_only=False); we replace it on our engine
with torch.load(weights_only=True) and an explicit allow-list of the few DeepSpeed classes
its files hold.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import CheckpointError


def _safe_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19.8 pickles into its checkpoint files."""
    out = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        out += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        out.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        out.append(fragment_address)
    except ImportError:
        pass
    import argparse
    import collections
    out += [argparse.Namespace, collections.OrderedDict, set]
    return out


def safe_torch_load(path, map_location=None):
    """torch.load with weights_only=True, allowing only DeepSpeed's plain-data classes."""
    import pickle

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        error = CheckpointError(f"{path} holds objects that are not plain tensors/data, so it "
                                f"is not loaded (torch.load weights_only=True): "
                                f"{str(e).splitlines()[0]}")
    # rank 0 reads the first model-parallel rank's model file as every rank of a data-parallel
    # run does (and says so for them); any other file - a ZeRO optimizer shard, another
    # model-parallel rank's - is read by the rank that failed alone, which has to say so
    error.every_rank = Path(path).name == "mp_rank_00_model_states.pt"
    raise error


def use_safe_loading(engine) -> None:
    """Make this engine's DeepSpeed checkpoint engine load with weights_only=True."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None:
        return
    ce.load = safe_torch_load
