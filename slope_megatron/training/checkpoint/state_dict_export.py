"""Export a checkpoint as the one state dict `GPTModel.load_state_dict(..., strict=True)` takes:
the TP = 1, unpipelined model of any layout, with its kept values (the fp32 master weights),
masks, column masks and layer extra state, plus the run's config.yaml to build the model from.

Why not DeepSpeed's zero_to_fp32.py: its output holds parameters and persistent buffers only,
and the masks are neither, so loading its kept values into a model built from another seed
puts them under other masks - silently wrong logits. This export carries the masks, and a
strict load replaces the new model's own. It reads the checkpoint's DeepSpeed files through
the same conversion as a resume in another layout (universal.py); the checkpoint is verified
against its manifest first and only read.

    out/model.pt      torch.save of the state dict (loads with weights_only=True)
    out/config.yaml   the run's config (model shape, sparsity, adapters, ...)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ... import __version__
from ...io import atomic_directory
from .errors import CheckpointError
from .manifest import verify
from .universal import ModelFacts, convert

STATE, CONFIG, MARKER = "model.pt", "config.yaml", "slope_state_dict.json"


def _is_state_export(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def export_state_dict(tag_dir: Path, out_dir: Path) -> Path:
    """Write checkpoint `tag_dir`'s full TP = 1 state dict and config to `out_dir`."""
    tag_dir = Path(tag_dir)
    problems = verify(tag_dir, None)
    if problems:
        raise CheckpointError(f"checkpoint {tag_dir} does not verify: " + "; ".join(problems[:5]))
    snap = convert(tag_dir, ModelFacts.of_checkpoint(tag_dir))
    state = {**snap.model, **snap.state["extra_state"]}
    with atomic_directory(Path(out_dir), _is_state_export, "state-dict export") as tmp:
        torch.save(state, tmp / STATE)
        shutil.copyfile(tag_dir / "slope_model" / CONFIG, tmp / CONFIG)
        (tmp / MARKER).write_text(json.dumps({"producer": f"slope_megatron {__version__}",
                                              "checkpoint": str(tag_dir.resolve())}))
    return Path(out_dir)
