"""Inductor-compiled block regions on the GPU: same loss and gradients as eager, with the sparse
GEMMs (cuSPARSELt) left outside the graphs."""
import pytest
import torch
from helpers.train import loss_and_grads, worst_grad_rel

from slope_megatron.config import load_config
from slope_megatron.model import GPTModel, regions

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("backend", ["cusparselt", "none"])
def test_inductor_regions_match_eager_bf16(arch, backend, inductor):
    sparse = backend != "none"
    cfg = load_config(None, [f"model.arch={arch}", "model.vocab_size=512", "model.hidden_size=256",
                             "model.num_heads=4", "model.num_layers=3", "model.seq_len=128",
                             f"sparsity.enabled={str(sparse).lower()}",
                             f"sparsity.backend={backend if sparse else 'reference'}"])
    model = GPTModel.from_config(cfg).to("cuda", torch.bfloat16)
    x = torch.randint(0, 512, (4, 128), device="cuda")
    loss_e, grads_e = loss_and_grads(model, x, x)
    regions.enable_compile(True)
    for _ in range(2):  # compile, then the cached graphs
        loss_c, grads_c = loss_and_grads(model, x, x)
    used = (regions.causal_attention, regions.residual_norm, regions.mlp_activation,
            regions.lm_loss)
    assert all(r.is_compiled for r in used), "a region fell back to eager"
    assert abs(loss_c.item() - loss_e.item()) < 5e-3
    worst = worst_grad_rel(grads_c, grads_e)
    assert worst[0] < 3e-2, f"gradient {worst[1]} differs by {worst[0]:.3g} (rel)"
