"""Typed, validated run configuration.

One dataclass per concern (model, sparsity, adapters, parallel, zero, optimizer, data,
train; `schema.py`), loaded from YAML plus ``--set key=value`` overrides (`loading.py`).
Every field carries its help text, so ``launch/pretrain.py --help-config`` and the reference in
docs/CONFIG.md come from the same source. Validation (`validation.py`) happens before any
process allocates a model, and every error names the key, the bad value and what to do.
"""
from .loading import apply_overrides, config_from_dict, load_config
from .schema import (AdaptersConfig, Config, ConfigError, DataConfig, ModelConfig,
                     OptimizerConfig, ParallelConfig, SparsityConfig, TrainConfig,
                     VOCAB_PAD_MULTIPLE, ZeroConfig, config_reference, ffn_hidden_size,
                     padded_vocab_size)
from .validation import validate, validate_world

__all__ = ["AdaptersConfig", "Config", "ConfigError", "DataConfig", "ModelConfig",
           "OptimizerConfig", "ParallelConfig", "SparsityConfig", "TrainConfig",
           "VOCAB_PAD_MULTIPLE", "ZeroConfig", "apply_overrides", "config_from_dict",
           "config_reference", "ffn_hidden_size", "load_config", "padded_vocab_size",
           "validate", "validate_world"]
