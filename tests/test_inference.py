"""Inference: artifact round trip and damage detection, KV cache == full recompute, sampling,
stop tokens, context limits, HF export logits, the CLIs, and clear errors on bad input."""
import json
import os

import pytest
import torch

from slope_megatron.config import load_config
from slope_megatron.model import GPTModel
from slope_megatron.sparsity import enable_adapters, slope_layers
from slope_megatron.inference import (ArtifactError, InferenceModel, SamplingConfig,
                                      export_checkpoint, find_artifact, generate, load_artifact,
                                      load_tokenizer, save_artifact)
from slope_megatron.inference.artifact import pack_mask, unpack_mask
from slope_megatron.inference.sampling import filter_logits

VOCAB, SEQ = 96, 16


def tiny(arch="gpt", adapters="active", *overrides):
    """A tiny random model with adapters 'active' / 'inactive' (both with non-zero B)."""
    cfg = load_config(None, [f"model.arch={arch}", f"model.vocab_size={VOCAB}",
                             "model.hidden_size=32", "model.num_heads=4", "model.num_layers=2",
                             f"model.seq_len={SEQ}", "model.init_std=0.3",
                             "model.rope_theta=500.0", *overrides])
    model = GPTModel.from_config(cfg).eval()
    for layer in slope_layers(model):
        torch.nn.init.normal_(layer.adapter_b, 0.0, 0.2)  # B = 0 would hide adapter bugs
    if adapters == "active":
        enable_adapters(model)
    return cfg, model


def saved(tmp_path, arch="gpt", adapters="active", *overrides, tokenizer=None):
    cfg, model = tiny(arch, adapters, *overrides)
    path = save_artifact(model.state_dict(), cfg, tokenizer, tmp_path / "art")
    return cfg, model, path


CASES = [(a, ad) for a in ("gpt", "llama") for ad in ("active", "inactive")]


# ---- artifact ---------------------------------------------------------------------------

