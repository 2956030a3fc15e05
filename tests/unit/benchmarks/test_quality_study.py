"""`python -m benchmarks.quality_study` (the four arms of the quality study) and
`python -m benchmarks.plot_results`, on CPU."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.corpus import write_corpus
from helpers.launch import load_benchmark
from helpers.paths import ROOT

study_mod = load_benchmark("quality_study")


def test_all_arms_start_from_the_same_base_weights():
    """One seed, one initial model: the arms differ in training only (adapters are drawn
    without touching the global RNG; sparse kept values are the dense weights at the mask)."""
    from slope_megatron.config import load_config
    from slope_megatron.model import GPTModel

    models = {}
    for arm, overrides in study_mod.ARMS.items():
        torch.manual_seed(0)
        cfg = load_config(ROOT / "configs" / "quality-gpt2-small.yaml",
                          ["model.vocab_size=96", "model.hidden_size=32", "model.num_heads=2",
                           "model.num_layers=2", "model.seq_len=16", *overrides])
        models[arm] = GPTModel.from_config(cfg)
    dense = dict(models["dense"].named_modules())
    for arm in ("static-2to4", "slope", "slope-adapters"):
        for name, mod in models[arm].named_modules():
            if hasattr(mod, "mask"):  # a SlopeLinear: its values are the dense init at M
                want = dense[name].weight.detach()[mod.mask].view_as(mod.weight)
                assert torch.equal(mod.weight.detach(), want), (arm, name)
                assert mod.double_prune == (arm != "static-2to4")
                assert (mod.adapter_a is not None) == (arm == "slope-adapters")
            elif isinstance(getattr(mod, "weight", None), torch.Tensor):
                assert torch.equal(mod.weight, dense[name].weight), (arm, name)


def test_summary_gaps_and_ratio():
    def arm(loss):
        return {"final_val_loss": loss, "final_val_ppl": 2.0 ** loss}
    s = study_mod.summarize({"dense": arm(3.0), "static-2to4": arm(3.5), "slope": arm(3.4),
                             "slope-adapters": arm(3.2)})
    assert s["gap_to_dense"] == pytest.approx({"dense": 0.0, "static-2to4": 0.5, "slope": 0.4,
                                               "slope-adapters": 0.2})
    assert s["gap_ratio"] == pytest.approx(0.4) and s["goal_met"] is True
    assert s["ppl_gap_ratio"] == pytest.approx((2 ** 3.2 - 8) / (2 ** 3.5 - 8))
    worse = study_mod.summarize({"dense": arm(3.0), "static-2to4": arm(2.9),
                                 "slope-adapters": arm(3.1)})
    assert worse["gap_ratio"] is None and worse["goal_met"] is None  # no gap to recover
    assert study_mod.summarize({"slope": arm(3.0)})["gap_to_dense"] == {}


def _study(tmp_path, *args):
    cmd = [sys.executable, "-m", "benchmarks.quality_study", "--config",
           str(ROOT / "configs" / "demo.yaml"), "--out", str(tmp_path / "runs"),
           "--json", str(tmp_path / "study.json"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_four_arms_in_two_invocations(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    common = ["--set", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
              "data.tokenizer_vocab_size=300", "data.val_fraction=0.1", "model.hidden_size=32",
              "model.num_layers=1", "model.num_heads=2", "model.seq_len=32",
              "train.iters=100", "train.micro_batch_size=4", "train.global_batch_size=4",
              "train.log_interval=25", "train.eval_interval=50", "train.eval_iters=2",
              "train.save_interval=1000", "optimizer.warmup_iters=5"]
    first = _study(tmp_path, "--arms", "dense", "static-2to4", *common)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "gap ratio not available (missing arms: slope-adapters)" in first.stdout
    # the same arm again is refused (its run directory exists), before anything runs
    again = _study(tmp_path, "--arms", "static-2to4", *common)
    assert again.returncode != 0 and "exist" in again.stderr
    # another study's settings cannot be merged into this JSON
    other = _study(tmp_path, "--arms", "slope", *common, "train.seed=7")
    assert other.returncode != 0 and "different study" in other.stderr
    second = _study(tmp_path, "--arms", "slope", "slope-adapters", *common)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]

    study = json.loads((tmp_path / "study.json").read_text())
    arms = study["arms"]
    assert list(arms) == ["dense", "static-2to4", "slope", "slope-adapters"]
    for name, r in arms.items():
        assert [p["iter"] for p in r["curve"]] == [50, 100], name
        assert r["final_val_loss"] == r["curve"][-1]["val_loss"] and r["tokens_per_s"] > 0
        assert r["environment"]["torch"] == torch.__version__ and r["environment"]["date"]
        assert "launch/pretrain.py" in r["command"] and f"runs/{name}" in r["command"]
    assert "sparsity.double_prune=false" in arms["static-2to4"]["command"]
    assert [inv["arms"] for inv in study["invocations"]] == [["dense", "static-2to4"],
                                                             ["slope", "slope-adapters"]]
    assert all(" -m benchmarks.quality_study --config " in inv["command"]
               for inv in study["invocations"])
    # same init and data: slope-adapters is slope until the adapters switch on at iter 99
    # (up to float rounding: the inactive adapters change the optimizer's parameter groups)
    at50 = {a: arms[a]["curve"][0]["val_loss"] for a in arms}
    assert at50["slope-adapters"] == pytest.approx(at50["slope"], rel=1e-6)
    assert arms["slope-adapters"]["final_val_loss"] != arms["slope"]["final_val_loss"]
    assert abs(at50["static-2to4"] - at50["slope"]) > 1e-4
    s = study["summary"]
    gap = {a: arms[a]["final_val_loss"] - arms["dense"]["final_val_loss"] for a in arms}
    assert s["gap_to_dense"] == pytest.approx(gap)
    want = gap["slope-adapters"] / gap["static-2to4"] if gap["static-2to4"] > 0 else None
    assert s["gap_ratio"] == pytest.approx(want)
    assert "gap(slope-adapters) / gap(static-2to4)" in second.stdout or want is None
    assert "validation loss by iteration" in second.stdout


QUALITY = {"config": "configs/quality-gpt2-small.yaml",
           "summary": {"gap_ratio": 0.5, "goal_ratio": 0.6},
           "arms": {a: {"curve": [{"iter": i, "val_loss": 5.0 - i / 100 + k / 10, "val_ppl": 1.0}
                                  for i in (50, 100, 150)]}
                    for k, a in enumerate(["dense", "static-2to4", "slope", "slope-adapters"])}}
BENCH = {"environment": {"gpu": None}, "config": "configs/gpt2-small.yaml",
         "results": [{"arm": "dense", "vs_dense": 1.0, "max_mem_gb": None},
                     {"arm": "slope", "vs_dense": 0.9, "max_mem_gb": None}]}


@pytest.mark.parametrize("data", [QUALITY, BENCH], ids=["quality", "bench-train"])
def test_plot_writes_a_small_png(tmp_path, data):
    pytest.importorskip("matplotlib")
    plot = load_benchmark("plot_results")
    src = tmp_path / "study.json"
    src.write_text(json.dumps(data))
    assert plot.main([str(src)]) == 0
    png = tmp_path / "study.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 300_000


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch, capsys):
    plot = load_benchmark("plot_results")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    src = tmp_path / "study.json"
    src.write_text(json.dumps(QUALITY))
    assert plot.main([str(src)]) == 2
    assert "pip install -e .[plots]" in capsys.readouterr().err
    src.write_text("{}")
    assert plot.main([str(src)]) == 2
    assert "neither a quality-study JSON" in capsys.readouterr().err


def test_scaling_plot_from_several_bench_jsons(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot = load_benchmark("plot_results")
    files = []
    for h, speed in ((768, 0.8), (2048, 1.1)):
        report = dict(BENCH, config=str(ROOT / "configs" / "gpt2-small.yaml"),
                      overrides=[f"model.hidden_size={h}", "model.num_heads=4", "zero.stage=1"],
                      results=[{"arm": "dense", "vs_dense": 1.0, "resident_mem_gb": 2.0,
                                "mfu": 0.4},
                               {"arm": "slope", "vs_dense": speed, "resident_mem_gb": 1.4}])
        files.append(tmp_path / f"h{h}.json")
        files[-1].write_text(json.dumps(report))
    assert plot.model_label(json.loads(files[1].read_text()))[1] == "h2048 L12"
    out = tmp_path / "scaling.png"
    assert plot.main([*map(str, files), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert plot.main([*map(str, files), "--out", str(out), "--arm", "slope-adapters"]) == 2
    assert "lacks the dense or the 'slope-adapters' arm" in capsys.readouterr().err


def test_memory_by_size_plot_draws_an_arm_that_did_not_fit(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot = load_benchmark("plot_results")
    oom = ("error: out of GPU memory: CUDA out of memory. Tried to allocate 17.26 GiB. GPU 0 "
           "has a total capacity of 79.18 GiB of which 16.72 GiB is free. To fit: ...")
    files = []
    for layers, dense in ((12, {"arm": "dense", "max_mem_gb": 9.0, "resident_mem_gb": 2.0}),
                          (40, {"arm": "dense", "out_of_memory": True, "error": oom})):
        report = dict(BENCH, config=str(ROOT / "configs" / "gpt2-small.yaml"),
                      overrides=[f"model.num_layers={layers}", "train.micro_batch_size=8",
                                 "train.activation_checkpointing=true"],
                      results=[dense, {"arm": "slope", "max_mem_gb": 7.0,
                                       "resident_mem_gb": 1.5}])
        files.append(tmp_path / f"l{layers}.json")
        files[-1].write_text(json.dumps(report))
    assert plot._capacity_gib(json.loads(files[1].read_text())["results"]) == 79.18
    assert plot._capacity_gib(json.loads(files[0].read_text())["results"]) is None
    out = tmp_path / "memory.png"
    assert plot.main([*map(str, files), "--memory", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size < 300_000
    # the speed plot has no ratio at the size where dense did not fit: it leaves it out
    assert plot.main([*map(str, files), "--out", str(tmp_path / "speed.png")]) == 0
    capsys.readouterr()
    assert plot.main([str(files[1]), str(files[1]), "--out", str(tmp_path / "none.png")]) == 2
    assert "no model size with both arms measured" in capsys.readouterr().err


def test_the_diagnostic_adapter_arm_runs_only_when_asked_for():
    assert study_mod.parse_args([]).arms == ["dense", "static-2to4", "slope", "slope-adapters"]
    extra = study_mod.ARMS["slope-adapters-10pct"]
    base = study_mod.ARMS["slope-adapters"]
    assert set(extra) - set(base) == {"adapters.fraction=0.1"}
    assert set(base) - set(extra) == {"adapters.fraction=0.01"}
    assert study_mod.parse_args(["--arms", "slope-adapters-10pct"]).arms == ["slope-adapters-10pct"]


@pytest.mark.parametrize("key", ["arm_overrides", "data_order"])
def test_a_study_recorded_before_a_setting_was_is_not_continued(tmp_path, key):
    """A study JSON from before the arms' settings (e.g. adapter ranks of each layer's input
    width) or the sample order's version were recorded is another study: its arms were
    trained otherwise and are not merged with new ones."""
    args = type("Args", (), {"config": str(ROOT / "configs" / "demo.yaml"), "set": []})()
    ident = study_mod.study_identity(args)
    old = {k: v for k, v in ident.items() if k != key}
    path = tmp_path / "study.json"
    path.write_text(json.dumps({**old, "arms": {"dense": {}}}))
    with pytest.raises(study_mod.StudyError, match=key):
        study_mod.load_study(path, ident, ["slope-adapters"])
    path.write_text(json.dumps({**ident, "arms": {"dense": {}}}))
    assert "dense" in study_mod.load_study(path, ident, ["slope-adapters"])["arms"]
