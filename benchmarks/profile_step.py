"""Where the GPU time of a training step goes, dense vs SLoPe (a per-op profile).

    python -m benchmarks.profile_step --config configs/gpt2-small.yaml --arms dense slope \\
        [--set model.hidden_size=2048 ...] [--steps 3] [--json profile.json]

Each arm runs in its own process and builds the real training stack (`build_engine`:
GPTModel, AdamW, DeepSpeed engine with the config's precision and ZeRO stage) on one GPU,
feeds random tokens (no data preparation: this measures compute, not input), runs --warmup
optimizer steps (cuSPARSELt plans, `auto` backend choices, allocator), then profiles --steps
steps with torch.profiler. CUDA kernel time is summed into categories by kernel name
(`categorize`): sparse GEMMs (cuSPARSELt), dense GEMMs (cuBLAS/CUTLASS, includes dW),
attention, Triton gathers/refresh/adapter kernels, mask ops of the reference path, norms,
cross-entropy/softmax, optimizer, other elementwise, NCCL, everything else. Also reported: the
step's wall time with and without the profiler, the `auto` backend's decisions, and per phase
(forward / backward / engine.step / refresh) the host time to issue it against the GPU time
(`phase_times`), with a cProfile of the host side from a separate step. The arm that asks for
adapters (`slope-adapters`) has them switched on before the warm-up: its profile is the
adapter phase (the others keep the config's switch at the end of a run, never reached here).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_train import ARMS  # the arms are the same as the benchmark's
from benchmarks.common import checkout_env, require_cuda, run_environment
from slope_megatron.cli import Once, add_set_argument, config_error
from slope_megatron.errors import EXIT_USER_ERROR

# (category, substrings of a lower-cased kernel name); the first match wins
CATEGORIES = [
    ("communication", ("nccl",)),
    ("decode24_gemm", ("_decode24_kernel",)),  # the inference 2:4 decode GEMM
    ("sparse_gemm", ("cusparselt", "sparse", "spmma", "_sp_")),
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("triton_slope", ("_gather_kept_kernel", "_gather_wt_kernel", "_scatter_kept_kernel",
                      "_lowrank_add_kernel")),
    ("dense_gemm", ("gemm", "nvjet", "cutlass", "cublas", "xmma", "matmul", "splitk")),
    # Inductor's fused kernels of the compiled regions (norms, adds, activations, loss together)
    ("inductor_fused", ("triton_poi_", "triton_per_", "triton_red_", "triton_tem_")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("cross_entropy", ("softmax", "nll", "cross_entropy", "log_softmax")),
    ("norm", ("layer_norm", "layernorm", "rms", "norm_")),
    ("mask_ops", ("nonzero", "masked_scatter", "index_select", "scatter", "cumsum", "scan")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "reduce", "copy", "fill")),
]


def is_annotation(key: str) -> bool:
    """GPU-side user annotations span kernels that are counted on their own (not kernels:
    note that real kernel names may contain '#', from C++ lambdas)."""
    return key.startswith(("Optimizer.", "ProfilerStep", "## "))


def categorize(kernel_name: str) -> str:
    name = kernel_name.lower()
    for category, keys in CATEGORIES:
        if any(k in name for k in keys):
            return category
    return "other"


def add_arguments(p) -> None:
    p.add_argument("--config", action=Once, default="configs/gpt2-small.yaml",
                   help="YAML config every arm builds (default: %(default)s)")
    p.add_argument("--arms", nargs="+", default=["dense", "slope"], choices=list(ARMS),
                   metavar="ARM", help="arms to profile, as `bench train --arms` names "
                                       "them (default: dense slope)")
    add_set_argument(p, "overrides for every arm (model size, micro batch, ...)")
    p.add_argument("--warmup", type=int, default=3,
                   help="optimizer steps before profiling (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3,
                   help="optimizer steps profiled (default: %(default)s)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--one-arm", default=None, help=argparse.SUPPRESS)  # child process
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)


def profile_arm(args) -> dict:
    """Child process: build the engine, warm up, profile; returns the category split."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from slope_megatron.config import load_config
    from slope_megatron.sparsity import after_optimizer_step
    from slope_megatron.distributed import init_distributed
    from slope_megatron.training.engine import build_engine
    from slope_megatron.training.optimizer import switch_on_adapters
    from slope_megatron.training.step import train_step

    cfg = load_config(args.config, [*args.set, *ARMS[args.one_arm]])
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = cfg.data.tokenizer_vocab_size
    init_distributed()
    torch.manual_seed(cfg.train.seed)
    model, engine, optimizer = build_engine(cfg, None, 1)
    if "adapters.enabled=true" in ARMS[args.one_arm]:  # the adapter phase (`slope-adapters`)
        switch_on_adapters(model, optimizer, cfg)  # before the warm-up
    micro = cfg.train.global_batch_size // cfg.train.micro_batch_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = []
    for _ in range(micro):
        ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size,
                                                     cfg.model.seq_len + 1),
                            device="cuda", generator=gen)
        batches.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))

    def step():
        train_step(engine, batches)
        after_optimizer_step(model)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()  # the same steps without the profiler's host overhead
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    plain_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    phases = phase_times(engine, model, batches)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    split: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.device_type != torch.autograd.DeviceType.CUDA or is_annotation(ev.key):
            continue
        ms = ev.self_device_time_total / 1e3 / args.steps
        split[categorize(ev.key)] = split.get(categorize(ev.key), 0.0) + ms
        kernels[ev.key] = ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    tokens = cfg.train.global_batch_size * cfg.model.seq_len
    return {"arm": args.one_arm, "wall_ms": wall_ms, "kernel_ms": sum(split.values()),
            "tokens_per_s": tokens / wall_ms * 1e3, "split_ms": split,
            "unprofiled_wall_ms": plain_ms, "unprofiled_tokens_per_s": tokens / plain_ms * 1e3,
            "auto_decisions": auto_decisions(), **phases,
            "top_kernels_ms": [{"name": k[:160], "ms": v, "category": categorize(k)}
                               for k, v in top]}


