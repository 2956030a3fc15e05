"""The decode-step profile's arithmetic: one step's kernels are the difference of a long and a
short generate call, summed per category (the profiler itself runs on a GPU only)."""
import pytest

from helpers.launch import load_benchmark

gp = load_benchmark("generate_profile")
GEMM = "nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNT"
ATTN = "void fmha_cutlassF_bf16_aligned_64x64_rf_sm80"
NORM = "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float>"


def test_one_step_is_the_difference_per_extra_step():
    long = {GEMM: (1000.0, 50), ATTN: (300.0, 25), NORM: (40.0, 10), "prefill_only": (9.0, 1)}
    short = {GEMM: (100.0, 5), ATTN: (20.0, 0 + 1), NORM: (4.0, 1), "prefill_only": (9.0, 1)}
    step = gp.per_step(long, short, steps=9)
    assert step[GEMM] == (100.0, 5.0)
    assert step[ATTN] == pytest.approx((280 / 9, 24 / 9))
    assert step[NORM] == (4.0, 1.0)
    assert "prefill_only" not in step  # no decode-step time: dropped


def test_the_summary_sums_categories_and_lists_the_slowest_first():
    step = {GEMM: (100.0, 5.0), ATTN: (30.0, 3.0), NORM: (4.0, 1.0), "_decode24_kernel": (60.0, 4)}
    prof = gp.summarize(step, step_ms=0.25, top=2)
    assert prof["step_us"] == 250.0
    assert prof["kernel_us"] == pytest.approx(194.0)
    assert prof["launches"] == pytest.approx(13.0)
    assert list(prof["by_kind"]) == ["dense_gemm", "decode24_gemm", "attention", "norm"]
    assert prof["by_kind"]["attention"] == {"us": 30.0, "launches": 3.0}
    assert [k["name"] for k in prof["top"]] == [GEMM, "_decode24_kernel"]
    text = gp.format_profile("slope", 1, prof)
    assert "step 250 us" in text and "dense_gemm 100" in text and "decode24_gemm" in text


def test_profile_batches_must_be_measured_ones():
    from types import SimpleNamespace
    bench = load_benchmark("bench_generate")
    args = SimpleNamespace(layers=2, prompt=8, new=4, repeats=1, batches=[1, 8], prefill=[16],
                           profile=[1, 4])
    assert "--profile 4" in bench.argument_error(args)
    args.profile = [8]
    assert bench.argument_error(args) is None
