#!/usr/bin/env python
"""Pretrain a SLoPe (or dense) language model: `python launch/pretrain.py --help` for its usage.

The code and its documentation are slope_megatron/commands/pretrain.py; installed, the same
command is `slope-pretrain`.
"""
import sys

try:
    from slope_megatron.commands.pretrain import main
except ImportError as e:  # a checkout that was not installed
    sys.exit(f"error: {e}; install the project first: bash launch/install.sh (see README.md)")

if __name__ == "__main__":
    sys.exit(main())
