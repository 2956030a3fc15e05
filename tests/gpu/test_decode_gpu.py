"""Decoding on a GPU: the 2:4 decode kernel in bf16 for every token count 1..64, and CUDA-graph
decoding (`generate(decode="static")`) against eager decoding, both archs (run on a CUDA
machine: `pytest -m gpu tests/gpu/test_decode_gpu.py`).

Token-for-token equality is asserted where both sides run the same kernels: graphed vs eager
generation in fp32 (reference kernels, where attention over a masked full-capacity cache and
over the sliced cache agree to fp32 rounding), and the graph's replay vs the same static step
run eagerly in bf16 (identical kernels, so identical bits). Eager vs static decoding in bf16
use different attention kernels (unmasked flash vs masked), so there the logits are compared
within bf16 tolerance instead."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers.inference import left_padded, tiny

from slope_megatron.inference import InferenceModel, generate
from slope_megatron.inference.generate import _EagerSteps
from slope_megatron.inference.decode24_plans import base_tile
from slope_megatron.kernels.decode24_layout import pack_meta
from slope_megatron.kernels.decode24_config import (
    MODES,
    default_config,
    mode_config,
    rows_block,
)
from slope_megatron.kernels.decode24_triton import decode24_linear
from slope_megatron.model import regions
from slope_megatron.sparsity import slope_layers
from slope_megatron.sparsity.functional import dense_from_values
from slope_megatron.sparsity.masks import nm_mask

pytestmark = pytest.mark.gpu
WIDE = ("model.hidden_size=64", "model.num_heads=4")  # feature sizes cuSPARSELt takes
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9], [40, 50, 60]]
SHAPES = [(96, 36), (768, 3072), (4096, 11008)]
VARIANT_TOKENS = (1, 3, 6, 8, 13, 33, 64)  # every mode's configs (compiles) at these counts


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def sparse_weight(out, inp, dtype=torch.bfloat16):
    w = torch.randn(out, inp, device="cuda").to(dtype)
    mask = nm_mask(w)
    values = w[mask].view(out, -1).contiguous()
    return values, pack_meta(mask), dense_from_values(values, mask)


@pytest.mark.parametrize("out,inp", SHAPES)
def test_decode_kernel_equals_the_reference_for_every_token_count_in_bf16(out, inp):
    """Every token count 1..64 with the default config; at VARIANT_TOKENS also each mode that
    suits the count (the CUDA-core modes to 8 rows, the vector gather to 16, the tensor-core
    ones from 5), with and without split-K, and the CUDA-core ones also pipelined."""
    torch.manual_seed(0)
    values, meta, dense = sparse_weight(out, inp)
    bias = torch.randn(out, device="cuda", dtype=torch.bfloat16)
    for m in range(1, 65):
        x = torch.randn(m, inp, device="cuda", dtype=torch.bfloat16)
        want = F.linear(x.float(), dense.float(), bias.float())
        most = {"gather": 8, "gatherS": 8, "fma": 8, "select": 8, "gatherT": 16}  # dot: from 5
        modes = [mode for mode in MODES if m in VARIANT_TOKENS
                 and (m <= most[mode] if mode in most else m >= 5)]
        configs = [default_config(m, out, inp)] + \
            [mode_config(m, out, inp, mode, 32, 128) for mode in modes] + \
            [replace(mode_config(m, out, inp, mode, 64, 256), split_k=1) for mode in modes] + \
            [mode_config(m, out, inp, mode, *base_tile(mode, rows_block(m)), num_stages=3)
             for mode in modes if mode in most]
        for cfg in configs:
            got = decode24_linear(x, values, meta, bias, cfg)
            assert got.dtype == torch.bfloat16 and got.shape == (m, out)
            assert rel(got, want) < 5e-3, (m, cfg)  # bf16 rounding of y (~2e-3)


@pytest.mark.parametrize("out,inp,rank", [(12288, 4096, 64), (4096, 11008, 176)])
def test_decode_kernel_low_rank_epilogue_equals_the_reference_in_bf16(out, inp, rank):
    """The adapter term (x A) B * scale added in the kernel's epilogue, at 7B shapes and their
    rank-1.56% adapters (padded to 8), with each mode's default split and without a split."""
    torch.manual_seed(0)
    values, meta, dense = sparse_weight(out, inp)
    a = (0.02 * torch.randn(inp, rank, device="cuda")).to(torch.bfloat16)
    b = (0.02 * torch.randn(rank, out, device="cuda")).to(torch.bfloat16)
    for m in (1, 2, 3, 8, 13, 64):
        x = torch.randn(m, inp, device="cuda", dtype=torch.bfloat16)
        u = x @ a
        want = F.linear(x.float(), dense.float()) + (u.float() @ b.float()) / rank
        cfg = default_config(m, out, inp)
        one_row = [mode_config(m, out, inp, mode, 32, 256) for mode in ("select", "gatherS")
                   if m <= 3]
        for c in (cfg, replace(cfg, split_k=1), *one_row):
            got = decode24_linear(x, values, meta, None, c, lowrank=(u, b, 1.0 / rank))
            assert rel(got, want) < 5e-3, (m, c)


