"""Static-shape decoding (`generate(decode="static")`, static_decode.py) against eager decoding:
the same tokens (greedy and seeded sampling, left-padded batches, stop tokens, streaming,
context limits and their warnings), the same logits up to fp32 rounding, and a step that
reads no tensor on the host and always attends over the full capacity (what a CUDA graph
needs). The graph capture itself runs only on a GPU: tests/gpu/test_decode_gpu.py."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers.inference import SEQ, VOCAB, assert_teacher_forced_logits_match, tiny

from slope_megatron.inference import InferenceModel, SamplingConfig, generate
from slope_megatron.inference.generate import _EagerSteps
from slope_megatron.inference.kv_cache import KVCache, StaticKVCache
from slope_megatron.inference.static_decode import StaticDecoder

BATCHES = {"one": [[1, 2, 3, 4, 5]], "three_padded": [[1, 2, 3, 4, 5, 6, 7], [9], [40, 50, 60]]}


@pytest.fixture(scope="module", params=["gpt", "llama"])
def inf(request):
    cfg, model = tiny(request.param)
    return InferenceModel(cfg, model.state_dict())


def run(model, prompts, new, decode, **kw):
    """generate() with its results as comparable tuples and its warnings as strings."""
    streamed = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(model, prompts, new, decode=decode,
                       on_token=lambda i, t: streamed.append((i, t)), **kw)
    results = [(r.tokens, r.finish_reason, r.stop_token, r.prompt, r.truncated) for r in out]
    return results, streamed, [str(w.message) for w in caught]


@pytest.mark.parametrize("batch", BATCHES)
def test_static_greedy_decoding_gives_the_eager_tokens(inf, batch):
    prompts = BATCHES[batch]
    eager = run(inf, prompts, 12, "eager")  # 7 + 12 > SEQ: the long prompt hits the context
    assert run(inf, prompts, 12, "static") == eager
    assert len({t for r in eager[0] for t in r[0]}) > 3  # not a degenerate model


def test_static_stop_tokens_and_streaming_match_eager(inf):
    prompts = BATCHES["three_padded"]
    free = run(inf, prompts, 8, "eager")[0]
    stop = free[0][0][2]
    eager = run(inf, prompts, 8, "eager", stop_tokens=[stop])
    assert eager[0][0][1] == "stop"  # the test stops something
    assert run(inf, prompts, 8, "static", stop_tokens=[stop]) == eager


def test_static_seeded_sampling_gives_the_eager_tokens(inf):
    """Sampling stays outside the step, on its logits, with the caller's generator."""
    hot = SamplingConfig(temperature=1.5, top_k=40, top_p=0.95, seed=7)
    prompts = [[1, 2, 3], [4, 5]]
    for limit in (None, VOCAB // 3):
        eager = run(inf, prompts, 10, "eager", sampling=hot, vocab_limit=limit)
        assert run(inf, prompts, 10, "static", sampling=hot, vocab_limit=limit) == eager


def test_static_truncation_and_context_warnings_match_eager(inf):
    long = [(7 * i) % VOCAB for i in range(SEQ + 5)]
    eager = run(inf, [long, [3, 4]], 4, "eager")
    assert any("keeping its last 16" in w for w in eager[2])
    assert any("only 1 new tokens fit" in w for w in eager[2])
    assert run(inf, [long, [3, 4]], 4, "static") == eager


def test_static_logits_equal_eager_logits_step_by_step(inf):
    """Teacher-forced on eager's greedy tokens, with a sequence finishing half-way (its slot
    masked, its position frozen): the logits agree to fp32 rounding at every step."""
    prompts = BATCHES["three_padded"]
    b, longest = len(prompts), max(map(len, prompts))
    slots = longest + 8
    eager, static = _EagerSteps(inf, b, slots), inf.static_decoder(b, slots)
    assert static.capacity >= slots and not static.graphed
    with inf.generation_scope():
        assert_teacher_forced_logits_match(eager, static, prompts, 8)


def test_decode_step_reads_no_tensor_on_the_host_and_keeps_its_shapes(inf, monkeypatch):
    """No tensor value reaches Python inside the step (a CUDA graph could not replay a branch
    on it), and attention always sees all `capacity` slots (no slicing by the length)."""
    dec = inf.static_decoder(2, 10)
    ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    valid = torch.tensor([[False, True, True], [True, True, True]])
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    seen = []
    sdpa = F.scaled_dot_product_attention

    masks = []

    def recording(q, k, v, **kw):
        seen.append((tuple(k.shape), tuple(kw["attn_mask"].shape)))
        masks.append(kw["attn_mask"])
        return sdpa(q, k, v, **kw)

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor's value was read on the host")

    with inf.generation_scope():
        dec.prefill(ids, valid, positions, True)
        with monkeypatch.context() as m:
            for name in ("__bool__", "__int__", "__index__", "__float__", "item", "tolist"):
                m.setattr(torch.Tensor, name, host_read)
            m.setattr(F, "scaled_dot_product_attention", recording)
            for _ in range(3):
                dec.step()
            with pytest.raises(AssertionError, match="read on the host"):  # not vacuous
                inf(ids[:, :1], positions[:, :1], inf.new_cache(2, 4))
    layers = inf.config.model.num_layers
    heads = inf.config.model.num_heads
    head_dim = inf.config.model.hidden_size // heads
    assert seen == [((2, heads, dec.capacity, head_dim), (2, 1, 1, dec.capacity))] * 3 * layers
    # an additive mask in the model's dtype, made once per step (from a bool one SDPA would
    # build it again in every layer)
    assert all(m.dtype == inf.dtype for m in masks)
    assert [len({id(m) for m in masks[i:i + layers]}) for i in range(0, 3 * layers, layers)] \
        == [1, 1, 1]
    assert int(dec.view.slot) == 3 + 3


def test_static_cache_mask_is_the_sliced_caches_mask_padded_with_minus_inf():
    sliced = KVCache(1, 2, 1, 4, 8, torch.float32)
    static = StaticKVCache(KVCache(1, 2, 1, 4, 8, torch.float32))
    for t, valid in ((3, torch.tensor([[False, True, True], [True] * 3])), (1, None),
                     (1, torch.tensor([[True], [False]])), (2, None)):
        want = sliced.begin(t, valid)
        got = static.begin(t, valid)
        k = torch.randn(2, 1, t, 4)
        sliced_k, _ = sliced.write(0, k, k)
        static_k, _ = static.write(0, k, k)
        sliced.end(t)
        static.end(t)
        s = sliced.length
        if want is not None:
            assert want.dtype == got.dtype == torch.float32  # additive, in the cache's dtype
            assert torch.equal(got[..., :s], want) and (got[..., s:] == float("-inf")).all()
            assert set(want.unique().tolist()) == {0.0, float("-inf")}
        assert torch.equal(static_k[:, :, :s], sliced_k) and static_k.shape[2] == 8
        assert int(static.slot) == s


def test_decode_option_is_checked_and_the_models_setting_is_the_default(monkeypatch):
    cfg, model = tiny("gpt")
    with pytest.raises(ValueError, match="unknown decode 'graph'"):
        InferenceModel(cfg, model.state_dict(), decode="graph")
    inf = InferenceModel(cfg, model.state_dict(), decode="static")
    with pytest.raises(ValueError, match="unknown decode 'graph'"):
        generate(inf, [[1]], 2, decode="graph")
    calls = []
    real = inf.static_decoder
    monkeypatch.setattr(inf, "static_decoder", lambda *a: calls.append(a) or real(*a))
    generate(inf, [[1, 2]], 3)
    generate(inf, [[1, 2]], 3, decode="eager")
    assert calls == [(1, 4)]  # prompt 2 + 3 new - 1 slots, once: the model's default


def test_auto_decoding_is_static_only_where_cuda_graphs_can_be_used(monkeypatch):
    cfg, model = tiny("gpt")
    inf = InferenceModel(cfg, model.state_dict())
    assert inf.decode == "auto"  # the default
    assert inf.decoding() == "eager"  # a CPU: no graphs
    calls = []  # the static decoders asked for (built here without a graph: a CPU)
    monkeypatch.setattr(inf, "static_decoder",
                        lambda *a: calls.append(a) or StaticDecoder(inf, *a))
    eager = generate(inf, [[1, 2]], 3)
    assert calls == []
    monkeypatch.setattr(inf, "_graphs_usable", lambda: True)
    assert inf.decoding() == "static" and inf.decoding("eager") == "eager"
    assert [r.tokens for r in generate(inf, [[1, 2]], 3)] == [r.tokens for r in eager]
    assert calls == [(1, 4)]


def test_without_cuda_graphs_no_decoder_is_kept_and_kept_ones_die_with_the_dense_copies():
    cfg, model = tiny("llama")
    inf = InferenceModel(cfg, model.state_dict(), decode="static")
    assert not inf._graphs_usable()
    generate(inf, [[1, 2], [3]], 4)
    assert not inf._decoders  # built per call on a CPU
    inf._decoders[(1, 16)] = object()  # as a graph captured over this call's W*M copies
    with inf.generation_scope():
        assert inf._decoders
    assert not inf._decoders
