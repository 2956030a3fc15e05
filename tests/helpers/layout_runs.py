"""Runs of launch/pretrain.py in six layouts, for the tests of a resume in another layout.

A reference is an uninterrupted 16-iteration run in one layout, saving at iterations 8 and
16, with the adapters switching on at iteration 6 and the column masks refreshed every 3
steps (so both the adapter state and the refresh counters cross the resume). Its checkpoint
at 8 - what a kill after that save leaves - is then resumed in another layout
(`halfway_copy`), and iterations 9-16 are compared with the reference's.

References are cached per test session (`References`): every pair starting from the same
layout shares one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from helpers.corpus import tiny_run_args, write_corpus
from helpers.forked_runs import launch

from slope_megatron.training import checkpoint

ITERS, HALF = 16, 8
LAYOUTS = {  # name: (processes, settings)
    "1": (1, ()),
    "dp2-zero1": (2, ("zero.stage=1",)),
    "dp2-zero3": (2, ("zero.stage=3",)),
    "tp2": (2, ("parallel.tensor=2",)),
    "pp2": (2, ("parallel.pipeline=2",)),
    "tp2-pp2": (4, ("parallel.tensor=2", "parallel.pipeline=2")),
}
# layouts outside the six of the matrix, for the cases they add (TP shards under ZeRO-3)
MORE_LAYOUTS = {"tp2-zero3": (2, ("parallel.tensor=2", "zero.stage=3"))}
TOLERANCE = 1e-5  # relative: the parity bound for losses and final weights


def _layout(name: str) -> tuple:
    return {**LAYOUTS, **MORE_LAYOUTS}[name]


def run_args(root: Path, out: Path, layout: str, *extra: str) -> list[str]:
    return tiny_run_args(root / "corpus", root / "cache", out, ITERS, HALF,
                         *_layout(layout)[1], "adapters.fraction=0.625",  # on at iteration 6
                         "sparsity.column_mask_refresh=3", "train.eval_interval=8",
                         "model.vocab_size=320", *extra)


def run(root: Path, out: Path, layout: str, *extra: str, fault=None, timeout=240.0) -> list[int]:
    return launch(run_args(root, out, layout, *extra), _layout(layout)[0], fault=fault,
                  timeout=timeout)


class References:
    """Uninterrupted runs per layout under `root`, made on first use."""

    def __init__(self, root: Path):
        self.root = root
        write_corpus(root / "corpus")
        self.done: dict[str, Path] = {}

    def __call__(self, layout: str) -> Path:
        if layout not in self.done:
            out = self.root / f"reference-{layout}"
            assert run(self.root, out, layout) == [0] * _layout(layout)[0], layout
            self.done[layout] = out
        return self.done[layout]


def halfway_copy(reference: Path, dest: Path) -> Path:
    """`reference` as a kill right after its checkpoint at HALF would have left it."""
    shutil.copytree(reference, dest)
    ckpts = dest / "checkpoints"
    shutil.rmtree(ckpts / checkpoint.tag_for(ITERS))
    (ckpts / checkpoint.LATEST).write_text(checkpoint.tag_for(HALF))
    return dest


def losses(out: Path) -> dict[int, float]:
    """Iteration -> train loss, and -(iteration) -> val loss, from metrics.jsonl."""
    got = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("loss") is not None:
            got[record["iter"]] = record["loss"]
        if record.get("val_loss") is not None:
            got[-record["iter"]] = record["val_loss"]
    return got


def final_state(out: Path) -> dict:
    """The TP = 1 model of the run's final checkpoint (its inference artifact)."""
    from slope_megatron.inference.artifact import load_artifact

    return load_artifact(out / "checkpoints" / checkpoint.tag_for(ITERS) / "slope_model")[1]


def worst_relative(got: dict, want: dict) -> tuple[float, str]:
    """(largest relative difference, its key) between two {key: number} dicts."""
    assert got.keys() == want.keys(), set(got) ^ set(want)
    return max((abs(got[k] - v) / max(abs(v), 1e-30), str(k)) for k, v in want.items())


def model_relative(got: dict, want: dict) -> float:
    """The whole model's relative L2 difference (all floating-point tensors as one vector);
    every other entry - masks, column masks, extra state - must be equal."""
    assert got.keys() == want.keys(), set(got) ^ set(want)
    diff = norm = 0.0
    for key, value in want.items():
        if torch.is_tensor(value) and value.is_floating_point():
            diff += (got[key].double() - value.double()).pow(2).sum().item()
            norm += value.double().pow(2).sum().item()
        elif torch.is_tensor(value):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key
    return (diff / norm) ** 0.5


def resume_and_compare(refs: References, source: str, target: str, *extra: str) -> float:
    """Resume `source`'s checkpoint at HALF in `target` (with `extra` settings); assert
    iterations 9-16 (each train and val loss) and the final TP = 1 model (as one vector;
    masks and counters exactly) agree with the uninterrupted `source` run within TOLERANCE,
    relative. Returns (the largest loss difference, the weight difference), relative."""
    ref = refs(source)
    out = halfway_copy(ref, refs.root / f"resume-{source}-to-{target}{'-'.join(extra)}")
    assert run(refs.root, out, target, *extra) == [0] * _layout(target)[0]
    want = {k: v for k, v in losses(ref).items() if abs(k) > HALF}
    got = {k: v for k, v in losses(out).items() if abs(k) > HALF}
    loss_diff, at = worst_relative(got, want)
    assert loss_diff <= TOLERANCE, (source, target, at, got, want)
    weight_diff = model_relative(final_state(out), final_state(ref))
    assert weight_diff <= TOLERANCE, (source, target, weight_diff)
    return loss_diff, weight_diff
