"""Read a DeepSpeed checkpoint of any layout from its files alone: per tensor-parallel rank, the
module state (GPTModel keys, unpipelined) and, per parameter, the fp32 master weight, Adam's
moments and step count - what a layout conversion (universal.py) merges into the TP = 1 model.

What DeepSpeed 0.19.8 writes, and how each is read here (module state; fp32 master, moments,
steps):
- ZeRO 0, fp32: `mp_rank_XX_model_states.pt` `module`; its `optimizer`, torch AdamW's state
  dict (the masters are the module's weights).
- ZeRO 0, fp16/bf16: the same; its `optimizer`, FP16_UnfusedOptimizer's (`fp32_groups` and
  torch's state dict).
- ZeRO 1/2 and BF16_Optimizer: the same module; `[bf16_]zero_pp_rank_D_mp_rank_XX_optim_states
  .pt`, each DP rank's flat fp32 partition per param group with `param_slice_mappings`
  (parameter name -> its slice of the partition).
- ZeRO 3: `zero_pp_rank_0_mp_rank_XX_model_states.pt` (parameters empty);
  `zero_pp_rank_D_..._optim_states.pt`, every parameter cut in DP equal parts, laid out in
  `param_shapes` order.
- pipeline: `layer_II-model_TT-model_states.pt` per layer; the optimizer state as above, per
  stage (XX = stage x TP + TP rank).

A torch state dict keys its state by position; the position -> name map of a ZeRO-0 file is
rebuilt the way it was made: the stage's parameters in module order (pipeline stages as
DeepSpeed's `partition_balanced` cut them) grouped by training/optimizer.param_groups. Every
tensor's shape is checked against its parameter's, so a mismatch stops with a CheckpointError
instead of loading moments into the wrong parameter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...model.pipeline import pipeline_to_model_keys
from .errors import CheckpointError
from .safe_load import safe_torch_load

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class FileLayout:
    """The layout a checkpoint's files were written in."""
    tp: int
    pp: int
    dp: int
    stage: int


@dataclass
class RankState:
    """One tensor-parallel rank's state, unpipelined, under GPTModel's (TP-local) keys."""
    module: dict = field(default_factory=dict)   # parameters, masks, buffers, extra state
    master: dict = field(default_factory=dict)   # parameter name -> fp32 master weight
    exp_avg: dict = field(default_factory=dict)
    exp_avg_sq: dict = field(default_factory=dict)
    step: dict = field(default_factory=dict)     # parameter name -> optimizer steps taken


def _load(path: Path):
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is not a complete DeepSpeed "
                              f"checkpoint of the layout its files describe")
    return safe_torch_load(path, map_location="cpu")


def _model_states_file(tag_dir: Path, mp: int, stage: int) -> Path:
    if stage == 3:
        return tag_dir / f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt"
    return tag_dir / f"mp_rank_{mp:02d}_model_states.pt"


