"""Read a local Hugging Face checkpoint (GPT-2 or LLaMA, safetensors) as this project's model:
the model.* settings it implies, and its weights as the TP = 1 dense state dict of GPTModel.

The inverse of hf_export.py's mapping, so a checkpoint exported from here comes back the same:
- gpt2 -> model.arch gpt: Conv1D weights are (in, out) and are transposed; c_attn's [q; k; v]
  rows are our fused qkv's; GPT-2's GELU ("gelu_new", the tanh approximation) is ours.
- llama -> model.arch llama: q/k/v_proj stack into qkv, gate/up_proj into fc1 = [gate; up];
  HF's rotate-half rotary layout is ours, so no permutation.
OPT is not imported: its MLP is ReLU (model.arch gpt is GELU) and its learned positions are
offset by 2, so it does not map onto model.arch gpt exactly. Grouped-query attention
(num_key_value_heads < num_attention_heads), RoPE scaling and biased LLaMA projections have no
counterpart here either; such a checkpoint is refused with the setting named.

The linears come out dense (out, in); training/init_from.py chooses each sparse layer's N:M
mask from them by magnitude and keeps the values it selects.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import ModelConfig, ffn_hidden_size

GPT2_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # tanh GELU, as regions.py's


class HFImportError(ValueError):
    """A checkpoint that cannot be read as one of our models (the message says why)."""


@dataclass
class HFCheckpoint:
    """What a checkpoint directory holds: its kind, the model.* values it implies (with the
    HF config key each comes from) and its vocabulary size."""
    path: Path
    kind: str                 # "gpt2" | "llama"
    implied: dict             # model.<key> -> (value, the HF config key it comes from)
    vocab_size: int
    max_positions: int | None  # learned position rows (gpt2), None for rotary


def _rope_theta(c: dict) -> float:
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in (None, "default"):
        raise HFImportError(f"RoPE scaling '{rope_type}' is not supported (rotary here is the "
                            f"default kind)")
    return float(params.get("rope_theta", c.get("rope_theta", 10000.0)))


def _gpt2(c: dict) -> dict:
    act = c.get("activation_function", "gelu_new")
    if act not in GPT2_GELUS:
        raise HFImportError(f"activation_function '{act}' is not the tanh GELU of model.arch "
                            f"gpt ({', '.join(GPT2_GELUS)})")
    if not c.get("scale_attn_weights", True) or c.get("scale_attn_by_inverse_layer_idx"):
        raise HFImportError("attention scaling other than 1/sqrt(head_dim) (scale_attn_weights"
                            " / scale_attn_by_inverse_layer_idx) is not supported")
    h = int(c["n_embd"])
    return {"arch": ("gpt", "model_type"), "hidden_size": (h, "n_embd"),
            "num_layers": (int(c["n_layer"]), "n_layer"),
            "num_heads": (int(c["n_head"]), "n_head"),
            "ffn_hidden_size": (int(c.get("n_inner") or 4 * h), "n_inner"),
            "norm_eps": (float(c.get("layer_norm_epsilon", 1e-5)), "layer_norm_epsilon"),
            "tie_embeddings": (bool(c.get("tie_word_embeddings", True)), "tie_word_embeddings")}


def _llama(c: dict) -> dict:
    h, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    for key, want in (("num_key_value_heads", heads), ("head_dim", h // heads),
                      ("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if c.get(key) is not None and c[key] != want:
            raise HFImportError(f"{key} = {c[key]!r} is not supported (model.arch llama "
                                f"needs {want!r})")
    return {"arch": ("llama", "model_type"), "hidden_size": (h, "hidden_size"),
            "num_layers": (int(c["num_hidden_layers"]), "num_hidden_layers"),
            "num_heads": (heads, "num_attention_heads"),
            "ffn_hidden_size": (int(c["intermediate_size"]), "intermediate_size"),
            "norm_eps": (float(c.get("rms_norm_eps", 1e-6)), "rms_norm_eps"),
            "rope_theta": (_rope_theta(c), "rope_theta"),
            "tie_embeddings": (bool(c.get("tie_word_embeddings", False)),
                               "tie_word_embeddings")}


def read_hf_checkpoint(path: Path) -> HFCheckpoint:
    """Read `path`/config.json (nothing else): which of our models the checkpoint is."""
    path = Path(path)
    try:
        c = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise HFImportError(f"'{path}' is not a Hugging Face checkpoint directory: its "
                            f"config.json cannot be read ({e})") from None
    kind = c.get("model_type")
    if kind == "opt":
        raise HFImportError(f"'{path}' is an OPT model, which does not map onto model.arch gpt "
                            f"exactly (ReLU MLP, learned positions offset by 2); GPT-2 and "
                            f"LLaMA checkpoints are supported")
    if kind not in ("gpt2", "llama"):
        raise HFImportError(f"'{path}' is a '{kind}' model; GPT-2 (model_type gpt2) and LLaMA "
                            f"(model_type llama) checkpoints are supported")
    try:
        implied = _gpt2(c) if kind == "gpt2" else _llama(c)
    except HFImportError as e:
        raise HFImportError(f"'{path}' ({kind}): {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise HFImportError(f"'{path}/config.json' lacks or mangles a {kind} setting ({e})") \
            from None
    return HFCheckpoint(path, kind, implied, int(c["vocab_size"]),
                        int(c.get("n_positions", 1024)) if kind == "gpt2" else None)


def mismatches(ckpt: HFCheckpoint, model: ModelConfig) -> list[str]:
    """One line per model.* setting that disagrees with the checkpoint (empty: it fits)."""
    out = []
    for key, (value, theirs) in ckpt.implied.items():
        ours = ffn_hidden_size(model) if key == "ffn_hidden_size" else getattr(model, key)
        if ours != value:
            out.append(f"model.{key} is {ours!r}, the checkpoint's is {value!r} ({theirs})")
    if ckpt.max_positions is not None and model.seq_len > ckpt.max_positions:
        out.append(f"model.seq_len is {model.seq_len}, more than the checkpoint's "
                   f"{ckpt.max_positions} learned positions (n_positions)")
    if model.vocab_size is not None and model.vocab_size < ckpt.vocab_size:
        out.append(f"model.vocab_size is {model.vocab_size}, less than the checkpoint's "
                   f"{ckpt.vocab_size} (vocab_size)")
    return out


def _tensors(path: Path) -> dict:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out = {}
        for name in files:
            out.update(load_file(str(path / name)))
        return out
    if not (path / "model.safetensors").is_file():
        raise HFImportError(f"'{path}' holds no model.safetensors (nor a sharded index); only "
                            f"safetensors checkpoints are read")
    return load_file(str(path / "model.safetensors"))


def _take(t: dict, key: str) -> torch.Tensor:
    if key not in t:
        raise HFImportError(f"the checkpoint has no tensor '{key}'")
    return t[key].float()


def _gpt2_state(t: dict, c: ModelConfig) -> dict:
    t = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in t.items()}
    out = {"embedding.tokens.weight": _take(t, "wte.weight"),
           "embedding.positions.weight": _take(t, "wpe.weight")[:c.seq_len],
           "head.norm.weight": _take(t, "ln_f.weight"), "head.norm.bias": _take(t, "ln_f.bias")}
    for i in range(c.num_layers):
        src, dst = f"h.{i}.", f"blocks.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            for p in ("weight", "bias"):
                out[f"{dst}{ours}.{p}"] = _take(t, f"{src}{theirs}.{p}")
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[f"{dst}{ours}.weight"] = _take(t, f"{src}{theirs}.weight").t().contiguous()
            out[f"{dst}{ours}.bias"] = _take(t, f"{src}{theirs}.bias")
    if not c.tie_embeddings:
        out["head.lm_head.weight"] = _take(t, "lm_head.weight")
    return out


def _llama_state(t: dict, c: ModelConfig) -> dict:
    out = {"embedding.tokens.weight": _take(t, "model.embed_tokens.weight"),
           "head.norm.weight": _take(t, "model.norm.weight")}
    for i in range(c.num_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        out[dst + "norm1.weight"] = _take(t, src + "input_layernorm.weight")
        out[dst + "norm2.weight"] = _take(t, src + "post_attention_layernorm.weight")
        out[dst + "attn.qkv.weight"] = torch.cat(
            [_take(t, f"{src}self_attn.{p}_proj.weight") for p in "qkv"])
        out[dst + "attn.proj.weight"] = _take(t, src + "self_attn.o_proj.weight")
        out[dst + "mlp.fc1.weight"] = torch.cat(
            [_take(t, f"{src}mlp.{p}_proj.weight") for p in ("gate", "up")])
        out[dst + "mlp.fc2.weight"] = _take(t, src + "mlp.down_proj.weight")
    if not c.tie_embeddings:
        out["head.lm_head.weight"] = _take(t, "lm_head.weight")
    return out


def dense_state_dict(ckpt: HFCheckpoint, model: ModelConfig) -> dict:
    """The checkpoint's weights under GPTModel's TP = 1 keys, fp32, every linear dense
    (out, in); the vocabulary rows are the checkpoint's (model.vocab_size may have more).
    `model` must fit the checkpoint (`mismatches` empty)."""
    tensors = _tensors(ckpt.path)
    return (_gpt2_state if ckpt.kind == "gpt2" else _llama_state)(tensors, model)
