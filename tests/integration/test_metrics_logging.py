"""metrics.jsonl and TensorBoard after a resume: cut back to the same iteration, time_s
continued, and every field written documented in docs/CONFIG.md.

The end-to-end test forks single-process runs of launch/pretrain.py's main() (torch and
DeepSpeed imported once, here) and kills one by SIGKILL through SLOPE_FAULT, as
tests/integration/test_reliability.py does.
"""
from __future__ import annotations

import itertools
import json
import re
import signal
import time
from pathlib import Path

import pytest
from helpers.corpus import tiny_run_args, write_corpus
from helpers.forked_runs import launch as launch_ranks

from slope_megatron.training.metrics import MetricsWriter

from helpers.paths import ROOT
def tb_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of `out`/tensorboard as TensorBoard shows it (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def steps(scalars: dict, tag: str) -> list[int]:
    return [s for s, _ in scalars.get(tag, [])]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def next_second() -> None:
    """Event files are named by the second they were opened in (then pid, then a counter that
    sorts as text): open the next writer in a later second, so it sorts after the earlier."""
    time.sleep(1.02 - time.time() % 1)


# ---- MetricsWriter alone ----------------------------------------------------------------

def _write_run(out: Path, resume_iter: int, iters: range, time_s: float = 0.0) -> None:
    w = MetricsWriter(out, True, resume_iter)
    for it in iters:
        time_s += 1.0
        w.write({"iter": it, "loss": 10.0 - it, "time_s": time_s, "adapters_active": it > 3,
                 "mfu": None})
        if it % 4 == 0:
            w.write({"iter": it, "val_loss": 20.0 - it, "val_ppl": float("inf")})
    w.close()


def test_resume_keeps_the_resumed_iterations_points_in_both_sinks(tmp_path):
    _write_run(tmp_path, 0, range(1, 7))  # killed after iteration 6, checkpoint at 4
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iter": 7, "lo')  # a line cut by the kill
    next_second()
    _write_run(tmp_path, 4, range(5, 9), time_s=0.0)  # the resumed run: its clock starts at 0
    tb, jsonl = tb_scalars(tmp_path), records(tmp_path)
    assert steps(tb, "loss") == [r["iter"] for r in jsonl if "loss" in r] == list(range(1, 9))
    assert steps(tb, "val_loss") == [r["iter"] for r in jsonl if "val_loss" in r] == [4, 8]
    assert [v for _, v in tb["loss"]] == [10.0 - i for i in range(1, 9)]  # one point a step
    # time_s continues from the resumed record's (4.0) instead of restarting from 0
    assert [r["time_s"] for r in jsonl if "time_s" in r] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0,
                                                             7.0, 8.0]
    assert [v for _, v in tb["time_s"]] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    # booleans are 0/1 scalars; null and non-finite values are not scalars
    assert [v for _, v in tb["adapters_active"]] == [0.0] * 3 + [1.0] * 5
    assert "mfu" not in tb and "val_ppl" not in tb
    assert [r["val_ppl"] for r in jsonl if "val_ppl" in r] == [None, None]


def test_a_start_from_scratch_cuts_both_sinks_back_to_nothing(tmp_path):
    _write_run(tmp_path, 0, range(1, 4))  # a start that failed before its first checkpoint
    next_second()
    _write_run(tmp_path, 0, range(1, 3), time_s=10.0)
    tb, jsonl = tb_scalars(tmp_path), records(tmp_path)
    assert steps(tb, "loss") == [r["iter"] for r in jsonl] == [1, 2]
    assert [r["time_s"] for r in jsonl] == [11.0, 12.0]  # nothing to continue from


def test_write_leaves_the_callers_record_alone(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"iter": 2, "loss": 1.0, "time_s": 5.0}\n')
    w = MetricsWriter(tmp_path, True, 2)
    record = {"iter": 3, "loss": 0.5, "time_s": 1.0}
    w.write(record)
    w.close()
    assert record["time_s"] == 1.0 and records(tmp_path)[-1]["time_s"] == 6.0


# ---- a real run, killed and resumed -----------------------------------------------------

ITERS = 8  # checkpoints at 2, 4, 6, 8; eval at 4, 8
NAN = "nan:grad:iter=5"  # a skipped step (iteration 6) after the resume: its record too


