"""Load a layout-independent snapshot (universal.py) into a live DeepSpeed engine of any layout:
each rank takes its tensor-parallel slice (model/reshard.py) of every tensor of its pipeline
stage, the module state (kept values, masks, column masks, adapters, extra state) goes in
through the module's own load_state_dict, and the fp32 master weights and Adam state into
whatever optimizer DeepSpeed built for this layout:

- torch AdamW (ZeRO 0, fp32): the master is the parameter itself, Adam's state keyed by it;
- FP16_UnfusedOptimizer (ZeRO 0, 16-bit): its fp32 copy (`fp32_groups`), state keyed by that;
- ZeRO 1/2, BF16_Optimizer: this DP rank's fragment of the flat fp32 partition, found through
  DeepSpeed's own lp -> hp link (`_hp_mapping`); state keyed by the flat partition;
- ZeRO 3: DeepSpeed's `set_full_hp_param` for the fp32 partitions and the state, then the
  16-bit partitions from them, as its universal-checkpoint loader does.

Adam's state is created here (torch creates it lazily at the first step); its step count is
the snapshot's. DeepSpeed's counters (global steps and samples, skipped steps) and the RNG
state are restored too; the RNG per rank only where the world and TP / PP sizes are the
source's, else rank 0's on every rank (see docs/RELIABILITY.md: dropout masks then differ).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ...model.reshard import Cut, cut_of_stage_key, shard
from ..optimizer import base_optimizer
from .errors import CheckpointError
from .rng import set_rng_state
from .universal import Snapshot

MOMENTS = ("exp_avg", "exp_avg_sq")


class _Slicer:
    """This rank's piece of any snapshot tensor, by the live module's (local) key."""

    def __init__(self, snap: Snapshot, par, pipelined: bool):
        self.snap, self.arch = snap, snap.state["model"]["arch"]
        self.num_layers = int(snap.state["model"]["num_layers"])
        self.tp = par.tp_size if par is not None else 1
        self.rank = par.tp_rank if par is not None else 0
        self.pipelined = pipelined

    def cut(self, local_key: str) -> Cut:
        return cut_of_stage_key(local_key, self.arch, self.num_layers, self.pipelined)

    def get(self, local_key: str, what: str = "model"):
        cut = self.cut(local_key)
        source = getattr(self.snap, what)
        if what == "model" and cut.full_key in self.snap.state["extra_state"]:
            return self.snap.state["extra_state"][cut.full_key]
        if cut.full_key not in source:
            raise CheckpointError(f"the converted checkpoint has no {what} for {cut.full_key} "
                                  f"(this run's {local_key})")
        return shard(source[cut.full_key], cut, self.tp, self.rank)

    def step(self, local_key: str) -> float:
        return float(self.snap.state["step"].get(self.cut(local_key).full_key, 0))


def _load_module(module, slicer: _Slicer, partitioned: bool) -> None:
    """Load this rank's module state; under ZeRO-3 without the (partitioned) parameters,
    which the optimizer path sets."""
    params = {name for name, _ in module.named_parameters()}
    local = {key: slicer.get(key) for key in module.state_dict()
             if not (partitioned and key in params)}
    result = module.load_state_dict(local, strict=not partitioned)
    if partitioned and (result.unexpected_keys or set(result.missing_keys) - params):
        raise CheckpointError(f"the converted checkpoint does not fit this model: missing "
                              f"{sorted(set(result.missing_keys) - params)[:5]}, unexpected "
                              f"{result.unexpected_keys[:5]}")


def _new_adam_state(like: torch.Tensor, step: float, group: dict) -> dict:
    """Adam state as torch creates it at a first step (zeros), with `step` steps taken."""
    on_device = bool(group.get("fused") or group.get("capturable"))
    return {"step": torch.tensor(float(step), dtype=torch.float32,
                                 device=like.device if on_device else "cpu"),
            **{k: torch.zeros_like(like, memory_format=torch.preserve_format) for k in MOMENTS}}


def _group_of(optimizer, param) -> dict:
    return next((g for g in optimizer.param_groups if any(p is param for p in g["params"])),
                optimizer.param_groups[0] if optimizer.param_groups else {})


def _per_param(base, pairs: list, slicer: _Slicer) -> None:
    """ZeRO 0: Adam state keyed by each fp32 parameter (`pairs`: (local key, fp32 tensor))."""
    for key, fp32 in pairs:
        state = _new_adam_state(fp32, slicer.step(key), _group_of(base, fp32))
        for what in MOMENTS:
            state[what].copy_(slicer.get(key, what).reshape(fp32.shape))
        base.state[fp32] = state


def _flat_fragments(engine_optimizer, named: list, slicer: _Slicer) -> None:
    """ZeRO 1/2 and BF16_Optimizer: each parameter's fragment of its group's flat fp32
    partition on this DP rank, found through DeepSpeed's own lp -> hp link."""
    base = base_optimizer(engine_optimizer)
    for key, param in named:
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:  # held by another DP rank's partition
            continue
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        flat = base.param_groups[mapping.param_group_index]["params"][0]
        if flat not in base.state:
            base.state[flat] = _new_adam_state(flat, slicer.step(key),
                                               base.param_groups[mapping.param_group_index])
        for what, target in (("master", mapping.hp_fragment),
                             *((m, base.state[flat][m].narrow(0, hp.start, hp.numel))
                               for m in MOMENTS)):
            full = slicer.get(key, "model" if what == "master" else what)
            target.data.copy_(full.reshape(-1).narrow(0, lp.start, lp.numel))


