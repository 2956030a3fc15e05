"""What the measurement tools share: the CUDA check, the timing primitives, the environment of
the processes they start, the GPU speed check, and the provenance every result JSON records.

Nothing here imports torch or triton at import time: a tool checks its arguments and the GPU
(`require_cuda`) before either is loaded, so a CPU machine without triton gets one `error:`
line instead of a traceback.
"""
from __future__ import annotations

import datetime
import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

from slope_megatron.errors import EXIT_USER_ERROR

ROOT = Path(__file__).resolve().parent.parent  # the checkout


# ---- the CUDA check -----------------------------------------------------------------------

def require_cuda(tool: str) -> None:
    """Exit with status 2 and one line `error: <tool> needs a CUDA GPU` on stderr unless a CUDA
    GPU is usable. Call it before anything imports triton (a CPU machine may not have it);
    it imports torch only."""
    import torch
    if not torch.cuda.is_available():
        print(f"error: {tool} needs a CUDA GPU", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def argument_check_then_cuda(problem: str | None, tool: str) -> int | None:
    """A GPU tool's start: exit status 2 after one `error:` line if its arguments have a
    `problem`, else the CUDA check (`require_cuda`); None when the tool may go on."""
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    require_cuda(tool)
    return None


# ---- timing: warm-up, medians, inputs rotated past the L2 cache, relative error -----------

L2_ROTATE_BYTES = 256 << 20


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


class Rotor:
    """Cycles through copies of a tensor so that a timed call does not read it from L2."""

    def __init__(self, make, nbytes_each):
        self.items = [make() for _ in range(max(1, min(8, math.ceil(L2_ROTATE_BYTES /
                                                                   max(1, nbytes_each)))))]
        self.i = 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def bench_ms(fn, warmup: int = 10, rep: int = 40) -> float:
    """Median ms of one call of fn, each timed alone after an L2 flush
    (triton.testing.do_bench, CUDA events)."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def loop_ms(fn, calls: int = 16, reps: int = 9) -> float:
    """Per-call ms of `calls` back-to-back calls (median of `reps` loops, after a warm-up
    loop), timed by events around the loop: the stream's throughput, where a call's host
    work overlaps the GPU work queued before it. `bench_ms` times each call alone after an
    L2 flush, so host work longer than the flush shows there."""
    import torch
    times = []
    for i in range(reps + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        if i:
            times.append(start.elapsed_time(end) / calls)
    return float(sorted(times)[len(times) // 2])


# ---- child processes ----------------------------------------------------------------------

def checkout_env() -> dict:
    """os.environ with the checkout root prepended to PYTHONPATH, for a child process that
    must import this checkout's `slope_megatron` and `benchmarks` (each arm of a benchmark or
    study is a fresh `launch/pretrain.py` or `python -m benchmarks.<tool>` process)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


# ---- the GPU speed check ------------------------------------------------------------------

def gpu_speed() -> dict:
    """{'gpu', 'matmul_tflops', 'copy_gbps'} of the current CUDA device (a few seconds): one
    bf16 8192^3 matmul and a 1 GiB copy. A machine running below its usual speed shows here."""
    import torch
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = bench_ms(lambda: a @ b, warmup=50, rep=300)
    x = torch.empty(2 ** 29, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    copy_ms = bench_ms(lambda: y.copy_(x), warmup=20, rep=100)
    return {"gpu": torch.cuda.get_device_name(),
            "matmul_tflops": round(2 * 8192 ** 3 / mm_ms / 1e9, 1),
            "copy_gbps": round(2 * x.numel() * 2 / copy_ms / 1e6, 1)}


# ---- provenance: which code produced a result file ----------------------------------------
# A digest of the source files themselves (results are often produced from a copy of a
# checkout whose `.git` can lag its files); `python -m benchmarks.provenance --find DIGEST`
# maps it back to a commit.

SOURCE_DIRS = ("slope_megatron", "kernels", "launch", "benchmarks", "configs")
SOURCE_FILES = ("setup.py",)
SUFFIXES = (".py", ".cpp", ".cu", ".h", ".yaml", ".sh")
DIGEST_LEN = 16  # hex digits of a source digest


def is_source(rel: str) -> bool:
    """Whether a path relative to the checkout root counts towards the source digest."""
    return ("__pycache__" not in rel and rel.endswith(SUFFIXES)
            and (rel in SOURCE_FILES or rel.split("/", 1)[0] in SOURCE_DIRS))


def digest_of(files: dict[str, str]) -> str:
    """The tree digest from {relative path: sha256 of its bytes} (short: 16 hex digits)."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]}\n".encode())
    return h.hexdigest()[:DIGEST_LEN]


def source_digest(root: Path = ROOT) -> str:
    """The digest of the source files on disk under `root`."""
    files = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and is_source(rel):
            files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest_of(files)


def git(root: Path, *args: str) -> str | None:
    """git's stripped stdout in `root`, or None when git fails or is missing."""
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_identity(root: Path = ROOT) -> dict:
    """{"source_digest", "git_head", "git_dirty"}; the git fields are None outside a checkout.
    git's view can be stale in a copy; the digest cannot."""
    head = git(root, "rev-parse", "--short=12", "HEAD")
    status = git(root, "status", "--porcelain", "--", *SOURCE_DIRS, *SOURCE_FILES)
    return {"source_digest": source_digest(root), "git_head": head,
            "git_dirty": None if status is None else bool(status)}


def run_environment() -> dict:
    """What every result JSON records about its run: date, versions, GPU and the source."""
    import torch
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": None}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return {**env, **source_identity()}
