"""Import a launch/<name>.py script as a module (the launch scripts are not a package).

The launch directory goes on sys.path first, as it is when a script runs, so scripts can
import their sibling modules (e.g. child_env.py).
"""
import importlib.util
import sys
from pathlib import Path

LAUNCH = Path(__file__).resolve().parents[2] / "launch"


def load_launch(name):
    if str(LAUNCH) not in sys.path:
        sys.path.insert(0, str(LAUNCH))
    spec = importlib.util.spec_from_file_location(f"launch_{name}", LAUNCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pretrain_main(argv):
    """`launch/pretrain.py`'s main(argv), loaded fresh (for run_distributed's forked ranks)."""
    return load_launch("pretrain").main(argv)
