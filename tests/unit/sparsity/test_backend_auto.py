"""The `auto` backend's per-shape choice, on a CPU-only machine (fake timer, fake sparse path).

What is pinned down without a GPU: the rule (sparse iff dense/sparse time >= min_speedup), one
timing and one log line per key, separate keys per token count and grad mode, the timing leaves
the parameters' .grad alone, outputs equal the reference, the optimizer-step hook reaches the
sparse path only for layers routed to it, an ineligible call goes to the reference untimed,
the explicit 'cusparselt' backend never consults the timer, 'auto' on CPU is the reference, and
a decision taken before the layer's second optimizer step is timed once more after it.
"""
import logging

import pytest
import torch

from slope_megatron.sparsity import SlopeLinear
from slope_megatron.sparsity import backends
from slope_megatron.sparsity.backends import auto as auto_mod
from slope_megatron.sparsity.backends import get_backend, resolve_auto
from slope_megatron.sparsity.backends.auto import AutoBackend
from slope_megatron.sparsity.backends.reference import ReferenceBackend

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


class Counting(ReferenceBackend):
    """A reference backend that records its calls (stands in for cusparselt on CPU)."""

    def __init__(self, name):
        self.name = name
        self.calls = []

    def linear(self, layer, x):
        self.calls.append(("linear", layer.out_features, x.numel() // x.shape[-1]))
        return super().linear(layer, x)

    def after_optimizer_step(self, layer):
        self.calls.append(("after_step", layer.out_features))

    def on_column_mask_change(self, layer):
        self.calls.append(("mask_change", layer.out_features))


class FakeMeasure:
    """measure(sparse_step, dense_step): runs each step once, returns preset times per shape."""

    def __init__(self, times):
        self.times = times  # {(out, tokens): (sparse_s, dense_s)}
        self.calls = []
        self.reps = []

    def __call__(self, sparse_step, dense_step, reps=auto_mod.REPS):
        sparse_step()
        dense_step()
        layer_key = self.current
        self.calls.append(layer_key)
        self.reps.append(reps)
        times = self.times[layer_key]
        return times.pop(0) if isinstance(times, list) else times  # a list: one per timing


def make_auto(times, min_speedup=1.05):
    sparse, dense = Counting("cusparselt"), Counting("reference")
    measure = FakeMeasure(times)
    be = AutoBackend(sparse=sparse, dense=dense, measure=measure,
                     eligible=lambda layer, x: None, min_speedup=min_speedup)
    return be, sparse, dense, measure


def layer_pair(inn, out, be, seed=0):
    torch.manual_seed(seed)
    lay = SlopeLinear(inn, out, backend="reference")
    with torch.no_grad():
        lay.bias.normal_()
    lay.backend = be
    ref = SlopeLinear(inn, out, backend="reference")
    ref.load_state_dict(lay.state_dict())
    return lay, ref


def test_decision_rule_routes_per_shape_and_times_once(caplog):
    times = {(32, 16): (2.0e-3, 1.0e-3),   # sparse step 0.5x dense -> reference
             (64, 16): (1.0e-3, 1.3e-3),   # 1.3x -> cusparselt
             (64, 32): (1.0e-3, 1.02e-3)}  # 1.02x < 1.05 -> reference
    be, sparse, dense, measure = make_auto(times)
    small, small_ref = layer_pair(64, 32, be)
    big, big_ref = layer_pair(64, 64, be, seed=1)
    seen = set()
    with caplog.at_level(logging.INFO, logger=auto_mod.__name__):
        for lay, ref, tokens in ((small, small_ref, 16), (big, big_ref, 16), (big, big_ref, 32)):
            for rep in range(2):
                measure.current = (lay.out_features, tokens)
                x = torch.randn(tokens, 64, requires_grad=True)
                xr = x.detach().clone().requires_grad_()
                y, yr = lay(x), ref(xr)
                if id(lay) not in seen:  # the timing (first call) touched no .grad
                    assert lay.weight.grad is None and lay.bias.grad is None
                    seen.add(id(lay))
                y.sum().backward()
                yr.sum().backward()
                assert torch.equal(y, yr) and torch.equal(x.grad, xr.grad)
    assert measure.calls == [(32, 16), (64, 16), (64, 32)]  # once per key
    assert torch.equal(small.weight.grad, small_ref.weight.grad)
    assert torch.equal(big.bias.grad, big_ref.bias.grad)  # two reps of each of two token counts
    routed = {k[:3]: d.backend for k, d in be.decisions.items()}
    assert routed == {(32, 64, 16): "reference", (64, 64, 16): "cusparselt",
                      (64, 64, 32): "reference"}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("auto:")]
    assert len(lines) == 3, lines
    assert lines[0].startswith("auto: 64x32 T=16 -> reference (sparse step 0.50x dense")
    assert lines[1].startswith("auto: 64x64 T=16 -> cusparselt (sparse step 1.30x dense")
    assert lines[2].startswith("auto: 64x64 T=32 -> reference (sparse step 1.02x dense")
    # routed calls (not the timing ones) went to the winner: sparse only for (64, T=16)
    n_timing = 3  # each measurement ran each step once
    sparse_routed = [c for c in sparse.calls if c[0] == "linear"]
    assert len(sparse_routed) == n_timing + 2
    assert sum(1 for c in sparse_routed if c == ("linear", 64, 16)) == 1 + 2


def test_optimizer_hook_reaches_sparse_only_for_sparse_routed_layers():
    be, sparse, _, measure = make_auto({(32, 16): (2.0, 1.0), (64, 16): (1.0, 2.0)})
    small, _ = layer_pair(64, 32, be)
    big, _ = layer_pair(64, 64, be, seed=1)
    for lay in (small, big):
        measure.current = (lay.out_features, 16)
        lay(torch.randn(16, 64)).sum().backward()
    sparse.calls.clear()
    small.after_optimizer_step()
    big.after_optimizer_step()
    assert ("after_step", 64) in sparse.calls and ("after_step", 32) not in sparse.calls
    be.on_column_mask_change(small)  # always forwarded (marks a kernel cache's W^T stale)
    assert ("mask_change", 32) in sparse.calls


def run_step(lay, tokens=16):
    lay(torch.randn(tokens, lay.in_features)).sum().backward()
    lay.after_optimizer_step()


def test_provisional_decision_is_timed_again_once_the_layer_settled(caplog):
    # first timing (step 0): sparse looks slow; after two optimizer steps it is 1.2x
    be, sparse, _, measure = make_auto({(32, 16): [(2.0e-3, 1.0e-3), (1.0e-3, 1.2e-3)]})
    lay, _ = layer_pair(64, 32, be)
    measure.current = (32, 16)
    with caplog.at_level(logging.INFO, logger=auto_mod.__name__):
        run_step(lay)
        (first,) = be.decisions.values()
        assert first.backend == "reference" and not first.final
        run_step(lay)  # step 1: still the provisional decision, not timed again
        assert measure.calls == [(32, 16)]
        sparse.calls.clear()
        run_step(lay)  # step 2: timed again, and this call already runs on the new choice
    assert measure.calls == [(32, 16), (32, 16)]
    assert measure.reps == [auto_mod.REPS, auto_mod.SETTLED_REPS]  # the decisive one is longer
    (second,) = be.decisions.values()
    assert second.backend == "cusparselt" and second.final and second.first is first
    assert ("linear", 32, 16) in sparse.calls[1:]  # after the timing's own call
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("auto:")]
    assert lines[0].endswith("ms; provisional: timed again after 2 more optimizer steps)"), lines
    assert lines[1].startswith("auto: 64x32 T=16 -> cusparselt (sparse step 1.20x dense")
    assert lines[1].endswith("re-timed 2 optimizer steps later; first timing 0.50x)"), lines
    for _ in range(3):
        run_step(lay)
    assert len(measure.calls) == 2  # final: never timed again


