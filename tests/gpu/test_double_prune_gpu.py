"""The double-pruned mask's refresh on a GPU: the Triton kernels in bf16 against the torch
definitions bit for bit, at a 1.3B layer shape, and a layer refreshed by them against the
same layer refreshed by the torch path (`SLOPE_TRITON_DOUBLE_PRUNE=0`), gradients included."""
import pytest
import torch

from helpers.layer import compare_step

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("rows,cols,ties", [(2048, 8192, False), (8192, 2048, False),
                                            (64, 260, True)])
def test_kernels_match_torch_in_bf16(rows, cols, ties):
    from slope_megatron.kernels.double_prune_triton import double_prune_bits_2to4, wt_tag_from_bits
    from slope_megatron.kernels.nm_triton import wt_tag_matrix
    from slope_megatron.sparsity.functional import dense_from_values
    from slope_megatron.sparsity.masks import double_prune_mask, nm_mask, pack_bits, unpack_bits
    torch.manual_seed(0)
    w = (torch.randint(-2, 3, (rows, cols), device="cuda").float() if ties
         else torch.randn(rows, cols, device="cuda")).bfloat16()
    m = nm_mask(w)
    vals = w[m].view(rows, -1).contiguous()
    want = pack_bits(double_prune_mask(dense_from_values(vals, m), 2, 4, row_mask=m))
    got = double_prune_bits_2to4(vals, pack_bits(m))
    assert torch.equal(got, want)
    tag = wt_tag_from_bits(pack_bits(m), want, cols, torch.bfloat16)
    assert torch.equal(tag, wt_tag_matrix(m, unpack_bits(want, cols), torch.bfloat16))


@pytest.mark.parametrize("backend", ["cusparselt", "cublas"])
def test_layer_refreshed_by_the_kernel_trains_like_the_torch_path(backend, monkeypatch):
    """Two copies of a layer with column_mask_refresh=1, one refreshing through the kernel and
    one through torch: the same masks and bit-identical outputs and gradients for 4 steps."""
    from slope_megatron.sparsity import SlopeLinear
    torch.manual_seed(0)
    kw = dict(bias=True, column_mask_refresh=1, device="cuda", dtype=torch.bfloat16,
              backend=backend)
    fast, torch_path = SlopeLinear(256, 512, **kw), SlopeLinear(256, 512, **kw)
    torch_path.load_state_dict(fast.state_dict())
    masks = set()
    for step in range(4):
        for layer, env in ((fast, "1"), (torch_path, "0")):
            monkeypatch.setenv("SLOPE_TRITON_DOUBLE_PRUNE", env)
            assert layer._fast_double_prune() == (env == "1")
            layer.refresh_column_mask_if_stale()
        assert torch.equal(fast.column_mask_bits, torch_path.column_mask_bits), step
        masks.add(bytes(fast.column_mask_bits.cpu().numpy()))
        compare_step(fast, torch_path, (64, 256), f"{backend} step {step}")
    assert len(masks) == 4  # a new mask every step
