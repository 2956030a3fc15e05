#!/usr/bin/env python
"""Generate text from a SLoPe checkpoint: `python launch/generate.py --help` for its usage.

The code and its documentation are slope_megatron/commands/generate.py; installed, the same
command is `slope-generate`.
"""
import sys

try:
    from slope_megatron.commands.generate import main
except ImportError as e:  # a checkout that was not installed
    sys.exit(f"error: {e}; install the project first: bash launch/install.sh (see README.md)")

if __name__ == "__main__":
    sys.exit(main())
