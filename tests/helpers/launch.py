"""Load the checkout's command-line tools in a test: a launch/<name>.py entry point as a module
(the launch scripts are not a package), or a measurement tool of the `benchmarks` package.
"""
import importlib
import importlib.util
import sys

from helpers.paths import ROOT

LAUNCH = ROOT / "launch"


ENTRY_POINTS = ("pretrain", "prepare_data", "generate", "export")


def load_launch(name):
    """The code of launch/<name>.py: slope_megatron.commands.<name>, which the launch script
    (and the installed console script) runs. Other launch/<name>.py files are executed fresh
    as a module named launch_<name>."""
    if name in ENTRY_POINTS:
        return importlib.import_module(f"slope_megatron.commands.{name}")
    path = LAUNCH / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"launch_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_benchmark(name):
    """The module benchmarks.<name>, imported from this checkout (as `python -m
    benchmarks.<name>` run from the checkout root imports it)."""
    if str(ROOT) not in sys.path:  # pytest started elsewhere than the checkout root
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"benchmarks.{name}")


def pretrain_main(argv):
    """`launch/pretrain.py`'s main(argv) (for run_distributed's forked ranks)."""
    return load_launch("pretrain").main(argv)