def test_decode_kernel_in_a_cuda_graph_replays_its_eager_result():
    values, meta, _ = sparse_weight(4096, 4096)
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    cfg = default_config(16, 4096, 4096)
    assert cfg.split_k > 1  # the partial sums' reduction is captured too
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decode24_linear(x, values, meta, None, cfg)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = decode24_linear(x, values, meta, None, cfg)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(y, decode24_linear(x, values, meta, None, cfg))


def results(out):
    return [(r.tokens, r.finish_reason, r.stop_token) for r in out]


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_graphed_generation_equals_eager_generation_token_for_token(arch):
    cfg, model = tiny(arch)
    inf = InferenceModel(cfg, model.state_dict(), device="cuda")  # fp32, reference kernels
    assert inf._graphs_usable()
    graphed = []
    real = inf.static_decoder

    def spy(*args):
        decoder = real(*args)
        graphed.append(decoder.graphed)
        return decoder

    inf.static_decoder = spy
    for prompts in ([PROMPTS[0]], PROMPTS):
        eager = results(generate(inf, prompts, 12))
        assert results(generate(inf, prompts, 12, decode="static")) == eager
        stop = eager[0][0][1]
        assert results(generate(inf, prompts, 12, decode="static", stop_tokens=[stop])) \
            == results(generate(inf, prompts, 12, stop_tokens=[stop]))
    assert graphed and all(graphed)
    assert not inf._decoders  # captured over this call's W*M copies: dropped with them


