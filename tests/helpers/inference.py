"""Shared pieces of the inference tests: tiny random models, saved artifacts, a tokenizer."""

import torch

from slope_megatron.config import load_config
from slope_megatron.inference import save_artifact
from slope_megatron.model import GPTModel
from slope_megatron.sparsity import enable_adapters, slope_layers

VOCAB, SEQ = 96, 16


def tiny(arch="gpt", adapters="active", *overrides):
    """A tiny random model with adapters 'active' / 'inactive' (both with non-zero B)."""
    cfg = load_config(None, [f"model.arch={arch}", f"model.vocab_size={VOCAB}",
                             "model.hidden_size=32", "model.num_heads=4", "model.num_layers=2",
                             f"model.seq_len={SEQ}", "model.init_std=0.3",
                             "model.rope_theta=500.0", *overrides])
    model = GPTModel.from_config(cfg).eval()
    for layer in slope_layers(model):
        torch.nn.init.normal_(layer.adapter_b, 0.0, 0.2)  # B = 0 would hide adapter bugs
    if adapters == "active":
        enable_adapters(model)
    return cfg, model


def saved(tmp_path, arch="gpt", adapters="active", *overrides, tokenizer=None):
    cfg, model = tiny(arch, adapters, *overrides)
    path = save_artifact(model.state_dict(), cfg, tokenizer, tmp_path / "art")
    return cfg, model, path


CASES = [(a, ad) for a in ("gpt", "llama") for ad in ("active", "inactive")]


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def left_padded(prompts):
    """(ids, valid, positions) of `prompts` left-padded into one batch, as generate() lays
    them out: pads are token 0 and invalid, each sequence's positions count its real tokens."""
    b, longest = len(prompts), max(map(len, prompts))
    ids = torch.zeros(b, longest, dtype=torch.long)
    valid = torch.zeros(b, longest, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        valid[i, longest - len(p):] = True
    return ids, valid, (valid.long().cumsum(1) - 1).clamp(min=0)


def assert_teacher_forced_logits_match(reference, other, prompts, steps, rtol=1e-5, atol=1e-5):
    """Prefill two decoders (`_EagerSteps` / `StaticDecoder`: prefill + advance) with the
    left-padded `prompts`, then feed both `reference`'s greedy tokens for `steps` steps, the
    second sequence finishing half-way (its slot masked, its position frozen); their logits
    must agree at every step."""
    ids, valid, positions = left_padded(prompts)
    want = reference.prefill(ids, valid, positions, True)
    got = other.prefill(ids, valid, positions, True)
    for step in range(steps):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        chosen = want.argmax(-1)
        running = [i != 1 or step < steps // 2 for i in range(len(prompts))]
        want = reference.advance(chosen, running).clone()
        got = other.advance(chosen, running).clone()
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
