"""The layout-independent ("universal") snapshot of a checkpoint: what a run needs to go on in
any tensor / pipeline / data-parallel layout and ZeRO stage.

A snapshot is the TP = 1, unpipelined model, written beside the checkpoint it was converted
from (`checkpoints/universal/iter_N/`; the original is only read):

    model.safetensors     every parameter as its fp32 master weight, the masks, column masks
                          and other tensors of the model's state dict (GPTModel keys)
    exp_avg.safetensors   Adam's first moment, per parameter (TP = 1 shape)
    exp_avg_sq.safetensors  Adam's second moment
    state.pt              step count per parameter, layer extra state (refresh counters,
                          adapter switch), the trainer's client state, DeepSpeed's counters,
                          the RNG state of every source rank, the source layout
    manifest.json         size and sha256 of each file, and which checkpoint it came from

It is built by reading DeepSpeed's files of the source layout (deepspeed_files.py) and
merging the tensor-parallel pieces (model/reshard.py), and written through
io.atomic_directory: a kill during the conversion leaves a temporary directory (removed by
the next conversion) and no snapshot, never a torn one. Loading it into a live engine is
universal_load.py. Why our own format and not DeepSpeed's universal checkpoint: see
docs/RELIABILITY.md ("Resuming in another layout").
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml
from safetensors.torch import load_file, save_file

from ...io import atomic_directory, remove_stale_staging, sha256_file
from .. import faults
from ...model.reshard import cut_of, merge_state
from .deepspeed_files import (read_client_state, read_file_layout, read_param_groups,
                              read_rank)
from .errors import CheckpointError
from .manifest import MANIFEST, TAG_RE
from .safe_load import safe_torch_load

FORMAT = 1
UNIVERSAL = "universal"  # checkpoints/universal/<tag>/
MODEL, STATE = "model.safetensors", "state.pt"
MOMENT_FILES = {"exp_avg": "exp_avg.safetensors", "exp_avg_sq": "exp_avg_sq.safetensors"}

# DeepSpeed's own entries of a model file: not the trainer's client state
DEEPSPEED_KEYS = ("buffer_names", "param_shapes", "frozen_param_shapes", "shared_params",
                  "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd",
                  "sparse_tensor_module_names", "skipped_steps", "global_steps",
                  "global_samples", "dp_world_size", "mp_world_size",
                  "checkpoint_parallel_dimensions", "ds_config", "ds_version",
                  "universal_checkpoint_info")


@dataclass(frozen=True)
class ModelFacts:
    """What the conversion needs to know of the model: how keys map to pipeline layers and
    TP cuts."""
    arch: str
    num_layers: int
    tie_embeddings: bool

    @classmethod
    def of_checkpoint(cls, tag_dir: Path) -> "ModelFacts":
        """From the config of the checkpoint's inference artifact (slope_model/config.yaml)."""
        path = tag_dir / "slope_model" / "config.yaml"
        try:
            model = yaml.safe_load(path.read_text())["model"]
            return cls(str(model["arch"]), int(model["num_layers"]),
                       bool(model.get("tie_embeddings", True)))
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"cannot read the model of checkpoint {tag_dir} from {path} "
                                  f"({e})") from None


@dataclass
class Snapshot:
    """A snapshot in memory: TP = 1 tensors by GPTModel key, plus `state.pt`'s dict."""
    model: dict
    exp_avg: dict
    exp_avg_sq: dict
    state: dict


def snapshot_dir(ckpt_dir: Path, tag: str) -> Path:
    return ckpt_dir / UNIVERSAL / tag


def _source_fingerprint(tag_dir: Path) -> str:
    """The source checkpoint's manifest hash: a snapshot belongs to exactly that checkpoint."""
    return sha256_file(tag_dir / MANIFEST)


