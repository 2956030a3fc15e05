"""Shared by the backend tests: a (layer, reference) pair and one compared training step.

Every fast backend is checked the same way: the same random input and output gradient through
the layer and through a reference-backend copy of it, outputs and gradients compared, then the
same update applied to both and the optimizer-step hooks run (which refresh compressed
operands and, on schedule, the double-pruned column mask).
"""
import torch

from slope_megatron.sparsity import SlopeLinear, after_optimizer_step


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def make_pair(inn, out, bias, backend, seed=0, **kw):
    """(layer on `backend` (a name or a backend object), reference copy), bf16 on CUDA, with a
    random bias and the column mask recomputed every 2 steps."""
    torch.manual_seed(seed)
    kw = dict(bias=bias, column_mask_refresh=2, device="cuda", dtype=torch.bfloat16, **kw)
    lay = SlopeLinear(inn, out, backend=backend if isinstance(backend, str) else "reference",
                      **kw)
    if not isinstance(backend, str):
        lay.backend = backend  # e.g. a fresh AutoBackend: decisions independent of other tests
    if bias:
        with torch.no_grad():
            lay.bias.normal_()
    ref = SlopeLinear(inn, out, backend="reference", **kw)
    ref.load_state_dict(lay.state_dict())
    return lay, ref


def step_pairs(lay, ref, shape, device="cuda", dtype=torch.bfloat16) -> dict:
    """Forward + backward of both layers on the same random input and output gradient:
    {name: (layer's, reference's)} for the output and every gradient (the adapter's too when
    it is active)."""
    x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = lay(x), ref(xr)
    dy = torch.randn_like(yr)
    y.backward(dy)
    yr.backward(dy)
    pairs = {"y": (y, yr), "dx": (x.grad, xr.grad), "dw": (lay.weight.grad, ref.weight.grad)}
    if lay.bias is not None:
        pairs["db"] = (lay.bias.grad, ref.bias.grad)
    if lay.adapter_active:
        pairs["da"] = (lay.adapter_a.grad, ref.adapter_a.grad)
        pairs["db_adapter"] = (lay.adapter_b.grad, ref.adapter_b.grad)
    return pairs


def chain_pairs(pairs, shape, device="cuda", dtype=torch.bfloat16) -> dict:
    """Forward + backward through a chain of (layer, reference) pairs on the same input and
    output gradient: {"y": (chain's, reference chain's), "dx": (...)}."""
    x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = x, xr
    for lay, ref in pairs:
        y, yr = lay(y), ref(yr)
    dy = torch.randn_like(yr)
    y.backward(dy)
    yr.backward(dy)
    return {"y": (y, yr), "dx": (x.grad, xr.grad)}


def compare_step(lay, ref, shape, what, tol=None):
    """One step on both; tol=None: every output and gradient equal bit for bit, else rel. err
    below tol. Then the same sign-SGD update on both and `after_optimizer_step`."""
    for k, (a, b) in step_pairs(lay, ref, shape).items():
        assert a is not None and torch.isfinite(a).all(), (what, k)
        if tol is None:
            assert torch.equal(a, b), f"{what} {k}: max diff {(a.float() - b.float()).abs().max()}"
        else:
            assert rel_err(a, b) < tol, f"{what} {k}: rel err {rel_err(a, b):.2e}"
    same_update(lay, ref)


def same_update(lay, ref, through_data=False, lr=0.05):
    """The same sign-SGD step (from ref's gradients) on both layers (or models), then their
    optimizer-step hooks (compressed-operand refresh, column-mask schedule). through_data:
    write through `.data`, as DeepSpeed's bf16 optimizer does (no version-counter change)."""
    with torch.no_grad():
        for pa, pb in zip(lay.parameters(), ref.parameters()):
            if pb.grad is not None:
                upd = pb.grad.float().sign().to(pb.dtype) * lr
                for p in (pa, pb):
                    (p.data if through_data else p).sub_(upd)
            pa.grad = pb.grad = None
    for m in (lay, ref):
        if isinstance(m, SlopeLinear):
            m.after_optimizer_step()
        else:  # a model: every SLoPe layer's hook
            after_optimizer_step(m)