def launch(argv, fault: str | None = None) -> int:
    """pretrain main(argv) in a forked single-rank child; its exit code (negative: signal)."""
    return launch_ranks(argv, 1, fault)[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(uninterrupted run, run killed in iteration 5 after the iteration-4 checkpoint and
    eval, then rerun with the same command) output directories."""
    root = tmp_path_factory.mktemp("metrics_runs")
    corpus = write_corpus(root / "corpus")

    def argv(out):
        return tiny_run_args(corpus, root / "cache", out, ITERS, 2)

    ref, out = root / "reference", root / "resumed"
    assert launch(argv(ref), NAN) == 0
    assert launch(argv(out), f"kill:after_backward:iter=4;{NAN}") == -signal.SIGKILL
    killed = records(out)
    assert [r["iter"] for r in killed if "val_loss" in r] == [4]  # iteration 4's points exist
    assert killed[-1]["iter"] == 4
    next_second()
    assert launch(argv(out), NAN) == 0
    return ref, out


@pytest.mark.slow
def test_tensorboard_after_kill_and_resume_equals_the_uninterrupted_run(runs):
    ref, out = runs
    tb_ref, tb_out, jsonl = tb_scalars(ref), tb_scalars(out), records(out)
    for tag in ("loss", "val_loss"):
        assert steps(tb_out, tag) == steps(tb_ref, tag), tag
        assert steps(tb_out, tag) == [r["iter"] for r in jsonl
                                      if isinstance(r.get(tag), (int, float))], tag
    assert 4 in steps(tb_out, "loss") and steps(tb_out, "val_loss") == [4, 8]
    assert steps(tb_out, "loss") == [1, 2, 3, 4, 5, 7, 8]  # the skipped step 6 is not on it
    assert {tag: steps(tb_out, tag) for tag in tb_out} == \
        {tag: steps(tb_ref, tag) for tag in tb_ref}  # every tag, every step, once
    wall_clock = {"time_s", "tokens_per_s", "mfu", "eval_s"}
    for tag in set(tb_ref) - wall_clock:  # CPU fp32 resumes bitwise: the same values too
        assert tb_out[tag] == tb_ref[tag], tag
    # every finite numeric field of metrics.jsonl is a scalar of the same name at step iter
    expected = sorted((k, r["iter"], float(v)) for r in jsonl for k, v in r.items()
                      if k != "iter" and isinstance(v, (int, float)))
    got = sorted((tag, s, v) for tag, points in tb_out.items() for s, v in points)
    assert [(k, s) for k, s, _ in got] == [(k, s) for k, s, _ in expected]
    assert [v for *_, v in got] == pytest.approx([v for *_, v in expected], rel=1e-6)


@pytest.mark.slow
def test_time_s_continues_across_the_resume(runs):
    _, out = runs
    times = [(r["iter"], r["time_s"]) for r in records(out) if "time_s" in r]
    assert [i for i, _ in times] == [1, 2, 3, 4, 5, 7, 8]  # 6 was skipped
    assert all(a < b for (_, a), (_, b) in itertools.pairwise(times)), times


@pytest.mark.slow
def test_docs_list_every_metrics_field_written(runs):
    ref, _ = runs
    fields = {k for r in records(ref) for k in r}
    assert {"skipped", "skipped_loss", "skipped_steps", "val_loss"} <= fields  # all kinds
    doc = (ROOT / "docs" / "CONFIG.md").read_text()
    section = doc[doc.index("## Outputs"):doc.index("## Config reference")]
    named = set(re.findall(r"[a-z_]+", " ".join(re.findall(r"`([^`]*)`", section))))
    assert fields <= named, sorted(fields - named)


def _grad_norms(root: Path, world: int, *layout: str) -> list:
    """grad_norm of every train record of a 4-iteration run on `world` forked ranks."""
    out = root / "_".join(layout).replace("=", "-")
    argv = tiny_run_args(root / "corpus", root / "cache", out, 4, 0, *layout)
    assert launch_ranks(argv, world) == [0] * world
    return [r["grad_norm"] for r in records(out) if "tokens_per_s" in r]


@pytest.mark.slow
@pytest.mark.parametrize("world,layout", [
    (1, ("optimizer.grad_clip=0.05",)),  # clipping on: the norm DeepSpeed's clipping computes
    (1, ("optimizer.grad_clip=0", "train.log_interval=2")),  # off: computed when logged
    (2, ("parallel.tensor=2", "optimizer.grad_clip=0")),  # replicated weights once, shards all
    (2, ("parallel.pipeline=2", "optimizer.grad_clip=0")),  # every stage, tied embedding once
    (2, ("optimizer.grad_clip=0.05",)),  # DP=2
], ids=["clip", "no-clip", "tp2", "pp2", "dp2"])
def test_grad_norm_without_zero_equals_zero_1s(tmp_path, world, layout):
    """ZeRO-0 in fp32 steps our client optimizer, for which DeepSpeed computes no norm: we
    compute it as DeepSpeed counts it, so it equals ZeRO-1's (the same training on the same
    seed) in every layout - before clipping, where clipping is on."""
    write_corpus(tmp_path / "corpus")
    zero0 = _grad_norms(tmp_path, world, "zero.stage=0", *layout)
    zero1 = _grad_norms(tmp_path, world, "zero.stage=1", *layout)
    assert len(zero0) == (2 if "train.log_interval=2" in layout else 4)
    assert all(isinstance(n, float) and n > 0 for n in zero0), zero0
    assert zero0 == pytest.approx(zero1, rel=1e-5), (zero0, zero1)
    if "optimizer.grad_clip=0.05" in layout:
        assert min(zero0) > 0.05  # every step clipped: the logged norm is the one before


def _stage0_norms_by_hand(clip: float) -> dict:
    """On one forked rank: a DeepSpeed ZeRO-0 engine (fp32, client AdamW) with grad_norm
    attached, and the norm of the same model's gradients computed by hand, step by step."""
    import copy

    import deepspeed
    import torch

    from slope_megatron.training.grad_norm import ClientGradNorm
    from slope_megatron.training.grad_norm import global_grad_norm
    from slope_megatron.training.step import guard_client_optimizer

    def engine_for(stage, model):
        config = {"train_batch_size": 1, "gradient_clipping": clip,
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        return deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    ref = copy.deepcopy(model)
    engine = engine_for(0, model)
    guard_client_optimizer(engine)
    tracker = ClientGradNorm.attach(engine)
    got, by_hand = [], []
    for wanted, bad in [(True, False), (False, False), (True, False), (True, True)]:
        x, y = torch.randn(1, 4), torch.randn(1, 2)
        if bad:
            x[0, 0] = float("nan")
        ref.load_state_dict(engine.module.state_dict())
        ref.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        by_hand.append(torch.linalg.vector_norm(
            torch.cat([p.grad.flatten() for p in ref.parameters()])).item())
        tracker.wanted = wanted
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()
        got.append(global_grad_norm(engine))
    one = engine_for(1, copy.deepcopy(ref))
    return {"got": got, "by_hand": by_hand, "skipped": not engine.was_step_applied(),
            "stage1_attached": ClientGradNorm.attach(one) is not None}


@pytest.mark.slow
@pytest.mark.parametrize("clip", [0.01, 0.0])
def test_grad_norm_without_zero_is_the_norm_of_the_gradients(clip):
    """The ZeRO-0 norm equals the gradients' L2 norm computed by hand, before clipping; with
    clipping off it is computed only on the steps asked for (the logged ones); a skipped
    step's is inf (logged as null), as DeepSpeed's optimizers report it."""
    from helpers.dist import run_distributed

    (r,) = run_distributed(_stage0_norms_by_hand, 1, clip)
    got, by_hand = r["got"], r["by_hand"]
    assert min(by_hand[:3]) > 0.01  # clipping, where on, changed every step
    expected = by_hand[:3] if clip else [by_hand[0], None, by_hand[2]]
    assert [g is None for g in got[:3]] == [e is None for e in expected], (got, by_hand)
    assert [g for g in got[:3] if g is not None] == \
        pytest.approx([e for e in expected if e is not None], rel=1e-5), (got, by_hand)
    assert r["skipped"] and got[3] == float("inf")
    assert not r["stage1_attached"]  # ZeRO 1-3 compute it themselves


def test_grad_norm_reads_a_device_tensor_or_nothing():
    import torch

    from slope_megatron.training.grad_norm import global_grad_norm

    class Engine:
        def __init__(self, norm):
            self.norm = norm

        def get_global_grad_norm(self):
            return self.norm
    assert global_grad_norm(Engine(torch.tensor(2.5, dtype=torch.float64))) == 2.5
    assert global_grad_norm(Engine(3)) == 3.0 and global_grad_norm(Engine(None)) is None
