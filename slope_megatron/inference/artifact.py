"""The SLoPe inference artifact: compressed weights + config + tokenizer, checksummed.

The trainer writes one inside every checkpoint directory (`<ckpt>/slope_model/`); generation
and export read only this, never DeepSpeed's optimizer shards and never a pickle. Layout:

    model.safetensors  every tensor of the model state dict except the double-pruned column
                       masks (recomputed from the weights when needed) and `_extra_state`:
                       - sparse layers: `<p>.weight` = kept values (out, in*n/m) in row-major
                         order of the mask, `<p>.mask_bits` = the (out, in) bool mask packed
                         8 entries per byte (numpy packbits, little bit order, row-major),
                         `<p>.bias`, `<p>.adapter_a` (in, r), `<p>.adapter_b` (r, out)
                       - dense parameters (embeddings, norms, dense linears) under their names
    layers.json        format/version, each sparse layer's shape, n:m, adapter rank and the
                       module extra state (`_extra_state` entries: step counters, adapter switch)
    config.yaml        Config.to_dict() (model shape, sparsity, adapters, ...)
    <tokenizer>        copy of the data pipeline's saved tokenizer, when there is one, under
                       its own name: tokenizer.json (bpe), gpt2.tiktoken, or hf_tokenizer/
    manifest.json      size and sha256 of every other file (by relative path) and which file
                       is the tokenizer, of which kind; written last

The directory is written atomically (temp dir + rename), and `load_artifact` re-checks sizes
and checksums before it parses anything, so a missing, truncated or corrupt file is reported
by name instead of surfacing as a shape error deep inside the model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..config import Config, ConfigError, config_from_dict
from ..config.history import fill_added_nested
from ..errors import SlopeError
from ..io import atomic_directory, sha256_file

FORMAT = "slope-megatron-artifact"
VERSION = 1
WEIGHTS, LAYERS, CONFIG, MANIFEST = (
    "model.safetensors", "layers.json", "config.yaml", "manifest.json")
REQUIRED = (WEIGHTS, LAYERS, CONFIG)
EXTRA = "._extra_state"


class ArtifactError(SlopeError, RuntimeError):
    """A missing, partial, corrupt or inconsistent inference artifact (names the file)."""


# ---- masks -------------------------------------------------------------------------------

def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(out, in) bool -> uint8 bits, 8 entries per byte, row-major, little bit order."""
    bits = np.packbits(mask.detach().cpu().numpy().reshape(-1), bitorder="little")
    return torch.from_numpy(bits)


