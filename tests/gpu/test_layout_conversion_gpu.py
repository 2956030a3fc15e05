"""Layout conversion of bf16 checkpoints on one GPU, through every optimizer wrapper DeepSpeed
builds there: FP16_UnfusedOptimizer (ZeRO 0), BF16_Optimizer (ZeRO 1 with fp32 accumulation),
ZeRO 2 and ZeRO 3. A checkpoint converted, loaded into another ZeRO stage, saved there and
converted again changes no bit (helpers/layout_round_trip.py); a bf16 run resumed in another
stage continues with finite losses close to the uninterrupted run's.
(CPU fp32, every TP / PP / DP layout: tests/integration/test_layout_resume.py.)"""
import json
import os
import subprocess
import sys

import pytest

from helpers.corpus import write_corpus
from helpers.paths import ROOT


def _env():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}
    env.pop("SLOPE_FAULT", None)
    return env


def _argv(tmp_path, out, stage, iters=8):
    return ["--config", str(ROOT / "configs" / "demo.yaml"), "--set",
            f"data.path={tmp_path / 'corpus'}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.tokenizer_vocab_size=300", "data.val_fraction=0.1", "model.hidden_size=64",
            "model.num_heads=2", "model.num_layers=2", "model.seq_len=32", "model.vocab_size=320",
            f"train.iters={iters}", "train.micro_batch_size=2", "train.global_batch_size=8",
            "train.log_interval=1", "train.eval_interval=4", "train.eval_iters=1",
            "train.save_interval=4", "train.dtype=bf16", "sparsity.backend=reference",
            "sparsity.column_mask_refresh=3", "optimizer.warmup_iters=2",
            "adapters.fraction=0.5", f"zero.stage={stage}", f"train.output_dir={out}"]


def _pretrain(argv):
    # a fresh process: CUDA cannot be used in a child forked after the parent touched it
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), *argv],
                          env=_env(), text=True, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _losses(out):
    return {r["iter"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text()
                                              .splitlines()) if r.get("loss") is not None}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """bf16 runs of 8 iterations, checkpoints at 4 and 8, in ZeRO 0 and ZeRO 1."""
    root = tmp_path_factory.mktemp("bf16")
    write_corpus(root / "corpus")
    runs = {}
    for stage in (0, 1):
        runs[stage] = root / f"zero{stage}"
        _pretrain(_argv(root, runs[stage], stage))
    return root, runs


@pytest.mark.gpu
@pytest.mark.parametrize("source,target", [(0, 1), (0, 2), (0, 3), (1, 0), (1, 3)])
def test_a_bf16_checkpoint_round_trips_through_another_zero_stage_bitwise(sources, source,
                                                                         target):
    import shutil

    root, runs = sources
    ckpts = root / f"trip-{source}-{target}"
    shutil.copytree(runs[source] / "checkpoints", ckpts)
    code = ("import sys; from helpers.layout_round_trip import assert_same_snapshot, "
            "round_trip; got = round_trip(sys.argv[1:-2], sys.argv[-2], sys.argv[-1]); "
            "assert_same_snapshot(got['again'], got['first']); print('round trip ok')")
    done = subprocess.run([sys.executable, "-c", code, *_argv(root, root / "unused", target),
                           str(ckpts), str(root / f"saved-{source}-{target}")],
                          env=_env(), text=True, capture_output=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0 and "round trip ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.gpu
def test_a_bf16_run_resumed_in_another_zero_stage_goes_on_like_the_original(sources):
    import shutil

    root, runs = sources
    out = root / "resumed-0-in-3"
    shutil.copytree(runs[0], out)
    shutil.rmtree(out / "checkpoints" / "iter_00000008")
    (out / "checkpoints" / "latest").write_text("iter_00000004")
    said = _pretrain(_argv(root, out, 3))
    assert "resume: converted checkpoint iter_00000004 (tp=1 pp=1 ZeRO-0) to this run's " \
           "layout (tp=1 pp=1 ZeRO-3 dp=1)" in said
    want, got = _losses(runs[0]), _losses(out)
    for it in range(5, 9):  # bf16 sums in another order: close, not bitwise
        assert got[it] == pytest.approx(want[it], rel=2e-2), (it, got, want)
