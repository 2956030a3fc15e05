"""The run directory (train.output_dir): checked before any work, then recorded.

It must be a directory (or a path that can become one) we can write, and - once it holds a
checkpoint - hold a run of the same model, sparsity, data and layout (else we refuse instead
of mixing two runs): checked against its run_config.yaml and against the identity in the
checkpoint's manifest (the only record when run_config.yaml is gone, and the one holding the
data-parallel size under ZeRO 1-3), before any work and before run_config.yaml is written.
Before its first checkpoint a rerun with other settings replaces run_config.yaml (a start
that failed, e.g. out of memory, must not bind its corrected rerun).
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config import Config, ConfigError
from ..disk_space import check_free_space, dir_bytes, is_disk_full, no_space_error
from ..distributed import barrier
from ..io import write_text_atomic
from .checkpoint import LATEST, MANIFEST, TAG_RE, candidates, check_identity, saved_identity
from .run_identity import flatten, identity_diff, identity_of, run_identity, with_added_keys

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.yaml"


def _data_parallel_size(cfg: Config) -> int:
    """This launch's data-parallel size: the world size over tensor x pipeline ranks."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    return max(1, world // (cfg.parallel.tensor * cfg.parallel.pipeline))


def check_directory(out: Path) -> None:
    """train.output_dir must be a directory, or a path whose nearest existing ancestor is one,
    that we can write to (as far as permissions say: check_output_dir writes a probe once the
    directory is locked)."""
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
        why = " (a read-only file system)" if os.statvfs(probe).f_flag & os.ST_RDONLY else ""
        raise ConfigError(f"train.output_dir '{out}' is not writable{why}; choose another "
                          f"directory")


CHECKPOINTS = "checkpoints"
# what a run creates in train.output_dir, and what each must be: found before any work, not
# at the first save after hours of training
_LAYOUT = {CHECKPOINTS: "directory", "tensorboard": "directory", "metrics.jsonl": "file",
           RUN_CONFIG: "file"}


def check_layout(out: Path) -> None:
    """Refuse an output directory where something the run writes has the wrong kind: a file
    named `checkpoints` where the checkpoint directory belongs, a directory named
    `metrics.jsonl`, a broken symbolic link."""
    for name, kind in _LAYOUT.items():
        path = out / name
        if path.is_symlink() and not path.exists():
            raise ConfigError(f"train.output_dir '{out}' holds '{name}', a broken symbolic link "
                              f"(to '{os.readlink(path)}') where the run writes its {name}; "
                              f"restore its target, or use another train.output_dir")
        if not path.exists():
            continue
        if (kind == "directory") != path.is_dir():
            what = "a directory" if path.is_dir() else "a file"
            raise ConfigError(f"train.output_dir '{out}' holds {what} named '{name}' where the "
                              f"run writes its {name} ({kind}); move it away or use another "
                              f"train.output_dir")


def probe_writes(out: Path) -> None:
    """Write (and remove) a small file in the output directory and its checkpoint directory:
    a read-only file system, missing permissions (which os.access does not show to root) or a
    full disk stop the run here, before any work, in one line."""
    for where in (out, out / CHECKPOINTS):
        if not where.is_dir():
            continue
        probe = where / f".tmp-probe-{socket.gethostname()}-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            if is_disk_full(e):
                raise no_space_error(e, probe) from None
            raise ConfigError(f"train.output_dir '{out}': cannot write in '{where}' "
                              f"({e.strerror or e}); choose another train.output_dir or fix "
                              f"its permissions") from None
        finally:
            probe.unlink(missing_ok=True)


def check_room_for_a_checkpoint(ckpt_dir: Path) -> None:
    """Refuse to start when the disk has less room than the newest checkpoint takes: the
    first save would fail after the iterations before it were trained."""
    if not ckpt_dir.is_dir():
        return
    try:
        tags, _ = candidates(ckpt_dir)
    except OSError:
        return
    sealed = [t for t in tags if (ckpt_dir / t / MANIFEST).is_file()]
    if sealed:
        check_free_space(ckpt_dir, dir_bytes(ckpt_dir / sealed[0]),
                         f"the next checkpoint (as large as {sealed[0]})")


def holds_checkpoint(out: Path) -> bool:
    """Whether `out` holds a checkpoint: `checkpoints/latest`, or a sealed (manifested)
    iter_* directory. Only then does its run_config.yaml bind a rerun."""
    ckpts = out / CHECKPOINTS
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
    check_directory(out)
    check_layout(out)
    if out.is_dir():
        probe_writes(out)
        if cfg.train.save_interval:
            check_room_for_a_checkpoint(out / CHECKPOINTS)
    if not cfg.train.save_interval and (out / "metrics.jsonl").is_file() \
            and not (out / "checkpoints").is_dir():
        raise ConfigError(f"train.output_dir '{out}' holds the metrics of a run without "
                          f"checkpoints (train.save_interval=0), which cannot be resumed; "
                          f"rerunning there would overwrite them - use a new "
                          f"train.output_dir (or move that one away)")
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
        new = identity_of(cfg.to_dict())
        old = with_added_keys(identity_of(recorded.data), new)
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
        old, new = flatten(recorded.as_dict()), flatten(given)
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            write_text_atomic(saved, yaml.safe_dump(given, sort_keys=False))
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
            more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
            log.info("%s holds no checkpoint: %s of an earlier start (%s%s) replaced by this "
                     "run's", out, RUN_CONFIG, shown, more)
    barrier()
