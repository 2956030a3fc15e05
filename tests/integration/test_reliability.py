"""Reliability: kill -9 at named points and resume exactly; atomic, verified,
safely loaded checkpoints; NaN/Inf steps skipped; bad data stopped before work.

Runs are fork-started children of this process (torch/DeepSpeed already imported, so a
child starts in milliseconds) that call launch/pretrain.py's main(); a fault is injected
through SLOPE_FAULT (slope_megatron/training/faults.py). A killed child dies by SIGKILL -
no handler, no flush - and, as a cluster scheduler would, we then kill its peer ranks.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from helpers.corpus import tiny_run_args, write_corpus
from helpers.forked_runs import launch

from slope_megatron.io import write_text_atomic
from slope_megatron.training import checkpoint, faults

ITERS = 8  # saves at 2, 4, 6, 8; eval at 4, 8; adapters from iteration index 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def args(corpus, out, *extra):
    return tiny_run_args(corpus, corpus.parent / "cache", out, ITERS, 2,
                         "model.dropout=0.1",  # RNG state must resume exactly
                         "sparsity.column_mask_refresh=3",  # the refresh counter too
                         *extra)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def comparable(out) -> list[dict]:
    """metrics.jsonl without wall-clock fields."""
    drop = {"tokens_per_s", "time_s", "mfu", "eval_s"}
    return [{k: v for k, v in r.items() if k not in drop} for r in metrics(out)]


def final_weights(out) -> dict:
    from safetensors.torch import load_file

    state = load_file(out / "checkpoints" / checkpoint.tag_for(ITERS) / "slope_model" /
                      "model.safetensors")
    return {k: v.numpy().tobytes() for k, v in state.items()}  # bitwise comparable


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """Uninterrupted runs: one process (ZeRO-0) and two processes (DP=2, ZeRO-2)."""
    refs = {}
    for world, layout in ((1, ()), (2, ("zero.stage=2",))):
        out = tmp_path_factory.mktemp(f"reference{world}") / "run"
        assert launch(args(corpus, out, *layout), world) == [0] * world
        refs[world] = out
    return refs


# (fault, latest complete checkpoint the kill leaves). Run as one chain: each rerun resumes
# from what the previous kill left and is killed at the next point, so every resumed
# segment ends up in the final metrics, which must equal the uninterrupted run's.
KILL_CHAIN = [
    ("kill:after_backward:iter=2", 2),         # during a step (mid gradient accumulation)
    ("kill:eval:iter=3", 2),                   # during evaluation
    ("kill:save_after_engine:iter=4", 2),      # during a checkpoint write
    ("kill:save_after_latest:iter=4", 4),      # `latest` moved, old checkpoints not pruned
    # checkpoint + manifest written, `latest` not moved: the sealed iter 6 is complete, so the
    # next run resumes from it (and points `latest` at it) instead of redoing it
    ("kill:save_before_latest:iter=6", 4),
    ("kill:before_adapter_switch:iter=6", 6),  # right before the adapter switch
    ("kill:after_adapter_switch:iter=6", 6),   # right after it, before its first step
    ("kill:after_step:iter=6", 6),             # first step with adapters taken
    ("kill:save_after_engine:iter=8", 6),      # during the final save
]


@pytest.mark.slow
def test_kill_at_every_point_and_rerun_continues_bitwise(corpus, reference, tmp_path):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    for fault, survivor in KILL_CHAIN:
        assert launch(args(corpus, out), 1, fault) == [-signal.SIGKILL], fault
        assert checkpoint.latest_tag(ckpts) == checkpoint.tag_for(survivor), fault
        assert checkpoint.verify(ckpts / checkpoint.tag_for(survivor), None) == [], fault
    assert launch(args(corpus, out), 1) == [0]  # the same command, no fault
    ref = reference[1]
    assert comparable(out) == comparable(ref)  # losses, val losses, lr, adapters: bitwise
    assert final_weights(out) == final_weights(ref)
    assert sorted(p.name for p in ckpts.iterdir()) == \
        sorted(p.name for p in (ref / "checkpoints").iterdir())  # pruned to keep=2


@pytest.mark.slow
def test_two_ranks_killed_mid_step_rerun_continues_bitwise(corpus, reference, tmp_path):
    out = tmp_path / "run"
    argv = args(corpus, out, "zero.stage=2")  # DP=2: ZeRO-partitioned optimizer files
    assert -signal.SIGKILL in launch(argv, 2, "kill:after_backward:iter=4,rank=1")
    assert checkpoint.latest_tag(out / "checkpoints") == checkpoint.tag_for(4)
    assert launch(argv, 2) == [0, 0]
    assert comparable(out) == comparable(reference[2])
    assert final_weights(out) == final_weights(reference[2])


def _copy_run(ref, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    return out


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(corpus, reference,
                                                                    tmp_path, capfd):
    out = _copy_run(reference[1], tmp_path)
    victim = out / "checkpoints" / checkpoint.tag_for(ITERS) / "mp_rank_00_model_states.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # a half-written file
    capfd.readouterr()
    assert launch(args(corpus, out)) == [0]
    err = capfd.readouterr().err
    assert "mp_rank_00_model_states.pt has" in err and "resuming from the previous" in err
    assert checkpoint.latest_tag(out / "checkpoints") == checkpoint.tag_for(ITERS)
    assert comparable(out) == comparable(reference[1])
    assert final_weights(out) == final_weights(reference[1])


@pytest.mark.slow
def test_no_usable_checkpoint_stops_with_the_damaged_files_named(corpus, reference, tmp_path,
                                                                 capfd):
    out = _copy_run(reference[1], tmp_path)
    for tag in (6, 8):
        f = out / "checkpoints" / checkpoint.tag_for(tag) / "rng_rank0.pt"
        f.write_bytes(b"\0" + f.read_bytes()[1:])  # same size, different bytes
    capfd.readouterr()
    assert launch(args(corpus, out)) == [2]
    err = capfd.readouterr().err
    assert "error: no usable checkpoint" in err and "iter_00000008/rng_rank0.pt" in err
    assert "sha256" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("change,key", [("model.num_layers=3", "model.num_layers"),
                                        ("sparsity.n=1", "sparsity.n"),
                                        ("train.seed=7", "train.seed")])
def test_checkpoint_of_another_shape_sparsity_or_seed_is_refused(corpus, reference, tmp_path,
                                                                 capfd, change, key):
    out = _copy_run(reference[1], tmp_path)
    (out / "run_config.yaml").unlink()  # bypass the run_config check: the checkpoint itself
    capfd.readouterr()                   # must say what differs
    assert launch(args(corpus, out, "train.iters=10", change)) == [2]
    err = capfd.readouterr().err
    assert "belongs to a different run" in err and key in err and "Traceback" not in err


@pytest.mark.slow
def test_zero_checkpoint_of_another_data_parallel_size_is_converted(corpus, reference,
                                                                    tmp_path, capfd):
    """A layout change is no other run: the checkpoint is converted and the run goes on
    (that it goes on exactly: tests/integration/test_layout_resume.py)."""
    out = _copy_run(reference[2], tmp_path)  # DP=2, ZeRO-2: optimizer state in 2 partitions
    capfd.readouterr()
    assert launch(args(corpus, out, "zero.stage=2", "train.iters=10"), 1) == [0]
    cap = capfd.readouterr()
    assert "resume: converted checkpoint iter_00000008 (tp=1 pp=1 ZeRO-2 dp=2) to this run's " \
           "layout (tp=1 pp=1 ZeRO-2 dp=1)" in cap.out
    assert "Traceback" not in cap.err


def test_pickled_code_in_a_checkpoint_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "evil": Evil()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="not plain"):
        checkpoint.safe_torch_load(path)
    assert not marker.exists()


def test_prune_keeps_the_newest_complete_checkpoint(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for i in (2, 4, 6, 8):
        (ckpts / checkpoint.tag_for(i)).mkdir(parents=True)
    write_text_atomic(ckpts / "latest", checkpoint.tag_for(6))  # 8: incomplete
    checkpoint.prune(ckpts, keep=1)
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_00000006", "iter_00000008"]
    checkpoint.prune(ckpts, keep=2)
    assert checkpoint.latest_tag(ckpts) == "iter_00000006"


# ---- numerical faults -------------------------------------------------------------------

@pytest.mark.slow
def test_a_nan_loss_or_gradient_skips_the_step_and_is_counted(corpus, reference, tmp_path):
    out = tmp_path / "run"
    assert launch(args(corpus, out), 1, "nan:loss:iter=2;inf:loss:iter=4;nan:grad:iter=5") == [0]
    records = metrics(out)
    skipped = [r for r in records if r.get("skipped")]
    assert [(r["iter"], r["reason"]) for r in skipped] == [
        (3, "non-finite loss"), (5, "non-finite loss"), (6, "non-finite gradient")]
    train = [r for r in records if "loss" in r and not r.get("skipped")]
    assert [r["iter"] for r in train] == [1, 2, 4, 7, 8]
    assert train[-1]["skipped_steps"] == 3
    ref = [r for r in metrics(reference[1]) if "loss" in r]
    assert [r["loss"] for r in train[:2]] == [r["loss"] for r in ref[:2]]
    # skipped steps do not advance the schedule: iteration 4 runs with iteration 3's lr
    assert train[2]["lr"] == ref[2]["lr"]


@pytest.mark.slow
def test_too_many_consecutive_skips_stop_the_run_with_a_message(corpus, tmp_path, capfd):
    out = tmp_path / "run"
    capfd.readouterr()
    assert launch(args(corpus, out, "train.max_skipped_steps=3"), 1, "nan:loss:iter=3-7") == [2]
    err = capfd.readouterr().err
    assert "error: stopping at iteration 6: 3 consecutive optimizer steps were skipped" in err
    assert "Traceback" not in err
    assert [r["iter"] for r in metrics(out) if r.get("skipped")] == [4, 5, 6]
    # the save at iteration 4 (after one skip) holds the intact model; 6 was never saved
    assert checkpoint.latest_tag(out / "checkpoints") == checkpoint.tag_for(4)


@pytest.mark.slow
def test_pipeline_engine_skips_a_nan_step_too(corpus, tmp_path):
    """PP=2 (the step runs inside DeepSpeed's train_batch): the NaN loss on the last stage
    gives NaN gradients on both stages, DeepSpeed's ZeRO-1 check discards the step."""
    out = tmp_path / "run"
    argv = args(corpus, out, "parallel.pipeline=2", "zero.stage=1", "train.iters=4")
    assert launch(argv, 2, "nan:loss:iter=2") == [0, 0]
    records = metrics(out)
    assert [(r["iter"], r["reason"]) for r in records if r.get("skipped")] == \
        [(3, "non-finite loss")]
    assert [r["iter"] for r in records if "loss" in r and not r.get("skipped")] == [1, 2, 4]


def _tensors(obj) -> list:
    """Every tensor (and number, as a tensor) in a nested state dict, in a fixed order."""
    if torch.is_tensor(obj):
        return [obj.detach().clone()]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [torch.tensor(obj)]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _skip_worker(stage: int, bad_rank: int):
    """One engine per ZeRO stage: a NaN loss on one rank leaves everything bit-identical."""
    from slope_megatron.config import config_from_dict
    from slope_megatron.distributed import init_distributed
    from slope_megatron.training.engine import build_engine
    from slope_megatron.training.step import (
        guard_client_optimizer,
        guarded_train_step,
    )

    info = init_distributed()
    cfg = config_from_dict({"model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                      "seq_len": 16, "vocab_size": 64},
                            "sparsity": {"backend": "reference"},
                            "train": {"micro_batch_size": 2, "global_batch_size": 8,
                                      "dtype": "fp32"},
                            "zero": {"stage": stage}})
    torch.manual_seed(0)
    _, engine, optimizer = build_engine(cfg, None, info.world_size)
    guard_client_optimizer(engine)
    gen = torch.Generator().manual_seed(info.rank)
    batches = [(torch.randint(0, 64, (2, 16), generator=gen),) * 2 for _ in range(2)]

    def snapshot():
        import deepspeed
        params = list(engine.module.parameters())
        ctx = deepspeed.zero.GatheredParameters(params) if stage == 3 else \
            __import__("contextlib").nullcontext()
        with ctx:
            p = [t.detach().clone() for t in params]
        return p + _tensors(optimizer.state_dict())

    guarded_train_step(engine, batches, 0)  # a normal step first: Adam state exists
    assert engine.was_step_applied()
    before = snapshot()
    os.environ[faults.ENV] = f"nan:loss:iter=1,rank={bad_rank}"
    _, bad = guarded_train_step(engine, batches, 1)
    del os.environ[faults.ENV]
    assert bad and not engine.was_step_applied()
    after = snapshot()
    assert len(before) == len(after) > len(list(engine.module.parameters()))
    for a, b in zip(before, after):  # parameters, Adam moments and step counts
        assert torch.equal(a, b)
    guarded_train_step(engine, batches, 2)  # and training goes on
    assert engine.was_step_applied()
    return all(torch.isfinite(p).all() for p in engine.module.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_skipped_step_updates_nothing_under_every_zero_stage(stage):
    from helpers.dist import run_distributed

    assert run_distributed(_skip_worker, 2, stage, 1) == [True, True]


# ---- data faults ------------------------------------------------------------------------

def _shard(corpus) -> Path:
    return next((corpus.parent / "cache").glob("*/train.bin"))


def _shards(corpus) -> list[Path]:
    """Every cached train.bin of the corpus: runs with other data settings (another test's)
    leave caches of their own beside the one `args` uses, in no fixed order."""
    return sorted((corpus.parent / "cache").glob("*/train.bin"))


@pytest.mark.slow
def test_data_faults_are_caught_before_work(corpus, reference, tmp_path, capfd):
    import numpy as np

    saved = {shard: shard.read_bytes() for shard in _shards(corpus)}
    try:
        for shard, data in saved.items():  # whichever cache the run uses is damaged
            arr = np.frombuffer(data, dtype=np.uint16).copy()
            arr[5] = 65000  # an id outside the 300-token vocabulary, same file size
            shard.write_bytes(arr.tobytes())
        capfd.readouterr()
        # the cache's sha256 check catches it and rebuilds the shard from the corpus
        assert launch(args(corpus, tmp_path / "oov", "train.iters=2")) == [0]
        cap = capfd.readouterr()
        assert "train.bin does not match its recorded sha256" in cap.out + cap.err
        assert "Traceback" not in cap.err
        for shard in saved:
            shard.unlink()
        assert launch(args(corpus, tmp_path / "missing", "train.iters=2")) == [0]
        cap = capfd.readouterr()
        assert "train.bin' is missing" in cap.out + cap.err and "Traceback" not in cap.err
    finally:
        for shard, data in saved.items():
            shard.write_bytes(data)
    assert launch(args(corpus, tmp_path / "small", "train.global_batch_size=4096",
                       "train.micro_batch_size=8")) == [2]
    err = capfd.readouterr().err
    assert "fewer than one global batch" in err and "Traceback" not in err
    assert not (tmp_path / "small").exists()  # refused before anything was written


def test_a_shard_with_out_of_vocab_ids_is_refused_when_not_rehashed(corpus, reference, tmp_path):
    """Big caches are verified by size only: the id scan still stops a corrupt shard."""
    import numpy as np

    from slope_megatron.data import DataError, TokenDataset

    src = _shard(corpus).parent
    copy = tmp_path / src.name
    shutil.copytree(src, copy)
    shard = copy / "train.bin"
    arr = np.fromfile(shard, dtype=np.uint16)
    arr[5] = 65000
    arr.tofile(shard)
    with pytest.raises(DataError, match="contains id 65000 >= vocab_size 300"):
        TokenDataset(copy, "train", 32)