def test_mask_packing_round_trips_odd_sizes():
    mask = torch.rand(5, 12) > 0.5
    bits = pack_mask(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == 8  # ceil(60 / 8)
    assert torch.equal(unpack_mask(bits, (5, 12)), mask)


@pytest.mark.parametrize("arch,adapters", CASES)
def test_artifact_round_trip_is_exact(tmp_path, arch, adapters):
    cfg, model, path = saved(tmp_path, arch, adapters)
    config, state, tok = load_artifact(path)
    assert tok is None and config.to_dict() == cfg.to_dict()
    original = model.state_dict()
    assert set(state) == {k for k in original if not k.endswith("column_mask")}
    for key, value in original.items():
        if key.endswith("column_mask"):
            continue
        if key.endswith("_extra_state"):
            assert state[key] == value, key
        else:
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    files = {p.name for p in path.iterdir()}
    assert files == {"model.safetensors", "layers.json", "config.yaml", "manifest.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_artifact_stores_compressed_weights_not_dense(tmp_path):
    _, model, path = saved(tmp_path, "llama")
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        layer = model.blocks[1].attn.qkv
        assert f.get_slice("blocks.1.attn.qkv.weight").get_shape() == [96, 16]  # (out, in/2)
        assert f.get_slice("blocks.1.attn.qkv.mask_bits").get_shape() == [96 * 32 // 8]
    assert not [k for k in keys if "column_mask" in k or "_extra_state" in k or k.endswith(".mask")]
    layers = json.loads((path / "layers.json").read_text())
    assert layers["extra_state"]["blocks.1.attn.qkv"]["adapter_active"] is True
    assert layers["sparse_layers"]["blocks.1.attn.qkv"]["adapter_rank"] == layer.adapter_rank


def test_artifact_copies_tokenizer_and_checksums_it(tmp_path, tokenizer_file):
    _, _, path = saved(tmp_path, tokenizer=tokenizer_file)
    _, _, tok = load_artifact(path)
    assert tok == path / "tokenizer.json" and tok.read_bytes() == tokenizer_file.read_bytes()
    assert "tokenizer.json" in json.loads((path / "manifest.json").read_text())["files"]


def test_artifact_keeps_hf_tokenizer_directories_and_checks_their_files(tmp_path, tokenizer_file):
    transformers = pytest.importorskip("transformers")
    hf_dir = tmp_path / "hf_tokenizer"
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file),
                                         eos_token="<|endoftext|>").save_pretrained(hf_dir)
    cfg, model = tiny()
    path = save_artifact(model.state_dict(), cfg, hf_dir, tmp_path / "art")
    _, _, tok_path = load_artifact(path)
    assert tok_path == path / "hf_tokenizer" and tok_path.is_dir()
    tok = load_tokenizer(tok_path)
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat" and tok.eos_id is not None
    (path / "hf_tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(ArtifactError, match="hf_tokenizer/tokenizer.json"):
        load_artifact(path)


def test_plain_tokenizer_json_without_eos_still_loads(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world"] * 5, trainers.BpeTrainer(vocab_size=60))
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.eos_id is None and loaded.encode("hello")


def test_overwrite_replaces_atomically(tmp_path):
    cfg, model, path = saved(tmp_path)
    with torch.no_grad():
        model.embedding.tokens.weight.add_(1.0)
    save_artifact(model.state_dict(), cfg, None, path)
    _, state, _ = load_artifact(path)
    assert torch.equal(state["embedding.tokens.weight"], model.embedding.tokens.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_never_replaces_a_directory_that_is_not_an_earlier_output(tmp_path):
    cfg, model = tiny()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(FileExistsError, match="not an earlier SLoPe artifact"):
        save_artifact(model.state_dict(), cfg, None, precious)
    path = save_artifact(model.state_dict(), cfg, None, tmp_path / "art")
    with pytest.raises(FileExistsError, match="not an earlier Hugging Face export"):
        export_checkpoint(path, precious, "hf")
    with pytest.raises(FileExistsError, match="not an earlier SLoPe artifact"):
        export_checkpoint(path, precious, "slope")
    assert [p.name for p in precious.iterdir()] == ["thesis.txt"]
    (tmp_path / "empty").mkdir()
    export_checkpoint(path, tmp_path / "empty", "hf")
    export_checkpoint(path, tmp_path / "empty", "hf")  # an earlier export is replaced


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,file,words", [
    ("flip", "model.safetensors", "sha256"),
    ("truncate", "model.safetensors", "truncated"),
    ("delete", "layers.json", "missing"),
    ("flip", "config.yaml", "sha256"),
    ("delete", "manifest.json", "not a complete"),
    ("garble", "manifest.json", "corrupt"),
])
def test_damaged_artifact_is_reported_by_file_name(tmp_path, damage, file, words):
    _, _, path = saved(tmp_path)
    target = path / file
    if damage == "flip":
        _flip_byte(target, target.stat().st_size // 2)
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "delete":
        target.unlink()
    else:
        target.write_text("{not json")
    with pytest.raises(ArtifactError, match=words) as err:
        load_artifact(path)
    assert file in str(err.value)


def test_save_refuses_state_without_extra_state_or_with_broken_mask(tmp_path):
    cfg, model = tiny()
    state = model.state_dict()
    no_extra = {k: v for k, v in state.items() if k != "blocks.1.mlp.fc1._extra_state"}
    with pytest.raises(ArtifactError, match="blocks.1.mlp.fc1._extra_state"):
        save_artifact(no_extra, cfg, None, tmp_path / "a")
    broken = dict(state)
    broken["blocks.1.mlp.fc1.mask"] = torch.ones_like(state["blocks.1.mlp.fc1.mask"])
    with pytest.raises(ArtifactError, match="blocks.1.mlp.fc1"):
        save_artifact(broken, cfg, None, tmp_path / "b")
    no_mask = {k: v for k, v in state.items() if k != "blocks.1.attn.proj.mask"}
    with pytest.raises(ArtifactError, match="no 'blocks.1.attn.proj.mask'"):
        save_artifact(no_mask, cfg, None, tmp_path / "d")
    with pytest.raises(ArtifactError, match="tokenizer file"):
        save_artifact(state, cfg, tmp_path / "nope.json", tmp_path / "c")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_find_artifact_in_checkpoint_and_run_dirs(tmp_path):
    cfg, model = tiny()
    run = tmp_path / "run"
    for it in (10, 20):
        save_artifact(model.state_dict(), cfg, None,
                      run / "checkpoints" / f"iter_{it:08d}" / "slope_model")
    (run / "checkpoints" / "iter_00000030" / "slope_model").mkdir(parents=True)  # being written
    (run / "checkpoints" / "iter_00000040").mkdir()  # DeepSpeed files only, no artifact
    newest = run / "checkpoints" / "iter_00000020" / "slope_model"
    assert find_artifact(run) == newest
    assert find_artifact(newest.parent) == newest
    assert find_artifact(newest) == newest
    with pytest.raises(ArtifactError, match="incomplete"):
        find_artifact(run / "checkpoints" / "iter_00000030")
    with pytest.raises(ArtifactError, match="neither"):
        find_artifact(tmp_path)
    with pytest.raises(ArtifactError, match="not a directory"):
        find_artifact(tmp_path / "missing")


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
    prompt = [5, 17, 3, 88, 41]
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
        assert layer.mask.dtype == torch.bool and layer.column_mask.numel() == 0
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


# ---- export -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch,adapters,tie", [
    ("gpt", "active", True), ("gpt", "inactive", False),
    ("llama", "active", False), ("llama", "inactive", True)])
def test_hf_export_gives_the_same_logits(tmp_path, arch, adapters, tie):
    transformers = pytest.importorskip("transformers")
    extra = [f"model.tie_embeddings={tie}", f"sparsity.sparse_lm_head={not tie}"]
    _, model, path = saved(tmp_path, arch, adapters, *extra)
    out = export_checkpoint(path, tmp_path / "hf", "hf")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, local_files_only=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    expected = {"gpt": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[arch]
    assert type(hf).__name__ == expected
    ids = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        theirs, ours = hf.eval()(ids).logits, model(ids)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_slope_export_rewrites_a_verified_copy(tmp_path):
    _, model, path = saved(tmp_path, "llama")
    out = export_checkpoint(path, tmp_path / "copy", "slope")
    _, a, _ = load_artifact(path)
    _, b, _ = load_artifact(out)
    assert a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
    _flip_byte(path / "model.safetensors", 200)
    with pytest.raises(ArtifactError, match="sha256"):
        export_checkpoint(path, tmp_path / "copy2", "slope")
    with pytest.raises(ValueError, match="unknown export format"):
        export_checkpoint(out, tmp_path / "x", "onnx")
    with pytest.raises(ValueError, match="is the artifact being exported"):
        export_checkpoint(out, out, "slope")


# ---- command lines ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:80])
    tok.train_from_iterator(["the cat sat on the mat. " * 20, "a dog ate the hat. " * 20],
                            trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def _load_launch(name):
    import importlib.util
    from pathlib import Path
    file = Path(__file__).resolve().parents[1] / "launch" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"launch_{name}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_cli_streams_and_reports(tmp_path, tokenizer_file, capsys):
    cfg, model = tiny("gpt")
    run = tmp_path / "run"
    save_artifact(model.state_dict(), cfg, tokenizer_file,
                  run / "checkpoints" / "iter_00000005" / "slope_model")
    cli = _load_launch("generate")
    assert cli.main(["--checkpoint", str(run), "--prompt", "the cat", "--max-new-tokens", "6",
                     "--seed", "3", "--temperature", "0.9", "--top-k", "20"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("the cat") and "seed 3" in err and "tokens in" in err
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("a dog")
    assert cli.main(["--checkpoint", str(run), "--prompt", "the", "--prompt-file",
                     str(prompt_file), "--max-new-tokens", "3", "--dtype", "bf16",
                     "--low-memory"]) == 0
    out, _ = capsys.readouterr()
    assert "=== [0] ===\nthe" in out and "=== [1] ===\na dog" in out
    assert cli.main(["--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    assert "neither an artifact" in capsys.readouterr().err


def test_generate_cli_needs_a_tokenizer(tmp_path, capsys):
    _, _, path = saved(tmp_path)
    assert _load_launch("generate").main(["--checkpoint", str(path), "--prompt", "hi"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_export_cli(tmp_path, tokenizer_file, capsys):
    _, _, path = saved(tmp_path, "llama", tokenizer=tokenizer_file)
    cli = _load_launch("export")
    assert cli.main(["--checkpoint", str(path), "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "manifest.json").is_file()
    assert cli.main(["--checkpoint", str(path), "--out", str(tmp_path / "h"), "--format", "hf",
                     "--dtype", "bf16"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} \
        <= set(os.listdir(tmp_path / "h"))
    assert json.loads((tmp_path / "h" / "config.json").read_text())["dtype"] == "bfloat16"
    assert cli.main(["--checkpoint", str(path), "--out", str(tmp_path / "x"),
                     "--dtype", "bf16"]) == 2
    assert "--format hf only" in capsys.readouterr().err
    assert cli.main(["--checkpoint", str(path), "--out", str(tmp_path / "s"),
                     "--format", "hf"]) == 2  # an artifact is not an earlier HF export
    assert "refusing to replace" in capsys.readouterr().err
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "h", local_files_only=True)
    assert hf_tok.decode(hf_tok.encode("the cat")) == "the cat"
    assert hf_tok.eos_token == "<|endoftext|>"


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_cuda_generation_matches_cpu(tmp_path, arch):
    _, _, path = saved(tmp_path, arch)
    config, state, _ = load_artifact(path)
    prompts = [[1, 2, 3, 4, 5], [9, 8]]
    cpu = generate(InferenceModel(config, state), prompts, 8)
    gpu_model = InferenceModel(config, state, device="cuda")
    assert [r.tokens for r in generate(gpu_model, prompts, 8)] == [r.tokens for r in cpu]
    hot = SamplingConfig(temperature=1.0, top_p=0.9, seed=3)
    assert [r.tokens for r in generate(gpu_model, prompts, 8, hot)] == \
        [r.tokens for r in generate(gpu_model, prompts, 8, hot)]
    [r] = generate(InferenceModel(config, state, dtype="bf16", device="cuda"), [[1, 2]], 6)
    assert len(r.tokens) == 6
