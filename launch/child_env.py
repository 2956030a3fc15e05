"""Environment for a child process that must import this checkout's `slope_megatron`
(benchmark and study launchers run each arm as a fresh `launch/*.py` process)."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def checkout_env() -> dict:
    """os.environ with the checkout root prepended to PYTHONPATH."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}
