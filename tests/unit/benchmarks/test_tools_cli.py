"""The measurement tools' command lines (`python -m benchmarks.X`: bench train, quality_study,
plot_results, profile_step, host_overhead, provenance): a bad argument is one `error:` line on
stderr naming it, exit status 2, before any work (no arm launched, no GPU check first); long
runs say what they are doing; help texts show defaults and name no internal issue."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.launch import load_benchmark
from helpers.paths import ROOT

DEMO = str(ROOT / "configs" / "demo.yaml")
GPT2 = str(ROOT / "configs" / "gpt2-small.yaml")


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def with_config(argv, config=DEMO):
    """argv with --config added unless it gives one (--config may be given once)."""
    return argv if "--config" in argv else ["--config", config, *argv]


def no_launch(*args, **kw):
    raise AssertionError("a run was launched before the arguments were checked")


def run_module(module, *argv):
    """`python -m module argv` from the checkout root, as a user runs a tool."""
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


# ---- bench train ------------------------------------------------------------------------

def _bench_train(monkeypatch, fake_run=no_launch):
    bench_train = load_benchmark("bench_train")
    monkeypatch.setattr(bench_train.subprocess, "run", fake_run)
    monkeypatch.setattr(bench_train, "machine_check", lambda: None)
    p = argparse.ArgumentParser()
    bench_train.add_arguments(p)
    return bench_train, p


@pytest.mark.parametrize("argv,says", [
    (["--config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
    (["--iters", "0"], "--iters must be at least 1, got 0"),
    (["--log-interval", "0"], "--log-interval must be at least 1, got 0"),
    (["--skip-windows", "-1"], "--skip-windows must be at least 0, got -1"),
    (["--set", "model.foo=1"], "unknown config key 'model.foo'"),
    (["--set", "zero.stage=9"], "zero.stage"),
])
def test_bench_train_checks_its_arguments_before_any_arm(tmp_path, monkeypatch, capsys, argv,
                                                         says):
    bench_train, p = _bench_train(monkeypatch)
    args = p.parse_args(with_config(["--out", str(tmp_path / "runs"), *argv]))
    assert bench_train.run_train(args) == 2
    captured = capsys.readouterr()
    assert says in one_error_line(captured.err) and captured.out == ""
    assert not (tmp_path / "runs").exists()


def test_bench_train_refuses_a_taken_run_directory_before_the_first_arm(tmp_path, monkeypatch,
                                                                       capsys):
    """The second arm's directory exists: the first arm must not run first."""
    bench_train, p = _bench_train(monkeypatch)
    (tmp_path / "slope").mkdir()
    args = p.parse_args(["--config", DEMO, "--out", str(tmp_path), "--arms", "dense", "slope"])
    assert bench_train.run_train(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(tmp_path / "slope") in line and "exists" in line and "--out" in line
    assert not (tmp_path / "dense").exists()


def test_bench_train_from_the_command_line_exits_2_on_a_missing_config(tmp_path):
    done = run_module("benchmarks.bench", "train", "--config", str(tmp_path / "nope.yaml"),
                      "--out", str(tmp_path / "runs"))
    assert done.returncode == 2 and done.stdout == ""
    assert "nope.yaml' does not exist" in one_error_line(done.stderr)
    assert not (tmp_path / "runs").exists()


def _fake_pretrain(capsys, seen):
    """A pretrain.py run that writes one training window and an `auto:` log line; it checks
    that its progress line was printed before it started."""
    real_run = subprocess.run  # the module is shared: git and others still run for real

    def fake_run(cmd, *args, **kw):
        if not any(str(c).endswith("pretrain.py") for c in cmd):
            return real_run(cmd, *args, **kw)
        sets = cmd[cmd.index("--set") + 1:]
        out = Path(next(s for s in sets if s.startswith("train.output_dir=")).split("=", 1)[1])
        seen.append((out.name, capsys.readouterr()))
        out.mkdir(parents=True, exist_ok=True)  # as pretrain.py does
        kw["stdout"].write("x auto: 64x64 T=8 -> cublas (sparse step 0.9x dense)\n")
        (out / "metrics.jsonl").write_text(json.dumps(
            {"iter": 2, "loss": 5.0, "tokens_per_s": 100.0, "max_mem_gb": None,
             "resident_mem_gb": None, "adapters_active": False, "val_loss": 5.1,
             "val_ppl": 164.0}) + "\n")
        return subprocess.CompletedProcess(cmd, 0)
    return fake_run


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only notice")
def test_bench_train_says_which_arm_runs_and_where_its_log_goes(tmp_path, monkeypatch, capsys):
    seen = []
    bench_train, p = _bench_train(monkeypatch, _fake_pretrain(capsys, seen))
    args = p.parse_args(["--config", DEMO, "--out", str(tmp_path), "--iters", "2",
                         "--arms", "dense", "slope-reference"])
    assert bench_train.run_train(args) == 0
    (first, before_dense), (second, before_ref) = seen
    assert (first, second) == ("dense", "slope-reference")
    assert before_dense.err.strip().splitlines() == [
        "note: no CUDA GPU: the arms train on the CPU, which is slow (`bench train` is "
        "meant for a GPU)"]
    assert before_dense.out.strip().splitlines()[-1] == \
        f"[dense] (1/2) training; log: {tmp_path / 'dense' / 'stderr.log'}"
    assert before_ref.out.strip().splitlines()[-1] == \
        f"[slope-reference] (2/2) training; log: {tmp_path / 'slope-reference' / 'stderr.log'}"
    assert "note:" not in before_ref.err  # the notice is given once
    log = (tmp_path / "dense" / "stderr.log").read_text()  # written by the run itself
    assert "auto: 64x64" in log


# ---- quality_study ----------------------------------------------------------------------

@pytest.mark.parametrize("argv,says", [
    (["--config", "nope.yaml"], "config file 'nope.yaml' does not exist"),
    (["--set", "train.iters=0"], "optimizer.warmup_iters"),
    (["--set", "model.foo=1"], "unknown config key 'model.foo'"),
])
def test_quality_study_checks_the_config_before_any_arm(tmp_path, monkeypatch, capsys, argv,
                                                        says):
    qs = load_benchmark("quality_study")
    monkeypatch.setattr(qs.subprocess, "run", no_launch)
    assert qs.main(with_config(["--out", str(tmp_path / "runs"), *argv])) == 2
    captured = capsys.readouterr()
    assert says in one_error_line(captured.err) and captured.out == ""
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content,says", [("not json", "is not a readable JSON file"),
                                          ("[1, 2]", "is not a quality-study JSON")])
