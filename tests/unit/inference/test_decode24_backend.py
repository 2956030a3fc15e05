"""`InferenceModel(kernels="decode24")`: the decode kernel wired into inference. In Triton's
CPU interpreter, both archs (adapters on and off) give the reference kernels' logits for calls
of 1 to 64 tokens (the kernel) and longer ones (the W*M fallback), and the same generated
tokens, eager and static. The plan table's choice is tested with given timings (the real
timings need a GPU: tests/gpu/test_decode_gpu.py)."""
import math

import pytest
from helpers.inference import tiny
from helpers.interpreter import run_interpreted

from slope_megatron.inference import InferenceModel
from slope_megatron.inference.decode24_plans import (
    CUDA_CORE_MODES,
    TIMED_BUCKETS,
    TOKEN_BUCKETS,
    Decode24Plans,
    candidate_configs,
    measure_plans,
    plan_mode,
)


def test_decode24_model_matches_the_reference_kernels_in_interpreter():
    pytest.importorskip("triton")
    run_interpreted(r'''
import sys
sys.path.insert(0, "tests")
import torch
from helpers.inference import CASES, VOCAB, tiny
import slope_megatron.kernels.decode24_triton as kt
from slope_megatron.inference import InferenceModel, generate
from slope_megatron.inference.decode24 import Decode24Backend
from slope_megatron.sparsity import slope_layers
calls = [0]
real = kt.decode24_linear
def counting(*a, **k):
    calls[0] += 1
    return real(*a, **k)
kt.decode24_linear = counting
prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [40, 50, 60]]
for arch, adapters in CASES:
    cfg, model = tiny(arch, adapters)
    ref = InferenceModel(cfg, model.state_dict(), kernels="reference")
    dec = InferenceModel(cfg, model.state_dict(), kernels="decode24")
    assert dec.kernels == "decode24" and dec.kernels_note.startswith("7 of 7"), dec.kernels_note
    for layer in slope_layers(dec.model):
        assert isinstance(layer.backend, Decode24Backend) and layer.mask_bits.numel() == 0
    for b, t in ((1, 1), (3, 1), (2, 12), (4, 16), (5, 16)):  # 80 tokens: the fallback
        ids = torch.randint(0, VOCAB, (b, t))
        with ref.generation_scope():
            want = ref.full_logits(ids)
        before = calls[0]
        got = dec.full_logits(ids)
        assert (calls[0] > before) == (b * t <= 64), (b, t)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want = [r.tokens for r in generate(ref, prompts, 6)]
    assert [r.tokens for r in generate(dec, prompts, 6)] == want
    assert [r.tokens for r in generate(dec, prompts, 6, decode="static")] == want
print("ok")
''')


def test_decode24_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg, model = tiny("gpt")
    with pytest.raises(ValueError, match="kernels='decode24' cannot run here: device cpu"):
        InferenceModel(cfg, model.state_dict(), kernels="decode24")


def test_plans_keep_the_kernel_only_where_it_measured_faster():
    """Given timings: the kernel's best config wins where it beats the fallback (small token
    counts of the big layer here), the fallback everywhere else; a config that cannot run
    (inf) is never chosen."""
    def time_decode(out, inp, tokens, cfg):
        if cfg.split_k == 1 and out == 4096:
            return math.inf
        return tokens * (1.0 if out == 4096 else 5.0) + cfg.block_n / 1000

    def time_fallback(out, inp, tokens):
        return 16.0

    plans = measure_plans([(4096, 4096), (64, 64), (4096, 4096)], time_decode, time_fallback,
                          buckets=TOKEN_BUCKETS)
    big = {t: plans.table.get((4096, 4096, t)) for t in TOKEN_BUCKETS}
    assert {t for t, c in big.items() if c} == {1, 2, 4, 8}
    assert all(c.split_k > 1 and c.block_n == min(x.block_n for x in
               candidate_configs(t, 4096, 4096)) for t, c in big.items() if c)
    assert {k[2] for k in plans.table if k[0] == 64} == {1, 2}
    assert plans.choose(4096, 4096, 3) is big[4]  # 3 tokens: the bucket of 4
    assert plans.choose(4096, 4096, 9) is None    # 16 tokens lost: the fallback
    assert plans.choose(1024, 1024, 1) is None    # a shape never timed
    assert not plans.always and "measured faster" in plans.describe()
    timed = []
    measure_plans([(4096, 4096)], lambda *a: timed.append(a[2]) or 1.0, time_fallback)
    assert set(timed) == set(TIMED_BUCKETS) == {1, 2, 4, 8}  # by default: what can win, only


