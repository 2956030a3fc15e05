"""Starting from a Hugging Face checkpoint (train.init_from): a tiny random GPT-2 and LLaMA
made with transformers load as our model with the same logits (sparsity off), with every
sparse layer's mask the magnitude top-N of each group of its pretrained weights (sparsity on),
and a config or tokenizer that does not fit is refused with the key named."""
import pytest
import torch
from helpers.hf_models import HIDDEN, fitting_overrides, tiny_hf

from slope_megatron.config import ConfigError, load_config
from slope_megatron.model import GPTModel
from slope_megatron.sparsity import slope_layers
from slope_megatron.training.init_from import check_init_from, load_pretrained

KINDS = ["gpt2", "llama"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_file):
    root = tmp_path_factory.mktemp("hf")
    return {kind: (root / kind, tiny_hf(kind, root / kind, tokenizer_file)) for kind in KINDS}


def _ours(kind, path, *overrides):
    cfg = load_config(None, [*fitting_overrides(kind, path), "sparsity.backend=reference",
                             *overrides])
    said = []
    ckpt = check_init_from(cfg, said.append)
    model = GPTModel.from_config(cfg).eval()
    load_pretrained(model, cfg, None, ckpt)
    return cfg, model, said


@pytest.mark.parametrize("kind", KINDS)
def test_a_dense_import_gives_the_checkpoints_logits(checkpoints, kind):
    path, hf = checkpoints[kind]
    cfg, model, said = _ours(kind, path, "sparsity.enabled=false")
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(ids).logits
        ours = model(ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # its tokenizer prepares the data, its vocabulary is the model's (unpadded)
    assert cfg.data.tokenizer == f"hf:{path}" and cfg.model.vocab_size == 96
    assert said == [f"data.tokenizer: hf:{path} (the tokenizer of train.init_from)"]


def _magnitude_mask(dense: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Independently of masks.nm_mask: the n largest |w| of every m along `in`."""
    groups = dense.abs().reshape(dense.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(dense.shape)


def _hf_dense(kind, hf, block: int, role: str) -> torch.Tensor:
    """The pretrained (out, in) matrix of our `role` in block `block`."""
    if kind == "gpt2":
        name = {"qkv": "attn.c_attn", "proj": "attn.c_proj", "fc1": "mlp.c_fc",
                "fc2": "mlp.c_proj"}[role]
        return hf.transformer.h[block].get_submodule(name).weight.detach().t()
    layer = hf.model.layers[block]
    if role == "qkv":
        return torch.cat([getattr(layer.self_attn, f"{p}_proj").weight for p in "qkv"]).detach()
    if role == "fc1":
        return torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]).detach()
    return {"proj": layer.self_attn.o_proj, "fc2": layer.mlp.down_proj}[role].weight.detach()


@pytest.mark.parametrize("kind", KINDS)
def test_each_sparse_mask_is_the_magnitude_top_n_of_the_pretrained_weights(checkpoints, kind):
    path, hf = checkpoints[kind]
    _, model, _ = _ours(kind, path)
    layers = dict((name, layer) for name, layer in model.named_modules()
                  if layer in set(slope_layers(model)))
    assert len(layers) == 7  # block 0's qkv stays dense
    for name, layer in layers.items():
        _, block, part, role = name.split(".")
        dense = _hf_dense(kind, hf, int(block), role)
        want = _magnitude_mask(dense, 2, 4)
        assert torch.equal(layer.mask, want), name
        assert torch.equal(layer.weight.detach(), dense[want].reshape(dense.shape[0], -1)), name
        assert layer.column_mask_step == -1  # the double-pruned mask: from these weights


def test_a_config_that_does_not_fit_is_refused_naming_the_keys(checkpoints):
    path, _ = checkpoints["gpt2"]
    cfg = load_config(None, [*fitting_overrides("gpt2", path), "model.num_layers=3",
                             "model.seq_len=64"])
    with pytest.raises(ConfigError, match=r"train.init_from.*does not fit this config: "
                       r"model.num_layers is 3, the checkpoint's is 2 \(n_layer\); model.seq_len "
                       r"is 64, more than the checkpoint's 32 learned positions"):
        check_init_from(cfg, print)
    cfg = load_config(None, [*fitting_overrides("llama", checkpoints["llama"][0]),
                             f"model.hidden_size={2 * HIDDEN}"])
    with pytest.raises(ConfigError, match=r"model.hidden_size is 64, the checkpoint's is 32 "
                                          r"\(hidden_size\)"):
        check_init_from(cfg, print)


def test_another_tokenizer_is_refused(checkpoints):
    path, _ = checkpoints["llama"]
    cfg = load_config(None, [*fitting_overrides("llama", path), "data.tokenizer=hf:gpt2"])
    with pytest.raises(ConfigError, match=r"'data.tokenizer' = 'hf:gpt2' is not the tokenizer "
                                          r"of train.init_from"):
        check_init_from(cfg, print)
    cfg = load_config(None, [*fitting_overrides("llama", path), f"data.tokenizer=hf:{path}/"])
    check_init_from(cfg, print)  # the same directory, spelt otherwise


def test_unsupported_checkpoints_are_refused(checkpoints, tmp_path):
    import json

    from slope_megatron.inference.hf_import import HFImportError, read_hf_checkpoint

    (tmp_path / "opt").mkdir()
    (tmp_path / "opt" / "config.json").write_text(json.dumps({"model_type": "opt"}))
    with pytest.raises(HFImportError, match="OPT model, which does not map onto model.arch gpt"):
        read_hf_checkpoint(tmp_path / "opt")
    config = json.loads((checkpoints["llama"][0] / "config.json").read_text())
    (tmp_path / "gqa").mkdir()
    (tmp_path / "gqa" / "config.json").write_text(json.dumps({**config,
                                                              "num_key_value_heads": 2}))
    with pytest.raises(HFImportError, match=r"num_key_value_heads = 2 is not supported"):
        read_hf_checkpoint(tmp_path / "gqa")
    with pytest.raises(ConfigError, match="train.init_from"):
        load_config(None, [f"train.init_from={tmp_path / 'nothing'}"])


def test_a_larger_vocabulary_pads_with_the_mean_row(checkpoints):
    """model.vocab_size above the checkpoint's (e.g. to split over TP): the extra rows start
    as the mean of the pretrained ones, so no padded token outscores the real ones; the real
    tokens' logits are the checkpoint's."""
    path, hf = checkpoints["llama"]
    cfg, model, _ = _ours("llama", path, "sparsity.enabled=false", "model.vocab_size=128")
    rows = model.embedding.tokens.weight.detach()
    assert rows.shape[0] == 128
    pretrained = hf.model.embed_tokens.weight.detach()
    assert torch.equal(rows[:96], pretrained)
    assert torch.allclose(rows[96:], pretrained.mean(0).expand(32, -1))
    head = model.head.lm_head.weight.detach()
    assert torch.allclose(head[96:], hf.lm_head.weight.detach().mean(0).expand(32, -1))
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[..., :96], hf(ids).logits, rtol=1e-5, atol=1e-5)
