"""Activation checkpointing on the GPU: with the cuSPARSELt layers (native step, adapters in
the sparse GEMM) and Inductor-compiled regions, recomputing the blocks gives the loss and
gradients of the plain step, and the step's peak memory falls."""
import pytest
import torch
from helpers.layer import same_update
from helpers.train import loss_and_grads, worst_grad_rel

from slope_megatron.config import load_config
from slope_megatron.model import GPTModel, regions
from slope_megatron.model.recompute import enable_activation_checkpointing
from slope_megatron.sparsity import enable_adapters

pytestmark = pytest.mark.gpu


def model_of(arch, sparse, adapters, width=256, layers=3, seq=128, backend="cusparselt"):
    cfg = load_config(None, [f"model.arch={arch}", "model.vocab_size=512",
                             f"model.hidden_size={width}", "model.num_heads=4",
                             f"model.num_layers={layers}", f"model.seq_len={seq}",
                             f"sparsity.enabled={str(sparse).lower()}",
                             f"sparsity.backend={backend}"])
    torch.manual_seed(0)
    model = GPTModel.from_config(cfg).to("cuda", torch.bfloat16)
    if adapters:
        enable_adapters(model)
        for name, p in model.named_parameters():
            if name.endswith("adapter_b"):
                torch.nn.init.normal_(p, 0.0, 0.02)
    return model


@pytest.mark.parametrize("arch,adapters", [("gpt", False), ("llama", True)])
def test_recompute_matches_plain_with_sparse_kernels(arch, adapters, inductor):
    regions.enable_compile(True)
    model = model_of(arch, True, adapters)
    x = torch.randint(0, 512, (8, 128), device="cuda")
    for _ in range(2):  # first call per token count searches algorithms; then the native step
        loss, grads = loss_and_grads(model, x, x)
    enable_activation_checkpointing(model)
    loss_r, grads_r = loss_and_grads(model, x, x)
    assert all(r.is_compiled for r in (regions.residual_norm, regions.causal_attention))
    assert abs(loss_r.item() - loss.item()) < 1e-3
    worst = worst_grad_rel(grads_r, grads)
    assert worst[0] < 1e-2, f"gradient {worst[1]} differs by {worst[0]:.3g} (rel)"


@pytest.mark.parametrize("backend", ["cusparselt", "auto"])
def test_recompute_from_the_first_call(backend, inductor):
    """Recomputing from the first step on, while the layers search algorithms, switch from the
    Python function to the native step and (`auto`) time and re-time their choices inside
    the recomputation: every step's loss and gradients are the plain twin's."""
    regions.enable_compile(True)
    plain = model_of("gpt", True, False, width=512, backend=backend)
    recomputing = model_of("gpt", True, False, width=512, backend=backend)
    enable_activation_checkpointing(recomputing)
    x = torch.randint(0, 512, (8, 128), device="cuda")
    for step in range(4):  # auto re-times two optimizer steps after its first timing
        loss, grads = loss_and_grads(plain, x, x)
        loss_r, grads_r = loss_and_grads(recomputing, x, x)
        assert abs(loss_r.item() - loss.item()) < 1e-3, step
        worst = worst_grad_rel(grads_r, grads)
        assert worst[0] < 1e-2, f"step {step}: gradient {worst[1]} differs by {worst[0]:.3g}"
        same_update(recomputing, plain, lr=1e-3)  # plain's gradients, on both


@pytest.mark.parametrize("sparse", [True, False])
def test_recompute_lowers_peak_memory(sparse, inductor):
    regions.enable_compile(True)
    model = model_of("gpt", sparse, False, width=512, layers=6, seq=512)
    x = torch.randint(0, 512, (16, 512), device="cuda")
    peaks = {}
    for on in (False, True):
        enable_activation_checkpointing(model, on)
        loss_and_grads(model, x, x)  # warm: plans, compiled graphs, allocator
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss_and_grads(model, x, x)
        peaks[on] = torch.cuda.max_memory_allocated() - base
    print(f"sparse={sparse} step peak above the model: plain {peaks[False] / 2**20:.0f} MiB, "
          f"recomputing {peaks[True] / 2**20:.0f} MiB")
    assert peaks[True] < 0.6 * peaks[False], peaks
