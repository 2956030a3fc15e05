"""Export a SLoPe checkpoint: the compressed SLoPe artifact, a dense Hugging Face model, or the
model's full state dict.

    python launch/export.py --checkpoint runs/demo --out exported/demo --format slope
    python launch/export.py --checkpoint runs/demo --out exported/demo-hf --format hf [--dtype bf16]
    python launch/export.py --checkpoint runs/demo --out exported/demo-sd --format state_dict

--checkpoint takes an artifact dir, a checkpoint dir holding slope_model/, or a run's
output_dir (newest complete checkpoint). `hf` merges adapters into dense weights
(W * M + (A B / r)^T) and writes a GPT2LMHeadModel / LlamaForCausalLM checkpoint that
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads offline. `state_dict` writes
model.pt, which `GPTModel.load_state_dict(torch.load(OUT/model.pt), strict=True)` takes -
kept values, masks, column masks and layer state - and config.yaml (a checkpoint of any
layout; DeepSpeed's zero_to_fp32.py output has no masks).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from slope_megatron.inference import ArtifactError, export_checkpoint
from slope_megatron.inference.export import FORMATS
from slope_megatron.inference.locate import find_artifact
from slope_megatron.training.checkpoint import CheckpointError
from slope_megatron.training.checkpoint.state_dict_export import export_state_dict


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="artifact dir, checkpoint dir (with slope_model/) or run output_dir")
    p.add_argument("--out", required=True, type=Path, help="output directory (replaced)")
    p.add_argument("--format", choices=(*FORMATS, "state_dict"), default="slope")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="hf only: weight dtype (default: the checkpoint's)")
    return p.parse_args(argv)


def _state_dict(args: argparse.Namespace) -> Path:
    """The state-dict export of the checkpoint behind --checkpoint (it reads DeepSpeed's files,
    so a standalone artifact, which has none, does not do)."""
    if args.dtype is not None:
        raise ValueError("--dtype applies to --format hf only; the state dict holds the fp32 "
                         "master weights")
    tag_dir = find_artifact(args.checkpoint).parent
    out = Path(args.out).resolve()
    if tag_dir.resolve() in (out, *out.parents):
        raise ValueError(f"--out '{args.out}' is inside the checkpoint '{tag_dir}'; a "
                         f"checkpoint's files belong to its run - export somewhere else")
    if not (tag_dir / "manifest.json").is_file():
        raise ValueError(f"--format state_dict needs a training checkpoint (a run's output_dir "
                         f"or one of its checkpoints/iter_*), not a standalone artifact: "
                         f"{args.checkpoint}")
    return export_state_dict(tag_dir, args.out)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.format == "state_dict":
            out = _state_dict(args)
        else:
            out = export_checkpoint(args.checkpoint, args.out, args.format, args.dtype)
    except (ArtifactError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} export to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
