"""Config keys added after runs were already recorded, with the value every older run had.

A run_config.yaml, a checkpoint manifest's identity or an inference artifact's config.yaml
written before a key existed does not hold it. Reading such a record as holding the value
older code used keeps old runs resumable and old artifacts loadable, even where a new run's
default differs (`adapters.rank_of`: older runs sized adapters by each layer's input width).
"""
from __future__ import annotations

import copy
from typing import Callable, Union

Older = Union[object, Callable[[dict], object]]  # a value, or one computed from the record


def _older_rank_of(flat: dict) -> str:
    """Older code sized adapters by each layer's input width. Where it built none (a dense
    run, adapters off) or took an absolute rank, the rule changed nothing: read as today's
    default, so such runs resume without a setting that never mattered to them."""
    built = flat.get("adapters.enabled", True) and flat.get("sparsity.enabled", True)
    return "input" if built and flat.get("adapters.rank") is None else "hidden"


ADDED_KEYS: dict[str, Older] = {
    "sparsity.double_prune": True,
    "zero.grad_accum_dtype": "model",  # DeepSpeed's default before the key
    "data.corpus": "default",
    "adapters.lr_scale": 1.0,
    "adapters.rank_of": _older_rank_of,
}


def _older(key: str, flat: dict):
    value = ADDED_KEYS[key]
    return value(flat) if callable(value) else value


def fill_added_flat(old: dict, new: dict) -> dict:
    """A saved flat identity (``section.key`` -> value) with the keys added since it was
    written filled in as older runs had them (only those `new` has)."""
    return {**{k: _older(k, old) for k in ADDED_KEYS if k in new}, **old}


def fill_added_nested(recorded: dict) -> dict:
    """A copy of a recorded nested config dict (``{section: {key: value}}``) with every added
    key it lacks set to the value older code used."""
    out = copy.deepcopy(recorded)
    flat = {f"{section}.{k}": v for section, keys in out.items() if isinstance(keys, dict)
            for k, v in keys.items()}
    for key in ADDED_KEYS:
        section, name = key.split(".")
        if out.get(section) is None:
            out[section] = {}
        if isinstance(out[section], dict) and name not in out[section]:
            out[section][name] = _older(key, flat)
    return out
