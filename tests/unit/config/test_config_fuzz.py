"""Property-based config validation: for any config a user could write, the
run either starts cleanly or stops with a ConfigError naming the key - never a traceback
from deep inside torch or DeepSpeed.

Hypothesis draws configs around a small valid one: keys set to values of every type and
range (negative, zero, NaN/Inf, strings, lists, None, unknown keys and sections), with a
random world size. A config that passes validation is then built the way the trainer
builds it (model from the config, the client AdamW, one forward and backward) on CPU.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slope_megatron.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    validate_world,
)

BASE = {"model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "seq_len": 16,
                  "vocab_size": 64},
        "sparsity": {"backend": "reference"},
        "train": {"iters": 10, "micro_batch_size": 2, "global_batch_size": 16, "dtype": "fp32"}}

SMALL_INTS = st.sampled_from([-3, -1, 0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 65, 128])
FLOATS = st.one_of(st.sampled_from([0.0, -0.5, 0.01, 0.5, 0.99, 1.0, 1.5, 1e-8, 3e-4,
                                    float("nan"), float("inf"), -float("inf")]),
                   st.floats(allow_nan=True, allow_infinity=True, width=32))
ANY = st.one_of(SMALL_INTS, FLOATS, st.booleans(), st.none(),
                st.text(max_size=8), st.lists(st.text(max_size=4), max_size=3),
                st.sampled_from(["gpt", "llama", "auto", "bf16", "fp32", "cosine", "bpe",
                                 "reference", "qkv", "hf:x"]))

KEYS = {section.name: [f.name for f in dataclasses.fields(section.default_factory)]
        for section in dataclasses.fields(Config)}
KEYS["data"] = [k for k in KEYS["data"] if k not in ("path", "cache_dir")]  # no file access
KEYS["train"] = [k for k in KEYS["train"] if k != "output_dir"]
KEYS["zero"] = [k for k in KEYS["zero"] if k != "deepspeed_json"]


STRINGS = st.sampled_from(["gpt", "llama", "auto", "reference", "cusparselt", "bf16", "fp16",
                           "fp32", "cosine", "linear", "constant", "bpe", "tiktoken-gpt2",
                           "hf:gpt2", "", "x"])
FIELDS = {section.name: {f.name: str(f.type) for f in dataclasses.fields(section.default_factory)}
          for section in dataclasses.fields(Config)}


def typed_values(section: str, key: str):
    """Mostly values of the key's own type (so many configs get past the type check and
    exercise range/consistency checks and the build), sometimes anything."""
    t = FIELDS[section][key]
    if key == "modules":
        own = st.lists(st.sampled_from(["qkv", "proj", "fc1", "fc2", "up"]), max_size=4)
    elif "bool" in t:
        own = st.booleans()
    elif "int" in t:
        own = SMALL_INTS
    elif "float" in t:
        own = FLOATS
    else:
        own = STRINGS
    return st.one_of(own, own, own, ANY)


@st.composite
def raw_configs(draw):
    data = {s: dict(v) for s, v in BASE.items()}
    for _ in range(draw(st.integers(0, 5))):
        section = draw(st.sampled_from(sorted(KEYS)))
        key = draw(st.sampled_from(KEYS[section]))
        value = draw(typed_values(section, key))
        if draw(st.integers(0, 19)) == 0:
            key = key + "x"  # a typo
        data.setdefault(section, {})[key] = value
    if draw(st.integers(0, 29)) == 0:
        data[draw(st.sampled_from(["modle", "optim", "x"]))] = {"a": 1}
    return data


def _start(cfg: Config, world: int) -> None:
    """What the trainer does with a valid config, up to the first backward (CPU, TP=PP=1)."""
    from slope_megatron.model import GPTModel
    from slope_megatron.training.optimizer import build_optimizer

    validate_world(cfg, world)
    if cfg.parallel.tensor > 1 or cfg.parallel.pipeline > 1 or cfg.model.hidden_size > 128 \
            or (cfg.model.ffn_hidden_size or 0) > 512 or cfg.model.num_layers > 4:
        return  # validated only: multi-process layouts are covered by the layout tests
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = 64  # what the trainer takes from the tokenizer
    model = GPTModel.from_config(cfg, None)
    optimizer = build_optimizer(model, cfg)
    seq = min(cfg.model.seq_len, 8)
    x = torch.randint(0, cfg.model.vocab_size, (1, seq))
    loss = model(x, x)
    loss.backward()
    optimizer.step()


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True)  # the same 300 examples on every run: CI does not flake
@given(raw=raw_configs(), world=st.sampled_from([1, 1, 2, 2, 4, 8, 3]))
def test_any_config_starts_cleanly_or_names_its_error(raw, world):
    try:
        cfg = config_from_dict(raw)
        _start(cfg, world)
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg.strip()
        assert "config" in msg or "world size" in msg or "train." in msg, msg


@settings(max_examples=60, deadline=None, derandomize=True)
@given(overrides=st.lists(st.text(max_size=20), max_size=3))
def test_any_override_string_is_applied_or_refused_cleanly(overrides):
    try:
        load_config(None, overrides)
    except ConfigError:
        pass


@pytest.mark.parametrize("change,key", [
    ({"model": {"hidden_sise": 32}}, "model.hidden_sise"),          # unknown key
    ({"model": {"hidden_size": "32"}}, "model.hidden_size"),        # wrong type
    ({"sparsity": {"n": 4, "m": 4}}, "sparsity.n"),                 # N >= M
    ({"model": {"hidden_size": 30, "num_heads": 2}}, "model.hidden_size"),  # not % M
    ({"parallel": {"tensor": 4}, "model": {"num_heads": 2}}, "parallel.tensor"),
    ({"adapters": {"fraction": 1.0}}, "adapters.fraction"),
    ({"adapters": {"fraction": 0.0}}, "adapters.fraction"),
    ({"train": {"iters": 0}}, "train.iters"),
    ({"model": {"norm_eps": float("nan")}}, "model.norm_eps"),
    ({"model": {"init_std": -1.0}}, "model.init_std"),
    ({"optimizer": {"lr": float("inf")}}, "optimizer.lr"),
])
def test_each_named_config_error(change, key):
    raw = {s: dict(v) for s, v in BASE.items()}
    for section, values in change.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(raw)


def test_world_size_mismatch_is_named():
    cfg = config_from_dict({**BASE, "parallel": {"tensor": 2}})
    with pytest.raises(ConfigError, match="world size 3"):
        validate_world(cfg, 3)
    assert math.isfinite(cfg.optimizer.lr)
