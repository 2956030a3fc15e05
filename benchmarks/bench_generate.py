"""`python -m benchmarks.bench inference generate`: whole-model generation and prefill on a GPU,
dense vs SLoPe vs SLoPe with adapters, each arm in a fresh process.

The model: LLaMA-7B-shaped (32 blocks by default), random bf16 weights with no zeros. Each
arm is one process (`--arm`; the parent starts one per arm so that no arm inherits another's
allocator state, cuDNN/cuSPARSELt plans or compiled kernels) that:
1. builds the model and, for sparse arms, checks the fast kernels' logits against the
   reference kernels' on the same weights of its first two blocks, at 1, 2, 8 and 128 tokens
   per call (rel. err < 1e-2);
2. times `generate` (greedy, `--decode`, random prompts of `--prompt` tokens) at each batch
   size B: the per-token decode time is (t[new tokens] - t[1 token]) / (new - 1), so prefill
   and the first sample cancel; tokens/s = B / that time. Medians of `--repeats` calls after a
   warm-up call (which captures the CUDA graph);
3. times a prefill (one prompt of T tokens into an empty cache) for each T, median of 5;
4. reports weight bytes, and the achieved weight-streaming bandwidth of a decode step
   (weight bytes / step time) against the GPU's measured copy bandwidth;
5. with `--profile B ...`: the kernel list of one decode step at those batch sizes
   (`generate_profile.py`), after the timing, so the profiler never slows a timed call.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import argument_check_then_cuda, checkout_env, gpu_speed, run_environment

PRESET = dict(arch="llama", hidden=4096, heads=32, layers=32, vocab=32000, ffn=11008)
ARMS = {  # name: (sparse, kernels, adapter rank ratio)
    "dense": (False, "auto", None),
    "slope": (True, "decode24", None),
    "slope-cusparselt": (True, "cusparselt", None),
    "slope+adapters": (True, "decode24", 0.0156),
}


def add_arguments(p) -> None:
    p.add_argument("--arms", nargs="+", default=["dense", "slope", "slope+adapters"],
                   choices=list(ARMS), help="what to build: " + ", ".join(ARMS))
    p.add_argument("--layers", type=int, default=PRESET["layers"], help="transformer blocks")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32],
                   help="generate batch sizes")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--new", type=int, default=128, help="new tokens per sequence")
    p.add_argument("--prefill", nargs="*", type=int, default=[512, 2048, 8192],
                   help="prefill lengths T (batch 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    p.add_argument("--decode", choices=("static", "eager"), default="static",
                   help="generate()'s decoding loop")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="InferenceModel(compile=...): the regions between the GEMMs of a "
                        "static decode step torch.compile'd (auto: where it is a CUDA graph)")
    p.add_argument("--profile", nargs="*", type=int, default=[], metavar="B",
                   help="also list the kernels of one decode step at these batch sizes "
                        "(each must be one of --batches)")
    p.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)  # one arm, in-process
    p.add_argument("--json", default="docs/results/generate_bench.json",
                   help="write the results (with the GPU name and versions) here")


def argument_error(args) -> str | None:
    if args.layers < 1 or args.prompt < 1 or args.new < 2 or args.repeats < 1:
        return "--layers, --prompt and --repeats take values >= 1, --new >= 2"
    bad = [v for v in args.batches + args.prefill if v < 1]
    if bad:
        return f"--batches and --prefill take values >= 1, got {bad[0]}"
    unknown = [b for b in args.profile if b not in args.batches]
    if unknown:
        return f"--profile {unknown[0]}: profile only batch sizes that --batches measures"
    return None


def _config(args, sparse: bool, rank, layers: int | None = None):
    from slope_megatron.config import load_config
    seq_len = max([args.prompt + args.new] + args.prefill)
    sets = [f"model.arch={PRESET['arch']}", f"model.hidden_size={PRESET['hidden']}",
            f"model.num_heads={PRESET['heads']}", f"model.vocab_size={PRESET['vocab']}",
            f"model.ffn_hidden_size={PRESET['ffn']}", f"model.num_layers={layers or args.layers}",
            f"model.seq_len={seq_len}", f"sparsity.enabled={str(sparse).lower()}",
            f"adapters.enabled={str(rank is not None).lower()}"]
    if rank is not None:
        sets += [f"adapters.rank_ratio={rank}", "adapters.rank_of=input"]
    return load_config(None, sets)


def random_state(cfg):
    """The state dict of a random GPTModel built in bf16 on the GPU (no zeros: adapters get
    a random B)."""
    import torch

    from slope_megatron.model import GPTModel
    from slope_megatron.sparsity import enable_adapters, slope_layers
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = GPTModel.from_config(cfg)
    finally:
        torch.set_default_dtype(previous)
    if cfg.adapters.enabled:
        enable_adapters(model)
        for layer in slope_layers(model):
            torch.nn.init.normal_(layer.adapter_b, 0.0, 0.02)
    return model.state_dict()


def cuda_seconds(fn) -> float:
    import torch
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


CHECK_BLOCKS = 2
# (batch, length) of the checked calls: 1, 2 and 8 tokens per linear call (where the decode
# kernel's plan may take them) and 128 (cuSPARSELt; the length is cut to the model's context)
CHECK_SHAPES = ((1, 1), (1, 2), (8, 1), (2, 64))


def reference_error(args, state, kernels: str, rank, device: str = "cuda") -> float:
    """Max rel. error of `kernels`' logits vs the reference kernels' on the same weights, on a
    model of the first CHECK_BLOCKS blocks: every layer shape of the full model at every kind
    of call, while through 32 random blocks the bf16 rounding of any two correct kernels
    drifts apart by several 1e-2 (each block amplifies the last one's differences)."""
    import torch

    from slope_megatron.inference import InferenceModel
    cfg = _config(args, True, rank, layers=CHECK_BLOCKS)
    part = {k: v for k, v in state.items()
            if not k.startswith("blocks.") or int(k.split(".")[1]) < CHECK_BLOCKS}
    fast = InferenceModel(cfg, part, dtype="bf16", device=device, kernels=kernels)
    ref = InferenceModel(cfg, part, dtype="bf16", device=device, kernels="reference")
    gen = torch.Generator(device=device).manual_seed(1)
    worst = 0.0
    for batch, length in CHECK_SHAPES:
        ids = torch.randint(0, cfg.model.vocab_size, (batch, min(length, cfg.model.seq_len)),
                            device=device, generator=gen)
        with ref.generation_scope():
            want = ref.full_logits(ids)
        worst = max(worst, ((fast.full_logits(ids) - want).norm() / want.norm()).item())
    del fast, ref
    if device == "cuda":
        torch.cuda.empty_cache()
    return worst


def decode_plan(inf) -> dict:
    """'out x in @ tokens' -> the decode24 config the load-time plan chose (none: cuSPARSELt
    for every call)."""
    from slope_megatron.sparsity import slope_layers
    plans = {id(p): p for p in (getattr(layer.backend, "plans", None)
                                for layer in slope_layers(inf.model)) if p is not None}
    return {f"{o}x{i}@{t}": cfg.__dict__ for p in plans.values()
            for (o, i, t), cfg in sorted(p.table.items())}


def run_arm(args) -> dict:
    """Build one arm's model and measure it (this process only)."""
    import torch

    from benchmarks.generate_profile import profile_decode
    from slope_megatron.inference import InferenceModel, generate
    sparse, kernels, rank = ARMS[args.arm]
    cfg = _config(args, sparse, rank)
    t0 = time.time()
    state = random_state(cfg)
    inf = InferenceModel(cfg, state, dtype="bf16", device="cuda", kernels=kernels,
                         decode=args.decode, compile=args.compile)
    row = {"arm": args.arm, "kernels": inf.kernels, "kernels_note": inf.kernels_note,
           "decoding": inf.describe_decoding(),
           "load_s": time.time() - t0, "weight_bytes": sum(inf.weight_bytes().values()),
           "copy_gbps": gpu_speed()["copy_gbps"]}
    if sparse:
        row["err"] = reference_error(args, state, kernels, rank)
        row["plan"] = decode_plan(inf)
    del state
    torch.cuda.empty_cache()
    gen = torch.Generator().manual_seed(0)
    row["generate"], row["profile"] = {}, {}
    for b in args.batches:
        prompts = torch.randint(0, cfg.model.vocab_size, (b, args.prompt), generator=gen).tolist()

        def call(new):
            return cuda_seconds(lambda: generate(inf, prompts, new, decode=args.decode))

        call(args.new), call(1)  # warm-up: a graph per cache capacity, plans
        full = statistics.median(call(args.new) for _ in range(args.repeats))
        first = statistics.median(call(1) for _ in range(args.repeats))
        step = (full - first) / (args.new - 1)
        row["generate"][b] = {"step_ms": 1e3 * step, "tokens_per_s": b / step,
                              "weight_gbps": row["weight_bytes"] / step / 1e9,
                              "of_copy_bw": row["weight_bytes"] / step / 1e9 / row["copy_gbps"]}
        if b in args.profile:
            row["profile"][b] = profile_decode(call, args.new, 1e3 * step)
    inf.release_decoders()
    row["prefill"] = {}
    for t in args.prefill:
        ids = torch.randint(0, cfg.model.vocab_size, (1, t), device="cuda")
        pos = torch.arange(t, device="cuda")[None]

        def prefill():
            cache = inf.new_cache(1, t)
            inf(ids, pos, cache, None, last_only=True)

        prefill()
        row["prefill"][t] = {"ms": 1e3 * statistics.median(cuda_seconds(prefill)
                                                            for _ in range(5))}
    return row


def _print_row(row: dict, base: dict) -> None:
    gen = " ".join(f"B={b}: {g['tokens_per_s']:7.1f} tok/s ({g['of_copy_bw']:4.0%} BW, "
                   f"{base['generate'][b]['step_ms'] / g['step_ms']:4.2f}x)"
                   for b, g in row["generate"].items())
    pre = " ".join(f"T={t}: {p['ms']:7.1f} ms ({base['prefill'][t]['ms'] / p['ms']:4.2f}x)"
                   for t, p in row["prefill"].items())
    err = f"{row['err']:.1e}" if "err" in row else "-"
    print(f"{row['arm']:16s} | {row['weight_bytes'] / 2**30:5.2f} GiB "
          f"({row['weight_bytes'] / base['weight_bytes']:4.2f}x) | {gen} | prefill {pre} | "
          f"err {err} | {row['kernels_note']} | decoding {row['decoding']}", flush=True)


def run_generate(args) -> int:
    refused = argument_check_then_cuda(argument_error(args), "`bench inference generate`")
    if refused is not None:
        return refused
    if args.arm:  # a child: one arm, its row as JSON on the last line
        print(json.dumps(run_arm(args)), flush=True)
        return 0
    import triton

    from benchmarks.generate_profile import format_profile
    meta = {**run_environment(), "triton": triton.__version__, "command": " ".join(sys.argv),
            "layers": args.layers, "prompt": args.prompt, "new": args.new, "decode": args.decode,
            "compile": args.compile}
    print(f"# {meta['gpu']} | torch {meta['torch']} | {args.layers}-block LLaMA-7B shape | "
          f"bf16 | decode {args.decode} | prompt {args.prompt} + {args.new} new", flush=True)
    results, base = {"meta": meta, "rows": []}, None
    for arm in args.arms:
        cmd = [sys.executable, "-m", "benchmarks.bench", "inference", "generate", "--arm", arm,
               "--layers", str(args.layers), "--prompt", str(args.prompt), "--new",
               str(args.new), "--repeats", str(args.repeats), "--decode", args.decode,
               "--compile", args.compile,
               "--batches", *map(str, args.batches), "--prefill", *map(str, args.prefill),
               "--profile", *map(str, args.profile)]
        res = subprocess.run(cmd, env=checkout_env(), capture_output=True, text=True)
        if res.returncode != 0:
            print(f"error: arm {arm} failed:\n{res.stdout[-3000:]}{res.stderr[-3000:]}",
                  file=sys.stderr)
            return 1
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["generate"] = {int(k): v for k, v in row["generate"].items()}
        row["prefill"] = {int(k): v for k, v in row["prefill"].items()}
        row["profile"] = {int(k): v for k, v in row["profile"].items()}
        base = base or row
        results["rows"].append(row)
        _print_row(row, base)
        for b, prof in row["profile"].items():
            print(format_profile(arm, b, prof), flush=True)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1))
    bad = [r["arm"] for r in results["rows"] if not r.get("err", 0.0) < 1e-2]
    if bad:
        print(f"# CORRECTNESS FAILED: {', '.join(bad)}")
        return 1
    return 0

