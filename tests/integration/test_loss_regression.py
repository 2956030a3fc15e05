"""Pinned loss curves: the demo config's first 30 training losses on CPU in fp32, in one process
and in the TP=2 x PP=2 layout, equal the curves in tests/assets/losses/ to a tight tolerance.

Why: the unit tests pin each piece against the reference math, but a change that moves the
whole computation a little (an init order, a reduction, the data order, a schedule) passes
them all; a pinned curve catches it. The run is the demo's first 40 iterations (its warm-up:
the learning rates do not depend on train.iters there, and no adapter switch happens), of
which the first 30 losses are pinned.
When the math changes on purpose, regenerate the curves and commit them with the change:

    bash tests/run.sh tests/integration/test_loss_regression.py --update-losses
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.forked_runs import launch
from helpers.paths import ROOT

import deepspeed

ASSET = ROOT / "tests" / "assets" / "losses" / "demo_cpu_fp32.json"
PINNED = 30  # losses checked
RUN_ITERS = 40  # the demo's warm-up; a shorter run is refused (warm-up longer than the run)
REL_TOL = 1e-5  # fp32 on one CPU kind with pinned packages: observed equal to the last bit
OVERRIDES = [f"train.iters={RUN_ITERS}", "train.log_interval=1", "train.eval_interval=0",
             "train.save_interval=0", "train.dtype=fp32", "sparsity.backend=reference"]
LAYOUTS = {"one process": (1, []),
           "tp2_pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"])}


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    """One prepared copy of the demo's data (the built-in corpus) for both layouts."""
    return tmp_path_factory.mktemp("demo_data")


def _losses(out: Path, cache: Path, world: int, layout: list[str]) -> list[float]:
    argv = ["--config", str(ROOT / "configs" / "demo.yaml"), "--set", *OVERRIDES,
            f"data.cache_dir={cache}", f"train.output_dir={out}", *layout]
    assert launch(argv, world, timeout=900.0) == [0] * world
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["iter"] for r in train] == list(range(1, RUN_ITERS + 1))
    return [r["loss"] for r in train[:PINNED]]


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_demo_losses_equal_the_pinned_curve(layout, tmp_path, data_cache, request):
    world, overrides = LAYOUTS[layout]
    got = _losses(tmp_path / "run", data_cache, world, overrides)
    if request.config.getoption("--update-losses"):
        pinned = json.loads(ASSET.read_text()) if ASSET.is_file() else {}
        pinned.update({
            "about": "train loss of iterations 1-30 of configs/demo.yaml on CPU in fp32; "
                     "tests/integration/test_loss_regression.py checks and regenerates it",
            "overrides": OVERRIDES,
            "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__}})
        pinned.setdefault("layouts", {})[layout] = {"world": world, "overrides": overrides,
                                                    "losses": got}
        ASSET.parent.mkdir(parents=True, exist_ok=True)
        ASSET.write_text(json.dumps(pinned, indent=1) + "\n")
        return
    pinned = json.loads(ASSET.read_text())
    assert pinned["overrides"] == OVERRIDES, "the run's settings changed: regenerate the curves"
    want = pinned["layouts"][layout]["losses"]
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
    assert worst <= REL_TOL, (f"{layout}: losses moved by up to {worst:.2e} relative; if the "
                              f"math changed on purpose, regenerate (see this file's docstring)"
                              f"\n got {got}\nwant {want}")