def unpack_mask(bits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    count = shape[0] * shape[1]
    if bits.dtype != torch.uint8 or bits.numel() != (count + 7) // 8:
        raise ValueError(f"packed mask has {bits.numel()} {bits.dtype} entries; a {shape} mask "
                         f"needs {(count + 7) // 8} uint8")
    flat = np.unpackbits(bits.numpy(), count=count, bitorder="little")
    return torch.from_numpy(flat.astype(bool)).view(shape)


def _check_nm(name: str, mask: torch.Tensor, values: torch.Tensor, n: int, m: int) -> None:
    out, inp = mask.shape
    if inp % m or tuple(values.shape) != (out, inp * n // m):
        raise ValueError(f"sparse layer '{name}': kept values {tuple(values.shape)} do not fit "
                         f"a {n}:{m} mask of shape {(out, inp)}")
    per_group = mask.view(out, inp // m, m).sum(-1)
    if not bool((per_group == n).all()):
        raise ValueError(f"sparse layer '{name}': mask is not {n}:{m} (some group of {m} keeps "
                         f"{int(per_group.min())}..{int(per_group.max())} entries)")


# ---- save --------------------------------------------------------------------------------

def _split_state_dict(state_dict: dict) -> tuple[dict, dict, dict]:
    """-> (tensors for safetensors, sparse layer records, extra states)."""
    extra = {k[: -len(EXTRA)]: v for k, v in state_dict.items() if k.endswith(EXTRA)}
    masks = [k[: -len(".mask")] for k in state_dict if k.endswith(".mask")]
    for prefix, state in extra.items():  # a SlopeLinear's extra state names its n:m
        if isinstance(state, dict) and {"n", "m"} <= state.keys() and prefix not in masks:
            raise ArtifactError(f"state_dict has '{prefix}{EXTRA}' of a sparse layer but no "
                                f"'{prefix}.mask' (did gathering the state dict drop buffers?)")
    tensors, layers = {}, {}
    for prefix in masks:
        if prefix + ".weight" not in state_dict:
            raise ArtifactError(f"state_dict has '{prefix}.mask' but no '{prefix}.weight'")
        if prefix not in extra:
            raise ArtifactError(f"state_dict lacks '{prefix}{EXTRA}' (the SlopeLinear's n:m and "
                                "adapter switch); pass model.state_dict() including extra state")
        mask, values = state_dict[prefix + ".mask"].detach().cpu(), state_dict[prefix + ".weight"]
        n, m = int(extra[prefix]["n"]), int(extra[prefix]["m"])
        try:
            _check_nm(prefix, mask.bool(), values, n, m)
        except ValueError as e:
            raise ArtifactError(f"refusing to save: {e}") from None
        a = state_dict.get(prefix + ".adapter_a")
        layers[prefix] = {"out_features": mask.shape[0], "in_features": mask.shape[1],
                          "n": n, "m": m, "adapter_rank": None if a is None else a.shape[1]}
        tensors[prefix + ".mask_bits"] = pack_mask(mask.bool())
    skip = {p + s for p in masks for s in (".mask", ".column_mask")}
    for key, value in state_dict.items():
        if key.endswith(EXTRA) or key in skip:
            continue
        if not isinstance(value, torch.Tensor):
            raise ArtifactError(f"state_dict entry '{key}' is a {type(value).__name__}, "
                                "not a tensor")
        tensors[key] = value.detach().cpu().contiguous()
    for prefix, state in extra.items():
        try:
            json.dumps(state)
        except TypeError:
            raise ArtifactError(f"extra state of '{prefix}' is not JSON-serialisable: "
                                f"{state!r}") from None
    return tensors, layers, extra


def tokenizer_kind(path: Path) -> str:
    """The data pipeline's kind of a saved tokenizer: hf (a directory), tiktoken-gpt2, bpe."""
    path = Path(path)
    if path.is_dir():
        return "hf"
    return "tiktoken-gpt2" if path.suffix == ".tiktoken" else "bpe"


def is_artifact(path: Path) -> bool:
    """Whether `path` holds a (complete) artifact of this format, checksums not verified."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_artifact(state_dict: dict, config: Config, tokenizer_file: Optional[Path],
                  out_dir: Path) -> Path:
    """Write the artifact for a full (unsharded) GPTModel state dict to `out_dir`, atomically.

    tokenizer_file: the data pipeline's saved tokenizer (DataInfo.tokenizer_file): a
    tokenizer.json, a gpt2.tiktoken file or an hf_tokenizer/ directory; or None.
    """
    if tokenizer_file is not None:
        tokenizer_file = Path(tokenizer_file)
        if not tokenizer_file.exists():
            raise ArtifactError(f"tokenizer file '{tokenizer_file}' does not exist")
        if tokenizer_file.name in (*REQUIRED, MANIFEST):
            raise ArtifactError(f"tokenizer file name '{tokenizer_file.name}' clashes with an "
                                "artifact file; rename it")
    if not isinstance(config, Config):
        raise ArtifactError(f"config must be a slope_megatron Config, got {type(config).__name__}")
    tensors, layers, extra = _split_state_dict(state_dict)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for k, t in tensors.items()
                     if t.is_floating_point()})
    with atomic_directory(Path(out_dir), is_artifact, "SLoPe artifact") as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "producer": FORMAT})
        (tmp / LAYERS).write_text(json.dumps(
            {"format": FORMAT, "version": VERSION, "mask_encoding": "packbits-little-rowmajor",
             "dtypes": dtypes, "sparse_layers": layers, "extra_state": extra}, indent=1))
        (tmp / CONFIG).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        tokenizer = None
        if tokenizer_file is not None:
            copy = shutil.copytree if tokenizer_file.is_dir() else shutil.copyfile
            copy(tokenizer_file, tmp / tokenizer_file.name)
            tokenizer = {"path": tokenizer_file.name, "kind": tokenizer_kind(tokenizer_file)}
        files = {f.relative_to(tmp).as_posix(): {"size": f.stat().st_size,
                                                 "sha256": sha256_file(f)}
                 for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(
            {"format": FORMAT, "version": VERSION, "producer": f"slope_megatron {__version__}",
             "tokenizer": tokenizer, "files": files}, indent=1))
    return Path(out_dir)


# ---- load --------------------------------------------------------------------------------

def verify_artifact(path: Path) -> dict:
    """Check the manifest, then every file's presence, size and sha256; returns the manifest."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"artifact directory '{path}' does not exist")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"'{mpath}' is missing: '{path}' is not a complete SLoPe artifact "
                            "(interrupted save, or not an artifact directory)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        fmt, version = manifest["format"], manifest["version"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ArtifactError(f"'{mpath}' is corrupt ({e})") from None
    if fmt != FORMAT or version != VERSION:
        raise ArtifactError(f"'{mpath}' describes format {fmt!r} v{version}; this code reads "
                            f"{FORMAT!r} v{VERSION}")
    for name in REQUIRED:
        if name not in files:
            raise ArtifactError(f"'{mpath}' does not list the required file '{name}'")
    for name, meta in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(f"'{mpath}' lists a file outside the artifact: {name!r}")
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"artifact file '{f}' is missing")
        size = f.stat().st_size
        if size != meta["size"]:
            raise ArtifactError(f"artifact file '{f}' has {size} bytes, the manifest says "
                                f"{meta['size']} (truncated or partially written)")
        if sha256_file(f) != meta["sha256"]:
            raise ArtifactError(f"artifact file '{f}' fails its sha256 check (corrupt)")
    tokenizer = manifest.get("tokenizer")
    if tokenizer and not any(n == tokenizer["path"] or n.startswith(tokenizer["path"] + "/")
                             for n in files):
        raise ArtifactError(f"'{mpath}' names tokenizer '{tokenizer['path']}' but lists no such "
                            "file")
    return manifest


def _read_config(path: Path) -> Config:
    try:
        recorded = yaml.safe_load((path / CONFIG).read_text())
        if not isinstance(recorded, dict):
            raise ConfigError("it does not hold a mapping of config sections")
        return config_from_dict(fill_added_nested(recorded))  # as the code that wrote it
    except (yaml.YAMLError, ConfigError) as e:
        raise ArtifactError(f"'{path / CONFIG}' is not a valid config: {e}") from None


def load_artifact(path: Path) -> tuple[Config, dict, Optional[Path]]:
    """Verify and read an artifact -> (config, state_dict, tokenizer path or None).

    The tokenizer path is a file (tokenizer.json, gpt2.tiktoken) or a directory (hf);
    `inference.tokenizer.load_tokenizer` reads any of them.

    The state dict has the GPTModel names and bool masks, and `_extra_state` entries, but no
    `column_mask` entries (see `inference.model.load_slope_state_dict`).
    """
    path = Path(path)
    manifest = verify_artifact(path)
    config = _read_config(path)
    try:
        layers_doc = json.loads((path / LAYERS).read_text())
        layers, extra = layers_doc["sparse_layers"], layers_doc["extra_state"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ArtifactError(f"'{path / LAYERS}' is corrupt ({e})") from None
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"'{path / WEIGHTS}' cannot be read ({e})") from None
    state = {}
    for prefix, rec in layers.items():
        shape = (int(rec["out_features"]), int(rec["in_features"]))
        bits, values = tensors.pop(prefix + ".mask_bits", None), tensors.get(prefix + ".weight")
        if bits is None or values is None:
            raise ArtifactError(f"'{path / WEIGHTS}' lacks the mask or values of sparse layer "
                                f"'{prefix}' listed in {LAYERS}")
        try:
            mask = unpack_mask(bits, shape)
            _check_nm(prefix, mask, values, int(rec["n"]), int(rec["m"]))
        except ValueError as e:
            raise ArtifactError(f"'{path / WEIGHTS}': {e}") from None
        state[prefix + ".mask"] = mask
    state.update(tensors)
    for prefix, value in extra.items():
        state[prefix + EXTRA] = value
    tokenizer = manifest.get("tokenizer")
    return config, state, None if not tokenizer else path / tokenizer["path"]
