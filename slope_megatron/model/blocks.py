"""Transformer block pieces: norms, rotary embedding, causal self-attention, MLPs.

GPT-2/OPT style: LayerNorm, GELU MLP, biases. LLaMA style: RMSNorm, SwiGLU MLP, rotary
positions, no biases. Attention is PyTorch's fused `scaled_dot_product_attention`.
Every linear comes from a LinearFactory, so the block does not know whether it is sparse.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, ffn_hidden_size
from .linear_factory import LinearFactory


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "llama":
        return nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half form), tables built once for seq_len."""

    def __init__(self, head_dim: int, seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x: (batch, heads, T, head_dim)."""
        t = x.shape[-2]
        cos = self.cos[offset:offset + t].to(x.dtype)
        sin = self.sin[offset:offset + t].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


class Attention(nn.Module):
    """Causal multi-head self-attention with a fused QKV projection."""

    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory, layer_idx: int):
        super().__init__()
        h, bias = cfg.hidden_size, cfg.arch == "gpt"
        self.num_heads = cfg.num_heads // make_linear.tp_size  # this rank's heads
        self.head_dim = h // cfg.num_heads
        self.dropout = cfg.dropout
        self.qkv = make_linear("qkv", h, 3 * h, bias, layer_idx, chunks=3)
        self.proj = make_linear("proj", h, h, bias, layer_idx)
        self.rotary = Rotary(self.head_dim, cfg.seq_len, cfg.rope_theta) \
            if cfg.arch == "llama" else None

    def split_heads(self, x: torch.Tensor):
        b, t, _ = x.shape
        q, k, v = x.view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.split_heads(self.qkv(x))
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        y = y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return F.dropout(self.proj(y), drop, self.training)


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
        a = self.fc1(x)
        if self.swiglu:
            gate, up = a.chunk(2, dim=-1)
            a = F.silu(gate) * up
        else:
            a = F.gelu(a, approximate="tanh")
        return F.dropout(self.fc2(a), self.dropout, self.training)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory, layer_idx: int):
        super().__init__()
        self.norm1, self.norm2 = make_norm(cfg), make_norm(cfg)
        self.attn = Attention(cfg, make_linear, layer_idx)
        self.mlp = MLP(cfg, make_linear, layer_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
