"""`python -m benchmarks.bench train`: whole-model training throughput, dense vs SLoPe.

Each arm is a separate `launch/pretrain.py` run (a fresh process, so kernels, caches and
memory peaks do not leak between arms) on the same config, data and seed, differing only
in `sparsity.*`. Speed (tokens/s, MFU against the dense model's FLOPs) is the median over
the log windows of its metrics.jsonl after the first `--skip-windows` (which hold compilation,
the GEMM algorithm search and `auto`'s timings), in the last one's adapter state and after
the window of the switch; every window's tokens/s is kept in the JSON, so the spread shows.
Loss, peak GPU memory and the memory resident between steps (model state: weights, master
copies, gradients, optimizer state, masks - what the paper's memory figures count) come from
the last window. Why the median: a window of a small model lasts a few seconds, and single
windows of the same code differ noticeably (docs/RESULTS.md). Ratios are against the dense
arm of the same invocation. Writes a JSON with the GPU name and versions. Each arm keeps its
metrics and stderr log; no checkpoint is written unless --keep-checkpoints. An arm that runs
out of GPU memory is recorded as such (`out_of_memory`, and the allocator's message) and the
others still run: at the largest sizes, what fits is the result.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, checkout_env, gpu_speed, run_environment
from slope_megatron.cli import Once, add_set_argument, config_error
from slope_megatron.errors import EXIT_OUT_OF_MEMORY, EXIT_USER_ERROR

ARMS = {
    "dense": ["sparsity.enabled=false"],
    "slope": ["sparsity.enabled=true", "sparsity.backend=auto"],
    "slope-reference": ["sparsity.enabled=true", "sparsity.backend=reference"],
    # SLoPe's math with every GEMM dense (what the sparse kernels are worth in the whole step)
    "slope-cublas": ["sparsity.enabled=true", "sparsity.backend=cublas"],
    # every shape cuSPARSELt can take runs sparse, whether or not it wins (no `auto` timing)
    "slope-cusparselt": ["sparsity.enabled=true", "sparsity.backend=cusparselt"],
    # the peer: the same math on PyTorch's built-in 2:4 path (the paper's released code's API)
    "slope-torch-semi": ["sparsity.enabled=true", "sparsity.backend=torch-semi"],
    # compressed operands built per GEMM call instead of kept between steps: less model state
    "slope-per-call": ["sparsity.enabled=true", "sparsity.backend=auto",
                       "sparsity.keep_compressed=false"],
    # adapters on from the middle of the run: the measured windows are those with them active
    "slope-adapters": ["sparsity.enabled=true", "sparsity.backend=auto", "adapters.enabled=true",
                       "adapters.fraction=0.5"],
    # the same with the earlier adapter rule: rank 2% of each layer's input width (MLP-down's
    # rank ffn/hidden times the others')
    "slope-adapters-input-rank": ["sparsity.enabled=true", "sparsity.backend=auto",
                                  "adapters.enabled=true", "adapters.fraction=0.5",
                                  "adapters.rank_of=input"],
    # the layer steps through the Python autograd functions instead of the native (C++) step
    "slope-python": ["sparsity.enabled=true", "sparsity.backend=auto"],
}
ARM_ENV = {"slope-python": {"SLOPE_NATIVE_STEP": "0"}}  # environment of an arm's process
# the same without torch.compile of the block regions (on by default on a GPU): before/after
ARMS.update({f"{arm}-eager": [*ARMS[arm], "train.compile=false"] for arm in list(ARMS)})
ARM_ENV.update({f"{arm}-eager": env for arm, env in list(ARM_ENV.items())})


def add_arguments(p) -> None:
    p.add_argument("--config", action=Once, default="configs/gpt2-small.yaml",
                   help="YAML config every arm trains with (see configs/)")
    p.add_argument("--arms", nargs="+", default=["dense", "slope"], choices=list(ARMS),
                   metavar="ARM",
                   help="arms to run, in this order: "
                        f"{', '.join(a for a in ARMS if not a.endswith('-eager'))}; each also "
                        "as ARM-eager (without torch.compile)")
    p.add_argument("--iters", type=int, default=40, help="training iterations per arm")
    p.add_argument("--log-interval", type=int, default=5, help="iterations per log window")
    p.add_argument("--skip-windows", type=int, default=1,
                   help="first log windows left out of the speed (compilation, algorithm "
                        "search, auto's timings and re-timings)")
    add_set_argument(p, "overrides for every arm (model size, batch, ZeRO stage, ...)")
    p.add_argument("--out", default="runs/bench_train", help="run directories go here")
    p.add_argument("--json", default=None,
                   help="write the results here (by default they are only printed)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="save each arm's final checkpoint and keep it (by default none is "
                        "written: a large model's checkpoint takes tens of GB and minutes to "
                        "save)")


def arm_overrides(args, arm: str) -> list[str]:
    """The --set of the arm's pretrain.py run: the benchmark's schedule, the user's --set,
    then the arm's own keys and its run directory."""
    return [f"train.iters={args.iters}", f"train.log_interval={args.log_interval}",
            "train.eval_interval=0",
            f"train.save_interval={10 ** 9 if args.keep_checkpoints else 0}",
            "train.eval_iters=1", f"optimizer.warmup_iters={max(1, args.iters // 10)}",
            *args.set, *ARMS[arm], f"train.output_dir={Path(args.out) / arm}"]


