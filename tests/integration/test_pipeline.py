"""Pipeline parallelism (DeepSpeed PipelineModule, 1F1B), alone and with TP and DP:
the same losses as one process, with the adapter switch inside the window."""
import pytest
import torch

from helpers.dist import run_distributed
from helpers.layout_worker import train_losses


@pytest.fixture(scope="module")
def reference():
    return {arch: run_distributed(train_losses, 1, 1, 0, False, arch)[0][0]
            for arch in ("gpt", "llama")}


@pytest.mark.slow
@pytest.mark.parametrize("world,tp,pp,stage,arch", [
    (2, 1, 2, 0, "gpt"), (2, 1, 2, 1, "llama"), (4, 2, 2, 0, "gpt"), (4, 1, 2, 1, "gpt"),
])
def test_pipeline_layouts_match_one_process(reference, world, tp, pp, stage, arch):
    got = run_distributed(train_losses, world, tp, stage, False, arch, pp)[0][0]
    ref = reference[arch]
    assert ref[-1] < ref[0]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-6)


_FALLBACK_WARNING = "an autograd kernel was not registered"  # torch's autograd-fallback warning


def _pipeline_run_warnings(arch):
    """A PP = 2 run with tied embeddings: build, a tied-weight re-sync as a checkpoint load
    does it (PipelineModule.load_state_dir), two steps. The autograd-fallback warnings seen."""
    import warnings

    from helpers.layout_worker import GLOBAL_BATCH, MICRO, tiny_config
    from slope_megatron.parallel import initialize_parallel
    from slope_megatron.distributed import init_distributed
    from slope_megatron.training.engine import build_engine

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # not once per place: the forked parent may have seen it
        cfg = tiny_config(1, 2, 0, [f"model.arch={arch}", "model.tie_embeddings=true"])
        init_distributed()
        par = initialize_parallel(1, 2)
        model, engine, _ = build_engine(cfg, par, par.dp_size)
        assert "embed" in model.tied_modules
        model._synchronize_tied_weights()
        ids = torch.randint(0, 128, (GLOBAL_BATCH, 17), generator=torch.Generator().manual_seed(1))
        for _ in range(2):
            engine.train_batch(iter([(ids[i:i + MICRO, :-1], ids[i:i + MICRO, 1:])
                                     for i in range(0, GLOBAL_BATCH, MICRO)]))
    return [f"{w.category.__name__} ({w.filename}:{w.lineno}): {w.message}" for w in caught
            if _FALLBACK_WARNING in str(w.message)]


@pytest.mark.slow
def test_pipeline_run_raises_no_autograd_fallback_warning():
    """DeepSpeed broadcasts the tied embedding in place; under grad mode torch hooked the
    Parameter to warn "c10d::broadcast_: an autograd kernel was not registered ..." at
    every backward on both stages (see model/pipeline.py `_pipeline_module_class`)."""
    per_rank = run_distributed(_pipeline_run_warnings, 2, "gpt")
    assert per_rank == [[], []], "\n".join(w for ws in per_rank for w in ws)


def test_pipeline_keys_map_to_model_names():
    from slope_megatron.model.pipeline import pipeline_to_model_keys

    mapped = pipeline_to_model_keys({"0.positions.weight": 1, "1.attn.qkv.weight": 2,
                                     "3.norm.weight": 3, "tied_modules.embed.tokens.weight": 4},
                                    num_layers=2)
    assert mapped == {"embedding.positions.weight": 1, "blocks.0.attn.qkv.weight": 2,
                      "head.norm.weight": 3, "embedding.tokens.weight": 4}
    with pytest.raises(KeyError, match="unexpected pipeline layer index"):
        pipeline_to_model_keys({"9.x": 0}, num_layers=2)
