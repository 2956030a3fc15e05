"""model/reshard.py's cuts by key equal what the TP layers build: every TP rank's local state
is the cut of the TP = 1 model's, and merging the ranks' states gives the TP = 1 model back.

A tensor-parallel model's pieces are built without process groups (building needs none), from
the same seed as the TP = 1 model, which they equal by construction (layers.py generates
each full tensor, then slices it)."""
import types

import pytest
import torch

from slope_megatron.config import AdaptersConfig, ModelConfig, SparsityConfig
from slope_megatron.model import GPTModel
from slope_megatron.model.reshard import Cut, cut_of, merge, merge_state, shard


def _model(arch: str, tp: int = 1, rank: int = 0) -> GPTModel:
    par = None if tp == 1 else types.SimpleNamespace(tp_size=tp, tp_rank=rank, tp_group=None)
    cfg = ModelConfig(arch=arch, hidden_size=32, num_heads=4, num_layers=2, seq_len=8,
                      vocab_size=64, tie_embeddings=False)
    model = GPTModel(cfg, SparsityConfig(backend="reference", sparse_lm_head=True),
                     AdaptersConfig(rank=2), parallel=par, init_seed=3)
    return model


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_every_local_tensor_is_the_cut_of_the_tp1_tensor_and_merges_back(arch):
    full = _model(arch).state_dict()
    ranks = [_model(arch, 2, r).state_dict() for r in range(2)]
    for rank, local in enumerate(ranks):
        for key, value in local.items():
            cut = cut_of(key, arch)
            mine = shard(full[cut.full_key], cut, 2, rank)
            assert torch.equal(mine, value) if torch.is_tensor(value) else mine == value, key
    # adapters' B is zero at build: a random one must survive cut and merge, the way
    # parallel/gather.py puts a column-parallel B together ([q; k; v] blocks along `out`)
    from slope_megatron.parallel.gather import _column_full

    for key in [k for k in full if k.endswith("adapter_b")]:
        full[key] = torch.randn_like(full[key])
    for rank, local in enumerate(ranks):
        for key in [k for k in local if k.endswith("adapter_b")]:
            local[key] = shard(full[cut_of(key, arch).full_key], cut_of(key, arch), 2, rank)
    qkv_b = [local["blocks.1.attn.qkv.local.adapter_b"] for local in ranks]
    assert torch.equal(_column_full([b.t() for b in qkv_b], 3).t(),
                       full["blocks.1.attn.qkv.adapter_b"])
    merged = merge_state(ranks, arch)
    assert merged.keys() == full.keys()
    for key, value in full.items():
        assert torch.equal(merged[key], value) if torch.is_tensor(value) \
            else merged[key] == value, key


def test_cuts_by_role():
    assert cut_of("blocks.0.attn.qkv.local.weight", "gpt") == Cut(
        "blocks.0.attn.qkv.weight", 0, 3)
    assert cut_of("blocks.0.mlp.fc1.local.mask", "llama") == Cut("blocks.0.mlp.fc1.mask", 0, 2)
    assert cut_of("blocks.0.mlp.fc1.local.mask", "gpt") == Cut("blocks.0.mlp.fc1.mask", 0, 1)
    assert cut_of("blocks.1.mlp.fc2.local.weight", "gpt") == Cut("blocks.1.mlp.fc2.weight", 1)
    assert cut_of("blocks.1.mlp.fc2.local.adapter_a", "gpt").dim == 0
    assert cut_of("blocks.1.mlp.fc2.local.adapter_b", "gpt").dim is None
    assert cut_of("blocks.1.attn.qkv.local.adapter_a", "gpt").dim is None
    assert cut_of("blocks.1.attn.proj.bias", "gpt") == Cut("blocks.1.attn.proj.bias")
    assert cut_of("embedding.tokens.weight", "gpt") == Cut("embedding.tokens.weight", 0)
    with pytest.raises(ValueError, match="does not split into 3 block"):
        shard(torch.zeros(6, 4), Cut("x", 0, 3), 4, 0)
    assert merge([torch.ones(2)], Cut("x", 0)).shape == (2,)
