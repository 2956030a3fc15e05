"""Adapter rank: a fraction of the hidden size by default (the paper), of each layer's input
width with `adapters.rank_of: input`; runs and artifacts recorded before the key keep the
input-width ranks they were built with."""
import json

import pytest
import yaml
from helpers.inference import saved
from helpers.run_dir import recorded_run

from slope_megatron.config import Config, ConfigError, ffn_hidden_size, load_config
from slope_megatron.io import sha256_file
from slope_megatron.inference import load_artifact
from slope_megatron.model import GPTModel
from slope_megatron.sparsity import slope_layers
from slope_megatron.training.run_dir import check_output_dir

TINY = ["model.vocab_size=96", "model.hidden_size=64", "model.num_heads=4", "model.num_layers=2",
        "model.seq_len=16", "adapters.rank_ratio=0.1"]


def ranks(*overrides):
    model = GPTModel.from_config(load_config(None, [*TINY, *overrides]))
    return {name.split(".", 2)[-1]: layer.adapter_rank
            for name, layer in model.named_modules() if layer in set(slope_layers(model))
            and name.startswith("blocks.1.")}


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_default_rank_is_a_fraction_of_the_hidden_size_for_every_layer(arch):
    got = ranks(f"model.arch={arch}")
    assert set(got) == {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
    assert set(got.values()) == {round(0.1 * 64)}, got  # MLP-down too, whose input is ffn


def test_rank_of_input_sizes_mlp_down_by_its_input_width():
    cfg = load_config(None, [*TINY, "adapters.rank_of=input"])
    got = ranks("adapters.rank_of=input")
    assert got["mlp.fc2"] == round(0.1 * ffn_hidden_size(cfg.model))
    assert got["mlp.fc2"] > got["attn.qkv"] == round(0.1 * 64)


def test_an_absolute_rank_wins_and_a_bad_rank_of_is_refused():
    assert set(ranks("adapters.rank=3").values()) == {3}
    with pytest.raises(ConfigError, match="adapters.rank_of"):
        load_config(None, ["adapters.rank_of=output"])


def test_a_run_recorded_before_the_key_resumes_only_with_input_ranks(tmp_path):
    old = Config().to_dict()
    del old["adapters"]["rank_of"]
    recorded_run(tmp_path, old)
    with pytest.raises(ConfigError, match="adapters.rank_of: 'input' -> 'hidden'"):
        check_output_dir(load_config(None), tmp_path)
    check_output_dir(load_config(None, ["adapters.rank_of=input"]), tmp_path)


def test_an_artifact_written_before_the_key_loads_with_its_input_ranks(tmp_path):
    cfg, model, path = saved(tmp_path, "gpt", "active", "adapters.rank_ratio=0.1",
                             "adapters.rank_of=input")
    recorded = yaml.safe_load((path / "config.yaml").read_text())
    del recorded["adapters"]["rank_of"]  # as the code before the key wrote it
    (path / "config.yaml").write_text(yaml.safe_dump(recorded))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["config.yaml"] = {"size": (path / "config.yaml").stat().st_size,
                                        "sha256": sha256_file(path / "config.yaml")}
    (path / "manifest.json").write_text(json.dumps(manifest))
    config, state, _ = load_artifact(path)
    assert config.adapters.rank_of == "input"
    rebuilt = GPTModel.from_config(config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items() if "adapter" in k} == \
        {k: v.shape for k, v in model.state_dict().items() if "adapter" in k}
    fc2 = model.blocks[1].mlp.fc2
    assert fc2.adapter_rank > model.blocks[1].attn.qkv.adapter_rank  # the input rule's ranks


@pytest.mark.parametrize("setting", ["sparsity.enabled=false", "adapters.enabled=false",
                                     "adapters.rank=8"])
def test_runs_the_rank_rule_never_touched_resume_without_the_key(tmp_path, setting):
    """A dense run, one without adapters or with an absolute rank built the same model under
    either rule: its old record needs no adapters.rank_of."""
    old = load_config(None, [setting]).to_dict()
    del old["adapters"]["rank_of"]
    check_output_dir(load_config(None, [setting]), recorded_run(tmp_path, old))
