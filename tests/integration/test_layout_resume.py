"""A checkpoint resumes in any layout: TP / PP / DP size, ZeRO stage and micro-batch size may
change between a run's allocations, and the run goes on as if uninterrupted.

Six layouts (one process, DP2 ZeRO-1, DP2 ZeRO-3, TP2, PP2, TP2 x PP2): a 16-iteration run
in layout A saves at iteration 8 (adapters on since 6); its checkpoint there is resumed in
layout B for iterations 9-16, whose train and val losses and final TP = 1 weights must equal
the uninterrupted A run's within 1e-5 relative (helpers/layout_runs.py). CI runs a cycle
through the six (each layout once as source, once as target), two reversed pairs and a
micro-batch change; the full 30-pair matrix is `-m matrix`.
"""
from __future__ import annotations

import hashlib
import itertools
import json

import pytest
from helpers.layout_runs import (HALF, LAYOUTS, References, final_state, halfway_copy,
                                 losses, model_relative, resume_and_compare, run,
                                 worst_relative)

from slope_megatron.training import checkpoint
from slope_megatron.training.checkpoint.universal import UNIVERSAL

NAMES = list(LAYOUTS)
CYCLE = list(zip(NAMES, NAMES[1:] + NAMES[:1]))  # 1 -> dp2-zero1 -> ... -> tp2-pp2 -> 1
REVERSED = [("dp2-zero1", "1"), ("tp2-pp2", "tp2")]
MATRIX = [pair for pair in itertools.permutations(NAMES, 2)]


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    return References(tmp_path_factory.mktemp("layouts"))


@pytest.mark.slow
@pytest.mark.parametrize("source,target", CYCLE + REVERSED, ids=lambda x: x)
def test_a_checkpoint_resumes_in_another_layout_like_the_uninterrupted_run(refs, source,
                                                                            target):
    resume_and_compare(refs, source, target)


@pytest.mark.slow
def test_a_micro_batch_change_with_a_layout_change_resumes_alike(refs):
    """Global batch 8: 4 micro-batches of 2 per step in one process become 1 of 4 on each
    of two ZeRO-1 ranks (and with no layout change, 8 of 1: DeepSpeed's own load)."""
    resume_and_compare(refs, "1", "dp2-zero1", "train.micro_batch_size=4")
    resume_and_compare(refs, "1", "1", "train.micro_batch_size=1")


