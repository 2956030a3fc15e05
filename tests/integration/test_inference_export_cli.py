"""Export (HF logits equal ours, SLoPe copy) and the generate/export CLIs (CUDA generation: tests/gpu)."""
import json
import os
import shutil

import pytest
import torch
from helpers.inference import SEQ, VOCAB, flip_byte, saved, tiny
from helpers.launch import load_launch

from slope_megatron.inference import (
    ArtifactError,
    export_checkpoint,
    load_artifact,
    save_artifact,
)

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
    flip_byte(path / "model.safetensors", 200)
    with pytest.raises(ArtifactError, match="sha256"):
        export_checkpoint(path, tmp_path / "copy2", "slope")
    with pytest.raises(ValueError, match="unknown export format"):
        export_checkpoint(out, tmp_path / "x", "onnx")
    with pytest.raises(ValueError, match="is the artifact being exported"):
        export_checkpoint(out, out, "slope")


# ---- command lines ----------------------------------------------------------------------

def test_generate_cli_streams_and_reports(tmp_path, tokenizer_file, capsys):
    cfg, model = tiny("gpt")
    run = tmp_path / "run"
    save_artifact(model.state_dict(), cfg, tokenizer_file,
                  run / "checkpoints" / "iter_00000005" / "slope_model")
    cli = load_launch("generate")
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
    assert load_launch("generate").main(["--checkpoint", str(path), "--prompt", "hi"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_export_cli(tmp_path, tokenizer_file, capsys):
    _, _, path = saved(tmp_path, "llama", tokenizer=tokenizer_file)
    cli = load_launch("export")
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
    # another checkpoint's artifact (an earlier export of ours, so otherwise replaceable) or
    # any path inside a checkpoint is refused, and left as it was
    other = tmp_path / "run" / "checkpoints" / "iter_00000004" / "slope_model"
    shutil.copytree(tmp_path / "s", other)
    before = sorted((f.name, f.stat().st_size) for f in other.iterdir())
    for out in (other, other.parent / "hf"):
        assert cli.main(["--checkpoint", str(path), "--out", str(out), "--format", "slope"]) == 2
        assert "is inside the checkpoint" in capsys.readouterr().err
    assert sorted((f.name, f.stat().st_size) for f in other.iterdir()) == before
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "h", local_files_only=True)
    assert hf_tok.decode(hf_tok.encode("the cat")) == "the cat"
    assert hf_tok.eos_token == "<|endoftext|>"

