"""Config keys added after runs were already recorded, with the value every older run had.

A run_config.yaml, a checkpoint manifest's identity or an inference artifact's config.yaml
written before a key existed does not hold it. Reading such a record as holding the value
older code used keeps old runs resumable and old artifacts loadable, even where a new run's
default differs (`adapters.rank_of`: older runs sized adapters by each layer's input width).
"""
from __future__ import annotations

import copy

ADDED_KEYS = {
    "sparsity.double_prune": True,
    "zero.grad_accum_dtype": "model",  # DeepSpeed's default before the key
    "data.corpus": "default",
    "adapters.lr_scale": 1.0,
    "adapters.rank_of": "input",  # before the key, rank_ratio was of each layer's input width
}


def fill_added_flat(old: dict, new: dict) -> dict:
    """A saved flat identity (``section.key`` -> value) with the keys added since it was
    written filled in as older runs had them (only those `new` has)."""
    return {**{k: v for k, v in ADDED_KEYS.items() if k in new}, **old}


def fill_added_nested(recorded: dict) -> dict:
    """A copy of a recorded nested config dict (``{section: {key: value}}``) with every added
    key it lacks set to the value older code used."""
    out = copy.deepcopy(recorded)
    for key, value in ADDED_KEYS.items():
        section, name = key.split(".")
        if out.get(section) is None:
            out[section] = {}
        if isinstance(out[section], dict):
            out[section].setdefault(name, value)
    return out