def test_quality_study_refuses_an_unusable_json_with_exit_2(tmp_path, monkeypatch, capsys,
                                                           content, says):
    qs = load_benchmark("quality_study")
    monkeypatch.setattr(qs.subprocess, "run", no_launch)
    study = tmp_path / "study.json"
    study.write_text(content)
    assert qs.main(["--config", DEMO, "--out", str(tmp_path / "runs"), "--json",
                    str(study)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(study) in line and says in line


def test_quality_study_from_the_command_line_exits_2_on_a_missing_config(tmp_path):
    done = run_module("benchmarks.quality_study", "--config", "nope.yaml", "--out",
                      str(tmp_path / "runs"))
    assert done.returncode == 2 and done.stdout == ""
    assert "'nope.yaml' does not exist" in one_error_line(done.stderr)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only notice")
def test_quality_study_notes_that_the_arms_run_on_the_cpu(tmp_path, monkeypatch, capsys):
    qs = load_benchmark("quality_study")
    seen = []
    fake = _fake_pretrain(capsys, seen)

    def fake_run(cmd, *args, **kw):  # the study sends both streams to one log
        if "stdout" in kw and "env" in kw:
            kw["stderr"] = kw["stdout"]
        return fake(cmd, *args, **kw)
    monkeypatch.setattr(qs.subprocess, "run", fake_run)
    assert qs.main(["--config", DEMO, "--out", str(tmp_path / "runs"), "--arms", "dense"]) == 0
    (_, before), = seen
    assert "note: no CUDA GPU: the arms train on the CPU, which is slow (the quality study " \
           "is meant for a GPU)" in before.err
    assert "[dense] (1/1) " in before.out and f"log: {tmp_path / 'runs' / 'dense.log'}" in \
        before.out


# ---- profile_step, host_overhead: arguments before the GPU ------------------------------

@pytest.mark.parametrize("argv,says", [
    (["--steps", "0"], "error: --steps must be at least 1, got 0"),
    (["--warmup", "-1"], "error: --warmup must be at least 0, got -1"),
    (["--config", "nope.yaml"], "error: config file 'nope.yaml' does not exist; pass --config "
                                "configs/<name>.yaml"),
    (["--set", "zero.stage=9"], "error: config key 'zero.stage' = 9 is invalid"),
])
def test_profile_step_checks_its_arguments_before_the_gpu(monkeypatch, capsys, argv, says):
    profile_step = load_benchmark("profile_step")
    monkeypatch.setattr(profile_step.subprocess, "run", no_launch)
    assert profile_step.main(with_config(argv, GPT2)) == 2
    assert one_error_line(capsys.readouterr().err).startswith(says)


@pytest.mark.parametrize("argv,says", [
    (["--reps", "-1"], "error: --reps must be at least 10 (calls are timed in batches of 10), "
                       "got -1"),
    (["--reps", "5"], "error: --reps must be at least 10"),
    (["--features", "0"], "error: --features must be a positive multiple of 4"),
    (["--features", "30"], "error: --features must be a positive multiple of 4"),
    (["--tokens", "0"], "error: --tokens must be at least 1, got 0"),
])
def test_host_overhead_checks_its_arguments_before_the_gpu(capsys, argv, says):
    assert load_benchmark("host_overhead").main(argv) == 2
    assert one_error_line(capsys.readouterr().err).startswith(says)


# ---- provenance --find ------------------------------------------------------------------

@pytest.mark.parametrize("argv,says", [
    (["--find", "zz", "--max-count", "-3"], "error: --find takes a source digest of 16 hex "
                                            "digits"),
    (["--find", "0123456789abcde"], "error: --find takes a source digest of 16 hex digits"),
    (["--find", "0123456789abcdeg"], "error: --find takes a source digest of 16 hex digits"),
    (["--find", "0123456789abcdef", "--max-count", "0"], "error: --max-count must be at "
                                                         "least 1, got 0"),
    (["--max-count", "5"], "error: --max-count applies to --find only"),
])
def test_provenance_find_checks_digest_and_count(capsys, argv, says):
    assert load_benchmark("provenance").main(argv) == 2
    captured = capsys.readouterr()
    assert one_error_line(captured.err).startswith(says) and captured.out == ""


def test_provenance_find_takes_an_upper_case_digest():
    provenance = load_benchmark("provenance")
    if provenance.git(ROOT, "rev-parse", "HEAD") is None:
        pytest.skip("needs a git checkout")
    done = run_module("benchmarks.provenance", "--find", "ABCDEF0123456789", "--max-count", "1")
    assert done.returncode == 1 and done.stderr == ""  # searched, not refused
    assert "no commit among the newest 1 has source digest abcdef0123456789" in done.stdout


# ---- plot_results -----------------------------------------------------------------------

BENCH = {"environment": {"gpu": None}, "config": GPT2, "overrides": [],
         "results": [{"arm": "dense", "vs_dense": 1.0}, {"arm": "slope", "vs_dense": 0.9}]}
PROFILE = {"meta": {"gpu": "H100"}, "config": GPT2, "overrides": [],
           "results": [{"arm": "dense", "split_ms": {}, "kernel_ms": 1.0, "wall_ms": 1.0}]}
QUALITY = {"config": "configs/quality-gpt2-small.yaml", "summary": {},
           "arms": {"dense": {"curve": [{"iter": 10, "val_loss": 5.0}]}}}


def _plot(tmp_path, capsys, *argv):
    code = load_benchmark("plot_results").main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured


@pytest.mark.parametrize("content,says", [
    (None, "does not exist"),
    ("not json at all", "is not JSON"),
    (json.dumps(PROFILE), "is neither a quality-study JSON"),
    (json.dumps([1, 2, 3]), "is neither a quality-study JSON"),
    (json.dumps({"arms": {"dense": {"no": "curve"}}}), "is neither a quality-study JSON"),
], ids=["missing", "not-json", "profile", "a-list", "arms-without-curves"])
def test_plot_names_a_file_it_cannot_plot(tmp_path, capsys, content, says):
    src = tmp_path / "result.json"
    if content is not None:
        src.write_text(content)
    code, captured = _plot(tmp_path, capsys, src)
    line = one_error_line(captured.err)
    assert code == 2 and str(src) in line and says in line
    assert "quality-study JSON" in line and "bench-train JSON" in line  # what it takes
    assert not (tmp_path / "result.png").exists()


def test_plot_of_a_shipped_profile_is_refused(tmp_path, capsys):
    shipped = ROOT / "docs" / "results" / "profile_1p3b.json"
    if not shipped.is_file():
        pytest.skip("docs/results/profile_1p3b.json is not in this checkout")
    code, captured = _plot(tmp_path, capsys, shipped, "--out", tmp_path / "p.png")
    assert code == 2 and "neither a quality-study JSON" in one_error_line(captured.err)
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("flags,says", [
    (["--memory"], "error: --memory applies only to the by-model-size plot"),
    (["--arm", "slope"], "error: --arm applies only to the by-model-size plot"),
    (["--memory", "--arm", "slope"], "error: --memory and --arm apply only to the "
                                     "by-model-size plot"),
])
def test_plot_refuses_by_size_flags_with_one_json(tmp_path, capsys, flags, says):
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(BENCH))
    code, captured = _plot(tmp_path, capsys, src, *flags)
    assert code == 2 and one_error_line(captured.err).startswith(says)
    assert not (tmp_path / "bench.png").exists()


def test_plot_by_size_takes_bench_train_jsons_only(tmp_path, capsys):
    bench, quality = tmp_path / "bench.json", tmp_path / "quality.json"
    bench.write_text(json.dumps(BENCH))
    quality.write_text(json.dumps(QUALITY))
    code, captured = _plot(tmp_path, capsys, bench, quality, "--out", tmp_path / "s.png")
    line = one_error_line(captured.err)
    assert code == 2 and str(quality) in line and "bench-train JSONs only" in line


def test_plot_refuses_an_output_that_is_not_an_image(tmp_path, capsys):
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(BENCH))
    code, captured = _plot(tmp_path, capsys, src, "--out", src)
    assert code == 2 and "must end in .png" in one_error_line(captured.err)
    assert json.loads(src.read_text()) == BENCH  # not overwritten


