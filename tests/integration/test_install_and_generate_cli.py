"""launch/install.sh says what it installs from where (fake python/pip and nvidia-smi: nothing
is installed), and launch/generate.py's command-line behaviour: vocabulary checks before any
output, one-line notes instead of Python warnings, prompts numbered in command-line order, the
seed printed only when sampling."""
import os
import re
import shutil
import subprocess
import sys

import pytest
from helpers.inference import SEQ, saved
from helpers.launch import load_launch

from slope_megatron.inference import InferenceModel, generate, load_artifact

from helpers.paths import ROOT
INSTALL = ROOT / "launch" / "install.sh"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


# ---- launch/install.sh ------------------------------------------------------------------

FAKE_PYTHON = """#!/bin/bash
# records every call; "import torch" fails unless FAKE_TORCH=1; the report line is canned
echo "$*" >> "$FAKE_LOG"
if [ "$1" = "-c" ]; then
  if [ "$2" = "import torch" ]; then [ "${FAKE_TORCH:-0}" = 1 ]; exit; fi
  echo "torch 9.9.9+fake (CPU build) | deepspeed 0.0.0"
fi
exit 0
"""


def run_install(tmp_path, gpu=False, torch_present=False, index_url=None):
    """install.sh with PATH holding only a fake python (records its args) and, for a GPU
    machine, a fake nvidia-smi. Returns (completed process, the recorded pip commands)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    if gpu:
        smi = bin_dir / "nvidia-smi"
        smi.write_text("#!/bin/bash\nexit 0\n")
        smi.chmod(0o755)
    os.symlink(shutil.which("dirname"), bin_dir / "dirname")
    log = tmp_path / "calls.log"
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "FAKE_LOG": str(log),
           "FAKE_TORCH": "1" if torch_present else "0"}
    if index_url is not None:
        env["TORCH_INDEX_URL"] = index_url
    done = subprocess.run([shutil.which("bash"), str(INSTALL)], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, (done.stdout, done.stderr)
    pips = [line for line in log.read_text().splitlines() if line.startswith("-m pip ")]
    return done, pips


def test_cpu_machine_without_index_says_where_torch_comes_from(tmp_path):
    done, pips = run_install(tmp_path)
    assert pips[0] == "-m pip install -q torch==2.13.0"  # the path CI takes (local mirror)
    assert "installing torch==2.13.0 from pip's configured index (TORCH_INDEX_URL unset)" \
        in done.stdout
    assert "CPU build" not in done.stdout.split("installed:")[0]  # it cannot promise one
    note = [line for line in done.stderr.splitlines() if line.startswith("note: ")]
    assert len(note) == 1 and "multi-GB CUDA build" in note[0], done.stderr
    assert f"TORCH_INDEX_URL={CPU_INDEX}" in note[0]
    assert "installed: torch 9.9.9+fake (CPU build)" in done.stdout  # which build it got


def test_the_kernels_are_prebuilt_on_a_gpu_machine_only(tmp_path):
    """A prebuilt binding leaves no window at a job's start in which a killed rank leaves a
    build lock behind (and no rank waits ~40 s for another's build)."""
    for gpu in (False, True):
        where = tmp_path / ("gpu" if gpu else "cpu")
        where.mkdir()
        done, _ = run_install(where, gpu=gpu, torch_present=True)
        calls = (where / "calls.log").read_text().splitlines()
        assert ("docker/prebuild_kernels.py --lenient" in calls) is gpu
        assert ("prebuilding the kernels into" in done.stdout) is gpu


def test_cpu_machine_with_the_cpu_index_uses_it(tmp_path):
    done, pips = run_install(tmp_path, index_url=CPU_INDEX)
    assert pips[0] == f"-m pip install -q torch==2.13.0 --index-url {CPU_INDEX}"
    assert f"installing torch==2.13.0 from TORCH_INDEX_URL={CPU_INDEX}" in done.stdout
    assert "note:" not in done.stderr
    assert all("--index-url" not in p for p in pips[1:])  # only torch comes from it


@pytest.mark.parametrize("index_url", [None, "https://download.pytorch.org/whl/cu124"])
def test_gpu_machine_installs_the_newest_torch_in_range(tmp_path, index_url):
    done, pips = run_install(tmp_path, gpu=True, index_url=index_url)
    want = "-m pip install -q torch>=2.4,<2.15"
    assert pips[0] == (want if index_url is None else f"{want} --index-url {index_url}")
    assert "installing the newest torch>=2.4,<2.15 from" in done.stdout
    assert "note:" not in done.stderr


def test_importable_torch_is_kept(tmp_path):
    done, pips = run_install(tmp_path, torch_present=True, index_url=CPU_INDEX)
    assert not any("torch" in p for p in pips)
    assert pips == ["-m pip install -q setuptools wheel",
                    "-m pip install -q --no-build-isolation -e .[test]"]
    assert "keeping the torch already installed" in done.stdout


def test_readme_says_what_install_sh_does():
    readme = (ROOT / "README.md").read_text()
    script = INSTALL.read_text()
    for text in ("torch==2.13.0", "torch>=2.4,<2.15", "TORCH_INDEX_URL", CPU_INDEX):
        assert text in readme and text in script, text
    assert "torch 2.13 when no torch is present" not in readme


def test_install_sh_syntax_and_shellcheck():
    subprocess.run(["bash", "-n", str(INSTALL)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    r = subprocess.run(["shellcheck", str(INSTALL)], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stdout


# ---- launch/generate.py -----------------------------------------------------------------

@pytest.fixture
def artifact(tmp_path, tokenizer_file):
    return saved(tmp_path, "gpt", tokenizer=tokenizer_file)[2]


def _generate(*argv):
    return subprocess.run([sys.executable, str(ROOT / "launch" / "generate.py"), *argv],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)


def test_stop_token_outside_the_vocabulary_is_refused_before_any_output(artifact):
    done = _generate("--checkpoint", str(artifact), "--prompt", "the cat",
                     "--stop-token", "99999")
    assert done.returncode == 2 and done.stdout == ""  # not "the caterror: ..."
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    want = ("error: --stop-token 99999: outside the tokenizer's vocabulary (96 ids); use a "
            "token id in [0, 96)")
    assert lines == [want], done.stderr


def test_stop_token_check_comes_before_the_model_is_built(artifact, monkeypatch, capsys):
    cli = load_launch("generate")
    built = []
    monkeypatch.setattr(cli, "InferenceModel", lambda *a, **k: built.append(1))
    assert cli.main(["--checkpoint", str(artifact), "--prompt", "hi", "--stop-token", "5",
                     "--stop-token", "96"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and built == [] and err.startswith("error: --stop-token 96: ")


@pytest.mark.parametrize("prompt,new,says", [
    ("the cat sat on the mat. " * 3, "2", f"keeping its last {SEQ} tokens"),
    ("the cat", "40", f"new tokens fit in the model's context ({SEQ}); it will stop early"),
])
def test_context_warnings_are_one_note_line(artifact, prompt, new, says):
    done = _generate("--checkpoint", str(artifact), "--prompt", prompt, "--max-new-tokens", new)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and "generate.py:" not in done.stderr, done.stderr
    notes = [line for line in done.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) >= 1 and any(says in n for n in notes), done.stderr
    assert all(line.startswith(("note: ", "[")) for line in done.stderr.splitlines())
    assert done.stdout.startswith(prompt) and done.stdout.endswith("\n")


def test_prompts_are_numbered_in_command_line_order(artifact, tmp_path, capsys):
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("a dog")
    cli = load_launch("generate")
    assert cli.main(["--checkpoint", str(artifact), "--prompt-file", str(prompt_file),
                     "--prompt", "the", "--prompt", "mat", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "=== [0] ===\na dog" in out and "=== [1] ===\nthe" in out
    assert "=== [2] ===\nmat" in out
    assert "command-line order" in cli.__doc__


def test_seed_is_printed_only_when_sampling(artifact, capsys):
    cli = load_launch("generate")
    assert cli.main(["--checkpoint", str(artifact), "--prompt", "the",
                     "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[-1].endswith("finished: length]")  # greedy: no seed
    assert cli.main(["--checkpoint", str(artifact), "--prompt", "the", "--max-new-tokens", "2",
                     "--temperature", "0.7"]) == 0
    assert re.search(r"; seed \d+\]", capsys.readouterr().err)
    assert cli.main(["--checkpoint", str(artifact), "--prompt", "the", "--max-new-tokens", "2",
                     "--temperature", "0.7", "--seed", "5"]) == 0
    assert "; seed 5]" in capsys.readouterr().err


def test_prompt_is_echoed_even_when_the_first_token_stops(artifact, capsys):
    cli = load_launch("generate")
    config, state, tokenizer_file = load_artifact(artifact)
    tokenizer = cli.load_tokenizer(tokenizer_file)
    model = InferenceModel(config, state)
    [first] = generate(model, [tokenizer.encode("the cat")], 1)[0].tokens
    assert cli.main(["--checkpoint", str(artifact), "--prompt", "the cat",
                     "--stop-token", str(first), "--no-eos-stop"]) == 0
    out, err = capsys.readouterr()
    assert out == "the cat\n" and "finished: stop" in err


def test_static_decode_prints_the_same_text_as_eager(artifact, capsys, monkeypatch):
    """--decode static (fixed-shape steps; eager on the CPU) streams the same tokens, and only
    it runs the static decoder's steps."""
    from slope_megatron.inference.static_decode import StaticDecoder

    steps = []
    step = StaticDecoder.step
    monkeypatch.setattr(StaticDecoder, "step", lambda self: steps.append(1) or step(self))
    cli = load_launch("generate")
    argv = ["--checkpoint", str(artifact), "--prompt", "the cat", "--prompt", "a dog ate",
            "--max-new-tokens", "12"]
    outputs, counted = {}, {}
    for decode in ("eager", "static"):
        assert cli.main([*argv, "--decode", decode]) == 0
        outputs[decode], counted[decode] = capsys.readouterr().out, len(steps)
    assert outputs["static"] == outputs["eager"] and "=== [1] ===" in outputs["eager"]
    assert counted["eager"] == 0 and counted["static"] > 0


def test_compile_option_reaches_the_static_step_and_is_reported(artifact, capsys, monkeypatch):
    """--compile on compiles the static step's regions (here with a backend that runs the
    traced graphs as they are, not Inductor's C++), prints the same text, and says so."""
    import torch._dynamo

    from slope_megatron.model import regions

    traced = []

    def as_traced(gm, example_inputs):
        traced.append(gm)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setitem(regions._settings, "backend", as_traced)
    cli = load_launch("generate")
    argv = ["--checkpoint", str(artifact), "--prompt", "the cat", "--max-new-tokens", "8",
            "--decode", "static"]
    texts, notes = {}, {}
    for compile in ("off", "on"):
        assert cli.main([*argv, "--compile", compile]) == 0
        texts[compile], notes[compile] = capsys.readouterr()
        assert bool(traced) == (compile == "on")
    assert texts["on"] == texts["off"]
    assert "decoding: static (no graph)" in notes["off"]
    assert "decoding: static (no graph, compiled)" in notes["on"]
    torch._dynamo.reset()
