"""The pretraining loop: data -> model -> DeepSpeed engine -> train / eval / save / resume.

Readable in one screen on purpose (after nanoGPT). Everything stateful lives somewhere a
checkpoint reaches: weights, masks, layer counters and the adapter switch in the module;
Adam state in the optimizer; RNG per rank; the data position is the iteration number
(see data_order.py); the learning rate is a function of the iteration.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import Config, validate_world
from ..model import GPTModel, dense_flops_per_token
from ..model.pipeline import build_pipeline_model, mark_for_grad_norm
from ..parallel import initialize_parallel
from ..sparsity import adapters_active, after_optimizer_step
from . import checkpoint
from .data_order import GlobalBatchOrder
from .distributed import DistInfo, all_reduce_mean, barrier
from .engine import initialize
from .metrics import MetricsWriter, format_train_line, peak_flops
from .optimizer import (
    build_optimizer,
    lr_at,
    mark_adapters_active,
    set_lr,
    switch_on_adapters,
)
from .run_setup import (
    artifact_writer,
    check_output_dir,
    prepare_run_data,
    record_run_config,
    sample_from_checkpoint,
)
from .steps import eval_indices, eval_loss, make_batch, train_step


@dataclass
class TrainResult:
    final_iter: int
    val_loss: float
    train_loss: float
    resumed_from: int


def train(cfg: Config, dist: DistInfo) -> TrainResult:
    dp_size = validate_world(cfg, dist.world_size)
    par = None
    if cfg.parallel.tensor > 1 or cfg.parallel.pipeline > 1:
        par = initialize_parallel(cfg.parallel.tensor, cfg.parallel.pipeline)
    dp_rank, main = (par.dp_rank if par else dist.rank), dist.is_main
    out = Path(cfg.train.output_dir)
    given = check_output_dir(cfg, out)
    data = prepare_run_data(cfg, main)  # sets model.vocab_size from the tokenizer
    record_run_config(given, out, main)
    say = tqdm.write if main else (lambda *_: None)

    torch.manual_seed(cfg.train.seed)
    if cfg.parallel.pipeline > 1:
        model = build_pipeline_model(cfg, par)
        mark_for_grad_norm(model, par)
        engine, optimizer = initialize(model, build_optimizer(model, cfg), cfg, dp_size)
    else:
        model = GPTModel.from_config(cfg, par)
        engine, optimizer = initialize(model, build_optimizer(model, cfg), cfg, dp_size, mpu=par)
    stored = sum(p.numel() for p in model.parameters())
    say(f"model: {cfg.model.arch}, {stored:,} stored parameters on rank 0, "
        f"sparsity {'%d:%d' % (cfg.sparsity.n, cfg.sparsity.m) if cfg.sparsity.enabled else 'off'}"
        f", ZeRO-{cfg.zero.stage}, tp={cfg.parallel.tensor}, pp={cfg.parallel.pipeline}, "
        f"dp={dp_size}, adapters from iter {cfg.adapter_start_iter}")

    ckpt_dir = out / "checkpoints"
    client = checkpoint.load(engine, ckpt_dir, dist.rank) if ckpt_dir.is_dir() else None
    start = client["iteration"] if client else 0
    if client:
        say(f"resumed from {ckpt_dir / checkpoint.tag_for(start)} (iteration {start})")
        if adapters_active(model):
            mark_adapters_active(optimizer)
    metrics = MetricsWriter(out, main, start)
    order = GlobalBatchOrder(len(data.train), cfg.train.global_batch_size, cfg.train.seed)
    tokens_per_iter = cfg.train.global_batch_size * cfg.model.seq_len
    flops_per_token = dense_flops_per_token(cfg.model)
    val_batches = [make_batch(data.val, idx, engine.device)
                   for idx in eval_indices(cfg, len(data.val), dp_rank, dp_size)]
    peak = peak_flops()
    save_artifact = artifact_writer(engine, cfg, data, par)

    t0 = t_log = time.time()
    loss_sum, window = 0.0, 0
    val_loss = train_loss = float("nan")
    bar = tqdm(total=cfg.train.iters, initial=start, disable=not main, desc="train",
               dynamic_ncols=True)
    for it in range(start, cfg.train.iters):
        if it == cfg.adapter_start_iter and not adapters_active(model):
            n = switch_on_adapters(model, optimizer, cfg)
            say(f"iter {it}: lazy low-rank adapters switched on ({n} layers on rank 0)")
        set_lr(optimizer, lr_at(cfg, it))
        batches = [make_batch(data.train, mb, engine.device)
                   for mb in order.micro_batches(it, dp_rank, dp_size, cfg.train.micro_batch_size)]
        loss_sum += train_step(engine, batches)
        if engine.was_step_applied():
            after_optimizer_step(model)
        bar.update(1)
        done, window = it + 1, window + 1
        if done % cfg.train.log_interval == 0 or done == cfg.train.iters:
            now = time.time()
            train_loss = all_reduce_mean(loss_sum / window)
            tps = tokens_per_iter * window / (now - t_log)
            record = {"iter": done, "loss": train_loss, "lr": lr_at(cfg, it),
                      "tokens": done * tokens_per_iter, "tokens_per_s": tps,
                      "adapters_active": adapters_active(model), "time_s": now - t0,
                      "mfu": flops_per_token * tps / (peak * dist.world_size) if peak else None}
            metrics.write(record)
            say(format_train_line(record))
            loss_sum, window, t_log = 0.0, 0, now
        if (cfg.train.eval_interval and done % cfg.train.eval_interval == 0) \
                or done == cfg.train.iters:
            val_loss = all_reduce_mean(eval_loss(engine, val_batches))
            metrics.write({"iter": done, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
            say(f"iter {done:>6} | val loss {val_loss:.4f} | val ppl {math.exp(val_loss):.2f}")
        if done % cfg.train.save_interval == 0 or done == cfg.train.iters:
            path = checkpoint.save(engine, ckpt_dir, done, {"iteration": done}, dist.rank,
                                   save_artifact, cfg.train.keep_checkpoints)
            say(f"saved checkpoint {path}")
    bar.close()
    metrics.close()
    if start >= cfg.train.iters:
        say(f"nothing to do: {out} already holds a checkpoint at iteration {start} "
            f"(train.iters = {cfg.train.iters})")
    elif main:
        last = ckpt_dir / checkpoint.tag_for(cfg.train.iters)
        say(f"sample from {last}:\n" + sample_from_checkpoint(last))
        say(f"generate more: python launch/generate.py --checkpoint {out} --prompt \"...\"")
    barrier()
    return TrainResult(cfg.train.iters, val_loss, train_loss, start)
