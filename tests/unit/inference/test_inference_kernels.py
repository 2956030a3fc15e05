"""Choosing the inference kernels (CPU side): token buckets, clear errors, the bench's
per-block arithmetic. The compressed cuSPARSELt path itself is tested in
tests/gpu/test_inference_gpu.py."""

import pytest
from helpers.inference import tiny
from helpers.launch import load_benchmark

from slope_megatron.inference import InferenceModel
from slope_megatron.inference.compressed import token_bucket


def test_token_bucket_is_a_padded_multiple_of_16_with_bounded_waste():
    seen = set()
    for t in range(1, 20000):
        b = token_bucket(t)
        assert b % 16 == 0 and b >= t
        assert b <= max(16, t + 15, t * 1.125), (t, b)  # multiple of 16, <= 12.5% over
        seen.add(b)
    assert len(seen) < 200  # few distinct plans, not one per prompt length
    assert token_bucket(1) == token_bucket(8) == 16 and token_bucket(64) == 64


def test_cpu_picks_reference_kernels_and_says_why():
    cfg, model = tiny("gpt")
    inf = InferenceModel(cfg, model.state_dict())
    assert inf.kernels == "reference" and "not a CUDA device" in inf.kernels_note
    with pytest.raises(ValueError, match="kernels='cusparselt' cannot run here: device cpu"):
        InferenceModel(cfg, model.state_dict(), kernels="cusparselt")
    with pytest.raises(ValueError, match="unknown kernels 'fast'"):
        InferenceModel(cfg, model.state_dict(), kernels="fast")


def test_dense_model_needs_no_sparse_kernels():
    cfg, model = tiny("llama", "inactive", "sparsity.enabled=false")
    inf = InferenceModel(cfg, model.state_dict())
    assert (inf.kernels, inf.kernels_note) == ("reference", "no sparse layers")


def test_bench_inference_per_block_and_whole_model_arithmetic(capsys):
    bench = load_benchmark("bench_inference")
    # 1 block: 3 ms (embedding + head + first block), 5 blocks: 11 ms -> 2 ms per block
    m = {"all": {"bytes": 900, "prefill": {512: 11.0}, "decode": {8: 5.0}},
         "one": {"bytes": 300, "prefill": {512: 3.0}, "decode": {8: 2.0}}}
    d = bench.derive(m, layers=5, num_layers=32)
    assert d["block_bytes"] == 150 and d["model_bytes"] == 300 + 31 * 150
    assert d["prefill"][512] == {"block_ms": 2.0, "model_ms": 3.0 + 31 * 2.0}
    assert d["decode"][8]["block_ms"] == 0.75
    assert load_benchmark("bench").main(["inference", "blocks", "--layers", "1"]) == 2
    assert "--layers must be at least 2" in capsys.readouterr().err
