"""Scenarios for the cusparselt backend's bookkeeping on the CPU (run by
test_cusparselt_logic.py in a process with TRITON_INTERPRET=1; see fake_cusparselt.py).

Each scenario trains a cusparselt layer (fake runtime, real caches, real Triton kernels in
the interpreter, fp32) beside a reference layer and compares outputs and every gradient after
each change a training run makes: optimizer steps written through `.data` (DeepSpeed's bf16
optimizer), evaluation at another token count, the adapter switched on and off, a reload, an
`auto` timing, a refused widened GEMM, a ZeRO-3 partitioned weight at the optimizer step, an
out-of-memory at a token count's first call. Prints "ok <scenario>" per scenario.
"""
import copy
import sys

import torch

from helpers import fake_cusparselt
from helpers.layer import chain_pairs, rel_err, same_update, step_pairs

RT = fake_cusparselt.install()

from slope_megatron.sparsity import SlopeLinear  # noqa: E402
from slope_megatron.sparsity.backends.auto import AutoBackend  # noqa: E402
from slope_megatron.sparsity.backends.base import LOGGED_FALLBACKS  # noqa: E402

TOL = 1e-4  # fp32 on both sides


def pair(inn, out, bias, keep, rank=None, backend="cusparselt", seed=1):
    torch.manual_seed(seed)
    kw = dict(bias=bias, column_mask_refresh=2)
    fast = SlopeLinear(inn, out, backend=backend if isinstance(backend, str) else "reference",
                       keep_compressed=keep, **kw)
    if not isinstance(backend, str):
        fast.backend = backend  # e.g. a fresh AutoBackend
    ref = SlopeLinear(inn, out, backend="reference", **kw)
    with torch.no_grad():
        if bias:
            fast.bias.normal_()
    ref.load_state_dict(fast.state_dict())
    if rank is not None:
        for layer in (fast, ref):
            layer.create_adapter(rank)
        with torch.no_grad():
            fast.adapter_b.normal_()
            ref.adapter_b.copy_(fast.adapter_b)
            ref.adapter_a.copy_(fast.adapter_a)
    return fast, ref


def check(fast, ref, tokens, what, grad=True):
    if not grad:
        x = torch.randn(tokens, fast.in_features)
        with torch.no_grad():
            err = rel_err(fast(x), ref(x))
        assert err < TOL, (what, "y (no grad)", err)
        return
    pairs = step_pairs(fast, ref, (tokens, fast.in_features), device="cpu", dtype=torch.float32)
    bad = {k: rel_err(a, b) for k, (a, b) in pairs.items() if not rel_err(a, b) < TOL}
    assert not bad, (what, bad)


def data_step(fast, ref):
    """An optimizer step written through `.data` on both, as DeepSpeed's bf16 optimizer
    writes (no version-counter change), then the step hooks."""
    same_update(fast, ref, through_data=True)


def training_with_adapter(keep):
    # widening layers take the adapter inside the GEMM (rank 130: two rank blocks of the
    # widening pass); the narrowing one adds it after
    for inn, out, rank, bias, inside in [(64, 128, 10, True, True), (128, 128, 40, False, True),
                                         (64, 256, 130, True, True), (256, 64, 5, True, False)]:
        fast, ref = pair(inn, out, bias, keep, rank=rank)
        what = f"{inn}x{out} r{rank} keep={keep}"
        check(fast, ref, 32, f"{what} plain")
        data_step(fast, ref)
        for layer in (fast, ref):
            layer.enable_adapter()
        for step in range(4):  # the column mask is recomputed every 2 steps
            check(fast, ref, 32, f"{what} adapter step {step}")
            check(fast, ref, 48, f"{what} evaluation {step}", grad=False)
            data_step(fast, ref)
        cache = fast.__dict__["_cslt_cache"]
        assert (cache.adapter_operand is not None) == inside, what
        if keep:
            assert (cache.fwd_buf is None) == inside, (what, "plain operand released")
        for layer in (fast, ref):
            layer.adapter_active = False
        check(fast, ref, 32, f"{what} adapter off")
        data_step(fast, ref)
        for layer in (fast, ref):
            layer.adapter_active = True
        check(fast, ref, 32, f"{what} adapter on again")
        data_step(fast, ref)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.1 * torch.randn_like(p))
        fast.load_state_dict(copy.deepcopy(ref.state_dict()))
        check(fast, ref, 32, f"{what} after load_state_dict")
    print(f"ok training_with_adapter keep={keep}")


