"""Start a run from a Hugging Face checkpoint (train.init_from): its weights become the model's
initial weights in whatever layout the run has, and SLoPe's rule picks every sparse layer's
N:M mask - by magnitude, from the pretrained weights instead of random ones.

Two steps, both before any work they depend on:
1. `check_init_from` (start-up, before the data): the checkpoint is a GPT-2 or LLaMA model
   whose settings equal the config's model.* keys (one ConfigError listing every mismatch);
   its tokenizer prepares the data (data.tokenizer left at its default 'bpe' becomes
   'hf:<dir>'; any other tokenizer is refused); an unset model.vocab_size becomes the
   checkpoint's vocabulary size, unpadded.
2. `load_pretrained` (engine.py, on the built model before DeepSpeed wraps it, so every ZeRO
   stage partitions the loaded weights): the TP = 1 weights, masks chosen at TP = 1 and then
   cut for this rank (a mask group never straddles a shard, so this equals choosing per
   shard). Adapters, layer counters and column masks stay as a new model has them (the column
   mask is computed from the loaded weights at the first forward). Vocabulary rows beyond the
   checkpoint's (a model.vocab_size padded for tensor parallelism) start as the mean of the
   pretrained rows, so no padded token outscores the real ones.

A resume ignores train.init_from: the checkpoint's weights are newer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import Config, ConfigError
from ..inference.hf_import import (HFCheckpoint, HFImportError, dense_state_dict, mismatches,
                                   read_hf_checkpoint)
from ..model.reshard import cut_of_stage_key, shard
from ..sparsity.functional import values_from_dense
from ..sparsity.masks import nm_mask

KEPT_AS_BUILT = ("adapter_a", "adapter_b", "_extra_state", "column_mask")
VOCAB_ROWS = ("embedding.tokens.weight", "head.lm_head.weight")


def _same_dir(a: str, b: Path) -> bool:
    return Path(a).expanduser().resolve() == b.expanduser().resolve()


def check_init_from(cfg: Config, say: Callable[[str], None]) -> Optional[HFCheckpoint]:
    """Check train.init_from against the config and fix what it decides (data.tokenizer,
    an unset model.vocab_size); None without train.init_from."""
    if cfg.train.init_from is None:
        return None
    path = Path(cfg.train.init_from)
    key = f"config key 'train.init_from' = {cfg.train.init_from!r}"
    try:
        ckpt = read_hf_checkpoint(path)
    except HFImportError as e:
        raise ConfigError(f"{key} is invalid: {e}") from None
    problems = mismatches(ckpt, cfg.model)
    if problems:
        raise ConfigError(f"{key} does not fit this config: {'; '.join(problems)}. Set these "
                          f"model.* keys to the checkpoint's")
    tokenizer = f"hf:{path}"
    if cfg.data.tokenizer == "bpe":  # the default: the checkpoint's tokenizer is the one
        cfg.data.tokenizer = tokenizer
        say(f"data.tokenizer: {tokenizer} (the tokenizer of train.init_from)")
    elif not (cfg.data.tokenizer.startswith("hf:") and _same_dir(cfg.data.tokenizer[3:], path)):
        raise ConfigError(f"config key 'data.tokenizer' = {cfg.data.tokenizer!r} is not the "
                          f"tokenizer of train.init_from: its embedding rows are the ids of "
                          f"{path}'s tokenizer. Leave data.tokenizer at its default or set "
                          f"it to '{tokenizer}'")
    if cfg.model.vocab_size is None:
        tp = cfg.parallel.tensor
        if ckpt.vocab_size % tp:
            raise ConfigError(f"{key}: its vocabulary ({ckpt.vocab_size}) does not split over "
                              f"parallel.tensor = {tp}; set model.vocab_size to a multiple of "
                              f"{tp} that is >= {ckpt.vocab_size} (the extra rows start as "
                              f"the mean of the pretrained ones)")
        cfg.model.vocab_size = ckpt.vocab_size
    return ckpt


def pretrained_state(ckpt: HFCheckpoint, cfg: Config, sparse_prefixes: set) -> dict:
    """The TP = 1 initial state: the checkpoint's weights, vocabulary rows padded to
    model.vocab_size with their mean, and for each sparse layer (`sparse_prefixes`) its mask
    chosen by magnitude and the values it keeps."""
    state = dense_state_dict(ckpt, cfg.model)
    for key in VOCAB_ROWS:
        rows = state.get(key)
        if rows is not None and rows.shape[0] < cfg.model.vocab_size:
            pad = rows.mean(0, keepdim=True).expand(cfg.model.vocab_size - rows.shape[0], -1)
            state[key] = torch.cat([rows, pad])
    for prefix in sparse_prefixes:
        dense = state[f"{prefix}.weight"]
        mask = nm_mask(dense, cfg.sparsity.n, cfg.sparsity.m)
        state[f"{prefix}.mask"] = mask
        state[f"{prefix}.weight"] = values_from_dense(dense, mask)
    return state


def load_pretrained(model, cfg: Config, par, ckpt: HFCheckpoint) -> None:
    """Load the checkpoint's weights into this rank's built model (GPTModel, or a pipeline
    stage), before DeepSpeed wraps it."""
    from deepspeed.pipe import PipelineModule

    pipelined = isinstance(model, PipelineModule)
    tp, rank = (par.tp_size, par.tp_rank) if par is not None else (1, 0)
    m = cfg.model
    cuts = {key: cut_of_stage_key(key, m.arch, m.num_layers, pipelined)
            for key in model.state_dict()}
    sparse = {c.full_key[:-len(".mask")] for c in cuts.values() if c.full_key.endswith(".mask")}
    full = pretrained_state(ckpt, cfg, sparse)
    local = {key: shard(full[c.full_key], c, tp, rank) for key, c in cuts.items()
             if c.full_key in full}
    result = model.load_state_dict(local, strict=False)
    left = [k for k in result.missing_keys if k.rsplit(".", 1)[-1] not in KEPT_AS_BUILT]
    if left or result.unexpected_keys:
        raise ConfigError(f"config key 'train.init_from' = {cfg.train.init_from!r}: the "
                          f"checkpoint gives no {left[:3]} (unexpected: "
                          f"{result.unexpected_keys[:3]}); it does not fit this model")
