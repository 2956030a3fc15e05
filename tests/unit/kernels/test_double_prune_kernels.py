"""The Triton kernels that refresh the double-pruned mask (`kernels/double_prune_triton.py`),
run on CPU tensors by Triton's interpreter, against the torch definitions bit for bit: the
packed mask M_R * M_C against `masks.double_prune_mask`, the W_RC^T tag matrix against
`nm_triton.wt_tag_matrix`. Integer-valued weights make ties and exact zeros common, so the
tie rule (the lower row wins) and kept zeros are exercised. fp32 and fp16 here (the
interpreter's bf16 is broken); bf16 runs in tests/gpu/test_double_prune_gpu.py."""
import pytest

from helpers.interpreter import run_interpreted


def test_double_prune_and_tag_kernels_match_torch_in_interpreter():
    pytest.importorskip("triton")
    run_interpreted(r'''
import torch
from slope_megatron.kernels.double_prune_triton import double_prune_bits_2to4, wt_tag_from_bits
from slope_megatron.kernels.nm_triton import wt_tag_matrix
from slope_megatron.sparsity.masks import nm_mask, double_prune_mask, pack_bits, unpack_bits
from slope_megatron.sparsity.functional import dense_from_values
torch.manual_seed(0)
# rows of 1.5 bytes (cols 12), more columns than a block (132, 260), one group of rows (4)
shapes = [(8, 16, True), (16, 40, False), (12, 132, True), (4, 8, False), (64, 260, True)]
for dtype in (torch.float32, torch.float16):
    for o, i, ties in shapes:
        w = torch.randint(-2, 3, (o, i)).float() if ties else torch.randn(o, i)
        w = w.to(dtype)
        m = nm_mask(w)
        vals = w[m].view(o, -1).contiguous()
        want = pack_bits(double_prune_mask(dense_from_values(vals, m), 2, 4, row_mask=m))
        got = double_prune_bits_2to4(vals, pack_bits(m))
        assert torch.equal(got, want), (dtype, o, i)
        prod = unpack_bits(want, i)
        assert torch.equal(wt_tag_from_bits(pack_bits(m), want, i, dtype),
                           wt_tag_matrix(m, prod, dtype)), (dtype, o, i)
print("ok")
''')
