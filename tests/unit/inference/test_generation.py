"""Generation: KV cache == full recompute, compressed weights only, batching, sampling,
stop tokens, context limits, bf16, clear errors on bad input."""

import pytest
import torch
from helpers.inference import CASES, SEQ, VOCAB, saved, tiny

from slope_megatron.inference import (
    InferenceModel,
    SamplingConfig,
    generate,
    load_artifact,
)
from slope_megatron.inference.sampling import filter_logits
from slope_megatron.sparsity import slope_layers

# ---- inference model and generation -----------------------------------------------------

def recompute_greedy(model, prompt, steps):
    """Reference decoding: the training model's full forward over the whole sequence."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("dense_cache", [True, False])
@pytest.mark.parametrize("arch,adapters", CASES)
def test_kv_cache_greedy_equals_full_recompute(tmp_path, arch, adapters, dense_cache):
    _, model, path = saved(tmp_path, arch, adapters)
    config, state, _ = load_artifact(path)
    inf = InferenceModel(config, state, dense_cache=dense_cache)
    prompt = [1, 2, 3, 4, 5]  # greedy output varies for every case's seed-0 model
    [result] = generate(inf, [prompt], SEQ - len(prompt) + 1)  # fills the whole context
    assert result.tokens == recompute_greedy(model, prompt, SEQ - len(prompt) + 1)
    assert result.finish_reason == "length"
    assert len(set(result.tokens)) > 2  # a degenerate model would make this test vacuous
    assert not inf._backend._dense  # the per-call dense copies are gone


def test_inference_model_forward_matches_training_model_with_grad_enabled(tmp_path):
    _, model, path = saved(tmp_path, "llama")
    inf = InferenceModel(*load_artifact(path)[:2])
    ids = torch.randint(0, VOCAB, (2, SEQ))
    torch.testing.assert_close(inf.model(ids), model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_inference_model_keeps_only_compressed_sparse_weights(tmp_path, arch):
    _, model, path = saved(tmp_path, arch)
    inf = InferenceModel(*load_artifact(path)[:2])
    for layer in slope_layers(inf.model):
        assert layer.weight.shape == (layer.out_features, layer.in_features // 2)
        assert layer.mask.dtype == torch.bool and layer.column_mask_bits.numel() == 0
        owned = [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]
        assert not [t for t in owned if t.is_floating_point()
                    and tuple(t.shape) == (layer.out_features, layer.in_features)]
    sizes = inf.weight_bytes()
    assert sizes["sparse_values"] > 0 and sizes["masks"] > 0


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_batched_left_padded_prompts_match_single_runs(tmp_path, arch):
    _, _, path = saved(tmp_path, arch)
    inf = InferenceModel(*load_artifact(path)[:2])
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [40, 50, 60]]
    batched = generate(inf, prompts, 6)
    for p, r in zip(prompts, batched):
        assert r.tokens == generate(inf, [p], 6)[0].tokens


def test_sampling_is_reproducible_with_a_seed(tmp_path):
    _, _, path = saved(tmp_path, "llama")
    inf = InferenceModel(*load_artifact(path)[:2])
    hot = SamplingConfig(temperature=1.5, top_k=40, top_p=0.95, seed=7)
    a = generate(inf, [[1, 2, 3], [4, 5]], 10, hot)
    b = generate(inf, [[1, 2, 3], [4, 5]], 10, hot)
    c = generate(inf, [[1, 2, 3], [4, 5]], 10, SamplingConfig(1.5, 40, 0.95, seed=8))
    assert [r.tokens for r in a] == [r.tokens for r in b] and a[0].seed == 7
    assert [r.tokens for r in a] != [r.tokens for r in c]
    greedy = generate(inf, [[1, 2, 3]], 10)[0].tokens
    assert generate(inf, [[1, 2, 3]], 10, SamplingConfig(2.0, top_k=1, seed=1))[0].tokens == greedy
    assert generate(inf, [[1, 2, 3]], 10, SamplingConfig(2.0, top_p=1e-6, seed=1))[0].tokens \
        == greedy


def test_ids_past_the_tokenizers_vocabulary_are_never_chosen(tmp_path):
    """The output layer is padded past the tokenizer's vocabulary (to a multiple of 64); those
    ids decode to nothing, so sampling hot with the limit never picks one, and without it
    some are picked (the test would pass vacuously otherwise)."""
    _, _, path = saved(tmp_path, "llama")
    inf = InferenceModel(*load_artifact(path)[:2])
    limit = VOCAB // 3
    hot = SamplingConfig(temperature=50.0, seed=3)
    free = [t for r in generate(inf, [[1, 2], [3]], 14, hot) for t in r.tokens]  # fits SEQ
    assert max(free) >= limit
    held = [t for r in generate(inf, [[1, 2], [3]], 14, hot, vocab_limit=limit)
            for t in r.tokens]
    assert len(held) == len(free) and max(held) < limit  # as many tokens, none past it
    with pytest.raises(ValueError, match="stop tokens outside"):
        generate(inf, [[1]], 4, stop_tokens=[limit], vocab_limit=limit)
    with pytest.raises(ValueError, match="vocab_limit"):
        generate(inf, [[1]], 4, vocab_limit=VOCAB + 1)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.4)).tolist() == [[False, True, True, True]]
    both = filter_logits(logits, top_k=3, top_p=0.99)  # top-p renormalises after top-k
    assert torch.isinf(both).tolist() == [[False, False, False, True]]


def test_stop_tokens_end_each_sequence_on_its_own(tmp_path):
    _, _, path = saved(tmp_path)
    inf = InferenceModel(*load_artifact(path)[:2])
    free = generate(inf, [[1, 2, 3], [7, 7]], 8)
    stop = free[0].tokens[2]
    first = free[0].tokens.index(stop)
    got = generate(inf, [[1, 2, 3], [7, 7]], 8, stop_tokens=[stop])
    assert got[0].tokens == free[0].tokens[:first]
    assert got[0].finish_reason == "stop" and got[0].stop_token == stop
    other = free[1].tokens
    expect = other[:other.index(stop)] if stop in other else other
    assert got[1].tokens == expect


def test_long_prompt_is_truncated_from_the_left_with_a_warning(tmp_path):
    _, _, path = saved(tmp_path)
    inf = InferenceModel(*load_artifact(path)[:2])
    long = [(7 * i) % VOCAB for i in range(SEQ + 5)]
    with pytest.warns(UserWarning, match="keeping its last 16"):
        [r] = generate(inf, [long], 1)
    assert r.truncated == 5 and r.prompt == long[5:]
    assert r.tokens == generate(inf, [long[5:]], 1)[0].tokens
    with pytest.warns(UserWarning, match="only 3 new tokens fit"):
        [r] = generate(inf, [long[:SEQ - 2]], 10)
    assert len(r.tokens) == 3 and r.finish_reason == "context"


def test_bf16_generation_runs_with_bf16_weights(tmp_path):
    _, _, path = saved(tmp_path, "llama")
    inf = InferenceModel(*load_artifact(path)[:2], dtype="bf16")
    assert inf.model.blocks[1].attn.qkv.weight.dtype == torch.bfloat16
    assert inf.model.blocks[1].attn.qkv.mask.dtype == torch.bool
    [r] = generate(inf, [[1, 2, 3]], 5)
    assert len(r.tokens) == 5 and all(0 <= t < VOCAB for t in r.tokens)


@pytest.mark.parametrize("call,match", [
    (lambda m: generate(m, [], 4), "non-empty list"),
    (lambda m: generate(m, [1, 2, 3], 4), "not a list of token ids"),
    (lambda m: generate(m, [[1], []], 4), "prompt 1 is empty"),
    (lambda m: generate(m, [[1, VOCAB]], 4), r"outside \[0, 96\)"),
    (lambda m: generate(m, [[1]], 0), "max_new_tokens"),
    (lambda m: generate(m, [[1]], 4, SamplingConfig(temperature=-1)), "temperature"),
    (lambda m: generate(m, [[1]], 4, SamplingConfig(1.0, top_p=0.0)), "top_p"),
    (lambda m: generate(m, [[1]], 4, SamplingConfig(1.0, top_k=-2)), "top_k"),
    (lambda m: generate(m, [[1]], 4, stop_tokens=[-1]), "stop tokens"),
])
def test_bad_generation_inputs_give_clear_errors(tmp_path, call, match):
    _, _, path = saved(tmp_path)
    inf = InferenceModel(*load_artifact(path)[:2])
    with pytest.raises(ValueError, match=match):
        call(inf)


def test_artifact_that_does_not_fit_its_config_is_refused(tmp_path):
    cfg, model = tiny()
    state = model.state_dict()
    state["embedding.tokens.weight"] = torch.zeros(VOCAB + 1, 32)
    with pytest.raises(ValueError, match="do not fit"):
        InferenceModel(cfg, state)
    with pytest.raises(ValueError, match="unknown dtype"):
        InferenceModel(cfg, model.state_dict(), dtype="fp8")


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_unpadded_steps_take_the_maskless_path_with_the_same_logits(arch):
    """valid=None (no pads: is_causal / no mask) == an all-True valid (explicit masks)."""
    cfg, model = tiny(arch)
    inf = InferenceModel(cfg, model.state_dict())
    ids = torch.randint(0, VOCAB, (2, 9))
    pos = torch.arange(9).expand(2, -1)
    plain, masked = inf.new_cache(2, 9), inf.new_cache(2, 9)
    ones = torch.ones(2, 9, dtype=torch.bool)
    got = [inf(ids[:, :6], pos[:, :6], plain)]
    want = [inf(ids[:, :6], pos[:, :6], masked, ones[:, :6])]
    assert not plain.padded and masked.padded
    for i in range(6, 9):
        got.append(inf(ids[:, i:i + 1], pos[:, i:i + 1], plain))
        want.append(inf(ids[:, i:i + 1], pos[:, i:i + 1], masked, ones[:, i:i + 1]))
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(got, 1), inf.full_logits(ids), rtol=1e-4, atol=1e-4)
    fresh = inf.new_cache(2, 9)
    for t, needs_mask in ((4, False), (1, False), (2, True)):  # prefill, a token, a chunk
        assert (fresh.begin(t) is not None) == needs_mask
        fresh.end(t)
    fresh.begin(1, torch.tensor([[True], [False]]))
    fresh.end(1)
    assert fresh.padded and fresh.begin(1) is not None  # a pad: masks from then on


def test_a_step_gathers_the_rotary_tables_once_for_all_blocks():
    """The cos/sin rows at the step's positions are gathered once per step, not per block:
    the number of gathers does not grow with depth (a decode step is bound by its count of
    small kernels as much as by its GEMMs)."""
    from torch.profiler import ProfilerActivity, profile

    def gathers(layers):
        cfg, model = tiny("llama", "inactive", f"model.num_layers={layers}")
        inf = InferenceModel(cfg, model.state_dict())
        ids = torch.tensor([[5, 6, 7]])
        cache = inf.new_cache(1, 8)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            inf(ids, torch.arange(3)[None], cache)
        return sum(e.count for e in prof.key_averages() if e.key == "aten::index")

    assert gathers(4) == gathers(1) >= 2  # cos and sin