# ---- help texts -------------------------------------------------------------------------

def _help(tool, *argv):
    done = run_module(f"benchmarks.{tool}", *argv, "--help")
    assert done.returncode == 0, done.stderr
    return " ".join(done.stdout.split())  # argparse wraps lines


@pytest.mark.parametrize("tool,argv", [
    ("bench", []), ("bench", ["kernels"]), ("bench", ["train"]), ("bench", ["inference"]),
    ("bench", ["inference", "gemm"]), ("bench", ["inference", "generate"]),
    ("bench", ["inference", "blocks"]),
    ("quality_study", []), ("profile_step", []), ("host_overhead", []), ("provenance", []),
    ("plot_results", []), ("gpu_check", []), ("layer_host_gpu", []),
    ("bench_reference_step", []), ("bench_torchao", []), ("auto_timing_spread", []),
    ("refresh_cost", []), ("cslt_meta_probe", []), ("decode24_sass", [])])
def test_help_names_no_internal_issue(tool, argv):
    text = _help(tool, *argv)
    assert "issue" not in text.lower()
    assert text.startswith(f"usage: python -m benchmarks.{tool} {' '.join(argv)}".rstrip())


def test_bench_help_shows_every_option_with_its_default():
    kernels = _help("bench", "kernels")
    assert "--tokens T [T ...] token counts" in kernels
    assert "(default: 1024 8192 16384)" in kernels
    assert "(default: docs/kernels_bench.json)" in kernels
    assert "(default: gpt2-small opt-1.3b opt-2.7b opt-6.7b llama-7b)" in kernels
    train = _help("bench", "train")
    assert "--config CONFIG YAML config" in train and "(default: configs/gpt2-small.yaml)" in train
    assert "--iters ITERS training iterations per arm (default: 40)" in train
    assert "--json JSON write the results here" in train
    inference = _help("bench", "inference", "blocks")
    assert "(default: opt-2.7b opt-6.7b opt-13b llama-7b)" in inference
    assert "(default: docs/results/inference_bench.json)" in inference
    assert "--batches BATCHES [BATCHES ...]" in _help("bench", "inference", "generate")
    assert "(default: llama-7b llama-13b opt-6.7b)" in _help("bench", "inference", "gemm")


def test_quality_study_help_counts_its_arms():
    text = _help("quality_study")
    assert "four arms by default, a fifth, diagnostic, on request" in text
    assert "slope-adapters-10pct" in text