@pytest.mark.parametrize("kernels", ["cusparselt", "decode24"])
@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_bf16_graph_replays_the_eager_static_step_bitwise(arch, kernels, monkeypatch):
    monkeypatch.setenv("SLOPE_DECODE24_PLAN", "always")  # the kernel on every small call
    cfg, model = tiny(arch, "active", *WIDE)
    inf = InferenceModel(cfg, model.state_dict(), dtype="bf16", device="cuda", kernels=kernels,
                         compile="on")  # the uncaptured step below runs the same kernels
    assert inf.kernels == kernels
    graphed = results(generate(inf, PROMPTS, 10, decode="static"))
    [decoder] = inf._decoders.values()  # kept: compressed kernels hold no per-call copies
    assert decoder.graphed
    again = results(generate(inf, PROMPTS, 10, decode="static"))
    assert again == graphed and list(inf._decoders.values()) == [decoder]  # replayed, kept
    inf.static_graphs = False
    assert results(generate(inf, PROMPTS, 10, decode="static")) == graphed


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_graphed_step_runs_compiled_regions_as_accurate_as_the_eager_ones(arch, monkeypatch):
    """The default on a GPU: the captured step's regions compiled by Inductor (not silently
    fallen back to eager). Inductor keeps x + delta in fp32 where eager rounds it to bf16,
    so the two differ by bf16 rounding (through this tiny model's large activations, ~1e-2);
    both are held to the fp32 model: the compiled step no further from it than the eager
    one (a wrong region would be off by O(1))."""
    import torch._dynamo

    used = [regions.residual_norm, regions.mlp_activation]
    used += [regions.rotate_pair] if arch == "llama" else []
    torch._dynamo.reset()
    monkeypatch.setitem(regions._settings, "backend", "inductor")
    for r in used:  # compiled by this test by Inductor, whatever ran before it in the process
        monkeypatch.setattr(r, "failed", False)
        monkeypatch.setattr(r, "compiled", None)
    cfg, model = tiny(arch, "active", *WIDE)
    inf = InferenceModel(cfg, model.state_dict(), dtype="bf16", device="cuda",
                         kernels="cusparselt")
    fp32 = InferenceModel(cfg, model.state_dict(), device="cuda", compile="off")
    b, longest = len(PROMPTS), max(map(len, PROMPTS))
    ids, valid, positions = (t.cuda() for t in left_padded(PROMPTS))
    compiled = inf.static_decoder(b, longest + 8)
    assert compiled.graphed and compiled.compiled
    inf.compile_mode = "off"
    plain = inf.static_decoder(b, longest + 8)  # the same shape, another setting: a new one
    assert plain.graphed and not plain.compiled and plain is not compiled
    assert all(r.is_compiled for r in used), [(r.__name__, r.failed) for r in used]
    with fp32.generation_scope():
        exact = fp32.static_decoder(b, longest + 8)
        want = exact.prefill(ids, valid, positions, True)
        got, eager = (d.prefill(ids, valid, positions, True) for d in (compiled, plain))
        assert torch.equal(got, eager)  # prefill is eager in both
        errors = []
        for _ in range(8):
            chosen = want.argmax(-1)
            got, eager, want = (d.advance(chosen, [True] * b).clone()
                                for d in (compiled, plain, exact))
            errors.append((rel(got, want), rel(eager, want)))
    compiled_err, eager_err = (sum(e) / len(e) for e in zip(*errors))
    assert compiled_err < 1.5 * eager_err + 2e-3, errors
    assert all(c < 0.1 for c, _ in errors), errors


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_bf16_static_logits_match_eager_logits(arch):
    """Masked attention over the full-capacity cache against the sliced cache's (the regions
    eager in both: their compiled rounding is the test above's)."""
    cfg, model = tiny(arch, "active", *WIDE)
    inf = InferenceModel(cfg, model.state_dict(), dtype="bf16", device="cuda",
                         kernels="cusparselt", compile="off")
    b, longest = len(PROMPTS), max(map(len, PROMPTS))
    ids, valid, positions = (t.cuda() for t in left_padded(PROMPTS))
    eager, static = _EagerSteps(inf, b, longest + 8), inf.static_decoder(b, longest + 8)
    assert static.graphed
    want = eager.prefill(ids, valid, positions, True)
    got = static.prefill(ids, valid, positions, True)
    for step in range(8):
        assert rel(got, want) < 1e-2, step
        chosen = want.argmax(-1)
        running = [True, step < 3, True]
        want = eager.advance(chosen, running)
        got = static.advance(chosen, running).clone()


def test_decode24_model_with_adapters_on_the_kernel_matches_the_reference(monkeypatch):
    """Every call of up to 64 tokens on the kernel, adapters fused in its epilogue. The
    epilogue adds the adapter term in fp32 where the reference rounds it to bf16 twice, so
    the model is kept at a scale where bf16 rounding stays small (init_std 0.02; at 0.3 the
    bf16 reference itself is 3-5e-2 from fp32)."""
    monkeypatch.setenv("SLOPE_DECODE24_PLAN", "always")
    cfg, model = tiny("llama", "active", *WIDE, "model.init_std=0.02")
    state = model.state_dict()
    fast = InferenceModel(cfg, state, dtype="bf16", device="cuda", kernels="decode24")
    ref = InferenceModel(cfg, state, dtype="bf16", device="cuda", kernels="reference")
    assert all(layer.adapter_active for layer in slope_layers(fast.model))
    for shape in ((1, 1), (2, 3), (4, 16)):
        ids = torch.randint(0, cfg.model.vocab_size, shape, device="cuda")
        with ref.generation_scope():
            want = ref.full_logits(ids)
        assert rel(fast.full_logits(ids), want) < 1e-2, shape


