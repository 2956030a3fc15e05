"""Command-line conventions the launchers share, so that every `launch/*.py` reads its options
the same way: `--config` may be given once (a second one is a mistake, not a replacement),
and `--set` is repeatable (`--set a=1 --set b=2` is `--set a=1 b=2`; a later value of a key
wins)."""
from __future__ import annotations

import argparse


class Once(argparse.Action):
    """An option that may be given once: a second occurrence stops with a usage error."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = f"_{self.dest}_given"
        if getattr(namespace, given, False):
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)} and "
                         f"{values}); give one config and change keys with --set")
        setattr(namespace, given, True)
        setattr(namespace, self.dest, values)


def add_set_argument(p: argparse.ArgumentParser, help: str, **kw) -> None:
    """`--set KEY=VALUE ...`, repeatable."""
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help=f"{help} (repeatable: --set a=1 --set b=2 == --set a=1 b=2)", **kw)


def config_error(config, sets: list[str], arm_sets: dict[str, list[str]]) -> str | None:
    """What is wrong with a --config file and its --set overrides, alone and then with each
    arm's full overrides (`arm_sets`: arm -> the --set its process will load); None when
    nothing. Launchers that start one process per arm call it before starting any."""
    from .config import load_config
    from .errors import SlopeError

    for arm, overrides in {None: list(sets), **arm_sets}.items():
        try:
            load_config(config, overrides)
        except SlopeError as e:
            return str(e) if arm is None else f"arm {arm}: {e}"
    return None
