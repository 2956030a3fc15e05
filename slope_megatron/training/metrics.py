"""Run outputs on rank 0: metrics.jsonl, TensorBoard events, and the console summary.

Skipped steps (non-finite loss or gradient) get a record of their own:
`{"iter", "skipped": true, "reason", "skipped_loss", "skipped_steps", "consecutive_skips"}`;
train records carry `skipped_steps` (the run's total) too. Non-finite numbers are written as null.

On resume both sinks are cut back to the resumed iteration N, so a resumed run's outputs
read exactly like an uninterrupted one's: metrics.jsonl keeps only the records with
`iter <= N` (rewritten atomically; a line cut by a kill is dropped) and TensorBoard purges
the steps `>= N + 1` (`purge_step` purges from that step on, so N's own points stay). A
start from scratch (N = 0) cuts both back to nothing. Every finite numeric field of a record
(booleans as 0/1) is also a TensorBoard scalar of the same name at step `iter`.

`time_s` (seconds of training loop since the run began) continues on a resume from its
value when the resumed checkpoint was saved (client state `time_s`; for an older checkpoint
without it, from the last `time_s` kept at or before N), so it does not restart from 0; the
time lost to the interruption and to the restart is not counted.

A train record averages the loss over its log window (`LogWindow`), and its `tokens_per_s`
and `mfu` count the window's training time only, not evaluation or checkpoint saves. The
window is part of a checkpoint's client state, so a checkpoint inside a log interval
resumes into the same window and the record that ends it reads as an uninterrupted run's.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..io import raise_with_path, write_text_atomic

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12,
                   "A10": 125e12, "V100": 125e12}


def peak_flops() -> Optional[float]:
    """Dense bf16/fp16 tensor-core peak of this GPU, None when unknown or on CPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def max_memory_gb() -> Optional[float]:
    """Peak GPU memory allocated by this process so far (GiB), None on CPU."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2 ** 30


def resident_memory_gb() -> Optional[float]:
    """GPU memory allocated between optimizer steps (GiB), None on CPU: what stays resident
    across steps - weights, fp32 master copies, gradient buffers, optimizer state, masks and
    kernel caches - i.e. model state, without the activations of a step."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.memory_allocated() / 2 ** 30


@dataclass
class LogWindow:
    """The iterations since the last train record, which the next one reports on: the mean
    loss of its applied steps and its throughput.

    `loss_sum` is this rank's (the record all-reduces the mean over ranks). The clock counts
    training only: the caller takes evaluation and checkpoint time out (`exclude`). The
    window goes into a checkpoint's client state (`state`, every rank's loss sum) and comes
    back on resume (`restore`), so a checkpoint inside a log interval (train.save_interval
    not a multiple of train.log_interval) resumes into the same window.
    """
    loss_sum: float = 0.0  # this rank's losses of the window's applied steps
    steps: int = 0         # applied steps (a skipped one has no loss)
    iters: int = 0         # iterations, skipped ones included (their tokens went through)
    seconds: float = 0.0   # training time counted apart from the running clock
    since: float = field(default_factory=time.time)  # the running clock's start

    def add(self, loss: float, applied: bool) -> None:
        self.iters += 1
        if applied:
            self.loss_sum, self.steps = self.loss_sum + loss, self.steps + 1

    def elapsed(self, now: float) -> float:
        """Training seconds of the window up to `now`."""
        return self.seconds + (now - self.since)

    def exclude(self, seconds: float) -> None:
        """Take `seconds` (an evaluation, a checkpoint save) out of the window's time."""
        self.seconds -= seconds

    def reset(self, now: float) -> None:
        """Start the next window at `now`."""
        self.loss_sum, self.steps, self.iters, self.seconds, self.since = 0.0, 0, 0, 0.0, now

    def state(self, now: float, loss_sums: list[float]) -> dict:
        """The window at `now` for a checkpoint's client state; `loss_sums`: every rank's
        loss_sum, by global rank (the state is saved from one rank, loaded by all)."""
        return {"loss_sums": [float(v) for v in loss_sums], "steps": self.steps,
                "iters": self.iters, "seconds": self.elapsed(now)}

    @classmethod
    def restore(cls, state: Optional[dict], rank: int, world: int, now: float) -> "LogWindow":
        """The window a checkpoint saved (`state`), its clock going on from `now`; an empty
        window for a checkpoint without one (saved before windows were, or at a window's
        end). In another world size each rank takes the mean of the saved sums, so the
        all-reduced mean the record logs stays the same."""
        if not state or (not state.get("steps") and not state.get("iters")):
            return cls(since=now)
        sums = list(state.get("loss_sums") or [0.0])
        loss_sum = sums[rank] if len(sums) == world else sum(sums) / len(sums)
        return cls(float(loss_sum), int(state["steps"]), int(state["iters"]),
                   float(state.get("seconds", 0.0)), now)


class MetricsWriter:
    def __init__(self, output_dir: Path, enabled: bool, resume_iter: int = 0,
                 time_offset: Optional[float] = None):
        """`time_offset`: time_s at the resumed checkpoint (its client state), added to this
        run's time_s; None (an older checkpoint, or a start): the last time_s kept."""
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.tb = None
        self.time_offset = 0.0  # added to this run's time_s
        if not enabled:
            return
        if self.path.exists():
            self.time_offset = self._truncate_after(resume_iter)
        if time_offset is not None and resume_iter > 0:
            self.time_offset = float(time_offset)
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard drops every step >= purge_step: resume_iter + 1 keeps the resumed
        # iteration's own points, as metrics.jsonl keeps its records (iter <= resume_iter)
        self.tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_iter + 1)

    def _truncate_after(self, resume_iter: int) -> float:
        """Keep the records with iter <= resume_iter; the last time_s among them (0.0: none)."""
        keep, time_s = [], 0.0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if not isinstance(record, dict) or record.get("iter", 0) > resume_iter:
                continue
            keep.append(line)
            if isinstance(record.get("time_s"), (int, float)):
                time_s = float(record["time_s"])
        write_text_atomic(self.path, "".join(f"{line}\n" for line in keep))
        return time_s

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = dict(record)  # the caller's dict is left as it was
        if isinstance(record.get("time_s"), (int, float)):
            record["time_s"] += self.time_offset
        strict = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                  for k, v in record.items()}  # NaN/Inf are not JSON: written as null
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(strict) + "\n")
        except OSError as e:  # a full disk: the file named in the one-line error
            raise_with_path(e, self.path)
        step = record["iter"]
        for key, value in record.items():
            if key != "iter" and isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def run_time(self, seconds: float) -> float:
        """time_s as a record would carry it, for `seconds` of this run's loop (main rank)."""
        return self.time_offset + seconds

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def format_train_line(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    return (f"iter {r['iter']:>6} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
            f"{r['tokens_per_s']:,.0f} tok/s | MFU {mfu} | "
            f"adapters {'on' if r['adapters_active'] else 'off'}")