def _run_arm(args, arm: str, position: str = "") -> dict:
    out = Path(args.out) / arm
    if out.exists():
        raise SystemExit(f"error: {out} exists; choose another --out (runs are never reused)")
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", args.config,
           "--set", *arm_overrides(args, arm)]
    env = {**checkout_env(), **ARM_ENV.get(arm, {})}
    # the arm's log (backend decisions, warnings, progress) is written as it runs, beside its
    # metrics, so a long arm can be followed with `tail -f`
    log_file = out / "stderr.log"
    print(f"[{arm}]{position} training; log: {log_file}", flush=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    with open(log_file, "w") as log:
        done = subprocess.run(cmd, env=env, text=True, stdout=log, stderr=subprocess.STDOUT)
    wall_s = round(time.perf_counter() - start, 1)  # whole run: start-up, compile, steps
    stderr = log_file.read_text(errors="replace")
    if done.returncode == EXIT_OUT_OF_MEMORY:
        error = next((line for line in reversed(stderr.splitlines())
                      if line.startswith("error:")), "out of GPU memory")
        print(f"{arm}: does not fit ({error})", file=sys.stderr)
        return {"arm": arm, "command": " ".join(cmd), "wall_s": wall_s, "out_of_memory": True,
                "error": error}
    if done.returncode != 0:
        raise SystemExit(f"error: arm {arm} failed (exit {done.returncode}); the end of "
                         f"{log_file}:\n{stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "tokens_per_s" in r]
    if not windows:
        raise SystemExit(f"error: arm {arm} logged no training window ({out}/metrics.jsonl); "
                         "see its stderr.log")
    last = windows[-1]
    keys = ("iter", "loss", "max_mem_gb", "resident_mem_gb", "adapters_active")
    return {"arm": arm, "command": " ".join(cmd), "wall_s": wall_s,
            **{k: last.get(k) for k in keys}, **speed(windows, args.skip_windows),
            "auto_decisions": auto_decisions(stderr)}


def auto_decisions(log: str) -> list[str]:
    """The `auto` backend's decision lines of an arm's log ("2048x8192 T=16384 -> cusparselt
    (...)"), so the JSON says which path each shape took without the run directory."""
    return [line.rsplit("auto: ", 1)[1] for line in log.splitlines() if "auto: " in line
            and " -> " in line]


def speed(windows: list[dict], skip: int) -> dict:
    """Median tokens/s (and MFU) over the log windows after the first `skip`, among the run
    of windows in the last one's adapter state, without that run's first window if the state
    changed (it holds the switch); the last window alone if no other qualifies."""
    last = windows[-1]
    start = len(windows) - 1
    while start > 0 and windows[start - 1].get("adapters_active") == last.get("adapters_active"):
        start -= 1
    if start > 0:
        start += 1  # the window in which the adapters switched on
    measured = windows[max(skip, start):] or [last]
    got = [w["tokens_per_s"] for w in measured]
    tps = statistics.median(got)
    mfu = None if last.get("mfu") is None else last["mfu"] * tps / last["tokens_per_s"]
    return {"tokens_per_s": tps, "mfu": mfu, "speed_windows": len(measured),
            "tokens_per_s_range": [min(got), max(got)],
            "tokens_per_s_windows": [w["tokens_per_s"] for w in windows],
            "tokens_per_s_last": last["tokens_per_s"]}


def machine_check() -> dict | None:
    """`benchmarks.gpu_check`'s matmul and copy speed (None without CUDA), printed before the
    arms run: a degraded machine shows here, not as odd ratios afterwards."""
    import torch
    if not torch.cuda.is_available():
        return None
    try:
        check = gpu_speed()
    except Exception as e:  # record it; the arms may still run
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    print(f"gpu check: bf16 matmul {check['matmul_tflops']:.0f} TFLOP/s, copy "
          f"{check['copy_gbps']:.0f} GB/s (a healthy H100 80GB: ~700-800 and ~3000)", flush=True)
    torch.cuda.empty_cache()
    return check


def argument_error(args) -> str | None:
    """What is wrong with the command line (None when nothing), found before any arm runs:
    the numbers, the run directories, and the config file with --set and each arm's keys
    (as the arm's pretrain.py will load it)."""
    for flag, value, least in (("--iters", args.iters, 1),
                               ("--log-interval", args.log_interval, 1),
                               ("--skip-windows", args.skip_windows, 0)):
        if value < least:
            return f"{flag} must be at least {least}, got {value}"
    taken = [str(Path(args.out) / arm) for arm in args.arms if (Path(args.out) / arm).exists()]
    if taken:
        return (f"{', '.join(taken)} {'exists' if len(taken) == 1 else 'exist'}; choose "
                "another --out (runs are never reused)")
    return config_error(args.config, args.set,
                        {arm: arm_overrides(args, arm) for arm in args.arms})


def cpu_notice(what: str) -> None:
    """One line when there is no CUDA GPU: the arms train on the CPU, which is slow."""
    import torch
    if not torch.cuda.is_available():
        print(f"note: no CUDA GPU: the arms train on the CPU, which is slow ({what} is meant "
              "for a GPU)", file=sys.stderr, flush=True)


def run_train(args) -> int:
    args.arms = list(dict.fromkeys(args.arms))  # an arm named twice runs once
    problem = argument_error(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    cpu_notice("`bench train`")
    check = machine_check()
    results = [_run_arm(args, arm, f" ({i}/{len(args.arms)})")
               for i, arm in enumerate(args.arms, 1)]
    base = next((r for r in results if r["arm"] == "dense" and not r.get("out_of_memory")),
                None)
    print(f"{'arm':16s} {'tokens/s':>12s} {'vs dense':>9s} {'MFU':>7s} {'loss':>8s} "
          f"{'peak GiB':>9s} {'state GiB':>10s}")
    for r in results:
        if r.get("out_of_memory"):
            r["vs_dense"] = None
            print(f"{r['arm']:16s} {'out of GPU memory':>12s}")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        r["vs_dense"] = ratio
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['max_mem_gb']:.1f}" if r["max_mem_gb"] is not None else "n/a"
        state = "n/a"
        if r.get("resident_mem_gb") is not None:
            state = f"{r['resident_mem_gb']:.2f}"
            if base and base.get("resident_mem_gb"):
                state += f" ({r['resident_mem_gb'] / base['resident_mem_gb']:.2f}x)"
        print(f"{r['arm']:16s} {r['tokens_per_s']:12,.0f} "
              f"{(f'{ratio:.2f}x' if ratio else 'n/a'):>9s} {mfu:>7s} {r['loss']:8.4f} {mem:>9s} "
              f"{state:>10s}")
    for r in (r for r in results if not r.get("out_of_memory")):  # the windows' spread
        low, high = r["tokens_per_s_range"]
        print(f"  {r['arm']}: median of {r['speed_windows']} windows, {low:,.0f}-{high:,.0f} "
              "tokens/s")
        if r["speed_windows"] == 1 and len(r["tokens_per_s_windows"]) > 1:
            print(f"warning: {r['arm']}: one window measured (too few iterations after the "
                  "first window or the adapter switch); raise --iters", file=sys.stderr)
    if args.json:
        report = {"environment": {**run_environment(), "gpu_check": check},
                  "config": args.config, "overrides": args.set, "results": results}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
