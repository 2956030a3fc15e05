"""Measurement tools: benchmarks, profilers, studies and plots of SLoPe against dense.

Run each as a module from the checkout root (most need one CUDA GPU and say so in one
`error:` line on a machine without one):

    python -m benchmarks.bench kernels      # the sparse linear layer vs dense and torch's 2:4
    python -m benchmarks.bench train        # training throughput and memory, dense vs SLoPe
    python -m benchmarks.bench inference gemm|generate|blocks  # decode GEMM, generation, blocks
    python -m benchmarks.quality_study      # how much of 2:4's loss gap to dense SLoPe recovers
    python -m benchmarks.plot_results X.json  # a PNG of a study or bench-train JSON
    python -m benchmarks.profile_step       # where a training step's GPU time goes, per op
    python -m benchmarks.host_overhead      # host time per layer call, by piece
    python -m benchmarks.layer_host_gpu     # host vs GPU time of one layer step
    python -m benchmarks.bench_reference_step  # the dense-GEMM backends' layer step
    python -m benchmarks.bench_torchao      # torchao's runtime 2:4 training, for comparison
    python -m benchmarks.refresh_cost       # what one column-mask refresh costs
    python -m benchmarks.auto_timing_spread # how much `auto`'s per-shape timings vary
    python -m benchmarks.gpu_check          # is this GPU at full speed?
    python -m benchmarks.cslt_meta_probe    # can the decode kernel read cuSPARSELt's metadata?
    python -m benchmarks.decode24_sass      # the decode kernel's sm_90 code, counted (no GPU)
    python -m benchmarks.provenance [--find DIGEST]  # which code produced a result file

`--help` of each gives its options. The helpers they share (CUDA check, timing, child
processes, provenance) are in `benchmarks.common`; `benchmarks.bench_adapters` is the adapter
part of `bench kernels`. Current numbers, with the command, machine and date of each, are in
docs/RESULTS.md; the kernels' design in docs/KERNELS.md.
"""
