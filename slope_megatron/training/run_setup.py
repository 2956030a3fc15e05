"""Everything a run checks or prepares before the first step, and its small end-of-run extras.

- the output directory: a directory (or one that can be created) we can write, and - once it
  holds a checkpoint - holding a run of the same model, sparsity, data and layout (else we
  refuse instead of mixing two runs): checked against its run_config.yaml and against the
  identity in the checkpoint's manifest (the only record when run_config.yaml is gone, and
  the one holding the data-parallel size under ZeRO 1-3), before any work and before
  run_config.yaml is written; before its first checkpoint a rerun with other settings
  replaces run_config.yaml (a start that failed, e.g. out of memory, must not bind its
  corrected rerun);
- the data: prepared once on rank 0 (others wait, then hit the cache; a data error on any
  rank stops every rank with the same clean error), vocabulary size taken from the
  tokenizer, at least one global batch of training and of validation samples;
- the inference artifact writer used at every checkpoint;
- a short text sample at the end of training, through the inference artifact.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from ..config import Config, ConfigError, padded_vocab_size
from ..errors import SlopeError
from ..fileio import write_text_atomic
from .checkpoint import (LATEST, MANIFEST, NOT_IDENTITY_KEYS, TAG_RE, check_identity,
                         identity_diff, saved_identity, with_added_keys)
from .distributed import barrier
from .engine import grad_accum_dtype, resolve_dtype

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.yaml"
# sections/keys that must match for a rerun to resume the same run (a layout change is
# refused, not converted)
IDENTITY_KEYS = ("model", "sparsity", "adapters", "data", "parallel", "zero.stage",
                 "train.seed", "train.global_batch_size")
# ... except NOT_IDENTITY_KEYS (checkpoint.py), which change neither the math nor the files:
# kernel-side memory, and where the data cache lives. train.output_dir, train.iters and the
# other train.* / optimizer.* keys are not identity keys: a resume may change them (the
# checkpoint's optimizer settings are replaced by the config's after the load:
# optimizer.apply_optimizer_settings).


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, f"{key}.") if isinstance(v, dict) else {key: v})
    return out


def _identity(cfg_dict: dict) -> dict:
    flat = _flatten(cfg_dict)
    return {k: v for k, v in flat.items() if k not in NOT_IDENTITY_KEYS
            and any(k == i or k.startswith(i + ".") for i in IDENTITY_KEYS)}


def run_identity(cfg: Config, dp_size: int) -> dict:
    """What a checkpoint must match to be resumed (its manifest records it): run_config's
    identity keys plus the ZeRO stage, the gradient-accumulation dtype as resolved (it selects
    DeepSpeed's optimizer wrapper, whose files differ) and, under ZeRO 1-3, the data-parallel
    size (the optimizer files are partitioned by it; without ZeRO a different DP size resumes
    fine)."""
    ident = _identity(cfg.to_dict())
    ident["zero.stage"] = cfg.zero.stage
    ident["zero.grad_accum_dtype"] = grad_accum_dtype(cfg, resolve_dtype(cfg)) or "model"
    if cfg.zero.stage > 0:
        ident["data_parallel_size"] = dp_size
    return ident


def _data_parallel_size(cfg: Config) -> int:
    """This launch's data-parallel size: the world size over tensor x pipeline ranks."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    return max(1, world // (cfg.parallel.tensor * cfg.parallel.pipeline))


def _check_directory(out: Path) -> None:
    """train.output_dir must be a directory, or a path whose nearest existing ancestor is one,
    that we can write to."""
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"train.output_dir '{out}' is a broken symbolic link (to "
                          f"'{os.readlink(out)}'); remove it or choose another directory")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir '{out}' is a file, not a directory; choose "
                          f"another train.output_dir")
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise ConfigError(f"train.output_dir '{out}' cannot be created: '{probe}' is a file, "
                          f"not a directory; choose another train.output_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"train.output_dir '{out}' is not writable; choose another directory")


def holds_checkpoint(out: Path) -> bool:
    """Whether `out` holds a checkpoint: `checkpoints/latest`, or a sealed (manifested)
    iter_* directory. Only then does its run_config.yaml bind a rerun."""
    ckpts = out / "checkpoints"
    if not ckpts.is_dir():
        return False
    return (ckpts / LATEST).is_file() or any(
        TAG_RE.match(p.name) and (p / MANIFEST).is_file() for p in ckpts.iterdir())


@dataclass(frozen=True)
class RecordedConfig:
    """run_config.yaml of an output dir as start-up found it (before this run rewrites it),
    read and parsed once: `found` - it is a file; `data` - what yaml.safe_load made of it;
    `error` - the OSError or YAMLError reading it raised, kept to be raised only where a
    readable file is needed (a dir holding a checkpoint, see check_output_dir)."""
    found: bool = False
    data: Any = None
    error: Optional[Exception] = None

    def as_dict(self) -> dict:
        """The recorded config ({} when there is none, it is unreadable or not a mapping)."""
        return self.data if self.error is None and isinstance(self.data, dict) else {}


def read_recorded_config(out: Path) -> RecordedConfig:
    """Read and parse `out`/run_config.yaml: the one read of it at start-up."""
    saved = out / RUN_CONFIG
    if not saved.is_file():
        return RecordedConfig()
    try:
        return RecordedConfig(True, yaml.safe_load(saved.read_text()))
    except (OSError, yaml.YAMLError) as e:
        return RecordedConfig(True, error=e)


def check_output_dir(cfg: Config, out: Path, recorded: Optional[RecordedConfig] = None,
                     dp_size: Optional[int] = None) -> dict:
    """Refuse a path that is not a writable directory (nor can become one), one holding a
    checkpoint of a different run, or the finished metrics of a run without checkpoints when
    this one writes none either (writes nothing). `recorded`: read_recorded_config(out), read
    here when not given. `dp_size`: this launch's data-parallel size (default: the world size
    of the process group over parallel.tensor x parallel.pipeline).

    A dir holding a checkpoint binds a rerun twice, both before any work: its run_config.yaml
    (when there is one) and the run identity in the manifest of the checkpoint a load would
    verify first (`checkpoint.saved_identity`; ZeRO stage, resolved gradient-accumulation
    dtype and, under ZeRO 1-3, the data-parallel size included). Without the second, a run
    in a dir whose run_config.yaml is gone would get as far as the load - and would have
    written its own run_config.yaml by then, locking the original settings out.

    Returns the config as given (before derived values such as the vocabulary size) for
    `record_run_config` once the run's inputs are known to be good."""
    _check_directory(out)
    if not cfg.train.save_interval and (out / "metrics.jsonl").is_file() \
            and not (out / "checkpoints").is_dir():
        raise ConfigError(f"train.output_dir '{out}' holds the metrics of a run without "
                          f"checkpoints (train.save_interval=0), which cannot be resumed; "
                          f"rerunning there would overwrite them - use a new "
                          f"train.output_dir or delete that one")
    if recorded is None:
        recorded = read_recorded_config(out)
    if recorded.found and holds_checkpoint(out):
        problem = recorded.error if recorded.error is not None else (
            None if isinstance(recorded.data, dict) and recorded.data
            else "it is empty or not a mapping of config sections")
        if problem is not None:
            raise ConfigError(f"train.output_dir '{out}' holds a checkpoint, but its "
                              f"{RUN_CONFIG} cannot be read ({problem}); restore it (it "
                              f"says which run the checkpoint belongs to) or use a new "
                              f"train.output_dir")
        new = _identity(cfg.to_dict())
        old = with_added_keys(_identity(recorded.data), new)
        diff = identity_diff(old, new)
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
            raise ConfigError(f"train.output_dir '{out}' holds a different run ({shown}); "
                              f"use a new train.output_dir or the original settings")
    if holds_checkpoint(out):
        bound = saved_identity(out / "checkpoints")
        if bound is not None:
            tag_dir, saved = bound
            dp = dp_size if dp_size is not None else _data_parallel_size(cfg)
            ident = run_identity(cfg, dp)
            if cfg.model.vocab_size is None:  # the tokenizer's, known once the data is
                # prepared; the load compares it (and a different tokenizer is a data.* key)
                saved = {k: v for k, v in saved.items() if k != "model.vocab_size"}
                ident.pop("model.vocab_size", None)
            check_identity(tag_dir, saved, ident)
    return cfg.to_dict()


def record_run_config(given: dict, out: Path, main: bool,
                      recorded: Optional[RecordedConfig] = None) -> None:
    """Create the output dir and write run_config.yaml: at the first start, and at every
    start while the dir holds no checkpoint (the config of an earlier start that stopped
    before its first checkpoint is replaced, with one INFO line; nothing else is touched).
    Once a checkpoint exists the recorded config is the run's and stays.
    `recorded`: read_recorded_config(out) from start-up, read here when not given."""
    saved = out / RUN_CONFIG
    if main and not saved.is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(saved, yaml.safe_dump(given, sort_keys=False))
    elif main and not holds_checkpoint(out):
        if recorded is None:
            recorded = read_recorded_config(out)
        old, new = _flatten(recorded.as_dict()), _flatten(given)
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            write_text_atomic(saved, yaml.safe_dump(given, sort_keys=False))
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
            more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
            log.info("%s holds no checkpoint: %s of an earlier start (%s%s) replaced by this "
                     "run's", out, RUN_CONFIG, shown, more)
    barrier()


@dataclass
class RunData:
    train: Any
    val: Any
    tokenizer_file: Optional[Path]


def _open_run_data(cfg: Config, log: Callable) -> RunData:
    from ..data import prepare_data
    from ..data.prepare import open_training_splits

    info = prepare_data(cfg.data, log=log)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = padded_vocab_size(info.vocab_size)  # round up: faster GEMMs
    elif cfg.model.vocab_size < info.vocab_size:
        raise ConfigError(f"config key 'model.vocab_size' = {cfg.model.vocab_size} is smaller "
                          f"than the tokenizer's vocabulary ({info.vocab_size}); unset it or "
                          f"raise it")
    train, val = open_training_splits(info, cfg.model.seq_len, cfg.train.global_batch_size)
    return RunData(train, val, info.tokenizer_file)


def _attempt(fn: Callable[[], RunData]) -> tuple[Optional[RunData], Optional[Exception]]:
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - every rank must learn of it, see _share_failure
        return None, e


def _share_failure(error: Optional[Exception]) -> None:
    """Collective: raise on every rank when any rank failed (instead of the others dying in
    the next collective, or hanging in it). The failing rank raises its own exception; the
    others raise the same user error (a SlopeError of the same class and message) when rank
    0 failed with one, else a SlopeError naming the rank, so each rank exits 2 and rank 0
    prints the one `error:` line (every raised error is marked `every_rank`)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    mine = None
    if isinstance(error, SlopeError):
        mine = (type(error), str(error))
    elif error is not None:
        mine = (None, f"{type(error).__name__}: {error}")
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if error is not None:
        _said_by_rank_0(error)
        raise error
    for rank, failure in enumerate(everyone):
        if failure is None:
            continue
        cls, message = failure
        if rank != 0 or cls is None:
            raise _said_by_rank_0(
                SlopeError(f"rank {rank} failed while preparing the data: {message}"))
        try:
            shared = cls(message)
        except Exception:  # noqa: BLE001 - a SlopeError class that takes other arguments
            shared = SlopeError(message)
        raise _said_by_rank_0(shared)


def _said_by_rank_0(error: Exception) -> Exception:
    """Mark an error every rank raises after _share_failure: rank 0's `error:` line says it
    for all (launch/pretrain.py prints a non-zero rank's own error only when not so marked)."""
    try:
        error.every_rank = True
    except AttributeError:  # an exception type that takes no attributes
        pass
    return error


def prepare_run_data(cfg: Config, main: bool) -> RunData:
    """Prepare shards (rank 0 first, the others then hit the cache), fix model.vocab_size,
    open both splits. A failure on any rank - typically rank 0 finding the data unusable -
    stops every rank with the same SlopeError."""
    data = error = None
    if main:
        data, error = _attempt(lambda: _open_run_data(cfg, print))
    _share_failure(error)  # also the barrier the other ranks wait at
    if not main:
        data, error = _attempt(lambda: _open_run_data(cfg, lambda *a, **k: None))
    _share_failure(error)
    return data


def consolidated_state_dict(engine, cfg: Config, par) -> Optional[dict]:
    """The full TP = 1, unpipelined model state dict on rank 0 (None elsewhere).

    Collective: ZeRO-3 gathers partitioned parameters, TP gathers shards, and pipeline
    stages send their (renamed) pieces to rank 0.
    """
    import contextlib

    import torch.distributed as dist

    module = engine.module
    gather3 = contextlib.nullcontext()
    if cfg.zero.stage == 3:
        import deepspeed

        gather3 = deepspeed.zero.GatheredParameters(list(module.parameters()))
    with gather3:
        if cfg.parallel.tensor > 1:
            from ..parallel.gather import gather_full_state_dict

            state = gather_full_state_dict(module)
        else:
            state = module.state_dict()
        state = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                 for k, v in state.items()}
    if cfg.parallel.pipeline > 1:
        from ..model.pipeline import pipeline_to_model_keys

        mine = None
        if par.dp_rank == 0 and par.tp_rank == 0:
            mine = pipeline_to_model_keys(state, cfg.model.num_layers)
            if par.pp_rank > 0:  # the last stage's tied copy of the embedding module: its
                # tokens are tied, but its positions are an unused, untrained duplicate
                mine = {k: v for k, v in mine.items() if not k.startswith("embedding.")}
        pieces = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, pieces, dst=0)
        if dist.get_rank() != 0:
            return None
        state = {}
        for piece in pieces:
            state.update(piece or {})
    return state if dist.get_rank() == 0 else None