def test_decode24_model_measures_its_plan_and_matches_the_reference(monkeypatch):
    monkeypatch.delenv("SLOPE_DECODE24_PLAN", raising=False)
    cfg, model = tiny("llama", "active", *WIDE)
    state = model.state_dict()
    fast = InferenceModel(cfg, state, dtype="bf16", device="cuda", kernels="decode24")
    ref = InferenceModel(cfg, state, dtype="bf16", device="cuda", kernels="reference")
    layers = list(slope_layers(fast.model))
    assert "where it measured faster" in fast.kernels_note, fast.kernels_note
    # which shapes won is up to the GPU's timing; a layer keeps its metadata exactly when its
    # shape won some call, and only those layers' own copies (1/16 of dense bf16) are held
    # (a view of cuSPARSELt's metadata costs nothing)
    assert all(layer.backend is layers[0].backend for layer in layers)  # all on the hybrid
    won = {(out, inp) for out, inp, _ in layers[0].backend.plans.table}
    for layer in layers:
        shape = (layer.out_features, layer.in_features)
        assert ("_decode24" in layer.__dict__) == (shape in won), shape
    copied_bf16 = sum(2 * layer.out_features * layer.in_features for layer in layers
                      if "_decode24" in layer.__dict__
                      and layer.__dict__["_decode24"].dtype == torch.int32)
    assert fast.weight_bytes()["masks"] == copied_bf16 // 16
    # 1, 5, 64 and 208 tokens per linear call (batch x length; length <= model.seq_len),
    # against the fp32 model: whichever configs the plan chose (their fp32 sums run in
    # another order than cuBLAS's), no further from it than the bf16 reference kernels
    exact = InferenceModel(cfg, state, device="cuda", kernels="reference")
    for shape in ((1, 1), (1, 5), (4, 16), (13, 16)):
        ids = torch.randint(0, cfg.model.vocab_size, shape, device="cuda")
        with ref.generation_scope(), exact.generation_scope():
            want, bf16_ref = exact.full_logits(ids), ref.full_logits(ids)
        err, ref_err = rel(fast.full_logits(ids), want), rel(bf16_ref, want)
        assert err < 1.5 * ref_err + 2e-3, (shape, err, ref_err)


def test_decode24_reads_cusparselts_metadata_in_place_on_hopper(monkeypatch):
    """The layout kernels/decode24_cslt_meta.py models is the one this cuSPARSELt writes on
    sm90 (compared byte for byte per layer at load): every layer of the model (all of its
    shapes are modelled ones) reads it in place, so the model holds no second copy of the
    metadata, and its logits match the reference. Elsewhere: `python -m
    benchmarks.cslt_meta_probe` tells what differs."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the modelled metadata layout is cuSPARSELt's on sm90")
    monkeypatch.setenv("SLOPE_DECODE24_PLAN", "always")
    cfg, model = tiny("llama", None, *WIDE, "model.init_std=0.02")  # bf16 rounding stays small
    state = model.state_dict()
    fast = InferenceModel(cfg, state, dtype="bf16", device="cuda", kernels="decode24")
    ref = InferenceModel(cfg, state, dtype="bf16", device="cuda", kernels="reference")
    for layer in slope_layers(fast.model):
        meta, buf = layer.__dict__["_decode24"], layer.__dict__["_compressed"].buf
        assert meta.dtype == torch.int64, (layer.out_features, layer.in_features)
        assert buf.data_ptr() < meta.data_ptr() < buf.data_ptr() + buf.numel()
    assert fast.weight_bytes()["masks"] == 0
    for shape in ((1, 1), (3, 2), (4, 16)):
        ids = torch.randint(0, cfg.model.vocab_size, shape, device="cuda")
        with ref.generation_scope():
            want = ref.full_logits(ids)
        assert rel(fast.full_logits(ids), want) < 1e-2, shape