def test_steps_count_from_the_decision_so_a_resumed_run_re_times_too():
    be, _, _, measure = make_auto({(32, 16): [(2.0e-3, 1.0e-3), (1.0e-3, 2.0e-3)]})
    lay, _ = layer_pair(64, 32, be)
    lay.optimizer_steps = 1000  # as restored from a checkpoint
    measure.current = (32, 16)
    for _ in range(5):
        run_step(lay)
    assert measure.calls == [(32, 16)] * 2
    assert measure.reps == [auto_mod.REPS, auto_mod.SETTLED_REPS]
    (decision,) = be.decisions.values()
    assert decision.final and decision.backend == "cusparselt" and decision.first.step == 1000


def test_untimed_decisions_and_layers_without_a_step_count_are_final_at_once(monkeypatch):
    be, _, _, measure = make_auto({(32, 16): (1.0e-3, 2.0e-3)})
    lay, _ = layer_pair(64, 32, be)
    monkeypatch.setattr(auto_mod, "_counts_steps", lambda layer: False)  # no step counter
    measure.current = (32, 16)
    for _ in range(3):
        lay(torch.randn(16, 64)).sum().backward()
    assert measure.calls == [(32, 16)] and measure.reps == [auto_mod.SETTLED_REPS]
    assert all(d.final for d in be.decisions.values())

    def refuse(*a, **k):
        raise AssertionError("must not time an ineligible call")
    be = AutoBackend(sparse=Counting("cusparselt"), dense=Counting("reference"), measure=refuse)
    lay, _ = layer_pair(64, 32, be)  # CPU tensors: cusparselt cannot take them
    for _ in range(4):
        run_step(lay)
    (decision,) = be.decisions.values()
    assert decision.final and decision.backend == "reference"