def artifact_writer(engine, cfg: Config, data: RunData, par) -> Callable[[Path], None]:
    """A function that writes the consolidated inference artifact into a checkpoint dir."""
    from ..inference.artifact import save_artifact

    def write(tag_dir: Path) -> None:
        state = consolidated_state_dict(engine, cfg, par)
        if state is not None:
            save_artifact(state, replace(cfg), data.tokenizer_file, tag_dir / "slope_model")
    return write


def sample_from_checkpoint(tag_dir: Path, prompt: str = "The", new_tokens: int = 48,
                           seed: int = 0) -> str:
    """A short sample (temperature 0.8, top-k 40) from a checkpoint's inference artifact -
    the same path `launch/generate.py` takes, so the demo exercises it end to end."""
    from ..inference import (InferenceModel, SamplingConfig, generate, load_artifact,
                             load_tokenizer)

    config, state, tokenizer_file = load_artifact(tag_dir / "slope_model")
    tokenizer = load_tokenizer(tokenizer_file)
    model = InferenceModel(config, state)
    ids = tokenizer.encode(prompt)
    new_tokens = max(1, min(new_tokens, model.seq_len - len(ids)))  # a short demo context
    result = generate(model, [ids], new_tokens,
                      SamplingConfig(temperature=0.8, top_k=40, seed=seed), {tokenizer.eos_id},
                      vocab_limit=min(tokenizer.vocab_size, model.vocab_size))
    return prompt + tokenizer.decode(result[0].tokens)