def phase_times(engine, model, batches) -> dict:
    """Two more steps. The first is timed per phase (forward / backward / engine.step per
    micro-batch, then the kernel-cache refresh): the host time to issue the phase, the GPU
    time between CUDA events around it, and how often the GPU had already finished all
    earlier work when the host reached the end of a phase (it was then waiting for the host).
    Host time includes waits in syncs (engine.step waits for the backward). The second step
    runs under cProfile for the host side's top functions (cProfile slows the host, so it is
    kept out of the timed step)."""
    import cProfile
    import io
    import pstats

    import torch
    from slope_megatron.sparsity import after_optimizer_step

    def run_step(mark):
        for x, y in batches:
            loss = engine(x, y)
            mark("forward")
            engine.backward(loss)
            mark("backward")
            engine.step()
            mark("engine.step")
        after_optimizer_step(model)
        mark("refresh")

    marks = []

    def mark(name):
        caught_up = bool(marks) and marks[-1][2].query()  # GPU done with everything so far?
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        marks.append((name, time.perf_counter(), ev, caught_up))

    torch.cuda.synchronize()
    mark("start")
    run_step(mark)
    torch.cuda.synchronize()
    host: dict[str, float] = {}
    gpu: dict[str, float] = {}
    idle: dict[str, int] = {}
    for (_, t0, e0, _), (name, t1, e1, caught_up) in zip(marks, marks[1:]):
        host[name] = host.get(name, 0.0) + (t1 - t0) * 1e3
        gpu[name] = gpu.get(name, 0.0) + e0.elapsed_time(e1)
        idle[name] = idle.get(name, 0) + int(caught_up)
    prof = cProfile.Profile()
    prof.enable()
    run_step(lambda name: None)
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
    return {"phase_host_ms": host, "phase_gpu_ms": gpu, "phase_gpu_caught_up": idle,
            "cprofile_top": out.getvalue()[-6000:]}


def auto_decisions() -> list:
    """What the `auto` backend chose per (out, in, tokens, ..., grad) key in this process."""
    from slope_megatron.sparsity.backends import _INSTANCES

    auto = _INSTANCES.get("auto")
    if auto is None:
        return []
    return [{"out_in_tokens": list(key[:3]), "grad": key[-1], "backend": d.backend,
             "speedup": d.speedup, "final": d.final,
             "first_speedup": None if d.first is None else d.first.speedup}
            for key, d in auto.decisions.items()]


def run(args) -> int:
    if args.one_arm:
        Path(args.result).write_text(json.dumps(profile_arm(args)))
        return 0
    results = []
    for arm in args.arms:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "benchmarks.profile_step", "--config", args.config,
                   "--one-arm", arm, "--result", str(out), "--warmup", str(args.warmup),
                   "--steps", str(args.steps), *(["--set", *args.set] if args.set else [])]
            done = subprocess.run(cmd, env=checkout_env(), text=True, capture_output=True)
            if done.returncode != 0 or not out.exists():
                print(f"error: arm {arm} failed (exit {done.returncode}):\n"
                      f"{done.stderr[-3000:]}", file=sys.stderr)
                return 1
            results.append(json.loads(out.read_text()))
    cats = [c for c, _ in CATEGORIES] + ["other"]
    print(f"{'category (ms/step)':20s}" + "".join(f"{r['arm']:>18s}" for r in results))
    for c in cats:
        cells = [(r["split_ms"].get(c, 0.0), 100 * r["split_ms"].get(c, 0.0) / r["kernel_ms"])
                 for r in results]
        print(f"{c:20s}" + "".join(f"{ms:10.2f} ({pct:4.1f}%)" for ms, pct in cells))
    for key in ("kernel_ms", "wall_ms"):
        print(f"{key:20s}" + "".join(f"{r[key]:18.2f}" for r in results))
    print(f"{'tokens/s':20s}" + "".join(f"{r['tokens_per_s']:18,.0f}" for r in results))
    for key in ("phase_host_ms", "phase_gpu_ms"):
        for phase in results[0][key]:
            print(f"{key[6:-3] + ' ' + phase:20s}"
                  + "".join(f"{r[key].get(phase, 0.0):18.2f}" for r in results))
    print(f"{'tokens/s unprofiled':20s}" + "".join(f"{r['unprofiled_tokens_per_s']:18,.0f}"
                                                   for r in results))
    if args.json:
        meta = {**run_environment(), "command": " ".join(sys.argv)}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "config": args.config,
                                               "overrides": args.set, "results": results},
                                              indent=1))
    return 0


def argument_error(args) -> str | None:
    """What is wrong with the command line (None when nothing): the step counts, and the
    config file with --set and each arm's keys, as the arm's process will load it."""
    if args.steps < 1:
        return f"--steps must be at least 1, got {args.steps}"
    if args.warmup < 0:
        return f"--warmup must be at least 0, got {args.warmup}"
    return config_error(args.config, args.set,
                        {arm: [*args.set, *ARMS[arm]] for arm in args.arms})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step",
                                description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    if not args.one_arm:  # the parent checks the arguments first, then the GPU
        problem = argument_error(args)
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_USER_ERROR
        require_cuda("benchmarks.profile_step")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
