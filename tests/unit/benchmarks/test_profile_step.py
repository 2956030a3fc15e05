"""The per-op profile's kernel-name categories (the profile itself runs on a GPU only)."""
import pytest

from helpers.launch import load_benchmark
from helpers.paths import ROOT

profile_step = load_benchmark("profile_step")


@pytest.mark.parametrize("name,category", [
    ("void cusparseLt::sm90_xmma_sparse_gemm_bf16bf16_bf16f32_f32_tn_n", "sparse_gemm"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNT", "dense_gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "dense_gemm"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>", "attention"),
    ("_gather_kept_kernel", "triton_slope"),
    ("_decode24_kernel", "decode24_gemm"),
    ("triton_per_fused_add_native_layer_norm_3", "inductor_fused"),
    ("triton_red_fused__log_softmax__to_copy_nll_loss_forward_0", "inductor_fused"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float>", "norm"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>", "cross_entropy"),
    ("void at::native::(anonymous namespace)::fused_adam_kernel", "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>",
     "elementwise"),
    ("void cub::DeviceSelectSweepKernel nonzero", "mask_ops"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "communication"),
    ("some_unknown_kernel", "other"),
])
def test_kernel_names_fall_into_their_categories(name, category):
    assert profile_step.categorize(name) == category


def test_profile_needs_a_gpu(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-side refusal")
    config = str(ROOT / "configs" / "gpt2-small.yaml")
    with pytest.raises(SystemExit) as stopped:
        profile_step.main(["--arms", "dense", "--config", config])
    assert stopped.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_host_overhead_needs_a_gpu(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-side refusal")
    with pytest.raises(SystemExit) as stopped:
        load_benchmark("host_overhead").main([])
    assert stopped.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_annotations_are_not_kernels():
    assert profile_step.is_annotation("Optimizer.step#AdamW.step")
    assert not profile_step.is_annotation(
        "void at::native::vectorized_elementwise_kernel<4, {lambda(float)#1}>")
