#!/usr/bin/env python
"""Prepare a run's data ahead of training: `python launch/prepare_data.py --help` for its usage.

The code and its documentation are slope_megatron/commands/prepare_data.py; installed, the same
command is `slope-prepare-data`.
"""
import sys

try:
    from slope_megatron.commands.prepare_data import main
except ImportError as e:  # a checkout that was not installed
    sys.exit(f"error: {e}; install the project first: bash launch/install.sh (see README.md)")

if __name__ == "__main__":
    sys.exit(main())