def _zero3(opt, named: list, slicer: _Slicer) -> None:
    """ZeRO 3: DeepSpeed's set_full_hp_param for the fp32 partitions and Adam state, then
    the 16-bit partitions from the fp32 ones (as stage3's universal loader ends)."""
    base = opt.optimizer
    for sub, group in enumerate(opt.fp16_groups):
        flat = opt.fp32_partitioned_groups_flat[sub]
        key = next(k for k, p in named if any(p is q for q in group))
        base.state[flat] = _new_adam_state(flat, slicer.step(key), base.param_groups[0])
    for key, param in named:
        opt.set_full_hp_param(slicer.get(key).reshape(param.ds_shape).float(), param)
        for what in MOMENTS:
            opt.set_full_hp_param(slicer.get(key, what).reshape(param.ds_shape), param, what)
    for sub, fp32 in enumerate(opt.fp32_partitioned_groups_flat):
        if sum(fp32.size()) > 0:
            opt.fp16_partitioned_groups_flat[sub].data.copy_(fp32.data)
    for sub, flat in enumerate(opt.fp16_partitioned_groups_flat):
        updated = opt.unflatten(flat, opt.fp16_partitioned_groups[sub])
        for partitioned, q in zip(opt.fp16_partitioned_groups[sub], updated):
            partitioned.data = q.data


def _optimizer_loader(opt) -> Optional[Callable]:
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        return _zero3
    if hasattr(opt, "single_partition_of_fp32_groups") \
            or hasattr(opt, "fp32_groups_flat_partition"):
        return _flat_fragments
    if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):
        def unfused(o, named, slicer):
            where = {id(p): (i, j) for i, g in enumerate(o.fp16_groups) for j, p in enumerate(g)}
            pairs = []
            for key, lp in named:
                i, j = where[id(lp)]
                o.fp32_groups[i][j].data.copy_(slicer.get(key).reshape(lp.shape))
                pairs.append((key, o.fp32_groups[i][j]))
            _per_param(o.optimizer, pairs, slicer)
        return unfused
    if isinstance(opt, torch.optim.Optimizer):
        return lambda o, named, slicer: _per_param(o, named, slicer)
    return None


def load_snapshot(engine, snap: Snapshot, par, rank: int, world: int) -> dict:
    """Load `snap` into `engine` (collective only under ZeRO-3); returns the client state."""
    from deepspeed.pipe import PipelineModule

    module = engine.module
    slicer = _Slicer(snap, par, isinstance(module, PipelineModule))
    opt = engine.optimizer
    load = _optimizer_loader(opt)
    if load is None:
        raise CheckpointError(f"cannot load a converted checkpoint into DeepSpeed's "
                              f"{type(opt).__name__}; resume in the checkpoint's own layout")
    zero3 = load is _zero3
    _load_module(module, slicer, partitioned=zero3)
    named = [(k, p) for k, p in module.named_parameters() if p.requires_grad]
    with torch.no_grad():
        load(opt, named, slicer)
    _restore_group_settings(opt, snap.state.get("param_groups", []))
    for counter, value in snap.state["engine"].items():
        if value is not None:
            setattr(engine, counter, value)
    _restore_rng(snap, par, rank, world)
    return dict(snap.state["client_state"])


# what DeepSpeed's own load puts back into each param group (torch's load_state_dict keeps the
# saved groups' values); structural keys (fused, foreach, ...) stay this engine's
GROUP_SETTINGS = ("lr", "betas", "eps", "weight_decay", "adapter_lr_scale")


def _restore_group_settings(engine_optimizer, saved: list[dict]) -> None:
    """The checkpoint's param-group settings, matched by group name, as a DeepSpeed load
    restores them (start-up then applies the config's: optimizer.apply_optimizer_settings)."""
    by_name = {g.get("name"): g for g in saved}
    for opt in {id(o): o for o in (engine_optimizer, base_optimizer(engine_optimizer))}.values():
        for group in getattr(opt, "param_groups", []):
            mine = by_name.get(group.get("name"), {})
            group.update({k: mine[k] for k in GROUP_SETTINGS if k in mine})


def _restore_rng(snap: Snapshot, par, rank: int, world: int) -> None:
    source = snap.state["source"]
    layout = source["layout"]
    tp, pp = (par.tp_size, par.pp_size) if par is not None else (1, 1)
    same = (source["world_size"] == world and layout["tp"] == tp and layout["pp"] == pp)
    states = snap.state["rng"]
    state = states.get(rank if same else 0)
    if state is not None:
        set_rng_state(state)
