#!/usr/bin/env python
"""Export a SLoPe checkpoint: the compressed SLoPe artifact, or a dense Hugging Face model.

    python launch/export.py --checkpoint runs/demo --out exported/demo --format slope
    python launch/export.py --checkpoint runs/demo --out exported/demo-hf --format hf [--dtype bf16]

--checkpoint takes an artifact dir, a checkpoint dir holding slope_model/, or a run's
output_dir (newest complete checkpoint). `hf` merges adapters into dense weights
(W * M + (A B / r)^T) and writes a GPT2LMHeadModel / LlamaForCausalLM checkpoint that
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads offline.

The code is slope_megatron/commands/export.py; installed, the same command is `slope-export`.
"""
import sys

try:
    from slope_megatron.commands.export import main
except ImportError as e:  # a checkout that was not installed
    sys.exit(f"error: {e}; install the project first: bash launch/install.sh (see README.md)")

if __name__ == "__main__":
    sys.exit(main())