def convert(tag_dir: Path, facts: ModelFacts) -> Snapshot:
    """Read checkpoint `tag_dir` (any layout) into a snapshot. Reads only."""
    layout = read_file_layout(tag_dir)
    ranks = [read_rank(tag_dir, layout, t, facts.num_layers, facts.tie_embeddings)
             for t in range(layout.tp)]
    missing = sorted(set(ranks[0].master) - set(ranks[0].module))
    if missing:
        raise CheckpointError(f"{tag_dir}: optimizer state for {missing[:3]} has no parameter "
                              f"in the model files")
    # each parameter as its fp32 master (ZeRO-3's model files hold empty placeholders)
    module = merge_state([{k: r.master.get(k, v) for k, v in r.module.items()} for r in ranks],
                         facts.arch)
    tensors = {k: v for k, v in module.items() if torch.is_tensor(v)}
    extra = {k: v for k, v in module.items() if not torch.is_tensor(v)}
    client = read_client_state(tag_dir, layout.stage)
    rng = {int(p.stem[len("rng_rank"):]): safe_torch_load(p)
           for p in sorted(tag_dir.glob("rng_rank*.pt"))}
    state = {"format": FORMAT, "source": {"tag": tag_dir.name, "layout": asdict(layout),
                                          "manifest_sha256": _source_fingerprint(tag_dir),
                                          "world_size": layout.tp * layout.pp * layout.dp},
             "model": asdict(facts), "extra_state": extra,
             "step": {cut_of(k, facts.arch).full_key: v for k, v in ranks[0].step.items()},
             "param_groups": read_param_groups(tag_dir, layout),
             "client_state": {k: v for k, v in client.items() if k not in DEEPSPEED_KEYS},
             "engine": {k: client.get(k) for k in ("global_steps", "global_samples",
                                                   "skipped_steps")},
             "rng": rng}
    return Snapshot(tensors, merge_state([r.exp_avg for r in ranks], facts.arch),
                    merge_state([r.exp_avg_sq for r in ranks], facts.arch), state)


def _is_snapshot(path: Path) -> bool:
    return (path / STATE).is_file() or (path / MANIFEST).is_file()


def write_snapshot(snap: Snapshot, out: Path) -> Path:
    """Write `snap` to `out` atomically (a kill leaves no `out`, or the complete one)."""
    remove_stale_staging(out)
    with atomic_directory(out, _is_snapshot, "universal checkpoint") as tmp:
        save_file({k: v.contiguous() for k, v in snap.model.items()}, str(tmp / MODEL))
        for key, name in MOMENT_FILES.items():
            save_file({k: v.contiguous() for k, v in getattr(snap, key).items()},
                      str(tmp / name))
        faults.point("convert_write", snap.state["client_state"].get("iteration"))
        torch.save(snap.state, tmp / STATE)
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps(
            {"format": FORMAT, "source": snap.state["source"], "files": files}, indent=1,
            sort_keys=True))
    return out


def usable_snapshot(out: Path, tag_dir: Path) -> Optional[str]:
    """None if `out` is a complete snapshot of checkpoint `tag_dir` whose files match its
    manifest; else what is wrong (it is then converted again)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except FileNotFoundError:
        return f"{out} does not exist"
    except (OSError, ValueError) as e:
        return f"{out / MANIFEST} is unreadable ({e})"
    if manifest.get("format") != FORMAT:
        return f"{out} has format {manifest.get('format')}, this code reads {FORMAT}"
    if manifest.get("source", {}).get("manifest_sha256") != _source_fingerprint(tag_dir):
        return f"{out} was converted from another version of {tag_dir.name}"
    for name, want in manifest.get("files", {}).items():
        path = out / name
        if not path.is_file() or path.stat().st_size != want["size"] \
                or sha256_file(path) != want["sha256"]:
            return f"{path} does not match the snapshot's manifest"
    return None


def read_snapshot(out: Path) -> Snapshot:
    """A snapshot written by write_snapshot (check it with usable_snapshot first)."""
    return Snapshot(load_file(str(out / MODEL)),
                    *(load_file(str(out / name)) for name in MOMENT_FILES.values()),
                    safe_torch_load(out / STATE))


def remove_other_snapshots(ckpt_dir: Path, keep: Optional[str]) -> None:
    """Delete every snapshot (and a killed conversion's leftovers) but `keep`'s: a snapshot
    is derived data, needed only until the run has saved in its new layout. Rank 0."""
    root = ckpt_dir / UNIVERSAL
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.name == keep or not (TAG_RE.match(path.name) or path.name.startswith(".")):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    if not any(root.iterdir()):
        root.rmdir()
