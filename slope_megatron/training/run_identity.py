"""Which settings make a run the same run: the identity a checkpoint's manifest records and
a rerun must match to resume it (else it is refused with the differing keys, instead of
mixing two runs in one directory).

Identity keys: model, sparsity, adapters, data, parallel layout, ZeRO stage, seed and global
batch size, plus the gradient-accumulation dtype as resolved and, under ZeRO 1-3, the
data-parallel size. train.output_dir, train.iters and the other train.* / optimizer.* keys
are not: a resume may change them (the checkpoint's optimizer settings are replaced by the
config's after the load: optimizer.apply_optimizer_settings).
"""
from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..config.deepspeed_json import grad_accum_dtype, resolve_dtype
from ..config.history import fill_added_flat as with_added_keys  # a saved identity, completed

# sections/keys that must match for a rerun to resume the same run (a layout change is
# refused, not converted)
IDENTITY_KEYS = ("model", "sparsity", "adapters", "data", "parallel", "zero.stage",
                 "train.seed", "train.global_batch_size")


# Keys inside the identity sections that change neither the math nor the files: which kernel
# buffers are kept, and where the data cache lives (the data's identity is its source,
# tokenizer and preparation settings). Left out of identities, and ignored where a saved
# identity (a run_config.yaml, or a manifest written while they counted) still has them.
NOT_IDENTITY_KEYS = ("sparsity.keep_compressed", "data.cache_dir")


# Identity keys holding a path: the same file or folder however it is spelt (relative paths
# are taken from the current directory, as the run itself takes them).
PATH_IDENTITY_KEYS = ("data.path", "data.tiktoken_file")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, f"{key}.") if isinstance(v, dict) else {key: v})
    return out


def identity_of(cfg_dict: dict) -> dict:
    """The identity keys of a config as a dict (a run_config.yaml's, or this run's)."""
    flat = flatten(cfg_dict)
    return {k: v for k, v in flat.items() if k not in NOT_IDENTITY_KEYS
            and any(k == i or k.startswith(i + ".") for i in IDENTITY_KEYS)}


def run_identity(cfg: Config, dp_size: int) -> dict:
    """What a checkpoint must match to be resumed (its manifest records it): run_config's
    identity keys plus the ZeRO stage, the gradient-accumulation dtype as resolved (it selects
    DeepSpeed's optimizer wrapper, whose files differ) and, under ZeRO 1-3, the data-parallel
    size (the optimizer files are partitioned by it; without ZeRO a different DP size resumes
    fine)."""
    ident = identity_of(cfg.to_dict())
    ident["zero.stage"] = cfg.zero.stage
    ident["zero.grad_accum_dtype"] = grad_accum_dtype(cfg, resolve_dtype(cfg)) or "model"
    if cfg.zero.stage > 0:
        ident["data_parallel_size"] = dp_size
    return ident


def _same(key: str, old, new) -> bool:
    if old == new:
        return True
    if key in PATH_IDENTITY_KEYS and isinstance(old, str) and isinstance(new, str):
        return Path(old).expanduser().resolve() == Path(new).expanduser().resolve()
    return False


def identity_diff(old: dict, new: dict) -> list[str]:
    """Sorted keys whose values differ between a saved identity and this run's."""
    old = with_added_keys(old, new)
    keys = (old.keys() | new.keys()) - set(NOT_IDENTITY_KEYS)
    return sorted(k for k in keys if not _same(k, old.get(k), new.get(k)))
