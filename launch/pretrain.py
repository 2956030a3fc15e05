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
from pathlib import Path

try:
    import slope_megatron  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slope_megatron.commands.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
