"""Reliability on one GPU (bf16, DeepSpeed's BF16/ZeRO optimizers): a NaN loss is skipped,
a kill -9 is resumed from the newest complete checkpoint, and DeepSpeed's bf16 optimizer
files load with weights_only=True. (CPU fp32 bitwise resume: tests/integration/test_reliability.py.)"""
import json
import math
import os
import subprocess
import sys

import pytest

from helpers.paths import ROOT
from helpers.corpus import write_corpus


def _run(argv, fault=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                      os.environ.get("PYTHONPATH")]))}
    env.pop("SLOPE_FAULT", None)
    if fault:
        env["SLOPE_FAULT"] = fault
    # a fresh process: CUDA cannot be used in a child forked after the parent touched it
    return subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), *argv],
                          env=env, text=True, capture_output=True, timeout=600)


@pytest.mark.gpu
@pytest.mark.parametrize("stage", [0, 1, 2, 3])  # 1: BF16_Optimizer (fp32 accumulation)
def test_bf16_nan_skip_and_kill_resume_on_gpu(tmp_path, stage):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    argv = ["--config", str(ROOT / "configs" / "demo.yaml"), "--set", f"data.path={corpus}",
            f"data.cache_dir={tmp_path / 'cache'}", "data.tokenizer_vocab_size=300",
            "data.val_fraction=0.1", "model.hidden_size=64", "model.num_heads=2",
            "model.num_layers=2", "model.seq_len=32", "train.iters=8",
            "train.micro_batch_size=2", "train.global_batch_size=8", "train.log_interval=1",
            "train.eval_interval=4", "train.eval_iters=1", "train.save_interval=2",
            "train.dtype=bf16", "sparsity.backend=reference", "optimizer.warmup_iters=2",
            "adapters.fraction=0.25", f"zero.stage={stage}", f"train.output_dir={out}"]
    killed = _run(argv, "nan:loss:iter=2;kill:after_step:iter=5")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "iter_00000004"
    done = _run(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r.get("skipped")] == [3]
    train = [r for r in records if "loss" in r and not r.get("skipped")]
    assert [r["iter"] for r in train] == [1, 2, 4, 5, 6, 7, 8]
    assert all(math.isfinite(r["loss"]) for r in train)
    assert train[-1]["adapters_active"] and train[-1]["skipped_steps"] == 1