def lazy_resync_after_data_write(keep):
    """A layer whose operands are not refreshed eagerly (what `auto` leaves when it routes the
    training shapes dense) must notice a `.data` write by the step count alone."""
    fast, ref = pair(64, 128, True, keep)
    x = torch.randn(16, 64)
    with torch.no_grad():
        fast(x)
        new = torch.randn_like(fast.weight)
        fast.weight.data.copy_(new)
        ref.weight.data.copy_(new)
        fast.optimizer_steps += 1  # counted, not refreshed
        assert rel_err(fast(x), ref(x)) < TOL, "stale operand after a .data write"
    print(f"ok lazy_resync_after_data_write keep={keep}")


def auto_with_adapter():
    """auto times plain layer steps (they rebuild the plain forward operand); the next
    adapter call releases it again, and results stay right."""
    def measure(sparse_step, dense_step, **_):
        sparse_step()
        dense_step()
        return 1.0, 2.0  # sparse "twice as fast": routed sparse

    be = AutoBackend(measure=measure)
    fast, ref = pair(64, 128, True, True, rank=10, backend=be)
    for layer in (fast, ref):
        layer.enable_adapter()
    for step in range(4):  # timed at step 0, re-timed at step 2
        check(fast, ref, 32, f"auto step {step}")
        data_step(fast, ref)
    check(fast, ref, 48, "auto evaluation key", grad=False)
    check(fast, ref, 32, "auto after evaluation")
    cache = fast.__dict__["_cslt_cache"]
    assert cache.adapter_operand is not None and cache.fwd_buf is None
    print("ok auto_with_adapter")


def refused_widened_gemm():
    fast, ref = pair(64, 128, True, True, rank=10)
    for layer in (fast, ref):
        layer.enable_adapter()
    RT.plans.refuse.add((128, 64 + 2 * 16))
    try:
        for step in range(2):
            check(fast, ref, 32, f"refused step {step}")
            data_step(fast, ref)
    finally:
        RT.plans.refuse.clear()
    assert fast.__dict__["_cslt_cache"].adapter_operand.tokens_refused == {32}
    print("ok refused_widened_gemm")


def chain_shares_scratch_and_survives_repointing():
    """Two per-call layers in a chain (one with the adapter inside, one without) fill the same
    scratch buffers right before their GEMMs; a kept layer after them whose weight is
    re-pointed to new storage with new values (as ZeRO re-points parameters) is picked up by
    the new data_ptr."""
    pairs = [pair(64, 128, True, False, rank=10, seed=2), pair(128, 64, False, False, seed=3),
             pair(64, 128, True, True, seed=4)]
    for layer in pairs[0]:
        layer.enable_adapter()
    for step in range(3):
        got = chain_pairs(pairs, (32, 64), device="cpu", dtype=torch.float32)
        for k, (a, b) in got.items():
            assert rel_err(a, b) < TOL, ("chain", step, k, rel_err(a, b))
        for fast, ref in pairs:
            data_step(fast, ref)
        fast, ref = pairs[2]
        new = torch.randn_like(ref.weight)
        fast.weight.data = new.clone()  # new storage and values, no step counted
        ref.weight.data.copy_(new)
    print("ok chain_shares_scratch_and_survives_repointing")


def column_mask_every_step_checks_the_layout_once(keep):
    """With a fresh column mask every step (`column_mask_refresh: 1`), W_RC^T is rebuilt at
    every step from the packed masks; the layout check (a sync) runs at the first build only,
    and every step's gradients stay the reference's."""
    from slope_megatron.sparsity.backends.cusparselt_cache import LayerKernelCache
    calls = []
    checked = LayerKernelCache._wt_layout_ok

    def counting(self, codes, layer):
        calls.append(layer)
        return checked(self, codes, layer)
    LayerKernelCache._wt_layout_ok = counting
    try:
        fast, ref = pair(64, 128, True, keep)
        for layer in (fast, ref):
            layer.column_mask_refresh = 1
        masks = set()
        for step in range(4):
            check(fast, ref, 32, f"refresh 1, step {step} keep={keep}")
            masks.add(bytes(fast.column_mask_bits.numpy()))
            assert torch.equal(fast.column_mask_bits, ref.column_mask_bits), step
            data_step(fast, ref)
        assert len(masks) >= 3, "the column mask did not change between steps"
        assert len(calls) == 1, f"{len(calls)} layout checks for {len(masks)} masks"
    finally:
        LayerKernelCache._wt_layout_ok = checked
    print(f"ok column_mask_every_step_checks_the_layout_once keep={keep}")


def _sparse_wins(sparse_step, dense_step, **_):
    sparse_step()
    dense_step()
    return 1.0, 2.0  # sparse "twice as fast": `auto` routes the layer sparse


