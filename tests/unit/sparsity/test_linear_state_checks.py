"""SlopeLinear's state stays consistent through loads, mask changes and adapter switches.

- Without double pruning the column mask *is* the row mask: `column_mask_bits` equals
  `mask_bits` after every load (a double-pruned checkpoint, a state dict without
  `column_mask`) and refresh, since the cublas / torch-semi / native backends read the bits
  for dX (the interpreted cublas check is in test_backend_cublas.py).
- A double-pruned layer that gets no double-pruned mask with its weights recomputes it.
- The Triton double-pruning kernel runs only where Triton is usable (the check that sends
  `auto` to the reference), else the torch path.
- A loaded column mask must keep at most n of every m along `out` (or be the row mask).
- A checkpoint with the adapter switched on does not load into a layer without one, and
  `enable_adapter` refuses a rank other than the adapter's.
"""
import sys

import pytest
import torch
from torch import nn

from slope_megatron.sparsity import SlopeLinear, enable_adapters
from slope_megatron.sparsity.backends import cublas
from slope_megatron.sparsity.masks import double_prune_mask, pack_bits


def double_pruned_source(seed=0, inn=64, out=32):
    """A double-pruned layer whose column mask has been computed (a training forward)."""
    torch.manual_seed(seed)
    src = SlopeLinear(inn, out, column_mask_refresh=1)
    src(torch.randn(4, inn, requires_grad=True)).sum().backward()
    assert src.column_mask_step == 0
    assert not torch.equal(src.column_mask_bits, src.mask_bits)  # really double-pruned
    return src


def static_layer(seed=1, inn=64, out=32):
    torch.manual_seed(seed)
    return SlopeLinear(inn, out, double_prune=False)


@pytest.mark.parametrize("how", ["double-pruned state dict", "strict=False, no column_mask"])
def test_static_layer_column_bits_follow_the_loaded_mask(how):
    src, static = double_pruned_source(), static_layer()
    assert not torch.equal(src.mask_bits, static.mask_bits)
    state = src.state_dict()
    strict = how == "double-pruned state dict"
    if not strict:
        del state["column_mask"]
    version = static.column_mask_bits._version
    static.load_state_dict(state, strict=strict)
    assert torch.equal(static.mask_bits, src.mask_bits)
    assert torch.equal(static.column_mask_bits, static.mask_bits)
    assert torch.equal(static.column_mask, static.mask)
    assert static.column_mask_bits.data_ptr() != static.mask_bits.data_ptr()  # a copy
    assert static.column_mask_bits._version > version  # caches keyed on it see the change
    # and so it stays: a refresh, another load, a move
    static.refresh_column_mask()
    assert torch.equal(static.column_mask_bits, static.mask_bits)
    static.load_state_dict(static_layer(seed=5).state_dict())
    assert torch.equal(static.column_mask_bits, static.mask_bits)


def test_static_layer_load_tells_the_backend():
    calls = []

    class Spy(type(static_layer().backend)):
        def on_column_mask_change(self, layer):
            calls.append(torch.equal(layer.column_mask_bits, layer.mask_bits))

    static = static_layer()
    static.backend = Spy()
    state = double_pruned_source().state_dict()
    del state["column_mask"]
    static.load_state_dict(state, strict=False)
    assert calls == [True]  # told once, after the bits were made equal


def test_inference_style_emptied_column_mask_stays_empty():
    static = static_layer()
    static.column_mask_bits = torch.zeros(0, 0, dtype=torch.uint8)  # as inference.model does
    state = {k: v for k, v in double_pruned_source().state_dict().items()
             if k != "column_mask"}
    static.load_state_dict(state, strict=False)
    assert static.column_mask_bits.numel() == 0


@pytest.mark.parametrize("source", ["no column_mask", "static layer's column mask"])
def test_double_pruned_layer_recomputes_a_column_mask_it_did_not_get(source):
    """The loaded extra state may say the column mask is fresh; without a double-pruned mask
    loaded alongside, it is marked stale and recomputed from the loaded weights."""
    if source == "no column_mask":
        state = double_pruned_source(seed=3).state_dict()
        del state["column_mask"]
    else:
        static = static_layer(seed=3)
        static.refresh_column_mask()  # a static layer's step can be >= 0 too
        state = static.state_dict()
        assert state["_extra_state"]["column_mask_step"] == 0
    assert state["_extra_state"]["column_mask_step"] == 0
    torch.manual_seed(4)
    layer = SlopeLinear(64, 32, column_mask_refresh=100)
    layer.load_state_dict(state, strict=False)
    assert layer.column_mask_step == -1
    layer(torch.randn(2, 64, requires_grad=True))
    want = double_prune_mask(layer.dense_weight().detach(), 2, 4, row_mask=layer.mask)
    assert torch.equal(layer.column_mask, want)
    # a real double-pruned mask loads as it is, its step kept
    src = double_pruned_source(seed=3)
    layer.load_state_dict(src.state_dict())
    assert layer.column_mask_step == 0 and torch.equal(layer.column_mask, src.column_mask)


# ---- the Triton double-pruning kernel only where Triton is usable -----------------------
def pretend_cuda(monkeypatch):
    """Parameters claim to be on a GPU (the device part of the fast-path check), and the
    Triton double-pruning module cannot be imported (any attempt raises ImportError)."""
    monkeypatch.setattr(nn.Parameter, "is_cuda", property(lambda self: True), raising=False)
    monkeypatch.setitem(sys.modules, "slope_megatron.kernels.double_prune_triton", None)


