"""Which settings make a run the same run: the identity a checkpoint's manifest records and
a rerun must match to resume it (else it is refused with the differing keys, instead of
mixing two runs in one directory).

Identity keys: model, sparsity, adapters, data, seed and global batch size. A manifest also
records the run's layout - parallel.tensor / parallel.pipeline, the ZeRO stage, the
gradient-accumulation dtype as resolved and, under ZeRO 1-3, the data-parallel size - which
says how DeepSpeed's files are cut, not which run they hold: a rerun in another layout is the
same run, and start-up converts the checkpoint (training/layout_resume.py) instead of
refusing it. `identity_diff` compares the identity only; `layout_diff` the layout.
train.output_dir, train.iters, train.micro_batch_size and the other train.* / optimizer.*
keys are neither: a resume may change them (the checkpoint's optimizer settings are replaced
by the config's after the load: optimizer.apply_optimizer_settings).
"""
from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..config.deepspeed_json import grad_accum_dtype, resolve_dtype
from ..config.history import fill_added_flat as with_added_keys  # a saved identity, completed

# sections/keys recorded in a manifest: the identity (must match to resume) and the layout
IDENTITY_KEYS = ("model", "sparsity", "adapters", "data", "parallel", "zero.stage",
                 "train.seed", "train.global_batch_size")


# Recorded keys that say how the checkpoint's files are cut, not which run they hold: a
# rerun whose layout differs converts the checkpoint (layout_diff) instead of being refused.
LAYOUT_KEYS = ("parallel.tensor", "parallel.pipeline", "zero.stage", "zero.grad_accum_dtype",
               "data_parallel_size")


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
    """What a checkpoint's manifest records: run_config's identity keys (which must match to
    resume) and the layout (which, where it differs, makes start-up convert the checkpoint):
    the tensor/pipeline sizes, the ZeRO stage, the gradient-accumulation dtype as resolved (it
    selects DeepSpeed's optimizer wrapper, whose files differ) and, under ZeRO 1-3, the
    data-parallel size (the optimizer files are partitioned by it; without ZeRO DeepSpeed loads
    them for any DP size)."""
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
    """Sorted identity keys whose values differ between a saved identity and this run's (the
    layout keys are not compared: a layout change is converted, see layout_diff)."""
    old = with_added_keys(old, new)
    keys = (old.keys() | new.keys()) - set(NOT_IDENTITY_KEYS) - set(LAYOUT_KEYS)
    return sorted(k for k in keys if not _same(k, old.get(k), new.get(k)))


def layout_of(identity: dict) -> dict:
    """The layout keys of a recorded identity (a saved one completed as older runs had it:
    the gradient-accumulation dtype was DeepSpeed's default before it was recorded).
    data_parallel_size is present only under ZeRO 1-3, whose files are cut by it."""
    full = with_added_keys(identity, {"zero.grad_accum_dtype": None})
    return {k: full[k] for k in LAYOUT_KEYS if k in full}


def layout_diff(old: dict, new: dict) -> list[str]:
    """Sorted layout keys whose values differ between a saved identity and this run's: empty
    when DeepSpeed can load the checkpoint's files as they are."""
    old, new = layout_of(old), layout_of(new)
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def describe_layout(identity: dict) -> str:
    """A layout in words, e.g. 'tp=2 pp=1 ZeRO-1 dp=2' (dp only where the files depend on
    it)."""
    lay = layout_of(identity)
    text = (f"tp={lay.get('parallel.tensor')} pp={lay.get('parallel.pipeline')} "
            f"ZeRO-{lay.get('zero.stage')}")
    if "data_parallel_size" in lay:
        text += f" dp={lay['data_parallel_size']}"
    if lay.get("zero.grad_accum_dtype") not in (None, "model"):
        text += f" grad_accum_dtype={lay['zero.grad_accum_dtype']}"
    return text
