"""launch/pretrain.py end to end on 2 CPU processes: outputs, adapters, resume, bad input."""
import json
import shutil

import pytest
import torch

from helpers.corpus import tiny_run_args, write_corpus
from helpers.dist import run_distributed
from helpers.launch import pretrain_main

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def args(corpus, out, *extra):
    return tiny_run_args(corpus, out.parent / "cache", out, 8, 4, *extra)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("world,layout", [
    (2, ["zero.stage=2"]),                                        # DP=2
    (4, ["parallel.tensor=2", "parallel.pipeline=2", "zero.stage=1"]),  # TP2 x PP2
])
def test_run_writes_everything_and_resumes_exactly(corpus, tmp_path, world, layout):
    out = tmp_path / "run"
    run = lambda: run_distributed(pretrain_main, world, args(corpus, out, *layout))  # noqa: E731
    assert run() == [0] * world
    records = metrics(out)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in train] == list(range(1, 9))
    assert {"iter", "loss", "lr", "tokens", "tokens_per_s", "adapters_active", "time_s"} <= \
        train[0].keys()
    assert [r["adapters_active"] for r in train] == [False] * 6 + [True] * 2  # iters 7, 8
    assert [r["iter"] for r in evals] == [4, 8] and evals[-1]["val_ppl"] > 1
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "iter_00000008"
    assert (ckpts / "iter_00000008" / "slope_model" / "model.safetensors").is_file()
    if "parallel.pipeline=2" in layout:  # the artifact's learned positions are stage 0's
        from safetensors.torch import load_file
        art = load_file(ckpts / "iter_00000008" / "slope_model" / "model.safetensors")
        stage0 = torch.load(ckpts / "iter_00000008" / "layer_00-model_00-model_states.pt",
                            weights_only=True, map_location="cpu")
        assert torch.equal(art["embedding.positions.weight"], stage0["positions.weight"])
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_00000004", "iter_00000008"]

    # a crash right after iteration 4's checkpoint: the rerun must reproduce iters 5-8
    shutil.rmtree(ckpts / "iter_00000008")
    (ckpts / "latest").write_text("iter_00000004")
    assert run() == [0] * world
    resumed = [r for r in metrics(out) if "loss" in r]
    assert [r["iter"] for r in resumed] == list(range(1, 9))
    for a, b in zip(train, resumed):
        assert a["loss"] == b["loss"], (a, b)  # fp32 on CPU: bitwise
        assert a["adapters_active"] == b["adapters_active"]

    # rerunning a finished run does nothing and changes nothing
    before = (out / "metrics.jsonl").read_text()
    assert run() == [0] * world
    assert (out / "metrics.jsonl").read_text() == before


def test_bad_inputs_stop_before_work_with_one_message(corpus, tmp_path, capfd):
    out = tmp_path / "bad"
    assert run_distributed(pretrain_main, 1, args(corpus, out, "model.hiden_size=3")) == [2]
    err = capfd.readouterr().err
    assert "error: unknown config key 'model.hiden_size'" in err and "Traceback" not in err
    assert run_distributed(pretrain_main, 1, args(tmp_path / "missing", out)) == [2]
    err = capfd.readouterr().err
    assert "error:" in err and "missing" in err and "Traceback" not in err
    assert not out.exists()  # nothing written by a failing run


@pytest.mark.slow
@pytest.mark.parametrize("world,change,key", [(1, "model.num_layers=3", "model.num_layers"),
                                              (2, "sparsity.n=1", "sparsity.n")])
def test_a_different_model_or_sparsity_in_the_same_output_dir_is_refused(
        corpus, tmp_path, capfd, world, change, key):
    out = tmp_path / "run"
    assert run_distributed(pretrain_main, 1, args(corpus, out, "train.iters=2")) == [0]
    before = sorted(p.name for p in out.rglob("*"))
    capfd.readouterr()
    assert run_distributed(pretrain_main, world, args(corpus, out, "train.iters=2",
                                                        change)) == [2] * world
    err = capfd.readouterr().err
    assert "holds a different run" in err and key in err
    assert sorted(p.name for p in out.rglob("*")) == before


@pytest.mark.slow
def test_compiled_regions_train_like_eager(corpus, tmp_path, monkeypatch, capfd):
    """train.compile=true through the real DeepSpeed engine (aot_eager on CPU: the same graphs
    without code generation) trains, checkpoints and matches the eager run's losses."""
    monkeypatch.setenv("SLOPE_COMPILE_BACKEND", "aot_eager")
    losses = {}
    for mode in ("false", "true"):
        out = tmp_path / f"compile_{mode}"
        assert run_distributed(pretrain_main, 1, args(corpus, out, "train.iters=4",
                                                        f"train.compile={mode}")) == [0]
        losses[mode] = [r["loss"] for r in metrics(out) if "loss" in r]
        assert (out / "checkpoints" / "latest").read_text() == "iter_00000004"
        said = "torch.compile on" in capfd.readouterr().out
        assert said == (mode == "true")
    assert len(losses["true"]) == 4
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
