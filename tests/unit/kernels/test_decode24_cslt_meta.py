"""The decode kernel reading cuSPARSELt's metadata in place (`kernels/decode24_cslt_meta.py`):
the modelled layout round-trips to the mask, its bytes are the documented ones, a buffer's
metadata is taken as a view only where its bytes are exactly the model's, and the Triton
kernel (Triton's CPU interpreter) computes the same y from it as from its own metadata, in
every mode. Whether a real cuSPARSELt writes this layout is checked on a GPU
(tests/gpu/test_decode_gpu.py)."""
import pytest
import torch
from helpers.interpreter import run_interpreted

from slope_megatron.kernels.decode24_cslt_meta import (
    layout_covers,
    in_place_meta,
    meta_bytes,
    pack_cslt_meta,
    positions_from_cslt_meta,
)
from slope_megatron.kernels.decode24_layout import kept_positions
from slope_megatron.sparsity.masks import nm_mask


def _mask_keeping(out: int, inp: int, special: dict) -> torch.Tensor:
    """Every group keeps positions (0, 1), except special[(row, group)] = (a, b)."""
    mask = torch.zeros(out, inp // 4, 4, dtype=torch.bool)
    mask[:, :, :2] = True
    for (r, g), (a, b) in special.items():
        mask[r, g] = False
        mask[r, g, a] = mask[r, g, b] = True
    return mask.view(out, inp)


@pytest.mark.parametrize("out,inp", [(64, 32), (128, 96), (192, 320)])
def test_cslt_meta_round_trips_to_the_masks_positions(out, inp):
    gen = torch.Generator().manual_seed(out + inp)
    for ties in (False, True):
        w = (torch.randint(-2, 3, (out, inp), generator=gen).float() if ties
             else torch.randn(out, inp, generator=gen))
        mask = nm_mask(w)
        meta = pack_cslt_meta(mask)
        assert meta.dtype == torch.int64 and meta.numel() * 8 == meta_bytes(out, inp)
        assert torch.equal(positions_from_cslt_meta(meta, out, inp), kept_positions(mask))


def test_cslt_meta_bytes_are_the_documented_ones():
    """A nibble is first | second << 2: (0, 1) -> 0x4 everywhere, (2, 3) -> 0xE where set.
    Rows r and r + 8 share a byte (low, high nibble); bytes 2f + e hold group 4e + f of a
    32-column chunk; row r % 8 steps 8 bytes, a 16-row block 64, a chunk 256, a 64-row slab
    8 * in."""
    out, inp = 128, 64
    where = {(0, 0): (0, "low"), (8, 0): (0, "high"), (0, 4): (1, "low"), (0, 1): (2, "low"),
             (1, 0): (8, "low"), (16, 0): (64, "low"), (0, 8): (256, "low"),
             (64, 0): (8 * inp, "low"), (73, 13): (512 + 256 + 8 + 2 * 1 + 1, "high")}
    for (r, g), (byte, half) in where.items():
        meta = pack_cslt_meta(_mask_keeping(out, inp, {(r, g): (2, 3)})).view(torch.uint8)
        want = torch.full_like(meta, 0x44)
        want[byte] = 0x4E if half == "low" else 0xE4
        assert torch.equal(meta, want), (r, g)


def test_cslt_meta_refuses_shapes_outside_the_model():
    assert layout_covers(64, 32) and not layout_covers(96, 32) and not layout_covers(64, 48)
    with pytest.raises(ValueError, match="out % 64 == 0 and in % 32 == 0"):
        pack_cslt_meta(nm_mask(torch.randn(32, 64)))
    with pytest.raises(ValueError, match=r"\(64, 32\) is \(32,\) int64"):
        positions_from_cslt_meta(torch.zeros(16, dtype=torch.int64), 64, 32)


def test_in_place_meta_is_a_view_only_where_the_bytes_are_the_models():
    out, inp = 128, 64
    mask = nm_mask(torch.randn(out, inp))
    values = torch.randint(0, 256, (out * inp,), dtype=torch.uint8)   # 16-bit kept values
    padding = torch.zeros(40, dtype=torch.uint8)
    buf = torch.cat([values, pack_cslt_meta(mask).view(torch.uint8), padding])
    view = in_place_meta(buf, mask)
    assert view is not None and view.dtype == torch.int64
    assert view.data_ptr() == buf.data_ptr() + out * inp          # no copy: the buffer's bytes
    assert torch.equal(positions_from_cslt_meta(view, out, inp), kept_positions(mask))
    other = buf.clone()
    other[out * inp + 5] ^= 0x10                                  # one nibble of another layout
    assert in_place_meta(other, mask) is None
    assert in_place_meta(buf[: out * inp + 8], mask) is None      # too short
    assert in_place_meta(buf.view(torch.int16), mask) is None     # not a byte buffer
    shifted = torch.cat([torch.zeros(4, dtype=torch.uint8), buf])[4:]  # 4-byte aligned only
    assert torch.equal(shifted, buf) and in_place_meta(shifted, mask) is None
    odd = nm_mask(torch.randn(96, 64))                            # out % 64 != 0
    assert in_place_meta(torch.zeros(96 * 64 * 2, dtype=torch.uint8), odd) is None


def test_decode_kernel_reads_cslt_meta_as_its_own_in_interpreter():
    """Every mode, with split-K, bias, a low-rank term, against F.linear on W*M; tiles wider
    than the layer or over several 64-row slabs, a last K block past the end; and a clear
    error for int64 metadata of the wrong size."""
    pytest.importorskip("triton")
    run_interpreted(r'''
import torch
import torch.nn.functional as F
from slope_megatron.kernels.decode24_cslt_meta import pack_cslt_meta
from slope_megatron.kernels.decode24_config import Decode24Config, rows_block
from slope_megatron.kernels.decode24_triton import decode24_linear
from slope_megatron.sparsity.functional import dense_from_values
from slope_megatron.sparsity.masks import nm_mask
torch.manual_seed(2)
checked = 0
for out, inp in ((64, 96), (128, 64)):
    w = torch.randn(out, inp)
    mask = nm_mask(w)
    values = w[mask].view(out, -1).contiguous()
    meta, dense, bias = pack_cslt_meta(mask), dense_from_values(values, mask), torch.randn(out)
    a, b = torch.randn(inp, 5), torch.randn(5, out)
    for m in (1, 3, 16):
        x = torch.randn(m, inp)
        bm, bd = rows_block(m), max(16, rows_block(m))
        configs = [Decode24Config(bm, 16, 32, 3, "gather"), Decode24Config(bm, 32, 64, 1, "fma"),
                   Decode24Config(bd, 16, 64, 2, "dot"), Decode24Config(bd, 32, 32, 1, "dotT"),
                   Decode24Config(bm, 16, 64, 2, "gatherT")]
        if m <= 3:
            configs += [Decode24Config(1, 32, 64, 1, "select"),
                        Decode24Config(bm, 16, 64, 2, "gatherS")]
        for cfg in configs:
            want = F.linear(x, dense, bias)
            got = decode24_linear(x, values, meta, bias, cfg)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            got = decode24_linear(x, values, meta, bias, cfg, lowrank=(x @ a, b, 0.5))
            torch.testing.assert_close(got, want + 0.5 * (x @ a) @ b, rtol=1e-4, atol=1e-4)
            checked += 1
assert checked == 2 * (2 * 7 + 5), checked
try:
    decode24_linear(torch.randn(1, 64), values, meta[:-1])
except ValueError as e:
    assert "cuSPARSELt-layout metadata" in str(e), e
else:
    raise AssertionError("int64 metadata of the wrong size was accepted")
# tiles wider than the layer (128 rows of 64), over several 64-row slabs (128 of 192), and a
# last K block past the end (256 of 320 columns)
for (out, inp), cfgs in (((64, 320), [Decode24Config(1, 128, 256, 1, "gather"),
                                      Decode24Config(16, 128, 128, 2, "dotT")]),
                         ((192, 320), [Decode24Config(4, 128, 256, 2, "fma"),
                                       Decode24Config(16, 256, 256, 1, "dot"),
                                       Decode24Config(2, 128, 256, 2, "gatherT")])):
    w = torch.randn(out, inp)
    mask = nm_mask(w)
    values = w[mask].view(out, -1).contiguous()
    dense, meta = dense_from_values(values, mask), pack_cslt_meta(mask)
    for cfg in cfgs:
        x = torch.randn(min(cfg.block_m, 2), inp)
        torch.testing.assert_close(decode24_linear(x, values, meta, None, cfg),
                                   F.linear(x, dense), rtol=1e-5, atol=1e-5)
print("ok")
''')
