#!/usr/bin/env python
"""Generate text from a SLoPe checkpoint, printing tokens as they are produced.

    python launch/generate.py --checkpoint runs/demo --prompt "Once upon a time" \
        --max-new-tokens 64 [--temperature 0.8 --top-p 0.95 --seed 1]

--checkpoint takes an artifact dir, a checkpoint dir holding slope_model/, or a run's
output_dir (the newest complete checkpoints/iter_*/slope_model/ is used). Several --prompt /
--prompt-file (one whole file = one prompt) run as one batch, numbered in command-line order; a
single prompt streams. Temperature 0 (the default) is greedy decoding (no seed: the random seed
is printed only when sampling). With `--device cuda` (bf16 by default) the 2:4
sparse layers are compressed and run on cuSPARSELt (`--kernels auto`, the default); elsewhere
they run the reference math (a dense GEMM on W*M, see docs/INFERENCE.md).

The code is slope_megatron/commands/generate.py; installed, the same command is `slope-generate`.
"""
import sys

try:
    from slope_megatron.commands.generate import main
except ImportError as e:  # a checkout that was not installed
    sys.exit(f"error: {e}; install the project first: bash launch/install.sh (see README.md)")

if __name__ == "__main__":
    sys.exit(main())
