"""cusparselt backend vs the reference backend on a GPU: outputs and all three gradients.

Run on a CUDA machine (`pytest -m gpu tests/gpu`); skipped elsewhere by tests/conftest.py.
Each case builds one layer per backend with identical state, runs forward + backward on the
same random bf16 inputs and compares with ||a - b|| / ||b|| < 1e-2 (bf16 tolerance), then takes
optimizer steps so the refresh paths (copy for W, gather or re-compression for W^T) are
exercised too.
"""
import logging

import pytest
import torch

from helpers.layer import chain_pairs, same_update
from slope_megatron.sparsity import SlopeLinear

pytestmark = pytest.mark.gpu

TOL = 1e-2


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def make_pair(inn, out, bias, refresh=1, seed=0, keep=True):
    torch.manual_seed(seed)
    fast = SlopeLinear(inn, out, bias=bias, backend="cusparselt", column_mask_refresh=refresh,
                       device="cuda", dtype=torch.bfloat16, keep_compressed=keep)
    if bias:
        with torch.no_grad():
            fast.bias.normal_()
    ref = SlopeLinear(inn, out, bias=bias, backend="reference", column_mask_refresh=refresh,
                      device="cuda", dtype=torch.bfloat16)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def run_both(fast, ref, shape, inn):
    x = torch.randn(*shape, inn, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = fast(x), ref(xr)
    dy = torch.randn_like(yr)
    y.backward(dy)
    yr.backward(dy)
    got = {"y": y, "dx": x.grad, "dw": fast.weight.grad}
    want = {"y": yr, "dx": xr.grad, "dw": ref.weight.grad}
    if fast.bias is not None:
        got["db"], want["db"] = fast.bias.grad, ref.bias.grad
    if fast.adapter_active:
        got["da"], want["da"] = fast.adapter_a.grad, ref.adapter_a.grad
        got["db_adapter"], want["db_adapter"] = fast.adapter_b.grad, ref.adapter_b.grad
    return got, want


def assert_match(got, want, what=""):
    for k in want:
        assert got[k] is not None and torch.isfinite(got[k]).all(), (what, k)
        assert got[k].shape == want[k].shape, (what, k)
        err = rel_err(got[k], want[k])
        assert err < TOL, f"{what} {k}: rel err {err:.2e}"


# shape classes: GPT-2 square/up/down, LLaMA-like wide/tall, tiny, 3-D input
CASES = [
    (768, 768, True, (2, 512)),
    (768, 3072, True, (1024,)),
    (3072, 768, True, (1024,)),
    (4096, 11008, False, (2048,)),
    (11008, 4096, False, (2048,)),
    (128, 128, False, (128,)),
    (256, 512, True, (4, 8, 16)),
]


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "per-call"])
@pytest.mark.parametrize("inn,out,bias,shape", CASES)
def test_matches_reference_across_steps(inn, out, bias, shape, keep):
    fast, ref = make_pair(inn, out, bias, refresh=2, keep=keep)
    for step in range(4):  # column mask recomputed at steps 0 and 2, gathered at 1 and 3
        got, want = run_both(fast, ref, shape, inn)
        assert_match(got, want, f"{inn}x{out} step {step}")
        assert fast._unpacked == {}  # the sparse path never keeps bool masks
        assert torch.equal(fast.column_mask, ref.column_mask)
        fast.release_unpacked_masks()
        same_update(fast, ref)
    cache = fast.__dict__["_cslt_cache"]
    assert cache.wt_row_major  # the gather path really ran
    assert cache.keep is keep
    if not keep:  # only metadata is owned; the operands live in the shared scratch
        owned = cache.fwd_meta.numel() + cache.wt_meta.numel() + cache.wt_codes.numel()
        assert owned <= 0.75 * inn * out, owned


def test_per_call_layers_share_scratch_and_stay_correct():
    """Two per-call layers of different shapes in a chain: each GEMM sees its own operand
    although both use the same scratch buffers (filled right before each GEMM)."""
    torch.manual_seed(3)
    pairs = [make_pair(512, 1024, True, seed=1, keep=False),
             make_pair(1024, 512, False, seed=2, keep=False)]
    for step in range(3):
        got = chain_pairs(pairs, (256, 512))
        assert_match({k: a for k, (a, _) in got.items()}, {k: b for k, (_, b) in got.items()},
                     f"chain step {step}")
        for i, (fast, ref) in enumerate(pairs):
            assert_match({"dw": fast.weight.grad}, {"dw": ref.weight.grad}, f"layer {i}")
            same_update(fast, ref)


