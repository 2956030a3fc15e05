"""Pipeline parallelism (DeepSpeed PipelineModule, 1F1B), alone and with TP and DP:
the same losses as one process, with the adapter switch inside the window."""
import pytest
import torch

from dist_utils import run_distributed
from layout_worker import train_losses


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


def test_pipeline_keys_map_to_model_names():
    from slope_megatron.model.pipeline import pipeline_to_model_keys

    mapped = pipeline_to_model_keys({"0.positions.weight": 1, "1.attn.qkv.weight": 2,
                                     "3.norm.weight": 3, "tied_modules.embed.tokens.weight": 4},
                                    num_layers=2)
    assert mapped == {"embedding.positions.weight": 1, "blocks.0.attn.qkv.weight": 2,
                      "head.norm.weight": 3, "embedding.tokens.weight": 4}
    with pytest.raises(KeyError, match="unexpected pipeline layer index"):
        pipeline_to_model_keys({"9.x": 0}, num_layers=2)
