"""Compiled regions in the static decode step (`InferenceModel(compile=...)`): which steps
compile, that a compiled step gives the eager tokens and logits, and that prefill and eager
decoding never compile. On a CPU the regions are compiled with a counting backend that runs
the traced graphs as they are (Inductor's code generation runs on the GPU tests:
tests/gpu/test_decode_gpu.py)."""

import pytest
from helpers.inference import assert_teacher_forced_logits_match, tiny

from slope_megatron.inference import InferenceModel, generate
from slope_megatron.model import regions

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9], [40, 50, 60]]


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them as traced."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


@pytest.fixture
def backend(monkeypatch):
    """Every region compiled afresh with a counting backend (for `regions.scope(True)`),
    eager mode process-wide; the process's backend and failure flags restored after."""
    import torch._dynamo

    torch._dynamo.reset()
    counting = CountingBackend()
    monkeypatch.setitem(regions._settings, "backend", counting)
    for r in regions._regions:
        monkeypatch.setattr(r, "failed", False)
    yield counting
    torch._dynamo.reset()


def model(arch, compile):
    cfg, m = tiny(arch)
    return InferenceModel(cfg, m.state_dict(), compile=compile)


def test_unknown_compile_setting_is_refused_by_name():
    cfg, m = tiny("gpt")
    with pytest.raises(ValueError, match="unknown compile 'yes'; use one of auto, on, off"):
        InferenceModel(cfg, m.state_dict(), compile="yes")


def test_auto_compiles_only_a_graphed_step():
    inf = model("llama", "auto")
    assert inf.compiles(graphed=True) and not inf.compiles(graphed=False)
    assert not inf.static_decoder(1, 8).compiled  # a CPU: no graph, no compile
    assert inf.describe_decoding() == "eager"
    inf.decode = "static"
    assert inf.describe_decoding() == "static (no graph)"
    inf.compile_mode = "on"
    assert inf.describe_decoding() == "static (no graph, compiled)"
    inf.compile_mode = "off"
    assert not inf.compiles(graphed=True)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_compiled_static_step_gives_the_eager_tokens(arch, backend):
    inf = model(arch, "on")
    eager = [r.tokens for r in generate(inf, PROMPTS, 10, decode="eager")]
    assert backend.graphs == []  # prefill and eager decoding never compile
    static = [r.tokens for r in generate(inf, PROMPTS, 10, decode="static")]
    assert static == eager
    assert len(backend.graphs) == (3 if arch == "llama" else 2)  # one per region
    assert not regions.compile_enabled()  # the step's scope restored the setting


def test_compiled_step_logits_match_the_eager_step(backend):
    inf = model("llama", "on")
    b, longest = len(PROMPTS), max(map(len, PROMPTS))
    compiled = inf.static_decoder(b, longest + 6)
    inf.compile_mode = "off"
    plain = inf.static_decoder(b, longest + 6)
    assert compiled.compiled and not plain.compiled
    assert_teacher_forced_logits_match(plain, compiled, PROMPTS, 6)
    assert backend.graphs


def test_scope_restores_the_process_wide_setting(backend):
    regions.enable_compile(True, backend=backend)
    try:
        with regions.scope(False):
            assert not regions.compile_enabled()
        assert regions.compile_enabled()
        with regions.scope(True):
            assert regions.compile_enabled()
        assert regions.compile_enabled()
    finally:
        regions.enable_compile(False)
    with regions.scope(True):
        assert regions.compile_enabled()
    assert not regions.compile_enabled()
