"""SlopeLinear holds its masks packed (1 bit per entry); state dicts still carry bool masks."""
import pytest
import torch

from slope_megatron.sparsity import SlopeLinear
from slope_megatron.sparsity.masks import nm_mask, pack_bits, unpack_bits


@pytest.mark.parametrize("cols", [4, 8, 12, 36, 64])
def test_pack_unpack_round_trip(cols):
    mask = torch.rand(6, cols) > 0.4
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.shape == (6, (cols + 7) // 8)
    assert torch.equal(unpack_bits(bits, cols), mask)
    assert torch.equal(pack_bits(mask[2:4]), bits[2:4])  # rows stay separate


def test_unpack_refuses_a_wrong_shape():
    with pytest.raises(ValueError, match="packed mask of 16 columns"):
        unpack_bits(torch.zeros(3, 3, dtype=torch.uint8), 16)


def _layer(**kw):
    torch.manual_seed(0)
    return SlopeLinear(24, 16, **kw)


def test_layer_holds_bits_not_bools():
    layer = _layer()
    buffers = dict(layer.named_buffers())
    assert set(buffers) == {"mask_bits", "column_mask_bits"}
    assert all(b.dtype == torch.uint8 and b.shape == (16, 3) for b in buffers.values())
    dense = torch.zeros(16, 24)
    dense[layer.mask] = 1.0
    assert torch.equal(layer.mask, nm_mask(dense, 2, 4))  # an exact 2:4 pattern


def test_state_dict_carries_bool_masks_and_loads_back():
    a, b = _layer(), _layer()
    x = torch.randn(5, 24, requires_grad=True)
    a(x).sum().backward()  # computes a's column mask
    state = a.state_dict()
    assert not any(k.endswith("_bits") for k in state)
    assert state["mask"].dtype == torch.bool and state["mask"].shape == (16, 24)
    assert torch.equal(state["column_mask"], a.column_mask) and a.column_mask.any()
    torch.manual_seed(1)
    b = SlopeLinear(24, 16)  # another mask
    assert not torch.equal(b.mask, a.mask)
    b.load_state_dict(state)
    assert torch.equal(b.mask, a.mask) and torch.equal(b.column_mask, a.column_mask)
    assert torch.equal(b.mask_bits, a.mask_bits)


def test_load_reports_missing_and_misshapen_masks():
    layer, state = _layer(), _layer().state_dict()
    del state["column_mask"]
    missing, unexpected = layer.load_state_dict(state, strict=False)
    assert missing == ["column_mask"] and unexpected == []
    with pytest.raises(RuntimeError, match="column_mask"):
        layer.load_state_dict(state)
    state["column_mask"] = torch.ones(16, 20, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"size mismatch for column_mask.*\(16, 20\)"):
        layer.load_state_dict(state)


def test_unpacked_masks_are_kept_until_released_and_follow_changes():
    layer = _layer()
    first = layer.mask
    assert layer.mask is first  # kept for the reference path's every call
    layer.release_unpacked_masks()
    again = layer.mask
    assert again is not first and torch.equal(again, first)
    with torch.no_grad():
        layer.mask_bits.zero_()  # any in-place change of the bits is seen
    assert not layer.mask.any()


def test_keep_compressed_reaches_every_sparse_layer_from_the_config():
    from slope_megatron.config import load_config
    from slope_megatron.model import GPTModel
    cfg = load_config(None, ["sparsity.keep_compressed=false", "model.vocab_size=64"])
    layers = [m for m in GPTModel.from_config(cfg).modules() if isinstance(m, SlopeLinear)]
    assert layers and all(not m.keep_compressed for m in layers)
    assert "keep_compressed=False" in repr(layers[0])
    assert SlopeLinear(8, 8).keep_compressed  # the default keeps them


def test_state_dict_masks_are_unpacked_on_the_cpu():
    layer = _layer()
    assert all(v.device.type == "cpu" for k, v in layer.state_dict().items() if "mask" in k)


def test_inference_mode_never_keeps_an_inference_tensor():
    layer = _layer()
    x = torch.randn(3, 24)
    with torch.inference_mode():
        layer(x)
    assert layer._unpacked == {}
    layer(x.requires_grad_()).sum().backward()  # training afterwards still works
    with torch.inference_mode():
        built = SlopeLinear(8, 8)  # bits are inference tensors: no version counter
        built(torch.randn(2, 8))


def test_a_refused_load_leaves_the_masks_alone():
    layer = _layer()
    before = layer.mask_bits.clone()
    torch.manual_seed(7)
    other = SlopeLinear(24, 16, n=1, m=4)
    with pytest.raises(ValueError, match="1:4 sparsity"):
        layer.load_state_dict(other.state_dict(), strict=False)
    assert torch.equal(layer.mask_bits, before)


def test_a_mask_that_is_not_n_m_is_refused_on_load():
    """The kernels assume exactly n kept per group; a foreign mask must not load silently."""
    lay = SlopeLinear(16, 8)
    state = lay.state_dict()
    bad = state["mask"].clone()
    bad[0, :4] = torch.tensor([True, True, True, False])
    with pytest.raises(RuntimeError, match="does not keep exactly 2 of every 4"):
        lay.load_state_dict({**state, "mask": bad})
    outside = state["column_mask"].clone() | ~state["mask"]
    with pytest.raises(RuntimeError, match="keeps entries the row mask prunes"):
        lay.load_state_dict({**state, "column_mask": outside})
    lay.load_state_dict(state)  # the layer's own state still loads
