"""The launchers' command lines: repeated --set accumulates (in every launcher that takes it),
a second --config is refused, and generate.py checks its arguments and device before it loads
anything, answering a bad one with one `error:` line and exit status 2."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import yaml
from helpers.corpus import tiny_run_args, write_corpus
from helpers.dist import run_distributed
from helpers.inference import saved
from helpers.launch import load_benchmark, load_launch

from slope_megatron.config import load_config

from helpers.paths import ROOT
DEMO = str(ROOT / "configs" / "demo.yaml")
SPLIT = ["--set", "train.iters=8", "--set", "optimizer.warmup_iters=2", "train.output_dir=/tmp/x"]
JOINED = ["--set", "train.iters=8", "optimizer.warmup_iters=2", "train.output_dir=/tmp/x"]
WANT = ["train.iters=8", "optimizer.warmup_iters=2", "train.output_dir=/tmp/x"]


def _parser(name):
    """The argparse parser of a measurement tool that fills one through add_arguments."""
    p = argparse.ArgumentParser()
    load_benchmark(name).add_arguments(p)
    return p


# ---- --set: both forms, every launcher --------------------------------------------------

def test_pretrain_repeated_set_keeps_every_override():
    parse = load_launch("pretrain").parse_args
    split, joined = parse(["--config", DEMO, *SPLIT]), parse(["--config", DEMO, *JOINED])
    assert split.set == joined.set == WANT
    cfg = load_config(split.config, split.set)
    assert cfg.train.iters == 8 and cfg.optimizer.warmup_iters == 2
    assert cfg.train.output_dir == "/tmp/x"
    later = parse(["--config", DEMO, *SPLIT, "--set", "train.iters=5"])
    assert load_config(later.config, later.set).train.iters == 5  # a later value wins
    assert parse(["--config", DEMO]).set == []


@pytest.mark.parametrize("launcher", ["bench_train", "profile_step", "quality_study"])
def test_study_launchers_repeated_set_keeps_every_override(launcher):
    if launcher == "quality_study":
        parse = load_benchmark(launcher).parse_args
    else:
        parse = _parser(launcher).parse_args
    assert parse(SPLIT).set == parse(JOINED).set == WANT
    assert parse([]).set == []


def test_prepare_data_takes_several_values_per_set_and_repeated_sets(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", docs=8, lines=20)
    cli = load_launch("prepare_data")
    cache = tmp_path / "cache"
    assert cli.main(["--set", f"data.path={corpus}", f"data.cache_dir={cache}",
                     "--set", "data.tokenizer_vocab_size=300", "model.seq_len=32",
                     "--no-progress"]) == 0  # seq 32: enough windows for one global batch
    out = capsys.readouterr().out
    assert f"data directory : {cache}" in out and "bpe-300" in out  # all three took effect


def test_bench_train_passes_every_override_to_each_arm(tmp_path, monkeypatch):
    bench_train = load_benchmark("bench_train")
    seen = []

    def fake_run(cmd, env, **kw):
        seen.append(cmd)
        raise RuntimeError("stop here")
    monkeypatch.setattr(bench_train.subprocess, "run", fake_run)
    p = argparse.ArgumentParser()
    bench_train.add_arguments(p)
    args = p.parse_args(["--out", str(tmp_path), "--set", "model.num_layers=3",
                         "--set", "zero.stage=1", "train.seed=4"])
    with pytest.raises(RuntimeError, match="stop here"):
        bench_train._run_arm(args, "dense")
    child = load_launch("pretrain").parse_args(seen[0][2:])  # what pretrain.py will read
    assert {"model.num_layers=3", "zero.stage=1", "train.seed=4"} <= set(child.set)


@pytest.mark.parametrize("given", [[], ["--set", "model.num_layers=3", "--set", "zero.stage=1"]])
def test_profile_step_child_command_parses_back(tmp_path, monkeypatch, given):
    """run() starts each arm as `profile_step.py ... [--set *args.set]` (no --set when no
    override was given), which must parse back to the same overrides."""
    profile_step = load_benchmark("profile_step")
    seen = []

    def fake_run(cmd, env, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "stopped")
    monkeypatch.setattr(profile_step.subprocess, "run", fake_run)
    args = _parser("profile_step").parse_args(["--arms", "dense", *given])
    assert profile_step.run(args) == 1
    child = _parser("profile_step").parse_args(seen[0][3:])  # python -m benchmarks.profile_step
    assert child.set == args.set and child.one_arm == "dense"


def test_quality_study_identity_is_the_same_for_both_forms():
    qs = load_benchmark("quality_study")
    split, joined = qs.parse_args(SPLIT), qs.parse_args(JOINED)
    assert qs.study_identity(split) == qs.study_identity(joined)
    assert qs.study_identity(split)["overrides"] == WANT


@pytest.mark.slow
def test_pretrain_run_applies_overrides_from_two_set_flags(tmp_path):
    """End to end: iters from the second --set, not the config's."""
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    argv = tiny_run_args(corpus, tmp_path / "cache", out, 8, 0)
    i = argv.index("train.iters=8")
    argv[i:i + 1] = []
    argv += ["--set", "train.iters=3", "optimizer.warmup_iters=1"]

    def pretrain_main(argv):
        return load_launch("pretrain").main(argv)
    assert run_distributed(pretrain_main, 1, argv) == [0]
    given = yaml.safe_load((out / "run_config.yaml").read_text())
    assert given["train"]["iters"] == 3 and given["optimizer"]["warmup_iters"] == 1
    assert given["data"]["path"] == str(corpus)  # and the first --set's keys as well
    iters = [json.loads(line).get("iter") for line in
             (out / "metrics.jsonl").read_text().splitlines()]
    assert max(i for i in iters if i is not None) == 3


