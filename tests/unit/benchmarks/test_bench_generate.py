"""`bench inference generate` checks an arm's kernels on the first blocks of its weights: the
slice of the full model's state must load into a model of that depth, for arms with and
without adapters. (The GPU kernels themselves are compared in tests/gpu; here the reference
kernels run on both sides, so the check must find no difference at all.)"""
from types import SimpleNamespace

import torch

from helpers.launch import load_benchmark

SMALL = dict(arch="llama", hidden=64, heads=4, layers=4, vocab=96, ffn=128)


def _state(bench, args, rank):
    from slope_megatron.model import GPTModel
    from slope_megatron.sparsity import enable_adapters, slope_layers
    torch.manual_seed(0)
    model = GPTModel.from_config(bench._config(args, True, rank))
    if rank is not None:
        enable_adapters(model)
        for layer in slope_layers(model):
            torch.nn.init.normal_(layer.adapter_b, 0.0, 0.02)
    return model.state_dict()


def test_the_check_loads_the_first_blocks_of_every_arm_and_compares_them(monkeypatch):
    bench = load_benchmark("bench_generate")
    monkeypatch.setattr(bench, "PRESET", SMALL)
    args = SimpleNamespace(layers=SMALL["layers"], prompt=8, new=4, prefill=[16])
    assert bench.CHECK_BLOCKS < SMALL["layers"]
    for rank in (None, 0.0625):
        state = _state(bench, args, rank)
        assert any(k.startswith(f"blocks.{SMALL['layers'] - 1}.") for k in state)
        assert bench.reference_error(args, state, "reference", rank, device="cpu") == 0.0
