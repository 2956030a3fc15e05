"""The compiled block regions: same function as eager, one graph per region (not per block),
and the `train.compile` setting."""
import pytest
import torch
from helpers.train import loss_and_grads

from slope_megatron.config import ConfigError, load_config
from slope_megatron.model import GPTModel, regions


def tiny(arch, *overrides, layers=3):
    cfg = load_config(None, [f"model.arch={arch}", "model.vocab_size=96", "model.hidden_size=32",
                             "model.num_heads=4", f"model.num_layers={layers}",
                             "model.seq_len=16", *overrides])
    return GPTModel.from_config(cfg)


class CountingBackend:
    """A torch.compile backend that runs the traced graph as is and counts compilations."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.graphs.append(gm)
        run_as_is = lambda g, _: make_boxed_func(g.forward)  # noqa: E731
        return aot_autograd(fw_compiler=run_as_is, bw_compiler=run_as_is)(gm, example_inputs)


@pytest.fixture
def compiled():
    """Turn compilation on with a counting backend; restore eager mode afterwards."""
    import torch._dynamo

    torch._dynamo.reset()
    backend = CountingBackend()
    regions.enable_compile(True, backend=backend)
    yield backend
    regions.enable_compile(False)
    torch._dynamo.reset()


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("sparse", [True, False])
def test_compiled_regions_match_eager(arch, sparse, compiled):
    torch.manual_seed(0)
    model = tiny(arch, f"sparsity.enabled={str(sparse).lower()}", "model.dropout=0.0")
    x = torch.randint(0, 96, (2, 16))
    y = torch.randint(0, 96, (2, 16))
    regions.enable_compile(False)
    loss_e, grads_e = loss_and_grads(model, x, y)
    regions.enable_compile(True, backend=compiled)
    loss_c, grads_c = loss_and_grads(model, x, y)
    assert compiled.graphs, "no region was compiled"
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_one_graph_per_region_not_per_block(arch, compiled):
    """The GEMMs stay outside, so every block reuses the same compiled graphs: a 3-block and
    a 6-block model compile the same number of graphs (forward; backward is traced with it)."""
    import torch._dynamo

    counts = []
    for layers in (3, 6):
        torch._dynamo.reset()
        compiled.graphs.clear()
        model = tiny(arch, layers=layers)
        x = torch.randint(0, 96, (2, 16))
        model(x, x).backward()
        counts.append(len(compiled.graphs))
    # attention, residual add + norm, activation, loss
    assert counts == [4, 4]


def test_sparse_linears_are_not_traced(compiled):
    """No SlopeLinear op (mask scatter, the custom autograd function) appears in a graph."""
    model = tiny("gpt")
    x = torch.randint(0, 96, (2, 16))
    model(x, x).backward()
    code = "\n".join(g.code for g in compiled.graphs)
    assert "masked_scatter" not in code and "linear" not in code


def test_resolve_compile():
    assert regions.resolve_compile(None, torch.device("cuda", 0)) is True
    assert regions.resolve_compile(None, torch.device("cpu")) is False
    assert regions.resolve_compile(None, "cpu") is False
    assert regions.resolve_compile(True, torch.device("cpu")) is True
    assert regions.resolve_compile(False, torch.device("cuda", 0)) is False


def test_compile_setting_is_a_bool():
    assert load_config(None, ["train.compile=true"]).train.compile is True
    assert load_config(None, ["train.compile=false"]).train.compile is False
    assert load_config(None, []).train.compile is None
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(None, ["train.compile=fast"])


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_every_norm_runs_through_its_module(arch):
    """DeepSpeed hooks modules (ZeRO-3 gathers parameters in a pre-forward hook), so the fused
    residual add + norm must still be a call of the norm module."""
    model = tiny(arch)
    called = []
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))]
    for norm in norms:
        norm.register_forward_pre_hook(lambda mod, args: called.append(mod))
    x = torch.randint(0, 96, (2, 16))
    model(x, x)
    assert len(norms) == 2 * 3 + 1 and {id(m) for m in called} == {id(m) for m in norms}


def test_a_compiler_failure_falls_back_to_eager_with_one_warning(caplog):
    """A backend that cannot compile must not kill the run: same result, eager, one warning."""
    import torch._dynamo

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C compiler here")

    torch._dynamo.reset()
    regions.enable_compile(True, backend=broken_backend)
    try:
        a = torch.randn(2, 3, 8)
        with caplog.at_level("WARNING", logger="slope_megatron.model.regions"):
            got = regions.mlp_activation(a, False)
            again = regions.mlp_activation(a, False)
        assert torch.equal(got, torch.nn.functional.gelu(a, approximate="tanh"))
        assert torch.equal(again, got)
        warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.message]
        assert len(warnings) == 1 and "mlp_activation" in warnings[0]
        assert "no C compiler here" in warnings[0]  # the cause, not only "backend raised"
        assert regions.mlp_activation.failed and not regions.mlp_activation.is_compiled
        regions.enable_compile(False)
        regions.enable_compile(True, backend=broken_backend)
        assert not regions.mlp_activation.failed  # enabling again tries again
    finally:
        regions.enable_compile(False)
        torch._dynamo.reset()


def test_a_backward_compile_failure_is_caught_in_the_forward(caplog):
    """The backward graph is compiled with the forward, so its failure falls back too instead
    of surfacing from loss.backward()."""
    import torch._dynamo
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def broken_backward(gm, _):
        raise RuntimeError("backward codegen broke")

    backend = aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward),
                           bw_compiler=broken_backward)
    torch._dynamo.reset()
    regions.enable_compile(True, backend=backend)
    try:
        a = torch.randn(2, 3, 8, requires_grad=True)
        with caplog.at_level("WARNING", logger="slope_megatron.model.regions"):
            regions.mlp_activation(a, True).sum().backward()
        assert a.grad is not None and regions.mlp_activation.failed
        assert any("backward codegen broke" in r.getMessage() for r in caplog.records)
    finally:
        regions.enable_compile(False)
        torch._dynamo.reset()


def test_prefill_and_eager_decoding_run_the_regions_eagerly(compiled):
    """Prefill and eager decoding see a new shape at every call: they never compile a region,
    whatever the process-wide setting (only a static decode step does: test_compiled_decode)."""
    from slope_megatron.inference import InferenceModel

    model = tiny("llama")
    cfg = load_config(None, ["model.arch=llama", "model.vocab_size=96", "model.hidden_size=32",
                             "model.num_heads=4", "model.num_layers=3", "model.seq_len=16"])
    inf = InferenceModel(cfg, model.state_dict(), dtype="fp32", device="cpu")
    ids = torch.randint(0, 96, (2, 5))
    inf.full_logits(ids)
    cache = inf.new_cache(2, 16)
    inf.forward(ids, torch.arange(5).expand(2, 5), cache)
    assert compiled.graphs == [] and regions.compile_enabled()


def _compile_on_two_tp_ranks(fail_rank):
    """TP = 2, a backend that fails on `fail_rank` only (None: on none); per rank: the
    region's (failed, is_compiled) and whether its two calls equal eager's bit for bit."""
    import torch._dynamo
    import torch.distributed as dist

    from slope_megatron.parallel import initialize_parallel

    dist.init_process_group("gloo")
    initialize_parallel(2, 1)
    rank = dist.get_rank()

    def backend(gm, example_inputs):
        if rank == fail_rank:
            raise RuntimeError(f"compiler crashed on rank {rank}")
        return gm.forward

    torch._dynamo.reset()
    regions.enable_compile(True, backend=backend)
    r = regions.mlp_activation
    a = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    outs = [r(a, False), r(a, False)]
    eager = torch.nn.functional.gelu(a, approximate="tanh")
    return r.failed, r.is_compiled, all(torch.equal(o, eager) for o in outs)


@pytest.mark.parametrize("fail_rank", [None, 1])
def test_tp_ranks_agree_on_a_compile_fallback(fail_rank):
    """Compiled and eager results differ by rounding, so if compiling fails on one TP rank
    every TP rank must run the region eagerly (replicated activations stay equal)."""
    from helpers.dist import run_distributed

    per_rank = run_distributed(_compile_on_two_tp_ranks, 2, fail_rank)
    if fail_rank is None:
        assert [p[:2] for p in per_rank] == [(False, True)] * 2
    else:
        assert per_rank == [(True, False, True)] * 2, per_rank
