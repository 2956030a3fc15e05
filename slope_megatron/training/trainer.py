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
from ..model import GPTModel
from ..parallel import initialize_parallel
from ..sparsity import adapters_active, after_optimizer_step
from . import checkpoint
from .data_order import GlobalBatchOrder
from .distributed import DistInfo, all_reduce_mean, barrier
from .engine import initialize
from .metrics import MetricsWriter, format_train_line, peak_flops
from .optimizer import build_optimizer, lr_at, mark_adapters_active, set_lr, switch_on_adapters
from .run_setup import (RunData, artifact_writer, check_output_dir, prepare_run_data,
                        record_run_config, sample_from_checkpoint)


@dataclass
class TrainResult:
    final_iter: int
    val_loss: float
    train_loss: float
    resumed_from: int


def batch(dataset, indices, device) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dataset[int(i)] for i in indices))
    return torch.stack(xs).to(device), torch.stack(ys).to(device)


@torch.no_grad()
def evaluate(engine, data: RunData, cfg: Config, dp_rank: int, dp_size: int) -> float:
    """Mean validation loss over the first eval_iters x micro-batches (same every time)."""
    engine.eval()
    mbs = cfg.train.micro_batch_size
    n = min(len(data.val), cfg.train.eval_iters * mbs * dp_size)
    mine = list(range(dp_rank, n, dp_size))
    total = 0.0
    for i in range(0, len(mine), mbs):
        x, y = batch(data.val, mine[i:i + mbs], engine.device)
        total += engine(x, y).item() * len(mine[i:i + mbs])
    engine.train()
    return all_reduce_mean(total / max(1, len(mine)))


def train(cfg: Config, dist: DistInfo) -> TrainResult:
    dp_size = validate_world(cfg, dist.world_size)
    par = None
    if cfg.parallel.tensor > 1 or cfg.parallel.pipeline > 1:
        par = initialize_parallel(cfg.parallel.tensor, cfg.parallel.pipeline)
    dp_rank, main = (par.dp_rank if par else dist.rank), dist.is_main
    out = Path(cfg.train.output_dir)
    given = check_output_dir(cfg, out)
    data = prepare_run_data(cfg, main)  # sets cfg.model.vocab_size from the tokenizer
    record_run_config(given, out, main)
    say = tqdm.write if main else (lambda *_: None)

    torch.manual_seed(cfg.train.seed)
    model = GPTModel.from_config(cfg, par)
    engine, optimizer = initialize(model, build_optimizer(model, cfg), cfg, dp_size, mpu=par)
    say(f"model: {cfg.model.arch}, {model.num_parameters():,} stored parameters, "
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
    flops_per_token = model.dense_equivalent_flops_per_token()
    peak = peak_flops()
    save_artifact = artifact_writer(engine, cfg, data, main)

    t0 = t_log = time.time()
    loss_sum, loss_count, window = 0.0, 0, 0
    val_loss = train_loss = float("nan")
    bar = tqdm(total=cfg.train.iters, initial=start, disable=not main, desc="train",
               dynamic_ncols=True)
    for it in range(start, cfg.train.iters):
        if it == cfg.adapter_start_iter and not adapters_active(model):
            n = switch_on_adapters(model, optimizer, cfg)
            say(f"iter {it}: lazy low-rank adapters switched on in {n} layers")
        set_lr(optimizer, lr_at(cfg, it))
        for mb in order.micro_batches(it, dp_rank, dp_size, cfg.train.micro_batch_size):
            x, y = batch(data.train, mb, engine.device)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        if engine.was_step_applied():
            after_optimizer_step(model)
        bar.update(1)
        done, window = it + 1, window + 1
        if done % cfg.train.log_interval == 0 or done == cfg.train.iters:
            now = time.time()
            train_loss = all_reduce_mean(loss_sum / loss_count)
            tps = tokens_per_iter * window / (now - t_log)
            record = {"iter": done, "loss": train_loss, "lr": lr_at(cfg, it),
                      "tokens": done * tokens_per_iter, "tokens_per_s": tps,
                      "adapters_active": adapters_active(model), "time_s": now - t0,
                      "mfu": flops_per_token * tps / (peak * dist.world_size) if peak else None}
            metrics.write(record)
            say(format_train_line(record))
            loss_sum, loss_count, window, t_log = 0.0, 0, 0, now
        if (cfg.train.eval_interval and done % cfg.train.eval_interval == 0) \
                or done == cfg.train.iters:
            val_loss = evaluate(engine, data, cfg, dp_rank, dp_size)
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
