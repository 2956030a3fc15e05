#!/usr/bin/env python
"""Export a SLoPe checkpoint (SLoPe artifact or Hugging Face model): `python launch/export.py --help` for its usage.

The code and its documentation are slope_megatron/commands/export.py; installed, the same
command is `slope-export`.
"""
import sys

try:
    from slope_megatron.commands.export import main
except ImportError as e:  # a checkout that was not installed
    sys.exit(f"error: {e}; install the project first: bash launch/install.sh (see README.md)")

if __name__ == "__main__":
    sys.exit(main())
