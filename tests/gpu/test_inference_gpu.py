"""Compressed 2:4 inference on cuSPARSELt vs the reference kernels (run on a CUDA machine)."""

import pytest
import torch
from helpers.inference import CASES, saved, tiny
from helpers.launch import load_launch

from slope_megatron.inference import (InferenceModel, SamplingConfig, generate, load_artifact,
                                      save_artifact)
from slope_megatron.inference.compressed import unavailable_reason
from slope_megatron.sparsity import slope_layers

pytestmark = pytest.mark.gpu
WIDE = ("model.hidden_size=64", "model.num_heads=4")  # feature sizes cuSPARSELt takes


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(autouse=True)
def _kernels():
    reason = unavailable_reason(torch.device("cuda"), torch.bfloat16)
    if reason is not None:
        pytest.fail(f"cuSPARSELt inference unavailable on this GPU machine: {reason}")


def pair(arch, adapters):
    cfg, model = tiny(arch, adapters, *WIDE)
    state = model.state_dict()
    fast = InferenceModel(cfg, state, dtype="bf16", device="cuda", kernels="cusparselt")
    ref = InferenceModel(cfg, state, dtype="bf16", device="cuda", kernels="reference")
    return cfg, model, fast, ref


@pytest.mark.parametrize("arch,adapters", CASES)
def test_compressed_logits_match_reference(arch, adapters):
    _, model, fast, ref = pair(arch, adapters)
    n = len(list(slope_layers(model)))
    assert fast.kernels == "cusparselt" and fast.kernels_note.startswith(f"{n} of {n} ")
    ids = torch.randint(0, fast.vocab_size, (3, 16), device="cuda")
    with ref.generation_scope():
        want = ref.full_logits(ids)
    assert rel(fast.full_logits(ids), want) < 1e-2
    # KV-cached: a 5-token prefill (padded to 16 tokens inside), then one token at a time
    cache = fast.new_cache(3, 16)
    pos = torch.arange(16, device="cuda").expand(3, -1)
    steps = [fast(ids[:, :5], pos[:, :5], cache)]
    steps += [fast(ids[:, i:i + 1], pos[:, i:i + 1], cache) for i in range(5, 16)]
    assert rel(torch.cat(steps, dim=1), want) < 2e-2


@pytest.mark.parametrize("adapters", ["active", "inactive"])
def test_compressed_model_holds_only_compressed_weights(adapters):
    _, model, fast, ref = pair("llama", adapters)
    got = fast.weight_bytes()
    layers = list(slope_layers(fast.model))
    dense_bf16 = sum(2 * l.out_features * l.in_features for l in layers)
    assert got["masks"] == 0  # the 2:4 pattern lives in the cuSPARSELt metadata
    assert 0.5 * dense_bf16 < got["sparse_values"] <= 0.6 * dense_bf16
    assert all(l.weight.untyped_storage().data_ptr()
               == l.__dict__["_compressed"].buf.untyped_storage().data_ptr() for l in layers)
    if adapters == "inactive":
        assert got["adapters"] == 0  # never used at inference: dropped
    else:
        r = layers[0].adapter_rank
        assert got["adapters"] >= sum(2 * r * (l.in_features + l.out_features) for l in layers)
    want = ref.weight_bytes()
    # cuSPARSELt's values + metadata (9/16 of the dense bf16 bytes) hold no more than the
    # reference's kept values + bit-packed masks (also 9/16)
    assert got["sparse_values"] <= want["sparse_values"] + want["masks"]


def test_generation_on_compressed_weights_batches_and_repeats():
    _, _, fast, _ = pair("gpt", "active")
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [4]]
    first = generate(fast, prompts, 6)
    assert [len(r.tokens) for r in first] == [6, 6, 6]
    assert [r.tokens for r in generate(fast, prompts, 6)] == [r.tokens for r in first]
    [alone] = generate(fast, [prompts[1]], 6)  # batch of 1: another padded token count
    assert len(alone.tokens) == 6


def test_generate_cli_runs_each_kernel_and_decoding_loop(tmp_path, tokenizer_file, capsys):
    cfg, model = tiny("gpt", "active", *WIDE)
    path = save_artifact(model.state_dict(), cfg, tokenizer_file, tmp_path / "art")
    cli = load_launch("generate")
    assert cli.main(["--checkpoint", str(path), "--prompt", "the cat", "--max-new-tokens", "5",
                     "--device", "cuda"]) == 0  # bf16, decode24 and graphs by default on a GPU
    err = capsys.readouterr().err
    assert "sparse kernels: decode24" in err and "decoding: static" in err, err
    assert cli.main(["--checkpoint", str(path), "--prompt", "the cat", "--max-new-tokens", "5",
                     "--device", "cuda", "--kernels", "cusparselt", "--decode", "eager"]) == 0
    err = capsys.readouterr().err
    assert "sparse kernels: cusparselt" in err and "decoding: eager" in err, err
    assert cli.main(["--checkpoint", str(path), "--prompt", "the", "--device", "cuda",
                     "--dtype", "fp32", "--kernels", "cusparselt"]) == 2  # fp32 cannot
    assert "kernels='cusparselt' cannot run here: dtype torch.float32" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_cuda_generation_matches_cpu(tmp_path, arch):
    _, _, path = saved(tmp_path, arch)
    config, state, _ = load_artifact(path)
    prompts = [[1, 2, 3, 4, 5], [9, 8]]
    cpu = generate(InferenceModel(config, state), prompts, 8)
    gpu_model = InferenceModel(config, state, device="cuda")
    assert [r.tokens for r in generate(gpu_model, prompts, 8)] == [r.tokens for r in cpu]
    hot = SamplingConfig(temperature=1.0, top_p=0.9, seed=3)
    assert [r.tokens for r in generate(gpu_model, prompts, 8, hot)] == \
        [r.tokens for r in generate(gpu_model, prompts, 8, hot)]
    [r] = generate(InferenceModel(config, state, dtype="bf16", device="cuda"), [[1, 2]], 6)
    assert len(r.tokens) == 6