def test_refresh_takes_the_torch_path_where_triton_is_unusable(monkeypatch):
    pretend_cuda(monkeypatch)
    monkeypatch.setattr(cublas, "unavailable_reason",
                        lambda: "a Triton kernel failed to build or launch (no compiler)")
    torch.manual_seed(0)
    layer = SlopeLinear(64, 32, column_mask_refresh=1)
    assert layer.weight.is_cuda
    assert not layer._fast_double_prune()
    layer.refresh_column_mask()  # the torch path: no Triton import
    want = double_prune_mask(layer.dense_weight().detach(), 2, 4, row_mask=layer.mask)
    assert torch.equal(layer.column_mask_bits, pack_bits(want))
    # where Triton can run, the same layer takes the kernel (here: its import fails)
    monkeypatch.setattr(cublas, "unavailable_reason", lambda: None)
    assert layer._fast_double_prune()
    with pytest.raises(ImportError):
        layer.refresh_column_mask()
    monkeypatch.setenv("SLOPE_TRITON_DOUBLE_PRUNE", "0")
    assert not layer._fast_double_prune()


def test_auto_on_the_reference_trains_where_triton_is_unusable(monkeypatch):
    """`auto` resolves to the reference exactly when Triton is unusable: its first training
    forward must not reach for the Triton kernel."""
    from slope_megatron.sparsity import backends
    pretend_cuda(monkeypatch)
    monkeypatch.setattr(backends, "cusparselt_unavailable_reason", lambda: "compute 7.5")
    monkeypatch.setattr(cublas, "unavailable_reason", lambda: "triton is not installed")
    assert backends.resolve_auto() == "reference"
    torch.manual_seed(0)
    layer = SlopeLinear(64, 32, backend="auto")
    assert layer.backend.name == "reference"
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    assert layer.column_mask_step == 0 and x.grad is not None


def test_fast_path_check_touches_no_gpu_code_on_a_cpu_weight(monkeypatch):
    def boom():
        raise AssertionError("checked Triton for a CPU weight")
    monkeypatch.setattr(cublas, "unavailable_reason", boom)
    assert not SlopeLinear(16, 8)._fast_double_prune()


# ---- loaded column masks: at most n of every m along `out` -------------------------------
def test_a_column_mask_with_too_many_kept_along_out_is_refused():
    src = double_pruned_source()
    state = src.state_dict()
    bad = state["mask"].clone()
    r, c = (int(i) for i in bad.nonzero()[0])
    bad[r, c] = False  # inside the row mask, not the row mask, and over 2 of 4 along `out`
    assert (bad.reshape(-1, 4, 64).sum(1) > 2).any()
    model = nn.ModuleDict({"proj": SlopeLinear(64, 32)})
    before = model.proj.column_mask_bits.clone()
    with pytest.raises(RuntimeError, match=r"proj\.column_mask keeps more than 2 of every 4 "
                                           r"entries along `out`.*load a state dict saved"):
        model.load_state_dict({"proj." + k: v for k, v in {**state, "column_mask": bad}.items()})
    assert torch.equal(model.proj.column_mask_bits, before)
    # both forms a SlopeLinear saves still load: the double-pruned mask and the row mask
    model.proj.load_state_dict(state)
    model.proj.load_state_dict({**state, "column_mask": state["mask"]})


def test_a_column_mask_alone_is_checked_against_the_layer_row_mask():
    layer = SlopeLinear(64, 32)
    outside = ~layer.mask  # 2 of 4 along `in`, but all outside the row mask
    with pytest.raises(RuntimeError, match="keeps entries the row mask prunes"):
        layer.load_state_dict({"column_mask": outside}, strict=False)


# ---- adapter state --------------------------------------------------------------------
def test_adapter_switched_on_in_a_checkpoint_needs_an_adapter():
    torch.manual_seed(0)
    with_adapter = SlopeLinear(16, 8, adapter_rank=2)
    with_adapter.enable_adapter()
    model = nn.ModuleDict({"proj": SlopeLinear(16, 8)})
    with pytest.raises(ValueError, match=r"SlopeLinear proj: checkpoint has the lazy adapter "
                                         r"switched on .* this layer has no adapter"):
        model.load_state_dict({"proj." + k: v for k, v in with_adapter.state_dict().items()},
                              strict=False)
    assert not model.proj.adapter_active
    model.proj(torch.randn(2, 16))  # still runs
    # a layer with an adapter loads it
    other = SlopeLinear(16, 8, adapter_rank=2)
    other.load_state_dict(with_adapter.state_dict())
    assert other.adapter_active


def test_enable_adapter_refuses_another_rank():
    layer = SlopeLinear(16, 8, adapter_rank=4)
    with pytest.raises(ValueError, match="already has an adapter of rank 4"):
        layer.enable_adapter(rank=8)
    assert not layer.adapter_active and layer.adapter_a.shape == (16, 4)
    layer.enable_adapter(rank=4)  # the same rank: a resume may call it again
    layer.enable_adapter()
    assert layer.adapter_active and layer.adapter_rank == 4
    assert enable_adapters(nn.Sequential(layer)) == 0  # already on
