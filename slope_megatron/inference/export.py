"""Export a checkpoint's inference artifact as a SLoPe artifact or a dense HF checkpoint.

`slope` re-verifies and rewrites the artifact (the way to copy one out of a checkpoint
directory: the copy is checked while it is written). `hf` writes the dense-equivalent
transformers checkpoint of `hf_export`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .artifact import load_artifact, save_artifact
from .hf_export import export_hf
from .locate import _ITER, find_artifact
from .model import parse_dtype

FORMATS = ("slope", "hf")


def export_checkpoint(checkpoint: Path, out_dir: Path, fmt: str = "slope",
                      dtype: Optional[str] = None) -> Path:
    """Export the artifact behind `checkpoint` (artifact, checkpoint or run dir) to out_dir."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    src = find_artifact(Path(checkpoint))
    if Path(out_dir).resolve() == src.resolve():
        raise ValueError(f"--out '{out_dir}' is the artifact being exported; pick another path")
    inside = next((d for d in Path(out_dir).resolve().parents
                   if d.parent.name == "checkpoints" and _ITER.match(d.name)), None)
    if inside is not None:  # it would replace that checkpoint's own artifact, or add to it
        raise ValueError(f"--out '{out_dir}' is inside the checkpoint '{inside}'; a checkpoint's "
                         f"files belong to its run - export somewhere else")
    config, state, tokenizer = load_artifact(src)
    if fmt == "slope":
        if dtype is not None:
            raise ValueError("--dtype applies to --format hf only; the SLoPe artifact keeps the "
                             "dtype it was trained with")
        return save_artifact(state, config, tokenizer, Path(out_dir))
    return export_hf(config, state, Path(out_dir), tokenizer,
                     None if dtype is None else parse_dtype(dtype))
