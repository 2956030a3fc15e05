"""Backend selection and the cusparselt backend's fallbacks, on a CPU-only machine.

CI has no GPU, so these pin down everything of the fast path that needs none: 'auto' picks the
reference backend, the cusparselt module imports without touching CUDA or building anything,
a layer asked for 'cusparselt' still computes the reference result (logging why, once), the
shape/dtype rules that send a layer to the fallback, the plan cache's search-once-and-persist
logic (with a fake binding), and the Triton gathers in Triton's CPU interpreter.
"""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from slope_megatron.sparsity import SlopeLinear
from slope_megatron.sparsity.backends import get_backend, resolve_auto
from slope_megatron.sparsity.backends import cusparselt as cslt
from slope_megatron.sparsity.backends.base import LOGGED_FALLBACKS

from helpers.paths import ROOT as _ROOT

ROOT = str(_ROOT)
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


@no_cuda
def test_auto_resolves_to_reference_without_cuda():
    assert resolve_auto() == "reference"
    assert get_backend("auto").name == "reference"
    assert cslt.unavailable_reason() == "CUDA is not available"


def test_importing_the_backend_loads_no_kernels():
    code = ("import sys; import slope_megatron.sparsity.backends.cusparselt as c; "
            "from slope_megatron.sparsity import SlopeLinear; "
            "bad = [m for m in sys.modules if m.startswith('kernels') or "
            "m == 'torch.utils.cpp_extension' or m.startswith('triton')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@no_cuda
def test_cusparselt_layer_on_cpu_matches_reference_and_logs_once(caplog):
    torch.manual_seed(0)
    fast = SlopeLinear(64, 32, backend="cusparselt")
    ref = SlopeLinear(64, 32, backend="reference")
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(4, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    LOGGED_FALLBACKS.clear()
    with caplog.at_level(logging.WARNING, logger=cslt.__name__):
        y = fast(x)
        fast(x)  # second call: no second log line
    y.sum().backward()
    ref(x_ref).sum().backward()
    assert torch.equal(y, ref(x_ref))
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.equal(fast.weight.grad, ref.weight.grad)
    lines = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert len(lines) == 1 and "not on a CUDA device" in lines[0], lines
    assert "_cslt_cache" not in fast.__dict__  # no kernel state was built
    fast.after_optimizer_step()  # hooks are safe without a cache
    fast.backend.on_column_mask_change(fast)
    assert "_cslt_cache" not in fast.state_dict()


@pytest.mark.parametrize("kw,dtype,expect", [
    (dict(in_features=64, out_features=32), torch.bfloat16, None),
    (dict(in_features=64, out_features=32), torch.float32, "dtype torch.float32"),
    (dict(in_features=64, out_features=32), torch.float16, "dtype torch.float16"),
    (dict(in_features=64, out_features=32, n=1, m=4), torch.bfloat16, "sparsity 1:4"),
    (dict(in_features=48, out_features=32), torch.bfloat16, "in_features=48"),
    (dict(in_features=64, out_features=40), torch.bfloat16, "out_features=40"),
])
def test_static_fallback_rules(kw, dtype, expect):
    layer = SlopeLinear(**kw, dtype=dtype)
    reason = cslt.static_unsupported_reason(layer)
    if expect is None:
        assert reason is None
    else:
        assert reason is not None and expect in reason, reason


def test_input_fallback_rules():
    layer = SlopeLinear(64, 32, dtype=torch.bfloat16)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    assert "not on a CUDA device" in cslt.input_unsupported_reason(layer, x)


class _FakePlan:
    """Stands in for the native Plan: records what the cache asks of it."""
    calls: list = []

    def __init__(self, m, k, n, dtype, device, alg=-1, split_k=1, split_k_mode=1,
                 split_k_buffers=1, with_bias=False):
        self.shape, self.cfg = (m, k, n), [alg, split_k, split_k_mode, split_k_buffers, 10]
        _FakePlan.calls.append(("create", self.shape, alg))

    def search(self, a, b):
        _FakePlan.calls.append(("search", self.shape))
        self.cfg = [7, 2, 1, 1, 10]
        return self.cfg

    def config(self):
        return self.cfg

    def matmul(self, a, b, c=None, beta=0.0, bias=None):
        return ("mm", self.shape)


class _FakeExt:
    Plan = _FakePlan

    @staticmethod
    def library_version(device):
        return 801


def test_plan_cache_searches_once_and_persists(tmp_path, monkeypatch):
    kplans = pytest.importorskip("slope_megatron.kernels.cslt_plans")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "FakeGPU")
    monkeypatch.delenv("SLOPE_CSLT_ALGO_CACHE", raising=False)
    monkeypatch.delenv("SLOPE_CSLT_SEARCH", raising=False)
    path = str(tmp_path / "algos.json")
    _FakePlan.calls = []
    cache = kplans.PlanCache(_FakeExt, path=path)
    b = torch.empty(8, 64, dtype=torch.bfloat16)
    assert cache.matmul(None, 32, 64, b) == ("mm", (32, 64, 8))
    cache.matmul(None, 32, 64, b)
    assert _FakePlan.calls == [("create", (32, 64, 8), -1), ("search", (32, 64, 8))]
    stored = json.load(open(path))
    assert list(stored) == ["FakeGPU|cusparselt-801|bfloat16|32x64x8"]
    assert stored["FakeGPU|cusparselt-801|bfloat16|32x64x8"]["alg"] == 7
    # a new process (new cache) builds the plan with the stored algorithm, no search
    _FakePlan.calls = []
    kplans.PlanCache(_FakeExt, path=path).matmul(None, 32, 64, b)
    assert _FakePlan.calls == [("create", (32, 64, 8), 7)]
    # search disabled: default algorithm, nothing stored for the new shape
    _FakePlan.calls = []
    kplans.PlanCache(_FakeExt, path=path, search=False).matmul(None, 64, 32, b)
    assert _FakePlan.calls == [("create", (64, 32, 8), -1)] and len(json.load(open(path))) == 1


def test_plan_cache_searches_again_after_a_failed_search(tmp_path, monkeypatch):
    """An out-of-memory in the algorithm search must not leave the plan on the default
    algorithm for the process's life: the next call searches again."""
    kplans = pytest.importorskip("slope_megatron.kernels.cslt_plans")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "FakeGPU")
    monkeypatch.delenv("SLOPE_CSLT_ALGO_CACHE", raising=False)
    monkeypatch.delenv("SLOPE_CSLT_SEARCH", raising=False)
    search = _FakePlan.search

    def search_out_of_memory_once(self, a, b):
        monkeypatch.setattr(_FakePlan, "search", search)
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(_FakePlan, "search", search_out_of_memory_once)
    _FakePlan.calls = []
    cache = kplans.PlanCache(_FakeExt, path=str(tmp_path / "algos.json"))
    b = torch.empty(8, 64, dtype=torch.bfloat16)
    with pytest.raises(torch.OutOfMemoryError):
        cache.matmul(None, 32, 64, b)
    assert cache.matmul(None, 32, 64, b) == ("mm", (32, 64, 8))
    assert _FakePlan.calls == [("create", (32, 64, 8), -1), ("search", (32, 64, 8))]
    assert cache.configs()["FakeGPU|cusparselt-801|bfloat16|32x64x8"]["alg"] == 7


