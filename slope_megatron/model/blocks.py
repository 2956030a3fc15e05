"""Transformer block pieces: norms, rotary embedding, causal self-attention, MLPs.

GPT-2/OPT style: LayerNorm, GELU MLP, biases. LLaMA style: RMSNorm, SwiGLU MLP, rotary
positions, no biases. Attention is PyTorch's fused `scaled_dot_product_attention`.
Every linear comes from a LinearFactory, so the block does not know whether it is sparse.
The work between the linears lives in `regions.py` (torch.compile'd when enabled).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig, ffn_hidden_size
from .linear_factory import LinearFactory
from .regions import causal_attention, mlp_activation, residual_norm, stacked_heads


class AddNorm:
    """Norm mixin: norm(x), or with a residual update (x + delta, norm(x + delta)) computed by
    the `residual_norm` region. Going through the module's own forward keeps DeepSpeed's
    module hooks (ZeRO-3 gathers the norm's parameters there) and the state-dict names."""

    def forward(self, x: torch.Tensor, delta: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """norm(x); with `delta`: the tuple (x + delta, norm(x + delta))."""
        if delta is None:
            return super().forward(x)
        return residual_norm(x, delta, *norm_args(self))


class LayerNorm(AddNorm, nn.LayerNorm):
    pass


class RMSNorm(AddNorm, nn.RMSNorm):
    pass


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "llama":
        return RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


def norm_args(norm: nn.Module) -> tuple:
    """(weight, bias, eps, is_rms) of a make_norm() module, for `residual_norm`."""
    if isinstance(norm, nn.RMSNorm):
        return norm.weight, None, norm.eps, True  # eps None: F.rms_norm uses the input's
    return norm.weight, norm.bias, norm.eps, False


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout that launches nothing when p == 0 (the pretraining default)."""
    return F.dropout(x, p, True) if p > 0 else x


class Rotary(nn.Module):
    """Rotary position embedding tables (cos, sin), built once for seq_len; the rotation itself
    is `regions.rotate_half`, inside the compiled attention region."""

    def __init__(self, head_dim: int, seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def tables(self, t: int, dtype: torch.dtype, offset: int = 0):
        """cos, sin (t, head_dim) for positions offset..offset+t-1, in `dtype`."""
        return (self.cos[offset:offset + t].to(dtype), self.sin[offset:offset + t].to(dtype))


class Attention(nn.Module):
    """Causal multi-head self-attention with a fused QKV projection."""

    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory, layer_idx: int):
        super().__init__()
        h, bias, tp = cfg.hidden_size, cfg.arch == "gpt", make_linear.tp_size
        if cfg.num_heads % tp:
            raise ValueError(f"model.num_heads ({cfg.num_heads}) is not divisible by the "
                             f"tensor-parallel size ({tp}): each TP rank must hold whole "
                             f"attention heads; use a parallel.tensor that divides it")
        if cfg.dropout > 0 and tp > 1:  # config validation says the same, for a config
            raise ValueError(f"model.dropout ({cfg.dropout}) must be 0 with tensor "
                             f"parallelism (TP={tp}): every TP rank would draw the same "
                             f"attention-dropout masks for its heads")
        self.num_heads = cfg.num_heads // tp  # this rank's heads
        self.head_dim = h // cfg.num_heads
        self.dropout = cfg.dropout
        self.qkv = make_linear("qkv", h, 3 * h, bias, layer_idx, chunks=3)
        self.proj = make_linear("proj", h, h, bias, layer_idx)
        self.rotary = Rotary(self.head_dim, cfg.seq_len, cfg.rope_theta) \
            if cfg.arch == "llama" else None

    def stacked_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(b, t, 3*h*d) -> (3, b, heads, t, head_dim), a view (inference rotates [:2])."""
        return stacked_heads(x, self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary.tables(x.shape[1], qkv.dtype)
        drop = self.dropout if self.training else 0.0
        # dropout_p draws from the global RNG, seeded alike on every rank: hence no dropout
        # under TP (__init__; config validation)
        y = causal_attention(qkv, self.num_heads, cos, sin, drop)
        return dropout(self.proj(y), drop)


class MLP(nn.Module):
    """GELU MLP (gpt) or SwiGLU (llama; fc1 holds [gate; up] fused in one GEMM)."""

    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory, layer_idx: int):
        super().__init__()
        h, ffn, bias = cfg.hidden_size, ffn_hidden_size(cfg), cfg.arch == "gpt"
        self.swiglu = cfg.arch == "llama"
        self.dropout = cfg.dropout
        self.fc1 = make_linear("fc1", h, 2 * ffn if self.swiglu else ffn, bias, layer_idx,
                               chunks=2 if self.swiglu else 1)
        self.fc2 = make_linear("fc2", ffn, h, bias, layer_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = mlp_activation(self.fc1(x), self.swiglu)
        return dropout(self.fc2(a), self.dropout if self.training else 0.0)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).
    With `recompute` set (`recompute.enable_activation_checkpointing`) a training forward
    keeps only its input and runs again in the backward."""

    recompute = False

    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory, layer_idx: int):
        super().__init__()
        self.norm1, self.norm2 = make_norm(cfg), make_norm(cfg)
        self.attn = Attention(cfg, make_linear, layer_idx)
        self.mlp = MLP(cfg, make_linear, layer_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and self.training and torch.is_grad_enabled():
            return checkpoint(self.forward_layers, x, use_reentrant=True)  # recompute.py
        return self.forward_layers(x)

    def forward_layers(self, x: torch.Tensor) -> torch.Tensor:
        x, h = self.norm2(x, self.attn(self.norm1(x)))  # residual add fused into the norm
        return x + self.mlp(h)
