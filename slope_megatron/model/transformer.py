"""The decoder-only language model: embedding -> blocks -> final norm -> LM head.

Built as three kinds of stage (Embedding, Block, Head), which `pipeline.py` also lays out as
the stages of a DeepSpeed PipelineModule for parallel.pipeline > 1 (same pieces, same
seeds). The LM head is tied to the token embedding by default; the loss is computed in
float32.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdaptersConfig, Config, ModelConfig, SparsityConfig, ffn_hidden_size
from .blocks import Block, make_norm
from .linear_factory import LinearFactory
from .regions import lm_loss


class Embedding(nn.Module):
    """Token embedding (vocab-parallel under TP) + learned positions for gpt, and dropout."""

    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory):
        super().__init__()
        if make_linear.tp_size > 1:
            from ..parallel.layers import VocabParallelEmbedding

            self.tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.init_std,
                                                 make_linear.tp_size, make_linear.tp_rank,
                                                 make_linear.tp_group)
        else:
            self.tokens = nn.utils.skip_init(nn.Embedding, cfg.vocab_size, cfg.hidden_size)
            nn.init.normal_(self.tokens.weight, 0.0, cfg.init_std)
        self.positions = None
        if cfg.arch == "gpt":
            self.positions = nn.utils.skip_init(nn.Embedding, cfg.seq_len, cfg.hidden_size)
            nn.init.normal_(self.positions.weight, 0.0, cfg.init_std / 2)
        self.dropout = cfg.dropout

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(input_ids)
        if self.positions is not None:
            x = x + self.positions(torch.arange(input_ids.shape[1], device=input_ids.device))
        return F.dropout(x, self.dropout, self.training)


class Head(nn.Module):
    """Final norm and LM head (dense by default). With tied embeddings the head holds no
    weight of its own: it projects with the token embedding passed to forward. Under TP the
    logits stay sharded along the vocabulary (the loss is vocab-parallel)."""

    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory):
        super().__init__()
        self.norm = make_norm(cfg)
        self.tp_group = make_linear.tp_group if make_linear.tp_size > 1 else None
        self.lm_head = None if cfg.tie_embeddings else \
            make_linear("lm_head", cfg.hidden_size, cfg.vocab_size, False)

    def forward(self, x: torch.Tensor, tied_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.project(self.norm(x), tied_weight)

    def project(self, x: torch.Tensor, tied_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The LM head alone, on x already normed (inference fuses the last residual add
        into the final norm)."""
        if self.lm_head is None:
            if self.tp_group is not None:
                from ..parallel.mappings import copy_to_tp

                x = copy_to_tp(x, self.tp_group)
            return F.linear(x, tied_weight)
        return self.lm_head(x)


@contextlib.contextmanager
def seeded(seed: Optional[int]):
    """Build a piece of the model from its own seed (global RNG untouched), so every layer's
    init is the same whatever the pipeline/tensor layout builds around it. None: no-op."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def layer_seed(base: Optional[int], index: int) -> Optional[int]:
    """Seed of model piece `index` (0 embedding, 1..L blocks, L+1 head)."""
    return None if base is None else base * 1000 + index


class GPTModel(nn.Module):
    """GPT-2/OPT-style or LLaMA-style decoder; sparse or dense by SparsityConfig."""

    def __init__(self, cfg: ModelConfig, sparsity: SparsityConfig,
                 adapters: Optional[AdaptersConfig] = None, parallel=None,
                 init_seed: Optional[int] = None):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is unset; set it or let the trainer take it "
                             "from the tokenizer")
        self.cfg = cfg
        tp = dict(tp_size=parallel.tp_size, tp_rank=parallel.tp_rank,
                  tp_group=parallel.tp_group) if parallel is not None else {}
        make_linear = LinearFactory(sparsity, adapters or AdaptersConfig(enabled=False),
                                    cfg.init_std, cfg.num_layers, cfg.hidden_size, **tp)
        self.tp_size = make_linear.tp_size
        self.vocab_start = make_linear.tp_rank * cfg.vocab_size // make_linear.tp_size
        self.tp_group = make_linear.tp_group
        with seeded(layer_seed(init_seed, 0)):
            self.embedding = Embedding(cfg, make_linear)
        blocks = []
        for i in range(cfg.num_layers):
            with seeded(layer_seed(init_seed, i + 1)):
                blocks.append(Block(cfg, make_linear, i))
        self.blocks = nn.ModuleList(blocks)
        with seeded(layer_seed(init_seed, cfg.num_layers + 1)):
            self.head = Head(cfg, make_linear)

    @classmethod
    def from_config(cls, config: Config, parallel=None) -> "GPTModel":
        return cls(config.model, config.sparsity, config.adapters, parallel, config.train.seed)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            from ..parallel.layers import vocab_parallel_lm_loss

            return vocab_parallel_lm_loss(logits, targets, self.vocab_start, self.tp_group)
        return lm_loss(logits, targets)

    def forward(self, input_ids: torch.Tensor,
                targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (batch, T, vocab; this rank's vocab shard under TP), or the mean loss when
        `targets` are given."""
        if input_ids.shape[1] > self.cfg.seq_len:
            raise ValueError(f"input of {input_ids.shape[1]} tokens exceeds model.seq_len "
                             f"({self.cfg.seq_len})")
        x = self.embedding(input_ids)
        for block in self.blocks:
            x = block(x)
        logits = self.head(x, self.embedding.tokens.weight)
        return logits if targets is None else self.loss(logits, targets)

    # ---- accounting ---------------------------------------------------------------------
    def num_parameters(self, stored: bool = True) -> int:
        """Trainable values stored (sparse layers count kept values only)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not stored)

    def dense_equivalent_flops_per_token(self) -> float:
        return dense_flops_per_token(self.cfg)


def dense_flops_per_token(c: ModelConfig) -> float:
    """Training FLOPs per token of the *dense* model of this shape (6N + attention).

    MFU is reported against this number for both arms, so a sparse model's MFU says how
    fast it runs the dense model's work (the usual convention for sparse training).
    """
    h, ffn, layers = c.hidden_size, ffn_hidden_size(c), c.num_layers
    mlp = 3 * h * ffn if c.arch == "llama" else 2 * h * ffn
    matmul_params = layers * (4 * h * h + mlp) + h * c.vocab_size
    attention = 12 * layers * h * c.seq_len / 2  # causal: half of the T x T scores
    return 6.0 * matmul_params + attention