def test_triton_gathers_in_interpreter():
    """The two Triton gathers vs torch indexing, run by Triton's CPU interpreter."""
    pytest.importorskip("triton")
    code = r'''
import torch
from slope_megatron.kernels.nm_triton import wt_tag_matrix, gather_kept_2to4, gather_wt_values
from slope_megatron.sparsity.masks import nm_mask, double_prune_mask, pack_bits
from slope_megatron.sparsity.functional import dense_from_values
torch.manual_seed(0)
o, i = 64, 96
w = torch.randn(o, i).to(torch.bfloat16); m = nm_mask(w); vals = w[m].view(o, -1).contiguous()
d = torch.randn(o, i).to(torch.bfloat16)
assert torch.equal(gather_kept_2to4(d, pack_bits(m)), d[m].view(o, -1))
m12 = nm_mask(torch.randn(8, 12)); d12 = torch.randn(8, 12)  # a row of 1.5 bytes
assert torch.equal(gather_kept_2to4(d12, pack_bits(m12)), d12[m12].view(8, -1))
prod = double_prune_mask(dense_from_values(vals, m), 2, 4, row_mask=m)
t = wt_tag_matrix(m, prod, torch.bfloat16).view(i, o // 4, 4)
# what a compressor produces: each group's non-zeros in order, empty slots last
slots = torch.sort(-(t != 0).float(), dim=-1, stable=True).indices[..., :2]
codes = t.gather(-1, slots).reshape(i, o // 2).to(torch.uint8)
out = torch.full((i, o // 2), float("nan"), dtype=torch.bfloat16)
gather_wt_values(vals, codes, out)
w_rc_t = (dense_from_values(vals, m) * prod).t().reshape(i, o // 4, 4)
assert torch.equal(out, w_rc_t.gather(-1, slots).reshape(i, o // 2))
print("ok")
'''
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


def test_lowrank_add_in_interpreter():
    """The adapter's one-pass Y + (X A) B vs torch, run by Triton's CPU interpreter."""
    pytest.importorskip("triton")
    code = r'''
import torch
from slope_megatron.kernels.lowrank_triton import lowrank_add
torch.manual_seed(0)
for m, n, k in [(70, 130, 24), (128, 256, 40)]:
    y, xa, b = torch.randn(m, n), torch.randn(m, k), torch.randn(k, n)
    out = lowrank_add(y, xa, b)
    torch.testing.assert_close(out, y + xa @ b, rtol=1e-4, atol=1e-4)
print("ok")
'''
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


def test_widen_with_lowrank_in_interpreter():
    """The K-augmentation's input: [X | s X A spread 2:4] and X A, vs torch, in Triton's CPU
    interpreter; ranks above one rank block (128) and ragged rows/columns included."""
    pytest.importorskip("triton")
    code = r'''
import torch
from slope_megatron.kernels.lowrank_triton import widen_with_lowrank
torch.manual_seed(0)
for m, k, r, scale in [(70, 96, 24, 1.0), (64, 256, 16, 0.25), (33, 128, 200, 1 / 3)]:
    x, a = torch.randn(m, k), torch.randn(k, r)
    wide, xa = widen_with_lowrank(x, a, scale)
    torch.testing.assert_close(xa, x @ a, rtol=1e-4, atol=1e-4)
    assert wide.shape == (m, k + 2 * r) and torch.equal(wide[:, :k], x)
    groups = wide[:, k:].view(m, r // 2, 4)
    torch.testing.assert_close(groups[..., :2].reshape(m, r), scale * (x @ a), rtol=1e-4,
                               atol=1e-4)
    assert torch.equal(groups[..., 2:], torch.zeros_like(groups[..., 2:]))
print("ok")
'''
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


@no_cuda
def test_linear_with_adapter_on_cpu_matches_layer_forward():
    torch.manual_seed(0)
    fast = SlopeLinear(64, 32, backend="cusparselt")
    fast.enable_adapter(3)
    with torch.no_grad():
        fast.adapter_b.normal_()
    x = torch.randn(4, 64)
    torch.testing.assert_close(fast.backend.linear_with_adapter(fast, x), fast(x))