def test_eager_refresh_follows_the_training_keys_routed_sparse_now():
    # sparse at first, dense once re-timed: the optimizer-step hook stops refreshing
    be, sparse, _, measure = make_auto({(32, 16): [(1.0e-3, 2.0e-3), (2.0e-3, 1.0e-3)]})
    lay, _ = layer_pair(64, 32, be)
    measure.current = (32, 16)
    run_step(lay)
    assert auto_mod.routes_sparse(lay) and ("after_step", 32) in sparse.calls
    run_step(lay)
    run_step(lay)  # re-timed: dense from here on
    assert not auto_mod.routes_sparse(lay)
    sparse.calls.clear()
    run_step(lay)
    assert ("after_step", 32) not in sparse.calls
    # a no-grad (evaluation) key routed sparse does not make the hook refresh eagerly
    be, sparse, _, measure = make_auto({(32, 16): (1.0e-3, 2.0e-3)})
    lay, _ = layer_pair(64, 32, be)
    measure.current = (32, 16)
    with torch.no_grad():
        lay(torch.randn(16, 64))
    assert not auto_mod.routes_sparse(lay)
    lay.after_optimizer_step()
    assert ("after_step", 32) not in sparse.calls


def test_no_grad_is_a_separate_forward_only_key(caplog):
    be, sparse, dense, measure = make_auto({(32, 16): (1.0, 2.0)})
    lay, ref = layer_pair(64, 32, be)
    measure.current = (32, 16)
    x = torch.randn(16, 64)
    with caplog.at_level(logging.INFO, logger=auto_mod.__name__), torch.no_grad():
        y = lay(x)
    assert torch.equal(y, ref(x)) and lay.weight.grad is None
    assert "sparse forward 2.00x dense" in caplog.text
    lay(x)  # with grad: a new key, timed again
    assert len(measure.calls) == 2 and len(be.decisions) == 2


def test_ineligible_call_goes_to_reference_untimed(caplog):
    def measure(*a):
        raise AssertionError("must not time an ineligible call")
    be = AutoBackend(sparse=Counting("cusparselt"), dense=Counting("reference"),
                     measure=measure)  # default eligibility: the cusparselt checks
    lay, ref = layer_pair(64, 32, be)
    x = torch.randn(16, 64)
    with caplog.at_level(logging.INFO, logger=auto_mod.__name__):
        assert torch.equal(lay(x), ref(x))
    (decision,) = be.decisions.values()
    assert decision.backend == "reference" and "not on a CUDA device" in decision.reason
    assert "auto: 64x32 T=16 -> reference (cusparselt cannot take it" in caplog.text
    assert not [c for c in be.sparse.calls if c[0] == "linear"]


def test_min_speedup_from_environment(monkeypatch):
    monkeypatch.setenv("SLOPE_AUTO_MIN_SPEEDUP", "1.5")
    be = AutoBackend(sparse=Counting("c"), dense=Counting("r"))
    assert be.min_speedup == 1.5
    assert be.decide_from_times("8x8 T=16", 1.0, 1.4).backend == "r"  # the dense one
    assert be.decide_from_times("8x8 T=16", 1.0, 1.6).backend == "c"  # the sparse one
    monkeypatch.setenv("SLOPE_AUTO_MIN_SPEEDUP", "fast")
    assert AutoBackend(sparse=Counting("c"), dense=Counting("r")).min_speedup == \
        auto_mod.DEFAULT_MIN_SPEEDUP


def test_explicit_cusparselt_never_consults_the_timer(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the explicit cusparselt backend must not time anything")
    monkeypatch.setattr(auto_mod, "cuda_event_measure", boom)
    monkeypatch.setattr(AutoBackend, "_decide", boom)
    monkeypatch.setattr(AutoBackend, "choose", boom)
    be = get_backend("cusparselt")
    assert be.name == "cusparselt" and not isinstance(be, AutoBackend)
    lay = SlopeLinear(64, 32, backend="cusparselt")
    lay(torch.randn(16, 64)).sum().backward()  # CPU: its own fallback, no decision
    lay.after_optimizer_step()


def test_auto_is_the_per_shape_backend_where_cusparselt_can_run(monkeypatch):
    monkeypatch.setattr(backends, "cusparselt_unavailable_reason", lambda: None)
    monkeypatch.setattr(backends, "_INSTANCES", {})
    assert resolve_auto() == "auto"
    be = get_backend("auto")
    assert isinstance(be, AutoBackend) and be.name == "auto"
    assert be.sparse is get_backend("cusparselt") and be.dense is get_backend("cublas")


@no_cuda
def test_auto_on_cpu_is_reference():
    assert resolve_auto() == "reference"
    lay = SlopeLinear(64, 32, backend="auto")
    assert type(lay.backend) is ReferenceBackend and lay.backend.name == "reference"
