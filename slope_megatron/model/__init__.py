"""The transformer: GPT-2/OPT-style and LLaMA-style decoders sharing one code path."""
from .blocks import MLP, Attention, Block, Rotary, make_norm
from .linear_factory import LinearFactory
from .transformer import Embedding, GPTModel, Head, dense_flops_per_token, lm_loss

__all__ = ["GPTModel", "Block", "Attention", "MLP", "Rotary", "Embedding", "Head",
           "LinearFactory", "lm_loss", "make_norm", "dense_flops_per_token"]
