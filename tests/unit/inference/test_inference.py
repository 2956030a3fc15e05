"""Inference artifact: exact round trip, compressed storage, tokenizer copies, atomic
overwrite, damage detection by file name, finding it in checkpoint and run dirs."""
import json

import pytest
import torch
from helpers.inference import CASES, flip_byte, saved, tiny

from slope_megatron.inference import (
    ArtifactError,
    export_checkpoint,
    find_artifact,
    load_artifact,
    load_tokenizer,
    save_artifact,
)
from slope_megatron.inference.artifact import pack_mask, unpack_mask

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
        flip_byte(target, target.stat().st_size // 2)
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