# ---- --config once ----------------------------------------------------------------------

def _config_twice(launcher):
    argv = ["--config", DEMO, "--config", str(ROOT / "configs" / "gpt2-small.yaml")]
    if launcher == "pretrain":
        return load_launch(launcher).parse_args(argv)
    if launcher == "quality_study":
        return load_benchmark(launcher).parse_args(argv)
    if launcher == "prepare_data":
        return load_launch(launcher).main(argv)
    return _parser(launcher).parse_args(argv)


@pytest.mark.parametrize("launcher", ["pretrain", "prepare_data", "profile_step",
                                      "quality_study"])
def test_config_given_twice_is_an_error(launcher, capsys):
    with pytest.raises(SystemExit) as e:
        _config_twice(launcher)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: --config given twice" in err and "demo.yaml" in err
    assert "gpt2-small.yaml" in err


# ---- pretrain.py --help-config / --help into a closed pipe ----------------------------------

PRETRAIN = str(ROOT / "launch" / "pretrain.py")


@pytest.mark.parametrize("flag", ["--help-config", "--help"])
def test_pretrain_help_into_a_closed_pipe_exits_quietly(flag):
    """The reader is gone before the first write (`| head` that has already exited): always
    a broken pipe, so this is deterministic where `| head -1` is a race."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, PRETRAIN, flag], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120, cwd=ROOT,
                              check=False)
    finally:
        os.close(write_end)
    assert done.returncode == 0 and done.stderr == "", done.stderr  # no BrokenPipeError


def test_pretrain_help_config_into_head_prints_the_first_line_only():
    command = f'set -o pipefail; "{sys.executable}" {PRETRAIN} --help-config | head -1'
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, check=False)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout == "| key | default | meaning |\n"


# ---- generate.py: arguments and device checked before anything is loaded ----------------

@pytest.fixture
def artifact(tmp_path, tokenizer_file):
    return saved(tmp_path, "gpt", tokenizer=tokenizer_file)[2]


@pytest.fixture
def spied(monkeypatch):
    """generate.py with its loaders recording calls (the real ones still run)."""
    cli = load_launch("generate")
    calls = []
    for name in ("find_artifact", "load_artifact", "InferenceModel"):
        real = getattr(cli, name)

        def spy(*a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)
        monkeypatch.setattr(cli, name, spy)
    return cli, calls


def _one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("flag,value", [("--top-p", "2"), ("--top-p", "0"),
                                        ("--temperature", "-1"), ("--temperature", "nan"),
                                        ("--top-k", "-3"), ("--max-new-tokens", "0"),
                                        ("--stop-token", "-1")])
def test_bad_sampling_arguments_stop_before_the_model_loads(artifact, spied, capsys, flag,
                                                            value):
    cli, calls = spied
    assert cli.main(["--checkpoint", str(artifact), "--prompt", "hi", flag, value]) == 2
    out, err = capsys.readouterr()
    line = _one_error_line(err)
    assert flag in line and value in line
    assert out == "" and calls == []  # no prompt echoed, nothing read


@pytest.mark.parametrize("device,says", [("gpu", "not a torch device name"),
                                         ("cuda", "no CUDA GPU is visible"),
                                         ("meta", "hold no values")])
def test_unusable_device_is_one_error_line(artifact, spied, capsys, monkeypatch, device, says):
    cli, calls = spied
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: False)
    assert cli.main(["--checkpoint", str(artifact), "--prompt", "hi", "--device", device]) == 2
    out, err = capsys.readouterr()
    line = _one_error_line(err)
    assert line.startswith(f"error: --device {device}: ") and says in line
    assert "--device cpu" in line and out == "" and calls == []


def test_missing_cuda_index_is_one_error_line(artifact, spied, capsys, monkeypatch):
    cli, calls = spied
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli.torch.cuda, "device_count", lambda: 2)
    assert cli.main(["--checkpoint", str(artifact), "--prompt", "hi",
                     "--device", "cuda:2"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--device cuda:2: only 2 CUDA GPU(s) visible" in line and calls == []


def _generate(*argv):
    return subprocess.run([sys.executable, str(ROOT / "launch" / "generate.py"), *argv],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_generate_process_bad_device_exits_2_without_traceback(artifact):
    # cuda:99: no GPU here, or fewer than 100 on a GPU machine - refused either way
    for device in ("cuda:99", "gpu"):
        done = _generate("--checkpoint", str(artifact), "--prompt", "hi", "--device", device)
        assert done.returncode == 2 and done.stdout == ""
        assert _one_error_line(done.stderr).startswith(f"error: --device {device}: ")


def test_generate_process_bad_sampling_prints_nothing_else(artifact):
    done = _generate("--checkpoint", str(artifact), "--prompt", "hi", "--top-p", "2")
    assert done.returncode == 2 and done.stdout == ""  # not "hierror: ..."
    assert _one_error_line(done.stderr) == "error: --top-p must be in (0, 1] (1 = off), got 2.0"


def test_unreadable_user_tokenizer_is_named_without_data_advice(artifact, tmp_path):
    bad = tmp_path / "my-tokenizer.json"
    bad.write_text("not json")
    done = _generate("--checkpoint", str(artifact), "--prompt", "hi", "--tokenizer", str(bad))
    assert done.returncode == 2 and done.stdout == ""
    line = _one_error_line(done.stderr)  # no WARNING line before it
    assert line.startswith(f"error: --tokenizer {bad}: could not be read as a tokenizer.json")
    assert "prepare the data" not in done.stderr and "data directory" not in done.stderr


def test_missing_user_tokenizer_stops_before_loading(artifact, spied, tmp_path, capsys):
    cli, calls = spied
    gone = tmp_path / "gone.json"
    assert cli.main(["--checkpoint", str(artifact), "--prompt", "hi",
                     "--tokenizer", str(gone)]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"error: --tokenizer {gone}: no such file"
    assert calls == []


def test_good_user_tokenizer_still_generates(artifact, tokenizer_file, spied, capsys):
    cli, calls = spied
    assert cli.main(["--checkpoint", str(artifact), "--prompt", "the cat", "--seed", "1",
                     "--max-new-tokens", "3", "--tokenizer", str(tokenizer_file)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("the cat") and "3 tokens in" in err
    assert calls == ["find_artifact", "load_artifact", "InferenceModel"]
