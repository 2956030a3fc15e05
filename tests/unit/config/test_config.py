"""Config loading and validation: every mistake gets one message naming the key."""
import itertools
import json
import types
from pathlib import Path

import pytest

from slope_megatron.config import (Config, ConfigError, config_reference, load_config,
                                   validate_world)


def test_defaults_are_valid_and_adapter_start_is_ceil():
    cfg = load_config(None, ["train.iters=150"])
    assert isinstance(cfg, Config)
    assert cfg.adapter_start_iter == 149  # ceil(0.99 * 150) = 149 -> last 1 iteration
    cfg = load_config(None, ["train.iters=1000", "adapters.fraction=0.05"])
    assert cfg.adapter_start_iter == 950


def test_yaml_file_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  hidden_size: 64\ntrain:\n  iters: 7\n")
    cfg = load_config(p, ["train.iters=9", "optimizer.lr=1e-3"])
    assert (cfg.model.hidden_size, cfg.train.iters, cfg.optimizer.lr) == (64, 9, 1e-3)


@pytest.mark.parametrize("override,match", [
    ("model.hiden_size=64",
     "unknown config key 'model.hiden_size'. Did you mean 'model.hidden_size'"),
    ("modle.hidden_size=64", "unknown config section 'modle'"),
    ("train.iters=abc", "'train.iters' must be int"),
    ("train.iters=0", "'train.iters' = 0 is invalid"),
    ("sparsity.n=4", "'sparsity.n' = 4 is invalid: need 1 <= n < m"),
    ("model.num_heads=5", "'model.num_heads' = 5 is invalid: must divide"),
    ("model.ffn_hidden_size=130", "ffn size' = 130 is invalid: must be divisible by sparsity.m"),
    ("adapters.fraction=1.5", "'adapters.fraction' = 1.5 is invalid"),
    ("adapters.fraction=0", "must be in \\(0, 1\\)"),
    ("sparsity.backend=cuda", "use 'auto', 'reference', 'cusparselt', 'cublas' or 'torch-semi'"),
    ("train.dtype=fp8", "'train.dtype'"),
    ("train.global_batch_size=2", "must be >= train.micro_batch_size"),
    ("sparsity.modules=[qkv,mlp]", "unknown entries \\['mlp'\\]"),
    ("train.save_interval=-1", "must be >= 0 \\(0: no checkpoints\\)"),
])
def test_bad_values_are_named(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize("overrides,match", [
    (["parallel.tensor=3"], "must divide model.num_heads"),
    (["parallel.tensor=4", "model.hidden_size=40", "model.num_heads=4"],
     "must split into 4 shards that are multiples of sparsity.m"),
    (["parallel.tensor=2", "model.vocab_size=101"], "must divide model.vocab_size"),
    (["parallel.pipeline=2", "zero.stage=2"], "pipeline engine supports ZeRO 0 or 1"),
    (["parallel.pipeline=3"], "must not exceed model.num_layers"),
    (["parallel.tensor=2", "model.dropout=0.1"], "'model.dropout' = 0.1 is invalid: dropout is "
     "not supported with tensor parallelism .* Set model.dropout: 0 .* or parallel.tensor: 1"),
])
def test_parallel_layout_checks(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_dropout_is_allowed_without_tensor_parallelism():
    """SDPA's attention dropout draws from the global RNG, seeded alike on every rank: fine
    where every rank holds all heads (data and pipeline parallelism)."""
    assert load_config(None, ["model.dropout=0.1", "parallel.pipeline=2"]).model.dropout == 0.1
    assert load_config(None, ["model.dropout=0.0", "parallel.tensor=2"]).parallel.tensor == 2
    assert "attention probabilities" in config_reference()


def test_the_vocabulary_padding_is_one_constant():
    from slope_megatron.config import VOCAB_PAD_MULTIPLE, padded_vocab_size

    assert VOCAB_PAD_MULTIPLE == 64
    assert [padded_vocab_size(v) for v in (1, 64, 65, 8192, 50257)] == [64, 64, 128, 8192, 50304]


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.iters"])


def test_world_size_checks():
    cfg = load_config(None, ["parallel.tensor=2", "train.micro_batch_size=2",
                             "train.global_batch_size=8"])
    assert validate_world(cfg, 4) == 2
    with pytest.raises(ConfigError, match="world size 3 is not a multiple"):
        validate_world(cfg, 3)
    with pytest.raises(ConfigError, match="global_batch_size \\(8\\) must be a multiple"):
        validate_world(cfg, 6)  # dp=3: 2 x 3 = 6 does not divide 8


def test_reference_lists_every_key():
    ref = config_reference()
    for key in ("sparsity.column_mask_refresh", "adapters.rank_ratio", "train.global_batch_size",
                "zero.stage", "parallel.pipeline"):
        assert f"`{key}`" in ref


def test_save_interval_zero_means_no_checkpoints():
    assert load_config(None, ["train.save_interval=0"]).train.save_interval == 0
    assert "0 writes none" in config_reference()


# ---- shapes of every sparse linear, the LM head included, checked before any work ----------

from helpers.paths import ROOT
SPARSE_HEAD = ["model.tie_embeddings=false", "sparsity.sparse_lm_head=true"]


@pytest.mark.parametrize("overrides,match", [
    ([], "'model.vocab_size' = 4098 is invalid: a sparse LM head .* divisible by sparsity.m "
         "\\(4\\): use a multiple of 4 .*\\(e.g. 4100\\)"),
    (["parallel.tensor=2"], "'model.vocab_size' = 4098 is invalid: .* in each of its "
                            "parallel.tensor \\(2\\) shards: use a multiple of 8"),
])
def test_sparse_lm_head_vocab_must_split_into_groups(overrides, match):
    """Was a ValueError from SlopeLinear/ColumnParallelLinear after data preparation."""
    with pytest.raises(ConfigError, match=match):
        load_config(ROOT / "configs" / "demo.yaml", [*SPARSE_HEAD, "model.vocab_size=4098",
                                                      *overrides])
    load_config(ROOT / "configs" / "demo.yaml", [*SPARSE_HEAD, "model.vocab_size=4100"])
    load_config(ROOT / "configs" / "demo.yaml", ["model.tie_embeddings=false",
                                                 "model.vocab_size=4098"])  # dense head


def test_sparse_lm_head_with_the_tokenizers_vocab_needs_shards_of_whole_groups():
    """Unset, model.vocab_size becomes the tokenizer's rounded up to a multiple of 64: with
    TP=16 and m=8 a shard of 64k/16 rows need not hold whole groups of 8."""
    layout = ["parallel.tensor=16", "sparsity.m=8", "model.hidden_size=128",
              "model.num_heads=16"]
    with pytest.raises(ConfigError, match="'model.vocab_size' = None is invalid: unset, .* "
                                          "set model.vocab_size to a multiple of 128"):
        load_config(None, [*SPARSE_HEAD, *layout])
    assert load_config(None, [*SPARSE_HEAD, *layout, "model.vocab_size=384"])
    assert load_config(None, [*SPARSE_HEAD, "parallel.tensor=16", "model.hidden_size=128",
                              "model.num_heads=16"])  # m=4: 64k/16 is a multiple of 4


def _build_every_rank(cfg) -> None:
    """GPTModel on each TP rank (construction needs no process group)."""
    from slope_megatron.model import GPTModel

    tp = cfg.parallel.tensor
    for rank in range(tp):
        par = types.SimpleNamespace(tp_size=tp, tp_rank=rank, tp_group=None) if tp > 1 else None
        GPTModel.from_config(cfg, par)


def test_every_validated_layout_builds_its_sparse_linears():
    """Whatever validation accepts builds on every TP rank: qkv, proj, fc1, fc2 (gpt and
    llama's fused SwiGLU) and the LM head, each sparse linear's in/out (per shard) divisible
    by sparsity.m; an unset vocabulary is tried at the sizes the trainer can pad it to."""
    accepted = 0
    for arch, hidden, ffn, vocab, m, tp, head in itertools.product(
            ["gpt", "llama"], [8, 24], [None, 20, 48], [None, 100, 192], [3, 4, 8], [1, 2, 4],
            [False, True]):
        overrides = [f"model.arch={arch}", f"model.hidden_size={hidden}", "model.num_heads=2",
                     f"model.ffn_hidden_size={'null' if ffn is None else ffn}",
                     f"model.vocab_size={'null' if vocab is None else vocab}", "model.seq_len=8",
                     "model.num_layers=1", "sparsity.n=1", f"sparsity.m={m}",
                     "sparsity.dense_first_qkv=false", f"parallel.tensor={tp}",
                     *(SPARSE_HEAD if head else [])]
        try:
            cfg = load_config(None, overrides)
        except ConfigError:
            continue
        accepted += 1
        for padded in ([vocab] if vocab is not None else [64, 128, 192, 320]):
            cfg.model.vocab_size = padded
            _build_every_rank(cfg)
    assert accepted > 20


# ---- zero.deepspeed_json: resolved when the config is loaded, checked before any work -------

def _write_config(directory: Path, ds_json: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "run.yaml"
    path.write_text(f"zero: {{stage: 1, deepspeed_json: {ds_json}}}\n")
    return path


def test_deepspeed_json_beside_the_config_is_found_from_any_directory(tmp_path, monkeypatch):
    from slope_megatron.config.deepspeed_json import deepspeed_config

    config = _write_config(tmp_path / "exp", "ds/zero.json")
    (tmp_path / "exp" / "ds").mkdir()
    (tmp_path / "exp" / "ds" / "zero.json").write_text(
        json.dumps({"zero_optimization": {"overlap_comm": True}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(config)
    assert Path(cfg.zero.deepspeed_json).resolve() == tmp_path / "exp" / "ds" / "zero.json"
    assert deepspeed_config(cfg, dp_size=1, dtype="fp32")["zero_optimization"] == {
        "overlap_comm": True, "stage": 1}


def test_deepspeed_json_relative_to_the_current_directory_still_works(tmp_path, monkeypatch):
    """A config elsewhere may name configs/deepspeed/*.json relative to the repository root
    (the shipped ones name it beside themselves, so they load from any directory)."""
    monkeypatch.chdir(ROOT)
    cfg = load_config(_write_config(tmp_path, "configs/deepspeed/zero1.json"))
    assert cfg.zero.deepspeed_json == "configs/deepspeed/zero1.json"
    monkeypatch.chdir(tmp_path)
    assert load_config(ROOT / "configs" / "gpt2-small.yaml").zero.deepspeed_json == \
        str(ROOT / "configs" / "deepspeed" / "zero1.json")
    monkeypatch.chdir(ROOT)
    # beside the config wins; a --set path is relative to the current directory
    beside = tmp_path / "configs" / "deepspeed" / "zero1.json"
    beside.parent.mkdir(parents=True)
    beside.write_text("{}")
    config = _write_config(tmp_path, "configs/deepspeed/zero1.json")
    assert load_config(config).zero.deepspeed_json == str(beside)
    assert load_config(config, ["zero.deepspeed_json=configs/deepspeed/zero1.json"]) \
        .zero.deepspeed_json == "configs/deepspeed/zero1.json"


def test_missing_deepspeed_json_is_named_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "cfgs" / "run.yaml"
    config.parent.mkdir()
    config.write_text("zero: {stage: 1, deepspeed_json: configs/deepspeed/zero1.json}\n")
    with pytest.raises(ConfigError) as e:
        load_config(config)
    msg = str(e.value)
    assert "config key 'zero.deepspeed_json' = 'configs/deepspeed/zero1.json' is invalid" in msg
    assert str(tmp_path / "cfgs" / "configs" / "deepspeed" / "zero1.json") in msg  # both tried
    assert str(tmp_path / "configs" / "deepspeed" / "zero1.json") in msg
    assert "beside themselves" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="'zero.deepspeed_json' = 'nope.json' is invalid: no "
                                          "such file"):
        load_config(None, ["zero.deepspeed_json=nope.json"])


@pytest.mark.parametrize("text,match", [("[1, 2]", "holds a JSON array, not an object"),
                                        ("{bad", "could not be read as JSON"),
                                        ('"x"', "holds a JSON string")])
def test_deepspeed_json_must_hold_a_json_object(tmp_path, text, match):
    (tmp_path / "ds.json").write_text(text)
    with pytest.raises(ConfigError, match=f"'zero.deepspeed_json' = '.*ds.json' is invalid: "
                                          f"the file {match}"):
        load_config(_write_config(tmp_path, "ds.json"))


# ---- a quick trial of the demo config names the warm-up fix --------------------------------

def test_warmup_longer_than_the_run_names_the_fix():
    with pytest.raises(ConfigError, match=r"'optimizer.warmup_iters' = 40 is invalid: .*set "
                                          r"optimizer.warmup_iters=<n> with 0 <= n <= "
                                          r"train.iters \(here 8\)"):
        load_config(ROOT / "configs" / "demo.yaml", ["train.iters=8"])
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["train.iters=8",
                                                       "optimizer.warmup_iters=null"])
    assert cfg.optimizer.warmup_iters is None


def test_tiktoken_without_its_file_is_refused_at_load():
    with pytest.raises(ConfigError, match="'data.tiktoken_file' = None is invalid: "
                                          "data.tokenizer=tiktoken-gpt2 needs"):
        load_config(None, ["data.tokenizer=tiktoken-gpt2"])
    assert load_config(None, ["data.tokenizer=tiktoken-gpt2",
                              "data.tiktoken_file=gpt2.tiktoken"]).data.tokenizer == "tiktoken-gpt2"
