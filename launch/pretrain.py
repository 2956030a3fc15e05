#!/usr/bin/env python
"""Pretrain a SLoPe (or dense) language model.

    deepspeed launch/pretrain.py --config configs/demo.yaml [--set section.key=value ...]
    torchrun --nproc-per-node 2 launch/pretrain.py --config ...
    mpirun -n 2 python launch/pretrain.py --config ...
    python launch/pretrain.py --config ...            (one process)

Rerunning the same command resumes from the newest complete checkpoint in
train.output_dir. `--help-config` prints every config key with its default and meaning.

The code is slope_megatron/commands/pretrain.py; installed, the same command is `slope-pretrain`.
"""
import sys

try:
    from slope_megatron.commands.pretrain import main
except ImportError as e:  # a checkout that was not installed
    sys.exit(f"error: {e}; install the project first: bash launch/install.sh (see README.md)")

if __name__ == "__main__":
    sys.exit(main())