def _hashes(tag_dir):
    return {str(p.relative_to(tag_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tag_dir.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_kill_during_the_conversion_leaves_the_checkpoint_whole_and_the_rerun_converts(
        refs, capfd):
    ref = refs("dp2-zero1")
    out = halfway_copy(ref, refs.root / "killed-conversion")
    tag_dir = out / "checkpoints" / checkpoint.tag_for(HALF)
    before = _hashes(tag_dir)
    assert run(refs.root, out, "tp2", fault=f"kill:convert_write:iter={HALF}")[0] < 0
    assert _hashes(tag_dir) == before  # the original is only read
    universal = out / "checkpoints" / UNIVERSAL
    assert not (universal / tag_dir.name).exists()  # no snapshot, only a staging leftover
    assert [p.name.startswith(".tmp-") for p in universal.iterdir()] == [True]
    capfd.readouterr()
    assert run(refs.root, out, "tp2") == [0, 0]
    said = capfd.readouterr().out
    assert f"resume: converted checkpoint {tag_dir.name} (tp=1 pp=1 ZeRO-1 dp=2) to this " \
           f"run's layout (tp=2 pp=1 ZeRO-0)" in said
    assert _hashes(tag_dir) == before
    want = {k: v for k, v in losses(ref).items() if abs(k) > HALF}
    got = {k: v for k, v in losses(out).items() if abs(k) > HALF}
    assert worst_relative(got, want)[0] <= 1e-5
    assert model_relative(final_state(out), final_state(ref)) <= 1e-5
    # the new layout saved its own checkpoint: its rerun loads DeepSpeed's files directly
    latest = (out / "checkpoints" / checkpoint.LATEST).read_text()
    manifest = json.loads((out / "checkpoints" / latest / checkpoint.MANIFEST).read_text())
    assert manifest["identity"]["parallel.tensor"] == 2


@pytest.mark.matrix
@pytest.mark.parametrize("source,target", MATRIX, ids=lambda x: x)
def test_every_layout_pair_resumes_like_the_uninterrupted_run(refs, source, target):
    loss, weights = resume_and_compare(refs, source, target)
    print(f"{source} -> {target}: losses within {loss:.2e}, final weights {weights:.2e} "
          f"(relative)")


@pytest.mark.slow
def test_the_convert_command_writes_the_snapshot_a_resume_then_uses(refs, capfd):
    from slope_megatron.commands.convert_checkpoint import main
    from slope_megatron.training.checkpoint.universal import ModelFacts, usable_snapshot
    from slope_megatron.training.layout_resume import ensure_snapshot

    ref = refs("dp2-zero3")
    out = halfway_copy(ref, refs.root / "converted-first")
    ckpts, tag = out / "checkpoints", checkpoint.tag_for(HALF)
    capfd.readouterr()
    assert main(["--checkpoint", str(out)]) == 0
    snap = ckpts / UNIVERSAL / tag
    assert f"wrote {snap} (checkpoint {tag}, written in tp=1 pp=1 ZeRO-3 dp=2)" \
        in capfd.readouterr().out
    assert main(["--checkpoint", str(ckpts / tag)]) == 0
    assert f"up to date: {snap}" in capfd.readouterr().out
    assert run(refs.root, out, "pp2") == [0, 0]
    assert f"resume: loaded the converted copy of checkpoint {tag} (tp=1 pp=1 ZeRO-3 dp=2) " \
           f"to this run's layout (tp=1 pp=2 ZeRO-0)" in capfd.readouterr().out
    want = {k: v for k, v in losses(ref).items() if abs(k) > HALF}
    got = {k: v for k, v in losses(out).items() if abs(k) > HALF}
    assert worst_relative(got, want)[0] <= 1e-5
    # a damaged snapshot is derived data: it is converted again, never loaded
    victim = snap / "exp_avg.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert "does not match the snapshot's manifest" in usable_snapshot(snap, ckpts / tag)
    facts = ModelFacts.of_checkpoint(ckpts / tag)
    assert ensure_snapshot(ckpts, tag, facts) == (snap, True)
    assert usable_snapshot(snap, ckpts / tag) is None
    # a checkpoint that does not verify is not converted
    (ckpts / tag / "rng_rank1.pt").write_bytes(b"")
    assert main(["--checkpoint", str(out), "--tag", tag]) == 2
    assert "does not verify" in capfd.readouterr().err


@pytest.mark.slow
def test_the_state_dict_export_loads_strictly_into_a_model_of_another_seed(refs, tmp_path,
                                                                          capfd):
    """`export --format state_dict` of a TP2 x PP2 checkpoint: GPTModel.load_state_dict(strict=
    True) takes it, its masks replace those the new model drew, and the logits are the
    checkpoint's. Kept values alone (what zero_to_fp32.py gives) under the new model's masks
    give other logits."""
    import torch
    import yaml

    from slope_megatron.commands.export import main
    from slope_megatron.config import config_from_dict
    from slope_megatron.config.history import fill_added_nested
    from slope_megatron.model import GPTModel

    ref = refs("tp2-pp2")
    out = tmp_path / "exported"
    assert main(["--checkpoint", str(ref), "--out", str(out), "--format", "state_dict"]) == 0
    cfg = config_from_dict(fill_added_nested(yaml.safe_load((out / "config.yaml").read_text())))
    cfg.sparsity.backend = "reference"
    state = torch.load(out / "model.pt", weights_only=True)

    def build(seed):
        return GPTModel(cfg.model, cfg.sparsity, cfg.adapters, init_seed=seed).eval()

    exported = build(seed=999)
    exported.load_state_dict(state, strict=True)
    artifact = build(seed=cfg.train.seed)
    artifact.load_state_dict(final_state(ref), strict=False)  # the artifact: no column masks
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = artifact(ids)
        torch.testing.assert_close(exported(ids), want, rtol=1e-6, atol=1e-6)
        kept_only = build(seed=999)
        kept_only.load_state_dict({k: v for k, v in state.items()
                                   if not k.endswith("mask")}, strict=False)
        assert (kept_only(ids) - want).abs().max() > 1e-2
    assert main(["--checkpoint", str(ref / "checkpoints" / checkpoint.tag_for(16)), "--out",
                 str(ref / "checkpoints" / checkpoint.tag_for(16) / "sd"), "--format",
                 "state_dict"]) == 2
    assert "is inside the checkpoint" in capfd.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("source,target", [("dp2-zero1", "1"), ("dp2-zero1", "dp2-zero3"),
                                           ("dp2-zero1", "tp2-pp2"), ("1", "tp2-zero3")],
                         ids=lambda x: x)
def test_a_round_trip_through_another_layout_changes_no_bit(refs, source, target):
    """A checkpoint converted, loaded into `target`, saved there by DeepSpeed and converted
    again: the same fp32 masters, moments, steps, masks and state, bit for bit (TP shards
    under ZeRO-3 too, whose model files hold empty parameters)."""
    from helpers.dist import run_distributed
    from helpers.layout_round_trip import assert_same_snapshot, round_trip
    from helpers.layout_runs import MORE_LAYOUTS, run_args

    out = halfway_copy(refs(source), refs.root / f"round-trip-{source}-{target}")
    argv = run_args(refs.root, out, target)
    world = {**LAYOUTS, **MORE_LAYOUTS}[target][0]
    got = run_distributed(round_trip, world, argv, str(out / "checkpoints"),
                          str(refs.root / f"round-trip-{source}-{target}-saved"))[0]
    assert_same_snapshot(got["again"], got["first"])