def test_plan_always_runs_the_kernel_up_to_64_tokens(monkeypatch):
    always = Decode24Plans(always=True)
    assert all(always.choose(96, 32, t) is not None for t in range(1, 65))
    assert always.choose(96, 32, 65) is None and always.choose(96, 32, 0) is None
    monkeypatch.setenv("SLOPE_DECODE24_PLAN", "sometimes")
    with pytest.raises(ValueError, match="SLOPE_DECODE24_PLAN"):
        plan_mode()
    monkeypatch.setenv("SLOPE_DECODE24_PLAN", "always")
    assert plan_mode() == "always"


def test_candidate_configs_are_distinct_and_cover_the_tokens():
    for tokens in TOKEN_BUCKETS:
        configs = candidate_configs(tokens, 4096, 11008)
        assert len(configs) == len(set(configs)) >= 4
        assert all(c.block_m == (max(16, tokens) if c.use_dot else tokens) for c in configs)
        # the CUDA-core modes are timed pipelined and not (their loop is only pipelined if asked)
        for mode in {c.mode for c in configs} & set(CUDA_CORE_MODES):
            assert {c.num_stages for c in configs if c.mode == mode} == {1, 3}
        assert all(c.num_stages == 3 for c in configs if c.use_dot)


def test_a_tuned_config_file_replaces_the_built_in_candidates(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from benchmarks.bench_decode_gemm import save_configs
    from slope_megatron.kernels.decode24_config import Decode24Config, default_config
    tuned = [Decode24Config(1, 128, 256, 8, "gather", 8), Decode24Config(16, 32, 128, 4, "dotT")]
    rows = [{"tokens": 1, "config": tuned[0].__dict__, "runner_up": None},
            {"tokens": 12, "config": tuned[1].__dict__, "runner_up": tuned[1].__dict__}]
    path = tmp_path / "tuned.json"
    save_configs({"meta": {"gpu": "a GPU", "triton": "3"}, "rows": rows}, str(path))
    monkeypatch.setenv("SLOPE_DECODE24_CONFIGS", str(path))
    assert candidate_configs(1, 4096, 4096) == [default_config(1, 4096, 4096), tuned[0]]
    assert candidate_configs(16, 4096, 4096) == [default_config(16, 4096, 4096), tuned[1]]
    assert candidate_configs(4, 4096, 4096) == [default_config(4, 4096, 4096)]  # none listed
    path.write_text("{not json")
    with pytest.raises(ValueError, match="SLOPE_DECODE24_CONFIGS=.*tuned.json"):
        candidate_configs(1, 4096, 4096)


def test_layers_of_a_shape_the_kernel_never_won_drop_its_metadata():
    from types import SimpleNamespace

    from slope_megatron.inference.decode24 import drop_unused_meta
    layers = [SimpleNamespace(out_features=o, in_features=i) for o, i in
              ((96, 32), (64, 32), (96, 32))]
    for layer in layers:
        layer.__dict__["_decode24"] = object()
    plans = Decode24Plans({(96, 32, 1): candidate_configs(1, 96, 32)[0]})
    assert drop_unused_meta(layers, plans) == 1
    assert ["_decode24" in vars(layer) for layer in layers] == [True, False, True]


def test_the_kernels_note_counts_each_layer_once():
    from slope_megatron.inference.decode24 import kernels_note
    plan = Decode24Plans({(96, 32, 1): candidate_configs(1, 96, 32)[0]}).describe()
    note = kernels_note(127, 127, 32, plan, 0, 95)
    assert note == ("95 of 127 sparse linears on the decode kernel (where it measured faster: "
                    "1 (shape, tokens) cases; cuSPARSELt's metadata read in place), with "
                    "cuSPARSELt for other calls; 32 of 127 on cuSPARSELt only (the kernel won "
                    "no call of their shape)")
    assert "read in place in 90, a copy in the kernel's layout in 5" in kernels_note(
        127, 127, 32, plan, 0, 90)
    assert "; a copy of the metadata in the kernel's layout)" in kernels_note(
        127, 127, 32, plan, 0, 0)
    mixed = kernels_note(10, 6, 6, plan, 3)
    assert "on the decode kernel (" not in mixed  # every hybrid layer was dropped
    assert mixed.startswith("6 of 10 on cuSPARSELt only") and "1 of 10 on the reference" in mixed
    assert kernels_note(7, 0, 0, "", 7).startswith("7 of 7 sparse linears on the decode kernel")


def test_auto_kernels_take_decode24_only_where_cusparselt_and_triton_both_run(monkeypatch):
    import slope_megatron.inference.compressed as compressed
    import slope_megatron.inference.decode24 as decode24
    cfg, model = tiny("gpt")
    installed = []
    monkeypatch.setattr(decode24, "install", lambda *a: installed.append(a) or "stub note")
    monkeypatch.setattr(compressed, "unavailable_reason", lambda device, dtype: None)
    monkeypatch.setattr(decode24, "unavailable_reason", lambda device: None)
    inf = InferenceModel(cfg, model.state_dict())
    assert (inf.kernels, inf.kernels_note, len(installed)) == ("decode24", "stub note", 1)
    monkeypatch.setattr(decode24, "unavailable_reason", lambda device: "triton is not installed")
    monkeypatch.setattr(compressed, "CompressedBackend", object)
    monkeypatch.setattr(compressed, "compress_model", lambda model, backend: (7, []))
    inf = InferenceModel(cfg, model.state_dict())
    assert inf.kernels == "cusparselt" and len(installed) == 1
    assert inf.kernels_note == ("7 of 7 sparse linears compressed for cuSPARSELt "
                                "(no decode kernel: triton is not installed)")
    monkeypatch.setattr(compressed, "unavailable_reason", lambda device, dtype: "no GPU")
    inf = InferenceModel(cfg, model.state_dict())
    assert (inf.kernels, inf.kernels_note) == ("reference", "cusparselt unavailable: no GPU")


def test_the_load_time_plan_never_chooses_a_config_that_computes_something_else(monkeypatch):
    """measure_on_gpu with the timer and the kernel stubbed (the real ones need a GPU): the
    kernel always times faster than the fallback and gatherT fastest, but gatherT returns a
    wrong y, so the table keeps a config for every bucket and none of them is gatherT."""
    from types import SimpleNamespace

    import torch
    import triton.testing

    import slope_megatron.kernels.decode24_triton as kernel
    from slope_megatron.inference.decode24_plans import measure_on_gpu, relative_error
    layer = SimpleNamespace(out_features=64, in_features=128, bias=None,
                            weight=torch.randn(64, 64))
    dense = torch.randn(64, 128)
    calls = []

    def fallback(layer, x):
        calls.append("fallback")
        return x @ dense.t()

    def kernel_stub(x, values, meta, bias, cfg, lowrank=None):
        assert lowrank is None  # no adapter
        y = fallback(layer, x) + (1.0 if cfg.mode == "gatherT" else 0.0)
        calls[-1] = cfg.mode
        return y

    def do_bench(fn, **kwargs):  # gatherT is the fastest, the fallback the slowest
        fn()
        return {"gatherT": 0.5, "fallback": 2.0}.get(calls[-1], 1.0)

    monkeypatch.setattr(kernel, "decode24_linear", kernel_stub)
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    plans = measure_on_gpu([layer], fallback, lambda layer: None)
    assert {t for _, _, t in plans.table} == set(TIMED_BUCKETS)
    assert all(cfg.mode != "gatherT" for cfg in plans.table.values())
    assert relative_error(torch.ones(3), torch.ones(3)) == 0.0
    assert relative_error(torch.ones(3), torch.zeros(3)) == float("inf")


def test_the_load_time_plan_times_both_paths_with_the_layers_adapter(monkeypatch):
    """With an active adapter, the kernel is timed with its adapter epilogue ((x A, B, scale)
    passed in) and checked against the fallback's y with the adapter term."""
    from types import SimpleNamespace

    import torch
    import triton.testing

    import slope_megatron.kernels.decode24_triton as kernel
    from slope_megatron.inference.decode24_plans import measure_on_gpu
    layer = SimpleNamespace(out_features=64, in_features=128, bias=None,
                            weight=torch.randn(64, 64))
    dense, a, b = torch.randn(64, 128), torch.randn(128, 4), torch.randn(4, 64)
    lowranks = []

    def fallback(layer, x):  # the cuSPARSELt path with the adapter's term
        return x @ dense.t() + 0.5 * (x @ a) @ b

    def kernel_stub(x, values, meta, bias, cfg, lowrank=None):
        lowranks.append(lowrank)
        xa, bb, scale = lowrank
        return x @ dense.t() + scale * xa @ bb

    monkeypatch.setattr(kernel, "decode24_linear", kernel_stub)
    def do_bench(fn, **kwargs):  # the kernel (it records its call) beats the fallback
        before = len(lowranks)
        fn()
        return 1.0 if len(lowranks) > before else 2.0

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    plans = measure_on_gpu([layer], fallback, lambda layer: None, lambda layer: (a, b, 0.5))
    assert {t for _, _, t in plans.table} == set(TIMED_BUCKETS)  # each checked, each kept
    assert lowranks and all(lr[1] is b and lr[2] == 0.5 for lr in lowranks)
    x = torch.randn(3, 128)
    assert torch.allclose(kernel_stub(x, None, None, None, None, (x @ a, b, 0.5)),
                          fallback(layer, x))
