"""Running out of GPU memory: `launch/pretrain.py` says so in one line with what to change and
exits with its own status; `python -m benchmarks.bench train` records such an arm and runs the
rest."""
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from helpers.corpus import tiny_run_args, write_corpus
from helpers.dist import run_distributed
from helpers.launch import load_benchmark, pretrain_main
from slope_megatron.errors import EXIT_OUT_OF_MEMORY
from slope_megatron.model.transformer import GPTModel

# PyTorch's message, as an H100 printed it (docs/results/train_4p6b_recompute.json)
ALLOCATOR_MESSAGE = (
    "CUDA out of memory. Tried to allocate 17.26 GiB. GPU 0 has a total capacity of 79.18 GiB "
    "of which 16.72 GiB is free. Process 463 has 708.00 MiB memory in use. Including non-PyTorch "
    "memory, this process has 61.76 GiB memory in use. Of the allocated memory 51.87 GiB is "
    "allocated by PyTorch, and 8.22 GiB is reserved by PyTorch but unallocated. If reserved but "
    "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
    "to avoid fragmentation.  See documentation for Memory Management  (https://docs.pytorch."
    "org/docs/stable/notes/cuda.html#optimizing-memory-usage-with-pytorch-cuda-alloc-conf)")


def test_pretrain_reports_out_of_memory_in_one_line(tmp_path, monkeypatch, capfd):
    corpus = write_corpus(tmp_path / "corpus")
    calls = []
    forward = GPTModel.forward

    def forward_until_the_third_call(self, *a, **kw):  # the third micro-batch does not fit
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError(ALLOCATOR_MESSAGE)
        return forward(self, *a, **kw)
    monkeypatch.setattr(GPTModel, "forward", forward_until_the_third_call)
    out = tmp_path / "run"
    # a fork-started process (the patch goes with it, its process group stays there)
    status = run_distributed(pretrain_main, 1,
                             tiny_run_args(corpus, tmp_path / "cache", out, 4, 0))
    err = capfd.readouterr().err
    assert status == [EXIT_OUT_OF_MEMORY], err[-2000:]
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    assert line.startswith("error: out of GPU memory: CUDA out of memory. Tried to allocate "
                           "17.26 GiB. GPU 0 has a total capacity of 79.18 GiB of which 16.72 "
                           "GiB is free. To fit: lower train.micro_batch_size")
    for setting in ("train.activation_checkpointing", "zero.stage", "parallel.tensor"):
        assert setting in line
    assert "Process 463" not in line and "expandable_segments" not in line


def test_bench_train_records_an_arm_that_does_not_fit(tmp_path, monkeypatch, capsys):
    """The dense arm runs out of memory, the SLoPe arm fits: both are in the report, the
    SLoPe arm with its speed and memory, and no ratio against a dense run that did not run."""
    bench_train = load_benchmark("bench_train")

    def fake_run(cmd, env, **kw):
        overrides = cmd[cmd.index("--set") + 1:]
        out = Path(next(o for o in overrides if o.startswith("train.output_dir="))
                   .split("=", 1)[1])
        if "sparsity.enabled=false" in overrides:
            kw["stdout"].write(  # the arm's log file, as the child writes it
                "INFO building the model\nerror: out of GPU memory: CUDA out of memory. Tried "
                "to allocate 2.00 GiB. To fit: lower train.micro_batch_size ...\n")
            return SimpleNamespace(returncode=EXIT_OUT_OF_MEMORY)
        out.mkdir(parents=True, exist_ok=True)
        windows = [{"iter": 5 * i, "loss": 9.0, "tokens_per_s": 1000.0 + i, "mfu": 0.4,
                    "max_mem_gb": 60.0, "resident_mem_gb": 40.0} for i in (1, 2, 3)]
        (out / "metrics.jsonl").write_text("".join(json.dumps(w) + "\n" for w in windows))
        return SimpleNamespace(returncode=0)
    monkeypatch.setattr(bench_train.subprocess, "run", fake_run)
    monkeypatch.setattr(bench_train, "machine_check", lambda: None)
    monkeypatch.setattr(bench_train, "run_environment", lambda: {})  # it runs git
    report = tmp_path / "bench.json"
    args = SimpleNamespace(out=str(tmp_path / "runs"), iters=15, log_interval=5, skip_windows=1,
                           keep_checkpoints=False, set=[], config="configs/gpt2-small.yaml",
                           arms=["dense", "slope"], json=str(report))
    assert bench_train.run_train(args) == 0
    captured = capsys.readouterr()
    assert "dense: does not fit (error: out of GPU memory" in captured.err
    rows = [line for line in captured.out.splitlines() if line.startswith("dense ")]
    assert len(rows) == 1 and "out of GPU memory" in rows[0]  # the table's dense row
    dense, slope = json.loads(report.read_text())["results"]
    assert dense["out_of_memory"] and dense["vs_dense"] is None
    assert dense["error"].startswith("error: out of GPU memory: CUDA out of memory")
    assert not slope.get("out_of_memory") and slope["vs_dense"] is None
    assert slope["tokens_per_s"] == 1002.5 and slope["max_mem_gb"] == 60.0
