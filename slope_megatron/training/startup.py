"""A run's start-up, top to bottom: the config checked against this launch (world size,
precision, DeepSpeed's JSON: config/deepspeed_json.check_launch), the process groups of the
layout, the run directory (run_dir.py), the data (run_data.py), the recorded run config,
the DeepSpeed engine (engine.py) and the newest checkpoint if there is one. The run directory
is locked (run_lock.py) before anything in it is read or written."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from ..config import Config
from ..config.deepspeed_json import check_launch
from ..distributed import DistInfo
from ..parallel import initialize_parallel
from ..sparsity import adapters_active
from .engine import build_engine
from .init_from import check_init_from
from .layout_resume import resume_any_layout
from .optimizer import apply_optimizer_settings, mark_adapters_active
from .run_data import prepare_run_data
from .run_dir import check_directory, check_output_dir, read_recorded_config, record_run_config
from .run_lock import hold_run_lock
from .run_dir import holds_checkpoint
from .run_identity import run_identity


@dataclass
class Run:
    """What start-up produces, for the loop and the end of the run."""
    cfg: Config
    dist: DistInfo
    par: Any  # the tensor/pipeline layout; None without model parallelism
    dp_size: int
    dp_rank: int
    main: bool
    out: Path
    ckpt_dir: Path
    data: Any
    model: Any
    engine: Any
    optimizer: Any
    identity: dict
    client: Optional[dict]  # the resumed checkpoint's client state; None for a fresh run
    recorded: Any  # run_config.yaml as it was before this run (re)wrote it
    stored: int  # parameters stored on this rank, counted before the checkpoint loaded
    say: Callable[[str], None]  # a line on rank 0 (through tqdm: the bar stays below)


def start_run(cfg: Config, dist: DistInfo) -> Run:
    """Checks, output directory, data, engine and the newest checkpoint if any, in that
    order: a bad config stops before anything is written, a bad output directory before the
    data is prepared, bad data before the model is built."""
    dp_size = check_launch(cfg, dist.world_size)  # every check of the config, DeepSpeed's too
    # train.init_from: the checkpoint against the config; it may set data.tokenizer and
    # model.vocab_size, so before the run directory's identity check and the data
    pretrained = check_init_from(cfg, print if dist.is_main else (lambda *_: None))
    par = None
    if cfg.parallel.tensor > 1 or cfg.parallel.pipeline > 1:
        par = initialize_parallel(cfg.parallel.tensor, cfg.parallel.pipeline)
    dp_rank, main = (par.dp_rank if par else dist.rank), dist.is_main
    out = Path(cfg.train.output_dir)
    check_directory(out)  # a writable directory, or a path that can become one
    hold_run_lock(out, main)  # one run at a time in it, until this process ends (run_lock.py)
    recorded = read_recorded_config(out)  # the one read, before it is (re)written
    given = check_output_dir(cfg, out, recorded, dp_size)
    data = prepare_run_data(cfg, main)  # sets model.vocab_size from the tokenizer
    record_run_config(given, out, main, recorded)
    say = tqdm.write if main else (lambda *_: None)

    torch.manual_seed(cfg.train.seed)
    resuming = holds_checkpoint(out)  # then the checkpoint's weights, not train.init_from's
    model, engine, optimizer = build_engine(cfg, par, dp_size,
                                            None if resuming else pretrained)
    stored = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 too

    ckpt_dir = out / "checkpoints"
    identity = run_identity(cfg, dp_size)
    client = resume_any_layout(engine, cfg, par, ckpt_dir, dist.rank, dist.world_size,
                               identity, say) if ckpt_dir.is_dir() else None
    if client:  # DeepSpeed put the checkpoint's optimizer settings back: this run's config wins
        adapters_on = adapters_active(model)
        for change in apply_optimizer_settings(optimizer, cfg, adapters_on):
            say(f"resume: {change}")
        if adapters_on:  # a checkpoint taken past the switch: the adapter group's lr stays on
            mark_adapters_active(optimizer, cfg)
    return Run(cfg=cfg, dist=dist, par=par, dp_size=dp_size, dp_rank=dp_rank, main=main,
                out=out, ckpt_dir=ckpt_dir, data=data, model=model, engine=engine,
                optimizer=optimizer, identity=identity, client=client, recorded=recorded,
                stored=stored, say=say)
