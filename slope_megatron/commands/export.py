"""Export a SLoPe checkpoint: the compressed SLoPe artifact, or a dense Hugging Face model.

    python launch/export.py --checkpoint runs/demo --out exported/demo --format slope
    python launch/export.py --checkpoint runs/demo --out exported/demo-hf --format hf [--dtype bf16]

--checkpoint takes an artifact dir, a checkpoint dir holding slope_model/, or a run's
output_dir (newest complete checkpoint). `hf` merges adapters into dense weights
(W * M + (A B / r)^T) and writes a GPT2LMHeadModel / LlamaForCausalLM checkpoint that
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads offline.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from slope_megatron.inference import ArtifactError, export_checkpoint
from slope_megatron.inference.export import FORMATS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="artifact dir, checkpoint dir (with slope_model/) or run output_dir")
    p.add_argument("--out", required=True, type=Path, help="output directory (replaced)")
    p.add_argument("--format", choices=FORMATS, default="slope")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="hf only: weight dtype (default: the checkpoint's)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.format, args.dtype)
    except (ArtifactError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} export to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
