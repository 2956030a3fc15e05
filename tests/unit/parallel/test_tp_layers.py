"""Each TP mapping and parallel layer against its unsharded reference, fwd and bwd, TP 2/4."""
import pytest
import torch

from helpers.dist import run_distributed


def _setup(tp):
    import torch.distributed as dist

    from slope_megatron.parallel import initialize_parallel

    dist.init_process_group("gloo")  # plain gloo: layer tests need no DeepSpeed engine
    return initialize_parallel(tp, 1)


def mappings_worker(tp):
    from slope_megatron.parallel import copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp

    st = _setup(tp)
    g, r = st.tp_group, st.tp_rank
    torch.manual_seed(0)
    full = torch.randn(3, 8)
    dy = torch.randn(3, 8)
    checks = {}
    x = full.clone().requires_grad_(True)
    (copy_to_tp(x, g) * (r + 1)).backward(dy)  # backward all-reduces: sum_r (r+1) dy
    checks["copy"] = torch.allclose(x.grad, dy * sum(range(1, tp + 1)))
    x = (full * (r + 1)).requires_grad_(True)
    y = reduce_from_tp(x, g)
    y.backward(dy)
    checks["reduce"] = torch.allclose(y, full * sum(range(1, tp + 1))) and torch.equal(x.grad, dy)
    x = full.clone().requires_grad_(True)
    y = scatter_to_tp(x, g)
    y.backward(torch.ones_like(y))
    checks["scatter"] = torch.equal(y, full.chunk(tp, -1)[r]) and x.grad.sum().item() == x.numel()
    x = full.chunk(tp, -1)[r].clone().requires_grad_(True)
    y = gather_from_tp(x, g)
    y.backward(dy)
    checks["gather"] = torch.equal(y, full) and torch.equal(x.grad, dy.chunk(tp, -1)[r])
    return checks


@pytest.mark.parametrize("tp", [2, 4])
def test_mappings(tp):
    for checks in run_distributed(mappings_worker, tp, tp):
        assert all(checks.values()), checks


def layer_worker(tp, kind, sparse, chunks, adapter_on):
    from slope_megatron.parallel import ColumnParallelLinear, RowParallelLinear
    from slope_megatron.parallel.layers import shard_rows
    from slope_megatron.sparsity import SlopeLinear, dense_from_values, values_from_dense

    st = _setup(tp)
    r = st.tp_rank
    inn, out = 32, 48
    init = lambda t: torch.nn.init.normal_(t, 0, 0.5)  # noqa: E731
    kw = dict(n=2, m=4, column_mask_refresh=1, backend="reference") if sparse else None
    torch.manual_seed(0)
    ref = SlopeLinear(inn, out, adapter_rank=4 if sparse else None, init_method=init, **kw) \
        if sparse else torch.nn.utils.skip_init(torch.nn.Linear, inn, out)
    if not sparse:
        init(ref.weight)
    torch.manual_seed(0)
    cls = ColumnParallelLinear if kind == "column" else RowParallelLinear
    extra = dict(chunks=chunks) if kind == "column" else {}
    par = cls(inn, out, True, init, tp, r, st.tp_group, sparse_kw=kw,
              adapter_rank=4 if sparse else None, **extra)
    with torch.no_grad():
        ref.bias.copy_(torch.arange(out, dtype=torch.float32) / out)
        b = par.local.bias if kind == "column" else par.bias
        b.copy_(shard_rows(ref.bias.unsqueeze(1), tp, r, chunks).squeeze(1)
                if kind == "column" else ref.bias)
    if sparse and adapter_on:
        for layer in (ref, par.local):
            layer.enable_adapter()
            with torch.no_grad():  # B = 0 at the switch; make it non-zero to test the math
                layer.adapter_b.copy_(torch.linspace(-1, 1, layer.adapter_b.numel())
                                      .view_as(layer.adapter_b) if layer is ref else
                                      (shard_rows(ref.adapter_b.t(), tp, r, chunks).t()
                                       if kind == "column" else ref.adapter_b))
    torch.manual_seed(1)
    x = torch.randn(2, 5, inn, dtype=torch.float32)
    dy = torch.randn(2, 5, out)
    xr = x.clone().requires_grad_(True)
    ref(xr).backward(dy)
    rows = shard_rows(torch.arange(out).unsqueeze(1), tp, r, chunks).squeeze(1)
    cols = torch.arange(inn).chunk(tp)[r]
    if kind == "column":
        xp = x.clone().requires_grad_(True)
        y = par(xp)
        y.backward(dy[..., rows])
        ok = {"y": torch.allclose(y, ref(x)[..., rows], atol=1e-5),
              "dx": torch.allclose(xp.grad, xr.grad, atol=1e-5)}
        ref_wgrad = (dense_from_values(ref.weight.grad, ref.mask) if sparse else ref.weight.grad)[rows]
    else:
        xp = x[..., cols].clone().requires_grad_(True)
        y = par(xp)
        y.backward(dy)
        ok = {"y": torch.allclose(y, ref(x), atol=1e-5),
              "dx": torch.allclose(xp.grad, xr.grad[..., cols], atol=1e-5)}
        ref_wgrad = (dense_from_values(ref.weight.grad, ref.mask) if sparse else ref.weight.grad)[:, cols]
    local = par.local
    if sparse:
        ref_wgrad = values_from_dense(ref_wgrad, local.mask)
    ok["dw"] = torch.allclose(local.weight.grad, ref_wgrad, atol=1e-5)
    if sparse and adapter_on:
        if kind == "column":
            ok["dA"] = torch.allclose(local.adapter_a.grad, ref.adapter_a.grad, atol=1e-5)
            ok["dB"] = torch.allclose(local.adapter_b.grad, ref.adapter_b.grad[:, rows], atol=1e-5)
        else:
            ok["dA"] = torch.allclose(local.adapter_a.grad, ref.adapter_a.grad[cols], atol=1e-5)
            ok["dB"] = torch.allclose(local.adapter_b.grad, ref.adapter_b.grad, atol=1e-5)
    return ok


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("kind,chunks", [("column", 1), ("column", 3), ("row", 1)])
@pytest.mark.parametrize("sparse,adapter_on", [(True, True), (False, False)])
def test_parallel_linear_matches_unsharded(tp, kind, chunks, sparse, adapter_on):
    for ok in run_distributed(layer_worker, tp, tp, kind, sparse, chunks, adapter_on):
        assert all(ok.values()), ok


