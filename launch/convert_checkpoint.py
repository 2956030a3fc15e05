#!/usr/bin/env python
"""Convert a checkpoint into its layout-independent snapshot, ahead of a resume in another
layout (other TP / PP / DP size or ZeRO stage; training converts by itself when needed).

    python launch/convert_checkpoint.py --checkpoint runs/demo [--tag iter_00000400]

The code is slope_megatron/commands/convert_checkpoint.py; installed, the same command is
`slope-convert-checkpoint`.
"""
import sys

try:
    from slope_megatron.commands.convert_checkpoint import main
except ImportError as e:  # a checkout that was not installed
    sys.exit(f"error: {e}; install the project first: bash launch/install.sh (see README.md)")

if __name__ == "__main__":
    sys.exit(main())