def read_file_layout(tag_dir: Path) -> FileLayout:
    """The TP / PP / DP sizes and ZeRO stage recorded in a checkpoint's first model file."""
    path = next((p for p in (tag_dir / "mp_rank_00_model_states.pt",
                             tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt")
                 if p.is_file()), None)
    if path is None:
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed model file (mp_rank_00_model_states"
                              f".pt or zero_pp_rank_0_mp_rank_00_model_states.pt)")
    sd = _load(path)
    dims = sd.get("checkpoint_parallel_dimensions") or {}
    stage = int((sd.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))
    return FileLayout(tp=int(dims.get("tp_degree", sd.get("mp_world_size", 1))),
                      pp=int(dims.get("pp_degree", 1)), dp=int(sd["dp_world_size"]), stage=stage)


def read_client_state(tag_dir: Path, stage: int) -> dict:
    """The first model file's top-level entries (DeepSpeed's and the trainer's client state)
    without the module and optimizer state."""
    sd = _load(_model_states_file(tag_dir, 0, stage))
    return {k: v for k, v in sd.items() if k not in ("module", "optimizer")}


def _flat_partition_prefix(tag_dir: Path, mp: int) -> str | None:
    """'' (ZeRO 1/2's optimizer) or 'bf16_' (DeepSpeed's BF16_Optimizer, also under ZeRO 1):
    the prefix of model-parallel rank `mp`'s flat-partition optimizer files, or None where
    there are none (the optimizer state is a torch state dict in the model file). Read from
    the files, not the ZeRO stage, which does not tell the two apart."""
    for prefix in ("", "bf16_"):
        if (tag_dir / f"{prefix}zero_pp_rank_0_mp_rank_{mp:02d}_optim_states.pt").is_file():
            return prefix
    return None


def read_param_groups(tag_dir: Path, layout: FileLayout) -> list[dict]:
    """The optimizer's param-group settings (weight decay, betas, eps, the adapter group's lr
    scale ...) without their parameters, from the first model-parallel rank's files."""
    if layout.stage == 3:
        sd = _load(tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        groups = sd["optimizer_state_dict"]["optimizer_state_dict"]["param_groups"]
    elif (prefix := _flat_partition_prefix(tag_dir, 0)) is not None or layout.stage in (1, 2):
        sd = _load(tag_dir / f"{prefix or ''}zero_pp_rank_0_mp_rank_00_optim_states.pt")
        groups = sd["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    else:
        sd = _load(_model_states_file(tag_dir, 0, 0))["optimizer"]
        groups = sd.get("optimizer_state_dict", sd)["param_groups"]
    return [{k: v for k, v in g.items() if k != "params"} for g in groups]


# ---- module state -----------------------------------------------------------------------

def _pipeline_layers(num_layers: int) -> int:
    """Pipeline layer files: embedding, the blocks, the head (a tied LM head has none)."""
    return num_layers + 2


def _module_state(tag_dir: Path, layout: FileLayout, tp_rank: int, num_layers: int) -> dict:
    if layout.pp == 1:
        return dict(_load(_model_states_file(tag_dir, tp_rank, layout.stage))["module"])
    state = {}
    for idx in range(_pipeline_layers(num_layers)):
        layer = _load(tag_dir / f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt")
        state.update(pipeline_to_model_keys({f"{idx}.{k}": v for k, v in layer.items()},
                                            num_layers))
    return state


# ---- optimizer state: one model-parallel rank (a pipeline stage's TP rank) ------------------

def _adam_state(state, master: torch.Tensor) -> dict:
    """A flat partition's Adam state; zeros and step 0 for one that has not stepped yet."""
    state = state or {}
    return {"step": float(state.get("step", 0)),
            **{k: state.get(k, torch.zeros_like(master, dtype=torch.float32)) for k in MOMENTS}}


def _flat_partitions(tag_dir: Path, layout: FileLayout, mp: int, prefix: str) -> dict:
    """ZeRO 1/2 and BF16_Optimizer: every parameter's pieces from each DP rank's partition."""
    pieces: dict = {}
    for d in range(layout.dp):
        osd = _load(tag_dir / f"{prefix}zero_pp_rank_{d}_mp_rank_{mp:02d}_optim_states.pt")
        osd = osd["optimizer_state_dict"]
        base = osd["base_optimizer_state"]
        states = base["state"] if "state" in base else dict(enumerate(base))
        for i, mapping in enumerate(osd["param_slice_mappings"]):
            master = osd["single_partition_of_fp32_groups"][i]
            state = _adam_state(states.get(i), master)
            flats = {"master": master, **{k: state[k] for k in MOMENTS}}
            for name, frag in mapping.items():
                got = pieces.setdefault(name, {"step": state["step"]})
                for key, flat in flats.items():
                    got.setdefault(key, []).append(flat.narrow(0, frag.start, frag.numel))
    return pieces


def _zero3_partitions(tag_dir: Path, layout: FileLayout, mp: int, shapes: dict) -> dict:
    """ZeRO 3: each parameter is cut into DP equal parts (the last padded), laid out in
    `param_shapes` order in every rank's flat sub-groups."""
    flats: dict = {"master": [], **{k: [] for k in MOMENTS}}
    bounds, steps = [], []
    for d in range(layout.dp):
        osd = _load(tag_dir / f"zero_pp_rank_{d}_mp_rank_{mp:02d}_optim_states.pt")
        osd = osd["optimizer_state_dict"]
        groups, states = osd["fp32_flat_groups"], osd["optimizer_state_dict"]["state"]
        full = [_adam_state(states.get(s), g) for s, g in enumerate(groups)]
        flats["master"].append(torch.cat(groups))
        for key in MOMENTS:
            flats[key].append(torch.cat([state[key] for state in full]))
        if d == 0:
            bounds = [sum(g.numel() for g in groups[:s + 1]) for s in range(len(groups))]
            steps = [state["step"] for state in full]
    pieces, offset = {}, 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        part = math.ceil(numel / layout.dp)
        group = next(s for s, end in enumerate(bounds) if offset < end)
        pieces[name] = {"step": steps[group], **{key: [f.narrow(0, offset, part) for f in per]
                                                 for key, per in flats.items()}}
        offset += part
    if offset != bounds[-1]:
        raise CheckpointError(f"{tag_dir}: ZeRO-3 partitions of model-parallel rank {mp} hold "
                              f"{bounds[-1]} values per rank, the parameter shapes {offset}")
    return pieces


def _stage_parameter_names(module: dict, buffers: set) -> list[str]:
    """A stage's parameters in module order: the floating-point tensors of its state dict
    that are no persistent buffer (masks are bool, extra state is no tensor)."""
    return [k for k, v in module.items() if torch.is_tensor(v) and v.is_floating_point()
            and k not in buffers]


def _model_key(pipeline_key: str, num_layers: int) -> str:
    """GPTModel's key for a pipeline stage's parameter name."""
    return next(iter(pipeline_to_model_keys({pipeline_key: None}, num_layers)))


def _pipeline_stage_names(tag_dir: Path, layout: FileLayout, stage: int, tp_rank: int,
                          num_layers: int, tied: bool) -> list[str]:
    """The parameter names of pipeline stage `stage`, in PipelineModule order: the tied
    embedding module first (tied_modules), then the stage's own layers (partitioned as
    model/pipeline.py asks DeepSpeed to: balanced over the blocks)."""
    from deepspeed.runtime.utils import partition_balanced

    kinds = ["embed", *["block"] * num_layers, "head"] + (["tied_head"] if tied else [])
    parts = partition_balanced([1 if k == "block" else 0 for k in kinds], layout.pp)
    mine = range(parts[stage], parts[stage + 1])
    names = []
    layer0 = _load(tag_dir / f"layer_00-model_{tp_rank:02d}-model_states.pt")
    if tied and (0 in mine or len(kinds) - 1 in mine):
        names += [f"tied_modules.embed.{k}" for k in _stage_parameter_names(layer0, set())]
    for idx in mine:
        if kinds[idx] == "tied_head" or (tied and idx == 0):
            continue
        layer = layer0 if idx == 0 else \
            _load(tag_dir / f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt")
        names += [f"{idx}.{k}" for k in _stage_parameter_names(layer, set())]
    return names


def _torch_optimizer(sd: dict, names: list[str], module: dict) -> dict:
    """ZeRO 0: torch's state dict (positions in param-group order) -> per-name pieces.
    `module`: the stage's state (masters of an fp32 run are its weights)."""
    from ...config import Config
    from ..optimizer import param_groups

    fp32_groups = sd.get("fp32_groups")  # FP16_UnfusedOptimizer (fp16 / bf16 at ZeRO 0)
    base = sd["optimizer_state_dict"] if fp32_groups is not None else sd
    stand_in = nn.Module()
    params = {name: nn.Parameter(torch.empty(module[name].shape, device="meta"))
              for name in names}
    stand_in.named_parameters = lambda: iter(params.items())  # what param_groups reads
    by_id = {id(p): name for name, p in params.items()}
    order = [by_id[id(p)] for g in param_groups(stand_in, Config()) for p in g["params"]]
    saved = [i for g in base["param_groups"] for i in g["params"]]
    if len(order) != len(saved):
        raise CheckpointError(f"the optimizer state holds {len(saved)} parameters, the module "
                              f"{len(order)}: it was not written by this model")
    masters = [t for g in fp32_groups for t in g] if fp32_groups is not None else None
    pieces = {}
    for pos, (index, name) in enumerate(zip(saved, order)):
        state = base["state"].get(index, {})
        master = masters[pos] if masters is not None else module[name]
        got = {"master": [master.float().reshape(-1)], "step": float(state.get("step", 0))}
        for key in MOMENTS:
            moment = state.get(key, torch.zeros_like(master, dtype=torch.float32))
            if moment.shape != module[name].shape:
                raise CheckpointError(f"optimizer state {key} of {name} has shape "
                                      f"{tuple(moment.shape)}, the parameter "
                                      f"{tuple(module[name].shape)}")
            got[key] = [moment.float().reshape(-1)]
        pieces[name] = got
    return pieces


def _optimizer_pieces(tag_dir: Path, layout: FileLayout, stage: int, tp_rank: int,
                      num_layers: int, tied: bool, module: dict) -> tuple[dict, dict]:
    """(pieces by DeepSpeed's parameter name, parameter shapes) of one stage's TP rank."""
    mp = stage * layout.tp + tp_rank
    model_file = _load(_model_states_file(tag_dir, mp, layout.stage))
    if layout.stage == 3:
        shapes = {k: tuple(v) for g in model_file["param_shapes"] for k, v in g.items()}
        return _zero3_partitions(tag_dir, layout, mp, shapes), shapes
    prefix = _flat_partition_prefix(tag_dir, mp)
    if prefix is not None:
        shapes = {k: tuple(v) for g in model_file["param_shapes"] for k, v in g.items()}
        return _flat_partitions(tag_dir, layout, mp, prefix), shapes
    if layout.pp == 1:
        stage_module = module
        names = _stage_parameter_names(module, set(model_file.get("buffer_names") or ()))
    else:
        names = _pipeline_stage_names(tag_dir, layout, stage, tp_rank, num_layers, tied)
        stage_module = {n: module[_model_key(n, num_layers)] for n in names}
    pieces = _torch_optimizer(model_file["optimizer"], names, stage_module)
    return pieces, {n: tuple(stage_module[n].shape) for n in names}


def read_rank(tag_dir: Path, layout: FileLayout, tp_rank: int, num_layers: int,
              tied: bool) -> RankState:
    """TP rank `tp_rank`'s whole state: every pipeline stage's, under GPTModel's keys (a
    parameter both end stages hold - the tied embedding - from the first)."""
    out = RankState(module=_module_state(tag_dir, layout, tp_rank, num_layers))
    for stage in range(layout.pp):
        pieces, shapes = _optimizer_pieces(tag_dir, layout, stage, tp_rank, num_layers, tied,
                                           out.module)
        for ds_name, got in pieces.items():
            key = _model_key(ds_name, num_layers) if layout.pp > 1 else ds_name
            if key in out.master:
                continue
            shape = shapes[ds_name]
            numel = math.prod(shape)
            for what in ("master", *MOMENTS):
                flat = torch.cat(got[what])[:numel]
                if flat.numel() != numel:
                    raise CheckpointError(f"{tag_dir}: {what} of {ds_name} has {flat.numel()} "
                                          f"values, its shape {shape} {numel}")
                getattr(out, what)[key] = flat.reshape(shape).clone()
            out.step[key] = got["step"]
    return out
