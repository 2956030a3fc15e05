"""Run a snippet in a fresh process with TRITON_INTERPRET=1 (Triton kernels on the CPU).

A process of its own, because the interpreter flag is read when triton is first imported.
The snippet prints "ok" when its checks hold."""
import os
import subprocess
import sys

from helpers.paths import ROOT


def run_interpreted(code: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr
