"""The `auto` backend on a GPU: it times both paths per shape and routes to the faster one.

docs/KERNELS.md measured a GPT-2-small 768x768 layer at T=1024 at 0.45x dense through
cusparselt and a LLaMA MLP-up 4096x11008 layer at T=8192 at 1.37x, so `auto` must pick the
dense path (the cublas backend) for the first and cusparselt for the second; either way
outputs and gradients must match the reference backend across optimizer steps. Also: a layer
whose shape was routed to cublas (its kernel cache built by the timing, then not refreshed
after steps) computes
the right result when that shape is later routed sparse (the cache re-syncs from the weight's
(data_ptr, version)).
"""
import pytest
import torch

from helpers.layer import compare_step, make_pair, rel_err
from slope_megatron.sparsity.backends import get_backend
from slope_megatron.sparsity.backends.auto import AutoBackend, routes_sparse

pytestmark = pytest.mark.gpu

TOL = 1e-2


def step_both(lay, ref, tokens, inn, what):
    compare_step(lay, ref, (tokens, inn), what, tol=TOL)


def test_get_backend_auto_is_the_per_shape_backend():
    be = get_backend("auto")
    assert isinstance(be, AutoBackend) and be.name == "auto"
    assert get_backend("cusparselt").name == "cusparselt"


@pytest.mark.parametrize("inn,out,bias,tokens,expect", [
    (768, 768, True, 1024, "cublas"),
    (4096, 11008, False, 8192, "cusparselt"),
    # recorded, not asserted (near the break-even point in docs/KERNELS.md)
    (768, 3072, True, 16384, None),
    (2048, 2048, True, 8192, None),
    (4096, 4096, False, 1024, None),
    (2048, 8192, True, 8192, None),
])
def test_auto_picks_the_faster_path_and_matches_reference(inn, out, bias, tokens, expect):
    be = AutoBackend()
    lay, ref = make_pair(inn, out, bias, be)
    for step in range(4):  # step 2 re-times the provisional decision of step 0
        step_both(lay, ref, tokens, inn, f"{inn}x{out} T={tokens} step {step}")
    (d,) = be.decisions.values()
    print(f"{inn}x{out} T={tokens}: {d.backend}, sparse {d.sparse_s * 1e3:.3f} ms, dense "
          f"{d.dense_s * 1e3:.3f} ms ({d.speedup:.2f}x; first timing {d.first.speedup:.2f}x)")
    assert d.final and d.first is not None and not d.first.final
    if expect is not None:
        assert d.backend == expect, d
    assert d.sparse == (d.backend == "cusparselt") == routes_sparse(lay)


def test_cache_not_stale_after_dense_routed_steps():
    from slope_megatron.sparsity.backends.cusparselt_cache import weight_key
    be = AutoBackend(min_speedup=1e9)  # everything timed goes to the dense path
    lay, ref = make_pair(512, 1024, True, be)
    lay.keep_compressed = True  # kept operands can go stale; per-call ones are built each call
    for step in range(3):  # optimizer steps change the weights; no eager refresh
        step_both(lay, ref, 256, 512, f"dense-routed step {step}")
    (decision,) = be.decisions.values()
    assert decision.backend == "cublas"
    cache = lay.__dict__["_cslt_cache"]  # built by the timing
    assert cache.fwd_key != weight_key(lay)  # stale now: the weights moved since
    decision.backend, decision.sparse = "cusparselt", True  # route it sparse from here on
    for step in range(3):
        step_both(lay, ref, 256, 512, f"sparse-routed step {step}")
    assert cache.fwd_key == weight_key(lay) and lay.__dict__["_cslt_cache"] is cache


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "per-call"])
def test_auto_with_the_adapter_on(keep):
    """auto routing sparse with the adapter on: the adapter runs inside the widened GEMM,
    outputs and all gradients match the reference across steps, evaluation at another token
    count too; the timings' plain calls rebuild the plain forward operand, which the next
    adapter call releases again (kept mode: no second copy of W for the rest of the run)."""
    be = AutoBackend(min_speedup=0.0)  # every timed shape goes sparse
    lay, ref = make_pair(1024, 2048, True, be, keep_compressed=keep)
    for layer in (lay, ref):
        layer.enable_adapter(20)
    with torch.no_grad():
        lay.adapter_b.normal_()
        ref.adapter_b.copy_(lay.adapter_b)
        ref.adapter_a.copy_(lay.adapter_a)
    for step in range(4):  # timed at step 0, re-timed at step 2 (plain layer calls)
        step_both(lay, ref, 256, 1024, f"auto + adapter step {step}")
    with torch.no_grad():  # evaluation: a new key, timed (plain calls), then the adapter path
        x = torch.randn(128, 1024, device="cuda", dtype=torch.bfloat16)
        assert rel_err(lay(x), ref(x)) < TOL
    cache = lay.__dict__["_cslt_cache"]
    op = cache.adapter_operand
    assert op is not None and {128, 256} <= op.tokens_ok and not op.tokens_refused
    if keep:
        assert cache.fwd_buf is None