def test_no_grad_forward_builds_no_wt_buffer():
    fast, ref = make_pair(512, 256, True)
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y, yr = fast(x), ref(x)
    assert rel_err(y, yr) < TOL
    assert fast.__dict__["_cslt_cache"].wt_buf is None


def test_non_contiguous_input_and_side_stream():
    fast, ref = make_pair(512, 1024, False)
    base = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16)
    x = base.t()  # (64, 512), not contiguous
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = fast(x)
    torch.cuda.current_stream().wait_stream(stream)
    assert rel_err(y, ref(x)) < TOL


def test_weight_changed_without_hook_is_noticed():
    fast, ref = make_pair(256, 256, False)
    x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16)
    fast(x)
    with torch.no_grad():
        for layer in (fast, ref):
            layer.weight.mul_(-2.0)  # bumps the version: the cache must refresh
    assert rel_err(fast(x), ref(x)) < TOL


def test_unsupported_token_count_falls_back(caplog):
    from slope_megatron.sparsity.backends import cusparselt as cslt
    from slope_megatron.sparsity.backends.base import LOGGED_FALLBACKS
    fast, ref = make_pair(256, 256, True)
    x = torch.randn(10, 256, device="cuda", dtype=torch.bfloat16)
    LOGGED_FALLBACKS.clear()
    with caplog.at_level(logging.WARNING, logger=cslt.__name__):
        y = fast(x)
    assert torch.equal(y, ref(x))  # the reference ran
    assert any("10 tokens" in r.getMessage() for r in caplog.records)


def test_auto_is_per_shape_and_layout_holds():
    from slope_megatron.sparsity.backends import resolve_auto
    from slope_megatron.sparsity.backends.cusparselt_runtime import runtime
    assert resolve_auto() == "auto"
    assert runtime().values_row_major(torch.device("cuda", torch.cuda.current_device()),
                                      torch.bfloat16)


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "per-call"])
def test_weight_written_through_data_is_noticed_after_a_step(keep):
    """DeepSpeed's bf16 optimizer writes updated weights with `param.data.copy_()`, which
    leaves the version counter alone. A layer whose operands were not refreshed eagerly (auto
    routes its training shapes dense, its evaluation shape sparse) must still use the new
    weights once the layer has counted the optimizer step."""
    fast, ref = make_pair(512, 512, True, keep=keep)
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fast(x)  # operands built from the old weights
        new = torch.randn_like(fast.weight)
        fast.weight.data.copy_(new)
        ref.weight.data.copy_(new)
        fast.optimizer_steps += 1  # what after_optimizer_step counts, without the refresh
        assert_match({"y": fast(x)}, {"y": ref(x)}, "after a .data write")


def test_state_dict_unaffected_and_reload_resyncs():
    fast, ref = make_pair(512, 512, True)
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    fast(x)
    assert not any("cslt" in k for k in fast.state_dict())
    other, _ = make_pair(512, 512, True, seed=5)
    fast.load_state_dict(other.state_dict())  # new mask and weights
    ref.load_state_dict(other.state_dict())
    got, want = run_both(fast, ref, (64,), 512)
    assert_match(got, want, "after load_state_dict")


