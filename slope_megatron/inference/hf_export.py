"""Dense-equivalent Hugging Face checkpoint: gpt -> GPT2LMHeadModel, llama -> LlamaForCausalLM.

For tools that only know dense models (evaluation harnesses, serving stacks). Every linear
becomes the dense matrix it computes: W_eff = W * M (+ (A B / r)^T when its adapter is
active), so the HF model gives our logits - and none of the sparse savings. Written without
importing transformers (config.json + model.safetensors by hand), so export needs no extra
dependency; tests load the result with `AutoModelForCausalLM.from_pretrained`.

Name and layout mapping:
- gpt: GPT-2 stores linears as Conv1D with weight (in, out) = W_eff^T; our fused qkv rows
  [q; k; v] are exactly GPT-2's c_attn order; GELU(tanh) = "gelu_pytorch_tanh".
- llama: qkv rows split into q_proj/k_proj/v_proj; fc1 = [gate; up] splits into gate_proj /
  up_proj; our rotary is HF's rotate-half with the same head-dim layout, so no permutation.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from .. import __version__
from ..config import Config, ffn_hidden_size
from ..sparsity import dense_from_values
from ..io import atomic_directory
from .artifact import EXTRA, tokenizer_kind
from .tokenizer import EOS_NAMES, load_tokenizer

log = logging.getLogger(__name__)


MARKER = "slope_export.json"  # marks a directory written by export_hf (safe to replace)


def _is_hf_export(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def effective_linear(state: dict, prefix: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(dense fp32 weight (out, in) the layer computes with, bias or None)."""
    weight = state[prefix + ".weight"].float()
    if prefix + ".mask" in state:
        weight = dense_from_values(weight, state[prefix + ".mask"])
        extra = state.get(prefix + EXTRA, {})
        if extra.get("adapter_active") and prefix + ".adapter_a" in state:
            a, b = state[prefix + ".adapter_a"].float(), state[prefix + ".adapter_b"].float()
            weight = weight + (a @ b).t() / a.shape[1]  # scale 1 / rank, as SlopeLinear's
    bias = state.get(prefix + ".bias")
    return weight, None if bias is None else bias.float()


def _gpt2(config: Config, state: dict) -> tuple[dict, dict]:
    c = config.model
    t = {"transformer.wte.weight": state["embedding.tokens.weight"],
         "transformer.wpe.weight": state["embedding.positions.weight"],
         "transformer.ln_f.weight": state["head.norm.weight"],
         "transformer.ln_f.bias": state["head.norm.bias"]}
    for i in range(c.num_layers):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            t[dst + theirs + ".weight"] = state[src + ours + ".weight"]
            t[dst + theirs + ".bias"] = state[src + ours + ".bias"]
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            w, b = effective_linear(state, src + ours)
            t[dst + theirs + ".weight"] = w.t()  # Conv1D: (in, out)
            t[dst + theirs + ".bias"] = b
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
           "vocab_size": c.vocab_size, "n_positions": c.seq_len, "n_embd": c.hidden_size,
           "n_layer": c.num_layers, "n_head": c.num_heads, "n_inner": ffn_hidden_size(c),
           "activation_function": "gelu_pytorch_tanh", "resid_pdrop": 0.0, "embd_pdrop": 0.0,
           "attn_pdrop": 0.0, "layer_norm_epsilon": c.norm_eps,
           "initializer_range": c.init_std, "scale_attn_weights": True,
           "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    return t, cfg


def _llama(config: Config, state: dict) -> tuple[dict, dict]:
    c = config.model
    h, ffn = c.hidden_size, ffn_hidden_size(c)
    t = {"model.embed_tokens.weight": state["embedding.tokens.weight"],
         "model.norm.weight": state["head.norm.weight"]}
    for i in range(c.num_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        t[dst + "input_layernorm.weight"] = state[src + "norm1.weight"]
        t[dst + "post_attention_layernorm.weight"] = state[src + "norm2.weight"]
        qkv, _ = effective_linear(state, src + "attn.qkv")
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            t[dst + f"self_attn.{name}.weight"] = qkv[j * h:(j + 1) * h]
        t[dst + "self_attn.o_proj.weight"] = effective_linear(state, src + "attn.proj")[0]
        fc1, _ = effective_linear(state, src + "mlp.fc1")
        t[dst + "mlp.gate_proj.weight"], t[dst + "mlp.up_proj.weight"] = fc1[:ffn], fc1[ffn:]
        t[dst + "mlp.down_proj.weight"] = effective_linear(state, src + "mlp.fc2")[0]
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "vocab_size": c.vocab_size, "hidden_size": h, "intermediate_size": ffn,
           "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
           "num_key_value_heads": c.num_heads, "head_dim": h // c.num_heads,
           "hidden_act": "silu", "max_position_embeddings": c.seq_len,
           "rms_norm_eps": c.norm_eps, "initializer_range": c.init_std,
           "rope_parameters": rope, "rope_theta": c.rope_theta,  # new and old transformers
           "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0}
    return t, cfg


def _eos_name(tokenizer_file: Path) -> Optional[str]:
    """The end-of-text token's name in a tokenizers JSON file, if it has a usual one."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_file))
    return next((n for n in EOS_NAMES if tok.token_to_id(n) is not None), None)


def _write_tokenizer(tokenizer: Path, out: Path, seq_len: int) -> None:
    """Tokenizer files transformers' AutoTokenizer reads, for the kinds that have them."""
    kind = tokenizer_kind(tokenizer)
    if kind == "bpe":
        shutil.copyfile(tokenizer, out / "tokenizer.json")
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": seq_len}
        if (eos := _eos_name(tokenizer)) is not None:
            cfg.update({"eos_token": eos, "bos_token": eos})
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    elif kind == "hf":  # already a save_pretrained directory
        for f in tokenizer.iterdir():
            if f.is_file() and f.name not in ("config.json", "model.safetensors"):
                shutil.copyfile(f, out / f.name)
    else:
        log.warning("no Hugging Face tokenizer files written: a %s tokenizer has no "
                    "transformers form here; load it with tiktoken", kind)


def export_hf(config: Config, state: dict, out_dir: Path, tokenizer_file: Optional[Path] = None,
              dtype: Optional[torch.dtype] = None) -> Path:
    """Write a transformers checkpoint (config.json, model.safetensors, tokenizer) to out_dir."""
    c = config.model
    if c.arch not in ("gpt", "llama"):
        raise ValueError(f"no Hugging Face mapping for model.arch={c.arch!r}")
    tensors, hf_cfg = (_gpt2 if c.arch == "gpt" else _llama)(config, state)
    if not c.tie_embeddings:
        tensors["lm_head.weight"] = effective_linear(state, "head.lm_head")[0]
    if dtype is None:
        dtype = state["embedding.tokens.weight"].dtype
    tensors = {k: v.detach().to(dtype).contiguous().clone() for k, v in tensors.items()}
    eos_id = None if tokenizer_file is None else load_tokenizer(tokenizer_file).eos_id
    hf_cfg.update({"tie_word_embeddings": c.tie_embeddings, "bos_token_id": eos_id,
                   "eos_token_id": eos_id, "pad_token_id": None, "use_cache": True,
                   "dtype": str(dtype).replace("torch.", "")})
    with atomic_directory(Path(out_dir), _is_hf_export, "Hugging Face export") as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        (tmp / MARKER).write_text(json.dumps({"producer": f"slope_megatron {__version__}",
                                              "arch": c.arch, "merged_adapters": True}))
        if tokenizer_file is not None:
            _write_tokenizer(Path(tokenizer_file), tmp, c.seq_len)
    return Path(out_dir)