def test_unsplittable_shapes_are_rejected():
    from slope_megatron.parallel import ColumnParallelLinear, RowParallelLinear

    init = torch.nn.init.normal_
    kw = dict(n=2, m=4, column_mask_refresh=1, backend="reference")
    with pytest.raises(ValueError, match="row-parallel in_features=24 cannot be split over TP=4"):
        RowParallelLinear(24, 8, False, init, 4, 0, None, sparse_kw=kw)
    with pytest.raises(ValueError, match="column-parallel out_features=24"):
        ColumnParallelLinear(8, 24, False, init, 4, 0, None, sparse_kw=kw, chunks=3)


def loss_worker(tp):
    """vocab_parallel_lm_loss against lm_loss on the whole logits: some targets ignored, and
    every target ignored (NaN loss, zero gradients, as F.cross_entropy at TP = 1)."""
    from slope_megatron.model.regions import lm_loss
    from slope_megatron.parallel import vocab_parallel_lm_loss

    st = _setup(tp)
    vocab = 16
    per = vocab // tp
    torch.manual_seed(0)
    logits = torch.randn(2, 5, vocab)
    some = torch.randint(0, vocab, (2, 5))
    some[0, :2] = -1
    out = {}
    for name, targets in (("some_ignored", some), ("all_ignored", torch.full((2, 5), -1))):
        full = logits.clone().requires_grad_(True)
        ref = lm_loss(full, targets)
        ref.backward()
        shard = logits[..., st.tp_rank * per:(st.tp_rank + 1) * per].clone().requires_grad_(True)
        got = vocab_parallel_lm_loss(shard, targets, st.tp_rank * per, st.tp_group)
        got.backward()
        ref_grad = full.grad[..., st.tp_rank * per:(st.tp_rank + 1) * per]
        out[name] = (ref.detach(), got.detach(), ref_grad, shard.grad)
    return out


def test_vocab_parallel_loss_matches_lm_loss_also_when_every_target_is_ignored():
    for out in run_distributed(loss_worker, 2, 2):
        ref, got, ref_grad, grad = out["some_ignored"]
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(grad, ref_grad)
        ref, got, ref_grad, grad = out["all_ignored"]
        assert ref.isnan() and got.isnan(), (ref, got)  # was 0 under TP, NaN at TP = 1
        assert torch.equal(grad, ref_grad) and not grad.any()