def zero3_partitioned_weight_at_step(keep, adapter=False, auto=False):
    """DeepSpeed ZeRO-3 partitions every parameter outside forward (`p.data =
    torch.empty(0)`), and the trainer runs the optimizer-step hooks there: the hook must not
    raise (its eager refresh is skipped), and the next forward, with the parameters gathered
    again (into their old storage or new storage) and changed by the step, must use the new
    values (the lazy weight-key sync) in its output and gradients."""
    backend = AutoBackend(measure=_sparse_wins) if auto else "cusparselt"
    fast, ref = pair(64, 128, True, keep, rank=10 if adapter else None, backend=backend)
    if adapter:
        for layer in (fast, ref):
            layer.enable_adapter()
    what = f"zero3 keep={keep} adapter={adapter} auto={auto}"
    for step in range(4):  # the column mask is recomputed every 2 steps
        check(fast, ref, 32, f"{what} step {step}")
        with torch.no_grad():  # the optimizer step, through .data (DeepSpeed's bf16 optimizer)
            for pa, pb in zip(fast.parameters(), ref.parameters()):
                if pb.grad is not None:
                    upd = pb.grad.sign() * 0.05
                    pa.data.sub_(upd)
                    pb.data.sub_(upd)
                pa.grad = pb.grad = None
        gathered = {}
        for name, p in fast.named_parameters():  # ZeRO-3: partitioned outside forward
            gathered[name] = p.data
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        fast.after_optimizer_step()  # raised "size of tensor a (32) must match ... (0)"
        ref.after_optimizer_step()
        for name, p in fast.named_parameters():  # gathered again for the next forward
            p.data = gathered[name] if step % 2 else gathered[name].clone()
        check(fast, ref, 48, f"{what} forward after step {step}", grad=False)
    assert "_cslt_cache" in fast.__dict__, what  # the kernels ran (not a fallback)
    print(f"ok {what}")


def out_of_memory_is_not_a_refusal():
    """An out-of-memory (or any error that is not cuSPARSELt refusing the call) at a token
    count's first widened GEMM, or while its plans are created, propagates and records
    nothing: the next call runs the adapter inside the GEMM as usual, with the reference's
    results. (It was taken for a refusal: the token count moved to the after-GEMM path for
    good, and the log blamed cuSPARSELt.)"""
    fast, ref = pair(64, 128, True, True, rank=10)
    for layer in (fast, ref):
        layer.enable_adapter()
    logged = set(LOGGED_FALLBACKS)
    wide, plain = (128, 64 + 2 * 16), (128, 64)
    # the widened GEMM of 32 tokens (plans made), then the plans of a new token count (48)
    for shape, tokens, exc in [(wide, 32, torch.OutOfMemoryError("CUDA out of memory (fake)")),
                               (wide, 32, RuntimeError("an error that is not cuSPARSELt's")),
                               (plain, 48, torch.OutOfMemoryError("CUDA out of memory (fake)"))]:
        RT.plans.fail[shape] = exc
        try:
            fast(torch.randn(tokens, 64))
        except type(exc) as e:
            assert e is exc, (shape, e)
        else:
            raise AssertionError(f"{exc!r} at {shape} was swallowed")
        assert not RT.plans.fail, shape
        cache = fast.__dict__.get("_cslt_cache")
        op = cache.adapter_operand if cache is not None else None
        assert op is None or not (op.tokens_refused or op.tokens_ok), (shape, op.tokens_refused)
        assert cache is None or 48 not in cache.accepted_tokens, shape
        assert LOGGED_FALLBACKS == logged, LOGGED_FALLBACKS - logged
    RT.plans.calls.clear()
    for step in range(2):
        check(fast, ref, 32, f"after the errors, step {step}")
        check(fast, ref, 48, f"after the errors, step {step}", grad=False)
        data_step(fast, ref)
    cache = fast.__dict__["_cslt_cache"]
    op = cache.adapter_operand
    assert op.tokens_ok == {32, 48} and not op.tokens_refused, (op.tokens_ok, op.tokens_refused)
    assert 48 in cache.accepted_tokens
    assert wide + (32,) in RT.plans.calls, RT.plans.calls  # the adapter ran inside the GEMM
    assert LOGGED_FALLBACKS == logged, LOGGED_FALLBACKS - logged
    print("ok out_of_memory_is_not_a_refusal")


if __name__ == "__main__":
    for keep in (True, False):
        training_with_adapter(keep)
        lazy_resync_after_data_write(keep)
        column_mask_every_step_checks_the_layout_once(keep)
        zero3_partitioned_weight_at_step(keep)
        zero3_partitioned_weight_at_step(keep, adapter=True)
    zero3_partitioned_weight_at_step(True, auto=True)
    out_of_memory_is_not_a_refusal()
    auto_with_adapter()
    refused_widened_gemm()
    chain_shares_scratch_and_survives_repointing()
    sys.exit(0)
