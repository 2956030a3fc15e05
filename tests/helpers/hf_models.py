"""Tiny random Hugging Face checkpoints made with transformers and saved locally (safetensors
and a tokenizer), for the import tests; and the config of our model that fits each."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB, HIDDEN, HEADS, LAYERS, POSITIONS = 96, 32, 4, 2, 32
FFN = {"gpt2": 4 * HIDDEN, "llama": 64}


def save_tokenizer(tokenizer_file: Path, out: Path) -> None:
    """tokenizers' JSON as the files transformers' AutoTokenizer reads (with an EOS)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token="<|endoftext|>")
    tok.save_pretrained(str(out))


def tiny_hf(kind: str, out: Path, tokenizer_file: Path, seed: int = 0, **config):
    """A random GPT-2 or LLaMA of the sizes above, saved to `out`; returns the model (eval)."""
    import transformers

    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS,
                                      n_head=HEADS, n_positions=POSITIONS, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, **config)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN,
                                       num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                       intermediate_size=FFN[kind],
                                       max_position_embeddings=POSITIONS, rms_norm_eps=1e-5,
                                       **config)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # biases and norms away from their 0 / 1 init: mapping bugs show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(tokenizer_file, out)
    return model.eval()


def fitting_overrides(kind: str, path: Path) -> list[str]:
    """--set overrides of a config whose model fits the checkpoint at `path`."""
    arch = "gpt" if kind == "gpt2" else "llama"
    tied = "true" if kind == "gpt2" else "false"
    return [f"model.arch={arch}", f"model.hidden_size={HIDDEN}", f"model.num_heads={HEADS}",
            f"model.num_layers={LAYERS}", f"model.ffn_hidden_size={FFN[kind]}",
            f"model.tie_embeddings={tied}", "model.seq_len=16", f"train.init_from={path}"]
