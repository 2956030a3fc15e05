"""Where the GPU time of one decode step goes: the kernel list behind `bench inference
generate --profile`.

Why: a decode step's tokens/s says how far from the bandwidth bound it is, not what is in the
way. This profiles `generate` as the benchmark times it (the same model, prompts and decoding
loop, CUDA-graph replay included: CUPTI records the kernels a graph launches) and, like the
timing, takes the difference of a call with `new` tokens and one with a single token, divided
by new - 1, so that prefill and the first sample cancel and what remains is one decode step.
Kernel time is summed per category (`profile_step.categorize`: dense GEMMs, cuSPARSELt, the
decode kernel, attention, norms, elementwise, ...) and per kernel name.
"""
from __future__ import annotations

from benchmarks.profile_step import categorize, is_annotation


def kernel_times(fn) -> dict:
    """{kernel name: (total GPU us, launches)} of the CUDA kernels `fn()` runs."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    times: dict = {}
    for ev in prof.key_averages():
        if ev.device_type != torch.autograd.DeviceType.CUDA or is_annotation(ev.key):
            continue
        us, calls = times.get(ev.key, (0.0, 0))
        times[ev.key] = (us + ev.self_device_time_total, calls + ev.count)
    return times


def per_step(long: dict, short: dict, steps: int) -> dict:
    """{name: (us, launches)} per step from the kernel times of a call with `steps` more decode
    steps than another; names whose difference is not positive (prefill-only kernels, noise)
    are dropped."""
    out = {}
    for name, (us, calls) in long.items():
        us0, calls0 = short.get(name, (0.0, 0))
        if us - us0 > 0:
            out[name] = ((us - us0) / steps, (calls - calls0) / steps)
    return out


def summarize(kernels: dict, step_ms: float, top: int = 12) -> dict:
    """The profile's report: kernel time per category and the `top` kernels, per step, with
    the measured step time beside them (the rest is gaps between kernels)."""
    by_kind: dict = {}
    for name, (us, calls) in kernels.items():
        kind = by_kind.setdefault(categorize(name), {"us": 0.0, "launches": 0.0})
        kind["us"] += us
        kind["launches"] += calls
    names = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {"step_us": 1e3 * step_ms, "kernel_us": sum(us for us, _ in kernels.values()),
            "launches": sum(c for _, c in kernels.values()),
            "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1]["us"])),
            "top": [{"name": n[:160], "kind": categorize(n), "us": us, "launches": c}
                    for n, (us, c) in names]}


def profile_decode(call, new: int, step_ms: float) -> dict:
    """`call(new_tokens)` runs generate, already warmed up by the timing (graphs captured,
    plans made); the summary of one decode step's kernels."""
    kernels = per_step(kernel_times(lambda: call(new)), kernel_times(lambda: call(1)), new - 1)
    if not kernels:
        raise RuntimeError("the profiler recorded no decode-step kernels (CUPTI unavailable?)")
    return summarize(kernels, step_ms)


def format_profile(arm: str, batch: int, prof: dict) -> str:
    """A few lines for the benchmark's log."""
    kinds = ", ".join(f"{k} {v['us']:.0f}" for k, v in prof["by_kind"].items())
    lines = [f"# profile {arm} B={batch}: step {prof['step_us']:.0f} us, kernels "
             f"{prof['kernel_us']:.0f} us in {prof['launches']:.0f} launches | {kinds}"]
    lines += [f"#   {k['us']:8.1f} us {k['launches']:5.0f}x {k['kind']:12s} {k['name'][:90]}"
              for k in prof["top"][:8]]
    return "\n".join(lines)
