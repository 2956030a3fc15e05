"""`python -m benchmarks.bench train` runs each arm as its own pretrain process and reports
ratios."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers.corpus import write_corpus
from helpers.launch import load_benchmark
from helpers.paths import ROOT


def test_bench_train_reports_each_arm_against_dense(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    out, report = tmp_path / "runs", tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks.bench", "train", "--config",
           str(ROOT / "configs" / "demo.yaml"), "--iters", "2", "--log-interval", "1",
           "--arms", "dense", "slope-reference", "--out", str(out), "--json", str(report),
           "--set", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
           "data.tokenizer_vocab_size=300", "data.val_fraction=0.1", "model.hidden_size=32",
           "model.num_layers=1", "model.num_heads=2", "model.seq_len=32",
           "train.micro_batch_size=2", "train.global_batch_size=4"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(report.read_text())["results"]
    assert [r["arm"] for r in results] == ["dense", "slope-reference"]
    assert results[0]["vs_dense"] == 1.0 and results[1]["vs_dense"] > 0
    assert "gpu_check" in json.loads(report.read_text())["environment"]  # None without CUDA
    assert all(r["tokens_per_s"] > 0 and r["iter"] == 2 for r in results)
    # --skip-windows 1 of 2 one-iteration windows: the second one is the speed
    assert all(r["speed_windows"] == 1 and r["tokens_per_s"] == r["tokens_per_s_windows"][1]
               for r in results)
    assert "slope-reference" in done.stdout and "vs dense" in done.stdout
    for arm in ("dense", "slope-reference"):  # metrics and log stay, checkpoints do not
        assert (out / arm / "metrics.jsonl").is_file() and (out / arm / "stderr.log").is_file()
        assert not (out / arm / "checkpoints").exists()
    # each arm said when it started and where its log goes
    assert f"[dense] (1/2) training; log: {out / 'dense' / 'stderr.log'}" in done.stdout
    assert "[slope-reference] (2/2) training; log: " in done.stdout
    # a second run into the same directories is refused, before any arm runs
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.startswith("error: ") and len(again.stderr.splitlines()) == 1
    assert f"{out / 'dense'}, {out / 'slope-reference'} exist;" in again.stderr


def test_python_arm_turns_the_native_step_off(tmp_path, monkeypatch):
    """`slope-python` is `slope` with SLOPE_NATIVE_STEP=0 in its process (and only there)."""
    bench_train = load_benchmark("bench_train")
    monkeypatch.delenv("SLOPE_NATIVE_STEP", raising=False)  # the caller's must not leak in
    seen = {}

    def fake_run(cmd, env, **kw):
        seen[cmd[cmd.index("--set") + 1:][-1]] = env.get("SLOPE_NATIVE_STEP")
        raise RuntimeError("stop here")
    monkeypatch.setattr(bench_train.subprocess, "run", fake_run)
    args = SimpleNamespace(out=str(tmp_path), iters=2, log_interval=1, keep_checkpoints=False,
                           set=[], config="configs/gpt2-small.yaml")
    for arm in ("slope", "slope-python", "slope-python-eager"):
        with pytest.raises(RuntimeError, match="stop here"):
            bench_train._run_arm(args, arm)
    assert bench_train.ARMS["slope-python"] == bench_train.ARMS["slope"]
    assert list(seen.values()) == [None, "0", "0"]


def test_speed_is_the_median_of_the_settled_windows_in_the_last_adapter_state():
    speed = load_benchmark("bench_train").speed
    windows = [{"tokens_per_s": t, "mfu": t / 1000, "adapters_active": a}
               for t, a in ((50, False), (300, False), (100, False), (90, False), (80, True),
                            (70, True), (75, True))]
    got = speed(windows, skip=1)  # adapters-on windows only, without the switch's (80)
    assert got["tokens_per_s"] == 72.5 and got["speed_windows"] == 2
    assert got["tokens_per_s_range"] == [70, 75] and got["tokens_per_s_last"] == 75
    assert abs(got["mfu"] - 0.0725) < 1e-12
    got = speed([dict(w, adapters_active=False) for w in windows], skip=1)
    assert got["tokens_per_s"] == 85 and got["speed_windows"] == 6  # the compile window is out
    assert got["tokens_per_s_windows"][0] == 50
    got = speed(windows[:1], skip=1)  # nothing after the skipped window: the last one alone
    assert got["tokens_per_s"] == 50 and got["speed_windows"] == 1
    got = speed(windows[:5], skip=1)  # adapters on in the last window only: it alone
    assert got["tokens_per_s"] == 80 and got["speed_windows"] == 1


def test_auto_decision_lines_are_kept_from_the_arm_log():
    log = ("2026-11-25 01:44:47,824 INFO slope_megatron.sparsity.backends.auto: auto: 2048x2048 "
           "T=16384 -> cublas (sparse step 0.99x dense; 0.687 vs 0.681 ms)\n"
           "train:   7%|  | 2/30 [00:03<00:45]2026-11-25 01:44:50,156 INFO slope_megatron."
           "sparsity.backends.auto: auto: 2048x8192 T=16384 -> cusparselt (sparse step 1.14x "
           "dense)\nINFO sparse backend 'auto' -> 'reference': cusparselt unavailable\n")
    assert load_benchmark("bench_train").auto_decisions(log) == [
        "2048x2048 T=16384 -> cublas (sparse step 0.99x dense; 0.687 vs 0.681 ms)",
        "2048x8192 T=16384 -> cusparselt (sparse step 1.14x dense)"]
