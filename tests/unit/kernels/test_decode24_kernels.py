"""The 2:4 decode GEMM (`kernels/decode24_layout.py`, `kernels/decode24_triton.py`): the
layout's metadata round-trips to the mask and to W*M exactly, its bits are the documented
ones, and the Triton kernel - run on CPU tensors by Triton's interpreter - equals
F.linear(x, W*M, b) for 1 to 64 rows of x, several shapes (in not a multiple of the block,
out not a multiple of the tile) and every code path (tl.dot, CUDA-core rows, the vector gather
and the gather through shared memory, split-K partials, bias or none). fp32 (and fp16 once)
here; bf16 for every row count in 1..64 runs in tests/gpu/test_decode_gpu.py."""
import pytest
import torch
from helpers.interpreter import run_interpreted

from slope_megatron.kernels.decode24_layout import (
    kept_positions,
    mask_from_meta,
    meta_words,
    pack_meta,
    unpack_decode24,
)
from slope_megatron.sparsity import SlopeLinear
from slope_megatron.sparsity.functional import dense_from_values
from slope_megatron.sparsity.masks import nm_mask

SHAPES = [(1, 4), (4, 8), (7, 36), (16, 32), (33, 100), (130, 256), (64, 260)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layout_round_trips_exactly(dtype):
    gen = torch.Generator().manual_seed(0)
    for out, inp in SHAPES:
        for ties in (False, True):  # integer weights: ties and kept zeros
            w = (torch.randint(-2, 3, (out, inp), generator=gen).float() if ties
                 else torch.randn(out, inp, generator=gen)).to(dtype)
            mask = nm_mask(w)
            values = w[mask].view(out, -1).contiguous()
            meta = pack_meta(mask)
            assert meta.shape == (meta_words(inp), out) and meta.dtype == torch.int32
            assert meta.is_contiguous()
            assert torch.equal(mask_from_meta(meta, inp), mask), (out, inp)
            dense = unpack_decode24(values, meta, inp)
            assert dense.dtype == dtype
            assert torch.equal(dense, dense_from_values(values, mask)), (out, inp)


def test_layout_of_a_layer_is_its_weight_and_its_masks_meta():
    layer = SlopeLinear(72, 24, bias=True)
    meta = pack_meta(layer.mask)
    assert torch.equal(unpack_decode24(layer.weight.detach(), meta, 72),
                       layer.dense_weight().detach())


def test_meta_bits_are_the_documented_ones():
    """Row 0: groups keep (0,1), (2,3), (0,3), (1,2), then (0,1) x 4: word 0 holds kept values
    0..15, value j at bits 2j..2j+1; in = 36 needs a second word, zero past value 17."""
    pairs = [(0, 1), (2, 3), (0, 3), (1, 2)] + [(0, 1)] * 5
    mask = torch.zeros(1, 36, dtype=torch.bool)
    for g, (a, b) in enumerate(pairs):
        mask[0, 4 * g + a] = mask[0, 4 * g + b] = True
    positions = [p for pair in pairs for p in pair]
    assert kept_positions(mask)[0].tolist() == positions
    word0 = sum(p << (2 * j) for j, p in enumerate(positions[:16]))
    word1 = sum(p << (2 * j) for j, p in enumerate(positions[16:]))
    as_int32 = word0 - (1 << 32) if word0 >= 1 << 31 else word0
    assert pack_meta(mask)[:, 0].tolist() == [as_int32, word1]


def test_layout_refuses_what_is_not_2to4():
    with pytest.raises(ValueError, match="exactly 2 of every 4"):
        pack_meta(torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible by 4"):
        pack_meta(torch.ones(2, 6, dtype=torch.bool))
    meta = pack_meta(nm_mask(torch.randn(4, 64)))
    with pytest.raises(ValueError, match="int32"):
        unpack_decode24(torch.zeros(4, 48), meta, 96)
    with pytest.raises(ValueError, match="do not describe"):
        unpack_decode24(torch.zeros(4, 30), meta, 64)


def test_config_rules():
    from slope_megatron.kernels.decode24_config import (Decode24Config, default_config,
                                                         rows_block)
    assert [rows_block(t) for t in (1, 2, 3, 7, 8, 9, 33, 64)] == [1, 2, 4, 8, 8, 16, 64, 64]
    for tokens in range(1, 65):
        for out, inp in ((64, 64), (4096, 4096), (11008, 4096), (96, 36)):
            cfg = default_config(tokens, out, inp)
            assert cfg.block_m >= tokens and (cfg.block_m < 2 * tokens or cfg.block_m == 16)
            assert 1 <= cfg.split_k <= max(1, -(-inp // cfg.block_k))
            assert cfg.use_dot == (tokens > 4)
    for bad in (dict(block_m=3), dict(block_m=1, block_k=16), dict(block_m=16, block_n=8),
                dict(block_m=1, split_k=0), dict(block_m=8, mode="dot"),
                dict(block_m=2, mode="gather-ish"), dict(block_m=32, mode="gatherT"),
                dict(block_m=1, num_stages=0), dict(block_m=2, mode="select")):
        with pytest.raises(ValueError):
            Decode24Config(**bad)


def test_cuda_core_modes_default_to_an_unpipelined_loop():
    """Pipelining the CUDA-core modes' loop measured slower in place (docs/INFERENCE.md), and
    pipelined, gatherT stages every kept value's x in shared memory (an H100 refused a
    (64, 256) tile of 16 rows: 'out of resource: shared memory'): they run unpipelined unless
    a config asks; the tensor-core modes keep Triton's 3 stages."""
    from slope_megatron.kernels.decode24_config import default_config, mode_config, stage_count
    assert {stage_count(m) for m in ("gather", "gatherS", "gatherT", "fma", "select")} == {1}
    assert stage_count("dot") == stage_count("dotT") == 3
    assert mode_config(13, 96, 36, "gatherT", 64, 256).num_stages == 1
    assert mode_config(1, 4096, 4096, "gather", 32, 256).num_stages == 1
    assert mode_config(2, 4096, 4096, "gatherT", 32, 256, num_stages=3).num_stages == 3
    assert mode_config(16, 4096, 4096, "dotT", 64, 128).num_stages == 3
    assert default_config(1, 4096, 4096).num_stages == 1


def test_gather_s_needs_a_triton_with_tl_gather(monkeypatch):
    from slope_megatron.inference.decode24_plans import suited_modes
    from slope_megatron.kernels import decode24_config
    assert "gatherS" in suited_modes(1) and "gatherS" not in suited_modes(8)
    monkeypatch.setattr(decode24_config, "HAS_TL_GATHER", False)
    with pytest.raises(ValueError, match="gatherS mode needs tl.gather"):
        decode24_config.Decode24Config(1, mode="gatherS")
    assert "gatherS" not in suited_modes(1) and "gather" in suited_modes(1)


def test_decode_kernel_equals_the_reference_in_interpreter():
    pytest.importorskip("triton")
    run_interpreted(r'''
import torch
import torch.nn.functional as F
from slope_megatron.kernels.decode24_layout import pack_meta
from slope_megatron.kernels.decode24_config import Decode24Config, rows_block
from slope_megatron.kernels.decode24_triton import decode24_linear
from slope_megatron.sparsity.functional import dense_from_values
from slope_megatron.sparsity.masks import nm_mask
torch.manual_seed(0)
shapes = [(48, 96), (72, 36), (16, 256), (130, 200)]
paths = 0
for out, inp in shapes:
    w = torch.randn(out, inp)
    mask = nm_mask(w)
    values = w[mask].view(out, -1).contiguous()
    meta, dense, bias = pack_meta(mask), dense_from_values(values, mask), torch.randn(out)
    for m in (1, 2, 3, 7, 16, 33, 64):
        x = torch.randn(m, inp)
        bm, bd = rows_block(m), max(16, rows_block(m))
        configs = [None, Decode24Config(bm, 16, 32, 3, "gather"),
                   Decode24Config(bm, 64, 128, 1, "fma"), Decode24Config(bd, 16, 64, 2, "dot"),
                   Decode24Config(bd, 32, 32, 1, "dotT")]
        if m <= 16:  # the vector gather: x transposed (and zero-padded to its rows)
            configs.append(Decode24Config(bm, 16, 64, 2, "gatherT"))
        if m <= 7:  # select: one program per row; gatherS: x gathered via shared memory
            configs += [Decode24Config(1, 16, 64, 2, "select"),
                        Decode24Config(bm, 16, 64, 2, "gatherS")]
        for cfg in configs:
            for b in (bias, None):
                want = F.linear(x, dense, b)
                got = decode24_linear(x, values, meta, b, cfg)
                assert got.shape == want.shape and got.dtype == want.dtype
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                paths += 1
# a strided x (a view of a wider tensor) and fp16 (values, x and y in fp16)
x = torch.randn(5, 2 * 96)[:, ::2]
w = torch.randn(48, 96)
mask = nm_mask(w)
values = w[mask].view(48, -1).contiguous()
torch.testing.assert_close(decode24_linear(x, values, pack_meta(mask)),
                           F.linear(x, dense_from_values(values, mask)), rtol=1e-5, atol=1e-5)
x16, v16 = torch.randn(33, 96).half(), values.half()
got = decode24_linear(x16, v16, pack_meta(mask), None, Decode24Config(64, 16, 32, 2, "dotT"))
want = F.linear(x16.float(), dense_from_values(v16, mask).float())
assert got.dtype == torch.float16
torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
assert paths == 4 * (7 * 5 + 5 + 2 * 4) * 2  # gatherT at 1-16 rows; select, gatherS to 7
print("ok")
''')


def test_decode_kernel_adds_a_low_rank_term_in_its_epilogue_in_interpreter():
    """y = x (W*M)^T + scale (x A) B (+ b) for every mode, with and without split-K (the
    term is added once, by the program that sums the partials), ranks not a multiple of the
    rank slice, and a clear error for factors of the wrong shape."""
    pytest.importorskip("triton")
    run_interpreted(r'''
import torch
import torch.nn.functional as F
from slope_megatron.kernels.decode24_layout import pack_meta
from slope_megatron.kernels.decode24_config import Decode24Config, rows_block
from slope_megatron.kernels.decode24_triton import decode24_linear
from slope_megatron.sparsity.functional import dense_from_values
from slope_megatron.sparsity.masks import nm_mask
torch.manual_seed(1)
out, inp = 72, 96
w = torch.randn(out, inp)
mask = nm_mask(w)
values = w[mask].view(out, -1).contiguous()
meta, dense, bias = pack_meta(mask), dense_from_values(values, mask), torch.randn(out)
checked = 0
for rank in (3, 24):
    a, b = torch.randn(inp, rank), torch.randn(rank, out)
    for m in (1, 2, 5, 16, 33):
        x = torch.randn(m, inp)
        bm, bd = rows_block(m), max(16, rows_block(m))
        configs = [Decode24Config(bm, 16, 32, 3, "gather"), Decode24Config(bm, 32, 64, 1, "fma"),
                   Decode24Config(bd, 16, 64, 2, "dot"), Decode24Config(bd, 32, 32, 1, "dotT"),
                   Decode24Config(1, 16, 64, 2, "select")]
        if m <= 16:
            configs.append(Decode24Config(bm, 16, 64, 2, "gatherT"))
        if m <= 5:
            configs.append(Decode24Config(bm, 16, 64, 2, "gatherS"))
        for cfg in configs:
            want = F.linear(x, dense, bias) + 0.25 * (x @ a) @ b
            got = decode24_linear(x, values, meta, bias, cfg, lowrank=(x @ a, b, 0.25))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            checked += 1
assert checked == 2 * (5 * 5 + 4 + 3)
x = torch.randn(2, inp)
try:
    decode24_linear(x, values, meta, None, None, lowrank=(x @ a, b.t().contiguous(), 1.0))
except ValueError as e:
    assert "lowrank" in str(e), e
else:
    raise AssertionError("a transposed B was accepted")
print("ok")
''')
