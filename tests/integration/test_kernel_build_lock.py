"""A kernel build lock left behind by a killed process no longer hangs the next run.

Every run JIT-loads DeepSpeed's CPU communication op through torch.utils.cpp_extension.load,
which serializes builds with a lock file `<TORCH_EXTENSIONS_DIR>/<op>/lock`; a process killed
while holding it left the file behind, and every later run sat in FileBaton.wait, silently,
until someone removed it by hand. Here the lock is left by a real process killed while it held
it, in a copy of the built extension directory, and the next real run (a fork-started pretrain
rank) must start within seconds; a lock whose holder is alive is waited for, then named.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers.forked_runs import launch
from helpers.paths import ROOT
from helpers.stops import stop_args

from slope_megatron.errors import EXIT_USER_ERROR

OP = "deepspeed_shm_comm"

# take the op's build lock the way a build does (FileBaton.try_acquire), then wait to be killed;
# `install` chooses our lock (holder recorded) or torch's own (an empty file)
HOLD = """
import sys, time
if sys.argv[2] == "ours":
    from slope_megatron.build_lock import install
    install()
import torch.utils.cpp_extension as cpp
assert cpp.FileBaton(sys.argv[1]).try_acquire()
print("held", flush=True)
time.sleep(120)
"""


def _built_op_dir():
    """The op's built directory in the checkout's extension cache (built now if it is not)."""
    source = ROOT / ".torch_extensions" / OP
    if not list(source.glob(f"{OP}*.so")):
        build = ("from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; "
                 "ShareMemCommBuilder().load()")
        subprocess.run([sys.executable, "-c", build], check=True, timeout=600,
                       env={**_env(), "TORCH_EXTENSIONS_DIR": str(source.parent)})
    return source


def _env():
    import os

    return {**os.environ, "DS_ACCELERATOR": "cpu"}


@pytest.fixture
def extensions(tmp_path, monkeypatch):
    """A private TORCH_EXTENSIONS_DIR holding a copy of the built op (no rebuild needed), and
    DeepSpeed's in-process cache of loaded ops cleared, so the runs really take the lock."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    ext = tmp_path / "torch_extensions"
    shutil.copytree(_built_op_dir(), ext / OP, ignore=shutil.ignore_patterns("lock", "*.clear"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    monkeypatch.delitem(OpBuilder._loaded_ops, OP, raising=False)
    return ext / OP / "lock"


def _hold(lock, kind):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), kind],
                              stdout=subprocess.PIPE, text=True, env=_env())
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.slow
@pytest.mark.parametrize("kind, why", [
    ("ours", "is no longer running"),  # a run of this version killed during its build
    ("torch", "no holder information and no process has it open"),  # an older version's
])
def test_a_lock_left_by_a_killed_build_is_cleared_and_the_run_starts(
        stop_corpus, extensions, tmp_path, capfd, kind, why):
    holder = _hold(extensions, kind)
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    assert extensions.exists()  # left behind, as a kill leaves it
    capfd.readouterr()
    began = time.time()
    assert launch(stop_args(stop_corpus, tmp_path / "run", iters=2), 1, timeout=120) == [0]
    assert time.time() - began < 60  # before: forever
    err = capfd.readouterr().err
    assert f"kernel build: removed the stale lock {extensions} (" in err and why in err
    assert not extensions.exists()


@pytest.mark.slow
def test_a_live_holder_is_waited_for_then_named_in_one_line(stop_corpus, extensions, tmp_path,
                                                            capfd, monkeypatch):
    monkeypatch.setenv("SLOPE_BUILD_LOCK_TIMEOUT", "3")
    holder = _hold(extensions, "ours")
    try:
        capfd.readouterr()
        assert launch(stop_args(stop_corpus, tmp_path / "run", iters=2), 1,
                      timeout=120) == [EXIT_USER_ERROR]
        err = capfd.readouterr().err
        assert f"error: waited 3 s for the kernel build lock {extensions}, held by pid " \
               f"{holder.pid} on host " in err
        assert f"remove {extensions}" in err and "Traceback" not in err
    finally:
        holder.kill()
        holder.wait(10)