def adapter_pair(inn, out, rank, bias, keep):
    fast, ref = make_pair(inn, out, bias, refresh=2, keep=keep)
    for layer in (fast, ref):
        layer.enable_adapter(rank)
    with torch.no_grad():
        ref.adapter_a.copy_(fast.adapter_a)
        fast.adapter_b.normal_()
        ref.adapter_b.copy_(fast.adapter_b)
    return fast, ref


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "per-call"])
@pytest.mark.parametrize("inn,out,rank,bias,shape,inside", [
    (512, 1024, 10, True, (256,), True),  # rank padded 10 -> 16
    (1024, 1024, 16, False, (2, 128), True),
    (768, 3072, 15, True, (1024,), True),  # GPT-2 small MLP-up at rank 2%
    (4096, 2560, 82, False, (512,), True),  # rank 82 -> 96
    (1024, 2048, 272, False, (256,), True),  # three rank blocks in the widening pass
    (3072, 768, 61, True, (512,), False),  # MLP-down: the adapter goes after the GEMM
])
def test_adapter_through_cusparselt_matches_reference(inn, out, rank, bias, shape, inside, keep):
    """The active adapter through the cusparselt backend (inside the widened sparse GEMM, or
    after it for narrowing layers) vs the reference layer: output and gradients of x, W, A, B
    and bias, over optimizer steps that change W and B (the widened operand's refresh) and
    refresh the column mask; then the adapter is switched off and the plain operand is back."""
    fast, ref = adapter_pair(inn, out, rank, bias, keep)
    for step in range(4):
        got, want = run_both(fast, ref, shape, inn)  # with the adapter's gradients
        assert {"da", "db_adapter"} <= set(want)
        assert_match(got, want, f"{inn}x{out} rank {rank} step {step}")
        same_update(fast, ref, through_data=step % 2 == 1)
    cache = fast.__dict__["_cslt_cache"]
    op = cache.adapter_operand
    assert (op is not None) == inside
    assert op is None or not op.tokens_refused
    if keep:
        assert (cache.fwd_buf is None) == inside  # released while the adapter runs inside
    for layer in (fast, ref):
        layer.adapter_active = False
    got, want = run_both(fast, ref, shape, inn)
    assert_match(got, want, "adapter off again")


def test_adapter_path_falls_back_when_the_widened_gemm_is_refused(monkeypatch, caplog):
    """If cuSPARSELt rejects the widened GEMM (plan or algorithm search), that token count adds
    the adapter after the GEMM from then on (one warning) and results still match."""
    from slope_megatron.sparsity.backends import cusparselt_adapter
    from slope_megatron.sparsity.backends.cusparselt_runtime import CALL_FAILED

    def refuse(self, buf, wide, bias):  # worded as the binding's CSLT_CHECK words a refusal
        raise RuntimeError(f"{CALL_FAILED}cusparseLtMatmulSearch failed: refused (test)")

    monkeypatch.setattr(cusparselt_adapter.AugmentedOperand, "matmul", refuse)
    fast, ref = adapter_pair(512, 512, 8, True, True)
    x = torch.randn(128, 512, device="cuda", dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert_match({"y": fast(x)}, {"y": ref(x)}, "fallback")
    assert fast.__dict__["_cslt_cache"].adapter_operand.tokens_refused == {128}
    assert sum("refused (test)" in r.getMessage() for r in caplog.records) == 1


def test_stored_algorithm_is_reused_by_a_new_cache(tmp_path):
    """Search once, persist, and a fresh PlanCache builds the plan from the file (this path
    once segfaulted when the plan was re-initialised after changing its algorithm)."""
    from slope_megatron.kernels.cslt_plans import PlanCache
    from slope_megatron.sparsity.backends.cusparselt_runtime import runtime
    from slope_megatron.sparsity.masks import nm_mask
    rt = runtime()
    path = str(tmp_path / "algos.json")
    w = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    w = w * nm_mask(w)
    buf = rt.compressed_buffer(512, 256, torch.bfloat16, w.device)
    rt.ext.compress(w, buf)
    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16)
    first = PlanCache(rt.ext, path=path, search=True)
    y1 = first.matmul(buf, 512, 256, x)
    second = PlanCache(rt.ext, path=path, search=True)
    y2 = second.matmul(buf, 512, 256, x)
    cp = second.get(512, 256, 128, torch.bfloat16, x.device.index)
    assert cp.tuned and cp.plan.config()[0] == first.get(512, 256, 128, torch.bfloat16,
                                                         x.device.index).plan.config()[0]
    ref = x.float() @ w.float().t()
    assert rel_err(y1, ref) < TOL and rel_err(y2, ref) < TOL


def test_layers_sharing_a_plan_keep_their_own_bias():
    """Two same-shape layers share one cached plan; each call must use its own bias (the bias
    pointer is set per call when the epilogue is usable, else added separately)."""
    pairs = [make_pair(512, 256, True, seed=s) for s in (1, 2)]
    x = torch.randn(128, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(2):
            for fast, ref in pairs:
                assert rel_err(fast(x), ref(x)) < TOL
