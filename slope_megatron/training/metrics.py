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

`time_s` (seconds of training loop since the run began) continues on a resume from the last
`time_s` kept at or before N, so it does not restart from 0; the time lost to the
interruption and to the restart is not counted.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import torch

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


class MetricsWriter:
    def __init__(self, output_dir: Path, enabled: bool, resume_iter: int = 0):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.tb = None
        self.time_offset = 0.0  # time_s of the resumed record: added to this run's time_s
        if not enabled:
            return
        if self.path.exists():
            self.time_offset = self._truncate_after(resume_iter)
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
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in keep))
        os.replace(tmp, self.path)
        return time_s

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = dict(record)  # the caller's dict is left as it was
        if isinstance(record.get("time_s"), (int, float)):
            record["time_s"] += self.time_offset
        strict = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                  for k, v in record.items()}  # NaN/Inf are not JSON: written as null
        with open(self.path, "a") as f:
            f.write(json.dumps(strict) + "\n")
        step = record["iter"]
        for key, value in record.items():
            if key != "iter" and isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def format_train_line(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    return (f"iter {r['iter']:>6} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
            f"{r['tokens_per_s']:,.0f} tok/s | MFU {mfu} | "
            f"adapters {'on' if r['adapters_active'] else 'off'}")
