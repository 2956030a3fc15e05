"""Validation of a loaded configuration, before any process allocates a model: every error
names the key, the bad value and what to do."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from .schema import VOCAB_PAD_MULTIPLE, Config, ConfigError, ffn_hidden_size


def _require(cond: bool, key: str, value: Any, what: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: {what}")


def validate(cfg: Config) -> None:
    """Range and consistency checks that need no distributed state."""
    m, s, a, t, o = cfg.model, cfg.sparsity, cfg.adapters, cfg.train, cfg.optimizer
    _require(m.arch in ("gpt", "llama"), "model.arch", m.arch, "use 'gpt' or 'llama'")
    for key in ("hidden_size", "num_layers", "num_heads", "seq_len"):
        _require(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "must be >= 1")
    _require(m.hidden_size % m.num_heads == 0, "model.num_heads", m.num_heads,
             f"must divide model.hidden_size ({m.hidden_size})")
    if m.arch == "llama":
        _require((m.hidden_size // m.num_heads) % 2 == 0, "model.hidden_size", m.hidden_size,
                 "head dim (hidden_size / num_heads) must be even for rotary embeddings")
    _require(m.ffn_hidden_size is None or m.ffn_hidden_size >= 1, "model.ffn_hidden_size",
             m.ffn_hidden_size, "must be >= 1")
    _require(m.vocab_size is None or m.vocab_size >= 2, "model.vocab_size", m.vocab_size,
             "must be >= 2")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
    for key in ("norm_eps", "init_std", "rope_theta"):
        value = getattr(m, key)
        _require(math.isfinite(value) and value > 0, f"model.{key}", value,
                 "must be a finite number > 0")

    _require(1 <= s.n < s.m, "sparsity.n", s.n, f"need 1 <= n < m (m = {s.m})")
    _require(s.column_mask_refresh >= 1, "sparsity.column_mask_refresh", s.column_mask_refresh,
             "must be >= 1")
    _require(s.backend in ("auto", "reference", "cusparselt", "cublas", "torch-semi"),
             "sparsity.backend", s.backend,
             "use 'auto', 'reference', 'cusparselt', 'cublas' or 'torch-semi'")
    bad = [x for x in s.modules if x not in ("qkv", "proj", "fc1", "fc2")]
    _require(not bad, "sparsity.modules", s.modules, f"unknown entries {bad}; "
             "use any of qkv, proj, fc1, fc2")
    _require(not (s.sparse_lm_head and m.tie_embeddings), "sparsity.sparse_lm_head",
             s.sparse_lm_head, "a sparse LM head needs model.tie_embeddings: false")
    if s.enabled:
        ffn = ffn_hidden_size(m)
        for name, dim in (("model.hidden_size", m.hidden_size), ("ffn size", ffn)):
            _require(dim % s.m == 0, name, dim, f"must be divisible by sparsity.m = {s.m} "
                     "(N:M groups run along the input dim of every sparse linear)")

    _require(0.0 < a.fraction < 1.0, "adapters.fraction", a.fraction, "must be in (0, 1)")
    _require(0.0 < a.rank_ratio <= 1.0, "adapters.rank_ratio", a.rank_ratio, "must be in (0, 1]")
    _require(a.rank_of in ("hidden", "input"), "adapters.rank_of", a.rank_of,
             "use 'hidden' or 'input'")
    _require(a.rank is None or a.rank >= 1, "adapters.rank", a.rank, "must be >= 1")
    _require(a.weight_decay is None or (math.isfinite(a.weight_decay) and a.weight_decay >= 0),
             "adapters.weight_decay", a.weight_decay, "must be finite and >= 0")
    _require(math.isfinite(a.lr_scale) and a.lr_scale > 0, "adapters.lr_scale", a.lr_scale,
             "must be finite and > 0")

    _require(cfg.parallel.tensor >= 1, "parallel.tensor", cfg.parallel.tensor, "must be >= 1")
    _require(cfg.parallel.pipeline >= 1, "parallel.pipeline", cfg.parallel.pipeline,
             "must be >= 1")
    _require(cfg.zero.stage in (0, 1, 2, 3), "zero.stage", cfg.zero.stage, "must be 0-3")
    _require(cfg.zero.grad_accum_dtype in ("auto", "fp32", "model"), "zero.grad_accum_dtype",
             cfg.zero.grad_accum_dtype, "use 'auto', 'fp32' or 'model'")
    _require(not (cfg.zero.grad_accum_dtype == "fp32" and cfg.zero.stage != 1
                  and t.dtype in ("auto", "bf16")), "zero.grad_accum_dtype", "fp32",
             f"needs zero.stage: 1 for a bf16 model (DeepSpeed's BF16_Optimizer); zero.stage is "
             f"{cfg.zero.stage}. Set zero.stage: 1, or zero.grad_accum_dtype: auto")
    _validate_layout(cfg)

    _require(math.isfinite(o.lr) and o.lr > 0, "optimizer.lr", o.lr, "must be finite and > 0")
    _require(math.isfinite(o.eps) and o.eps > 0, "optimizer.eps", o.eps, "must be finite and > 0")
    _require(0 <= o.min_lr <= o.lr, "optimizer.min_lr", o.min_lr, "must be in [0, lr]")
    _require(o.schedule in ("cosine", "linear", "constant"), "optimizer.schedule", o.schedule,
             "use 'cosine', 'linear' or 'constant'")
    _require(o.warmup_iters is None or 0 <= o.warmup_iters <= t.iters, "optimizer.warmup_iters",
             o.warmup_iters, f"must be in [0, train.iters]: set optimizer.warmup_iters=<n> with "
             f"0 <= n <= train.iters (here {t.iters}), or optimizer.warmup_iters=null for the "
             f"default (1% of train.iters)")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optimizer.beta1/beta2", (o.beta1, o.beta2),
             "must be in [0, 1)")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "must be >= 0")
    _require(math.isfinite(o.grad_clip) and o.grad_clip >= 0, "optimizer.grad_clip",
             o.grad_clip, "must be finite and >= 0 (0 disables clipping)")
    _require(math.isfinite(o.weight_decay), "optimizer.weight_decay", o.weight_decay,
             "must be finite")

    _require(0.0 < cfg.data.val_fraction < 0.5, "data.val_fraction", cfg.data.val_fraction,
             "must be in (0, 0.5)")
    _require(cfg.data.corpus in ("default", "extended"), "data.corpus", cfg.data.corpus,
             "use 'default' or 'extended'")  # data/builtin_corpora.py's names (a test checks)
    _require(cfg.data.path is None or cfg.data.corpus == "default", "data.corpus",
             cfg.data.corpus, "a built-in corpus is used only when data.path is unset; "
             "set one of the two")
    _require(cfg.data.tokenizer in ("bpe", "tiktoken-gpt2") or cfg.data.tokenizer.startswith("hf:"),
             "data.tokenizer", cfg.data.tokenizer, "use 'bpe', 'tiktoken-gpt2' or 'hf:<name>'")
    _require(cfg.data.tokenizer_vocab_size >= 260, "data.tokenizer_vocab_size",
             cfg.data.tokenizer_vocab_size, "must be >= 260 (256 bytes + specials)")
    _require(cfg.data.tokenizer != "tiktoken-gpt2" or bool(cfg.data.tiktoken_file),
             "data.tiktoken_file", cfg.data.tiktoken_file, "data.tokenizer=tiktoken-gpt2 needs "
             "the path of a local gpt2.tiktoken file (nothing is downloaded); or use "
             "data.tokenizer=bpe")

    _require(t.iters >= 1, "train.iters", t.iters, "must be >= 1")
    _require(t.micro_batch_size >= 1, "train.micro_batch_size", t.micro_batch_size, "must be >= 1")
    _require(t.global_batch_size >= t.micro_batch_size, "train.global_batch_size",
             t.global_batch_size, f"must be >= train.micro_batch_size ({t.micro_batch_size})")
    for key in ("log_interval", "eval_iters", "keep_checkpoints", "max_skipped_steps"):
        _require(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "must be >= 1")
    _require(t.save_interval >= 0, "train.save_interval", t.save_interval,
             "must be >= 0 (0: no checkpoints)")
    _require(t.eval_interval >= 0, "train.eval_interval", t.eval_interval, "must be >= 0")
    _require(t.dtype in ("auto", "bf16", "fp16", "fp32"), "train.dtype", t.dtype,
             "use 'auto', 'bf16', 'fp16' or 'fp32'")
    _require(t.init_from is None or (Path(t.init_from).expanduser() / "config.json").is_file(),
             "train.init_from", t.init_from, "must be a local Hugging Face checkpoint directory "
             "(config.json, model.safetensors and the tokenizer files save_pretrained writes)")
    _validate_stop_signals(t.stop_signals)


def _validate_stop_signals(names) -> None:
    """train.stop_signals: names of signals a handler may catch (not SIGKILL/SIGSTOP)."""
    import signal

    _require(isinstance(names, list) and all(isinstance(n, str) for n in names),
             "train.stop_signals", names, "must be a list of signal names, e.g. "
             "[SIGTERM, SIGINT, SIGUSR1]")
    bad = [n for n in names if not n.startswith("SIG") or not hasattr(signal, n)
           or n in ("SIGKILL", "SIGSTOP") or not isinstance(getattr(signal, n), signal.Signals)]
    _require(not bad, "train.stop_signals", names, f"{bad} cannot be caught or are not signal "
             f"names here; use names such as SIGTERM, SIGINT, SIGUSR1, SIGUSR2")


def _validate_layout(cfg: Config) -> None:
    """Tensor/pipeline sizes against the model's shapes (shards must hold whole N:M groups)."""
    m, tp, pp = cfg.model, cfg.parallel.tensor, cfg.parallel.pipeline
    group = cfg.sparsity.m if cfg.sparsity.enabled else 1
    if tp > 1:
        _require(m.num_heads % tp == 0, "parallel.tensor", tp,
                 f"must divide model.num_heads ({m.num_heads})")
        for name, dim in (("model.hidden_size", m.hidden_size), ("ffn size", ffn_hidden_size(m))):
            _require(dim % tp == 0 and (dim // tp) % group == 0, "parallel.tensor", tp,
                     f"{name} ({dim}) must split into {tp} shards that are multiples of "
                     f"sparsity.m ({group})")
        _require(m.vocab_size is None or m.vocab_size % tp == 0, "parallel.tensor", tp,
                 f"must divide model.vocab_size ({m.vocab_size})")
        pad = VOCAB_PAD_MULTIPLE
        _require(m.vocab_size is not None or pad % tp == 0, "parallel.tensor", tp,
                 f"must divide {pad} (an unset model.vocab_size is the tokenizer's vocabulary "
                 f"padded to a multiple of {pad}); or set model.vocab_size to a multiple of "
                 f"{tp} that is >= the tokenizer's vocabulary")
        # SDPA draws the attention-probability dropout from the global RNG, which is seeded
        # alike on every rank: each TP rank's heads would get the same masks (head h and head
        # h + num_heads / TP always dropped together), unlike TP = 1.
        _require(m.dropout == 0.0, "model.dropout", m.dropout,
                 f"dropout is not supported with tensor parallelism (parallel.tensor = {tp}): "
                 f"every TP rank would draw the same attention-dropout masks for its heads, "
                 f"unlike one process. Set model.dropout: 0 (the pretraining default), or "
                 f"parallel.tensor: 1 (use data or pipeline parallelism instead)")
    s = cfg.sparsity
    if s.enabled and s.sparse_lm_head and not m.tie_embeddings:
        _validate_sparse_lm_head(cfg)
    if pp > 1:
        _require(m.num_layers >= pp, "parallel.pipeline", pp,
                 f"must not exceed model.num_layers ({m.num_layers})")
        _require(cfg.zero.stage <= 1, "zero.stage", cfg.zero.stage,
                 "DeepSpeed's pipeline engine supports ZeRO 0 or 1 only; use zero.stage: 1 "
                 "with parallel.pipeline > 1")


def _validate_sparse_lm_head(cfg: Config) -> None:
    """A sparse LM head is a SlopeLinear hidden -> vocab (column-parallel under TP: each rank
    holds vocab / TP rows), so every shard of the vocabulary must hold whole N:M groups (the
    double pruning runs along `out`). Its input, model.hidden_size, is checked with the blocks.
    """
    m, group, tp = cfg.model, cfg.sparsity.m, cfg.parallel.tensor
    unit = group * tp  # vocab % tp == 0 and (vocab / tp) % m == 0 <=> vocab % (m * tp) == 0
    shards = f" in each of its parallel.tensor ({tp}) shards" if tp > 1 else ""
    off = "or set sparsity.sparse_lm_head: false"
    if m.vocab_size is not None:
        _require(m.vocab_size % unit == 0, "model.vocab_size", m.vocab_size,
                 f"a sparse LM head (sparsity.sparse_lm_head) needs a vocabulary divisible by "
                 f"sparsity.m ({group}){shards}: use a multiple of {unit} that is >= the "
                 f"tokenizer's vocabulary (e.g. {-(-m.vocab_size // unit) * unit}), {off}")
    else:  # the trainer takes the tokenizer's vocabulary, rounded up (padded_vocab_size)
        pad = VOCAB_PAD_MULTIPLE
        _require(pad % unit == 0, "model.vocab_size", None,
                 f"unset, it becomes the tokenizer's vocabulary rounded up to a multiple of "
                 f"{pad}, which a sparse LM head cannot always split into whole groups of "
                 f"sparsity.m ({group}){shards}: set model.vocab_size to a multiple of "
                 f"{math.lcm(pad, unit)} that is >= the tokenizer's vocabulary, {off}")


def read_deepspeed_json(path: str, also_tried: Iterable[str] = ()) -> dict:
    """zero.deepspeed_json's settings: the file must exist and hold a JSON object. Relative
    paths are relative to the current directory (load_config has already resolved one given
    in a config file); `also_tried` are other places looked at, for the message."""
    p = Path(path)
    key = f"config key 'zero.deepspeed_json' = {path!r} is invalid"
    if not p.is_file():
        tried = ", ".join(f"'{t}'" for t in dict.fromkeys([*also_tried, os.path.abspath(p)]))
        raise ConfigError(f"{key}: no such file (tried {tried}); give an absolute path or one "
                          f"relative to the config file's directory or the current directory "
                          f"(the shipped configs name deepspeed/*.json beside themselves, in "
                          f"configs/), or unset the key")
    try:
        settings = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{key}: the file could not be read as JSON ({e}); fix it or unset "
                          f"the key") from None
    if not isinstance(settings, dict):
        kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
                type(None): "null"}.get(type(settings), type(settings).__name__)
        raise ConfigError(f"{key}: the file holds a JSON {kind}, not an object of DeepSpeed "
                          f"settings ({{\"zero_optimization\": {{...}}}}); fix it or unset "
                          f"the key")
    return settings


def validate_world(cfg: Config, world_size: int) -> int:
    """Check the layout against the world size; returns the data-parallel size."""
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    if world_size % (tp * pp) != 0:
        raise ConfigError(f"world size {world_size} is not a multiple of parallel.tensor "
                          f"({tp}) x parallel.pipeline ({pp}); launch tp*pp*dp processes")
    dp = world_size // (tp * pp)
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * dp) != 0:
        raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                          f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel size "
                          f"({dp})")
    return dp
