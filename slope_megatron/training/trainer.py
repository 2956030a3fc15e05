"""The pretraining loop: data -> model -> DeepSpeed engine -> train / eval / save / resume.

`train()` sets a run up (output directory, data, engine, the newest checkpoint if any), then
runs the iterations: an optimizer step that a non-finite loss or gradient skips, a metrics
record at each log interval, evaluation and checkpoint saves at theirs, and a sample from the
final checkpoint at the end. The helpers around it guard the optimizer step and say how to
continue after a stop.

Everything stateful lives somewhere a checkpoint reaches: weights, masks, layer counters and
the adapter switch in the module; Adam state in the optimizer; RNG per rank; the data
position is the iteration number (see data_order.py); the learning rate is a function of the
iteration; the skip counters, the open log window (metrics.LogWindow) and time_s in the
client state.

A resume may change train.iters (to extend or shorten a run): it says so in one warning,
the LR schedule continues on the new total's schedule, and the adapters switch on at the
first iteration at or past the new total's switch point (adapters already on stay on).
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Optional
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import Config, validate_world
from ..errors import SlopeError
from ..model import dense_flops_per_token
from ..model.regions import compile_enabled
from ..parallel import initialize_parallel
from ..sparsity import adapters_active, after_optimizer_step
from . import checkpoint, faults
from .data_order import GlobalBatchOrder
from .distributed import DistInfo, all_reduce_mean, barrier
from .engine import build_engine, check_deepspeed_json, check_precision_layout
from .grad_norm import ClientGradNorm
from .metrics import (LogWindow, MetricsWriter, format_train_line, max_memory_gb, peak_flops,
                      resident_memory_gb)
from .optimizer import (
    apply_optimizer_settings,
    lr_at,
    mark_adapters_active,
    set_lr,
    switch_on_adapters,
)
from .resume_notes import (
    adapter_phase,
    adapters_on_since,
    iters_change_warning,
    previous_train_iters,
)
from .run_setup import (
    artifact_writer,
    check_output_dir,
    prepare_run_data,
    read_recorded_config,
    record_run_config,
    run_identity,
    sample_from_checkpoint,
)
from .steps import eval_indices, eval_loss, is_pipelined, make_batch, train_step

log = logging.getLogger(__name__)


def rerun_advice(cfg: Config, how: str, ckpt_dir: Optional[Path] = None) -> str:
    """How to continue after a stop: from the newest checkpoint, or from scratch when the run
    writes none (train.save_interval=0)."""
    if not cfg.train.save_interval:
        return ("rerun from scratch in a new train.output_dir (train.save_interval=0: no "
                "checkpoints were written)" + (f" {how}" if how else ""))
    where = f" (the newest one in {ckpt_dir} is intact)" if ckpt_dir is not None else ""
    return f"resume from the last checkpoint{where}" + (f" {how}" if how else "")


class TrainingStopped(SlopeError):
    """The run stopped itself (e.g. too many consecutive non-finite steps); the message
    says why and what to do. A SlopeError, so launch/pretrain.py prints it as one clean
    `error:` line with exit code 2 instead of a traceback."""


def _device_sync() -> None:
    """Wait for the queued GPU work (before timing something that is not training)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _all_gather_float(value: float) -> list[float]:
    """`value` of every rank, by global rank (one all-gather; [value] on a single process)."""
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return [value]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    mine = torch.tensor([value], dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(tdist.get_world_size())]
    tdist.all_gather(every, mine)
    return [t.item() for t in every]


def _any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on any (one scalar all-reduce)."""
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if torch.cuda.is_available():
        t = t.cuda()
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def guard_client_optimizer(engine) -> None:
    """Without ZeRO (and in fp32) DeepSpeed steps our torch AdamW with no overflow check.

    Give it the check DeepSpeed's ZeRO optimizers have: before stepping, look for a
    non-finite gradient on any rank; if there is one, do nothing and report `overflow`, so
    the engine counts the step as skipped (was_step_applied() is False) and zeroes the
    gradients. Parameters, Adam moments and step counts stay bit-identical.
    """
    opt = engine.optimizer
    if not isinstance(opt, torch.optim.Optimizer) or getattr(opt, "_slope_guarded", False):
        return
    step = opt.step

    def guarded_step(*args, **kwargs):
        finite = [torch.isfinite(p.grad).all() for g in opt.param_groups for p in g["params"]
                  if p.grad is not None]
        bad = bool(finite) and not bool(torch.stack(finite).all())  # one device sync
        opt.overflow = _any_rank(bad)
        if opt.overflow:
            return None
        return step(*args, **kwargs)

    opt.step, opt.overflow, opt._slope_guarded = guarded_step, False, True


def global_grad_norm(engine) -> Optional[float]:
    """The global gradient norm (before clipping) of the engine's last optimizer step, as
    DeepSpeed's optimizers compute it (ZeRO 1-3 and ZeRO-0's bf16/fp16 wrappers, pipeline
    included; ZeRO-0 in fp32 through grad_norm.ClientGradNorm, on logged steps); None where
    none was computed. Read at log intervals only: on a GPU it is a device tensor, and
    reading it waits for the step."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def guarded_train_step(engine, batches: list, it: int) -> tuple[float, bool]:
    """One optimizer step -> (mean loss, whether any rank saw a non-finite loss).

    A non-finite loss on any rank makes every ZeRO stage skip the step.

    The plain engine is driven micro-batch by micro-batch; before the last backward the
    ranks agree (one all-reduce) whether any loss of this step was non-finite, and if so
    the last loss is multiplied by NaN, so every gradient is NaN and DeepSpeed's overflow
    check (ZeRO 1-3) or ours (guard_client_optimizer, no ZeRO) discards the whole step.
    The pipeline engine runs the step inside train_batch; there we rely on the gradient
    check alone (a NaN loss gives NaN gradients) and stop if a non-finite loss was applied.
    """
    if is_pipelined(engine):
        loss_fn = engine.module.loss_fn
        if faults.active() and loss_fn is not None:  # injection only: wrap the last stage's loss
            engine.module.loss_fn = lambda out, y: faults.corrupt_loss(loss_fn(out, y), it)
        try:
            loss = train_step(engine, batches)
        finally:
            engine.module.loss_fn = loss_fn
        return loss, not math.isfinite(loss)
    losses: list = []
    for i, (x, y) in enumerate(batches):
        loss = faults.corrupt_loss(engine(x, y), it)
        losses.append(loss.detach())
        if i == len(batches) - 1:
            # The step's one host sync (not one per micro-batch: each would drain the GPU).
            values = torch.stack(losses).float().tolist()
            bad_any = _any_rank(not all(math.isfinite(v) for v in values))
            if bad_any:
                loss = loss * float("nan")
        engine.backward(loss)
        if i == 0:
            faults.point("after_backward", it)
        engine.step()
    return (float("nan") if bad_any else sum(values) / len(values)), bad_any


@dataclass
class TrainResult:
    final_iter: int
    val_loss: float
    train_loss: float
    resumed_from: int


def _destroy_engine(engine) -> None:
    """DeepSpeed's engine teardown (its optimizer's hooks and buffers) at the end of a finished
    run, before the caller shuts the process groups down (`distributed.shutdown_distributed`):
    the teardown still asks them for the rank. Not after an error: it synchronizes the device,
    which can wait forever on a collective a failed peer never joins, before the error line is
    printed. Never raises: a teardown problem must not turn a finished run into a failure."""
    try:
        engine.destroy()
    except Exception as e:  # noqa: BLE001
        log.warning("DeepSpeed engine teardown failed: %s", e)


def _print_sample(tag_dir: Path, out: Path, say) -> None:
    """The end-of-run sample from the final checkpoint (rank 0; the others wait at a barrier).
    A failure there is one warning line: the run finished, its results stand."""
    try:
        sample = sample_from_checkpoint(tag_dir)
    except Exception as e:  # noqa: BLE001
        print(f"warning: the end-of-run sample from {tag_dir} failed ({type(e).__name__}: "
              f"{e}); the run itself finished and its checkpoint stands",
              file=sys.stderr, flush=True)
        return
    say(f"sample from {tag_dir}:\n" + sample)
    say(f"generate more: python launch/generate.py --checkpoint {out} --prompt \"...\"")


def train(cfg: Config, dist: DistInfo) -> TrainResult:
    dp_size = validate_world(cfg, dist.world_size)
    check_precision_layout(cfg)
    check_deepspeed_json(cfg, dp_size)
    par = None
    if cfg.parallel.tensor > 1 or cfg.parallel.pipeline > 1:
        par = initialize_parallel(cfg.parallel.tensor, cfg.parallel.pipeline)
    dp_rank, main = (par.dp_rank if par else dist.rank), dist.is_main
    out = Path(cfg.train.output_dir)
    recorded = read_recorded_config(out)  # the one read, before it is (re)written
    given = check_output_dir(cfg, out, recorded, dp_size)
    data = prepare_run_data(cfg, main)  # sets model.vocab_size from the tokenizer
    record_run_config(given, out, main, recorded)
    say = tqdm.write if main else (lambda *_: None)

    torch.manual_seed(cfg.train.seed)
    model, engine, optimizer = build_engine(cfg, par, dp_size)
    stored = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 too

    ckpt_dir = out / "checkpoints"
    identity = run_identity(cfg, dp_size)
    client = checkpoint.load(engine, ckpt_dir, dist.rank, identity) if ckpt_dir.is_dir() \
        else None
    if client:  # DeepSpeed put the checkpoint's optimizer settings back: this run's config wins
        for change in apply_optimizer_settings(optimizer, cfg, adapters_active(model)):
            say(f"resume: {change}")
    start = client["iteration"] if client else 0
    skipped_total = client.get("skipped_total", 0) if client else 0
    consecutive = client.get("consecutive_skips", 0) if client else 0
    adapters_on = adapters_active(model)
    adapters_since = client.get("adapters_since") if client else None
    old_iters = previous_train_iters(client, recorded.as_dict()) if client else None
    if adapters_on:  # resumed with them on; an older checkpoint lacks adapters_since
        adapters_since = adapters_on_since(cfg, adapters_since, old_iters)
    # after the resume: with the adapters already on it says since when (as the warning of
    # a resume with another train.iters does), not this run's switch point
    say(f"model: {cfg.model.arch}, {stored:,} stored parameters on rank 0, "
        f"sparsity {'%d:%d' % (cfg.sparsity.n, cfg.sparsity.m) if cfg.sparsity.enabled else 'off'}"
        f", ZeRO-{cfg.zero.stage}, tp={cfg.parallel.tensor}, pp={cfg.parallel.pipeline}, "
        f"dp={dp_size}, {adapter_phase(cfg, adapters_on, adapters_since, start)}, "
        f"torch.compile {'on (first step compiles)' if compile_enabled() else 'off'}, "
        f"optimizer {type(engine.optimizer).__name__}")
    if not cfg.train.save_interval:
        say("train.save_interval=0: this run writes no checkpoints; if it stops, it cannot be "
            "resumed from where it stopped")
    if client:
        say(f"resumed from {ckpt_dir / checkpoint.tag_for(start)} (iteration {start})")
        if adapters_on:
            mark_adapters_active(optimizer, cfg)
        warning = iters_change_warning(cfg, old_iters, start, skipped_total, adapters_on,
                                       adapters_since)
        if main and warning and start < cfg.train.iters:
            print(warning, file=sys.stderr, flush=True)
    guard_client_optimizer(engine)
    client_norm = ClientGradNorm.attach(engine)  # None unless ZeRO-0 in fp32
    metrics = MetricsWriter(out, main, start, client.get("time_s") if client else None)
    order = GlobalBatchOrder(len(data.train), cfg.train.global_batch_size, cfg.train.seed)
    tokens_per_iter = cfg.train.global_batch_size * cfg.model.seq_len
    flops_per_token = dense_flops_per_token(cfg.model)
    val_batches = [make_batch(data.val, idx, engine.device)
                   for idx in eval_indices(cfg, len(data.val), dp_rank, dp_size)]
    peak = peak_flops()
    save_artifact = artifact_writer(engine, cfg, data, par)

    t0 = time.time()
    # the open log window, as the checkpoint left it (one ending mid-window goes on)
    window = LogWindow.restore(client.get("log_window") if client else None, dist.rank,
                               dist.world_size, t0)
    val_loss = train_loss = float("nan")
    bar = tqdm(total=cfg.train.iters, initial=start, disable=not main, desc="train",
               dynamic_ncols=True)
    try:  # on any way out, the bar ends its line before an error is printed
        for it in range(start, cfg.train.iters):
            faults.point("step_start", it)
            # `>=`: a resume that starts past the switch point (train.iters changed) switches
            # too; adapters_on is adapters_active(model), kept here so that a pipeline stage
            # without SLoPe layers switches once, not at every iteration
            if it >= cfg.adapter_start_iter and not adapters_on:
                faults.point("before_adapter_switch", it)
                n = switch_on_adapters(model, optimizer, cfg)
                adapters_on, adapters_since = True, it
                say(f"iter {it}: lazy low-rank adapters switched on ({n} layers on rank 0)")
                faults.point("after_adapter_switch", it)
            lr = lr_at(cfg, it - skipped_total)  # skipped steps do not advance the schedule
            set_lr(optimizer, lr)
            batches = [make_batch(data.train, mb, engine.device) for mb in
                       order.micro_batches(it, dp_rank, dp_size, cfg.train.micro_batch_size)]
            logged = (it + 1) % cfg.train.log_interval == 0 or it + 1 == cfg.train.iters
            if client_norm is not None:
                client_norm.wanted = logged  # the norm of a step that is not logged: not needed
            loss, loss_bad = guarded_train_step(engine, batches, it)
            applied = engine.was_step_applied()
            if applied and not math.isfinite(loss):
                raise TrainingStopped(f"iteration {it + 1}: the loss is {loss} but the optimizer "
                                      f"step was applied; the model is no longer trustworthy - "
                                      f"{rerun_advice(cfg, 'with a lower optimizer.lr')}")
            faults.point("after_step", it)
            done = it + 1
            bar.update(1)
            window.add(loss, applied)
            if applied:
                after_optimizer_step(model)
                consecutive = 0
            else:
                skipped_total, consecutive = skipped_total + 1, consecutive + 1
                reason = "loss" if loss_bad else "gradient"
                metrics.write({"iter": done, "skipped": True, "reason": f"non-finite {reason}",
                               # not "loss": that tag's curve holds applied steps only
                               "skipped_loss": loss if math.isfinite(loss) else None,
                               "skipped_steps": skipped_total, "consecutive_skips": consecutive})
                say(f"iter {done:>6} | step skipped: non-finite {reason} "
                    f"({consecutive} in a row, {skipped_total} in total)")
                if consecutive >= cfg.train.max_skipped_steps:
                    raise TrainingStopped(
                        f"stopping at iteration {done}: {consecutive} consecutive optimizer steps "
                        f"were skipped for a non-finite loss or gradient (train.max_skipped_steps "
                        f"= {cfg.train.max_skipped_steps}); lower optimizer.lr, raise "
                        f"optimizer.warmup_iters or check the data, then "
                        f"{rerun_advice(cfg, '', ckpt_dir)}")
            if logged:
                now = time.time()
                train_loss = all_reduce_mean(window.loss_sum / window.steps) if window.steps \
                    else float("nan")
                tps = tokens_per_iter * window.iters / window.elapsed(now)
                record = {"iter": done, "loss": train_loss if window.steps else None, "lr": lr,
                          "tokens": done * tokens_per_iter, "tokens_per_s": tps,
                          "adapters_active": adapters_on, "time_s": now - t0,
                          "mfu": flops_per_token * tps / (peak * dist.world_size) if peak else None,
                          "skipped_steps": skipped_total, "max_mem_gb": max_memory_gb(),
                          "resident_mem_gb": resident_memory_gb(),
                          "grad_norm": global_grad_norm(engine)}
                if window.steps:
                    metrics.write(record)
                    say(format_train_line(record))
                window.reset(now)
            # evaluation and saves: their time is taken out of the window's (training only)
            if (cfg.train.eval_interval and done % cfg.train.eval_interval == 0) \
                    or done == cfg.train.iters:
                _device_sync()
                began = time.time()
                val_loss = all_reduce_mean(eval_loss(engine, faults.during("eval", it,
                                                                           val_batches)))
                eval_s = time.time() - began
                window.exclude(eval_s)
                metrics.write({"iter": done, "val_loss": val_loss,
                               "val_ppl": math.exp(val_loss) if val_loss < 700 else float("inf"),
                               "eval_s": eval_s})
                say(f"iter {done:>6} | val loss {val_loss:.4f} | "
                    f"val ppl {math.exp(min(val_loss, 700)):.2f}")
            if cfg.train.save_interval and (done % cfg.train.save_interval == 0
                                            or done == cfg.train.iters):
                _device_sync()
                began = time.time()
                state = {"iteration": done, "skipped_total": skipped_total,
                         "consecutive_skips": consecutive, "train_iters": cfg.train.iters,
                         "adapters_since": adapters_since, "time_s": metrics.run_time(began - t0),
                         "log_window": window.state(began, _all_gather_float(window.loss_sum))}
                path = checkpoint.save(engine, ckpt_dir, done, state, dist.rank, save_artifact,
                                       cfg.train.keep_checkpoints, identity)
                save_s = time.time() - began
                window.exclude(save_s)
                say(f"saved checkpoint {path} ({save_s:.1f} s)")
    finally:
        bar.close()
        metrics.close()
    if start >= cfg.train.iters:
        say(f"nothing to do: {out} already holds a checkpoint at iteration {start} "
            f"(train.iters = {cfg.train.iters})")
    elif main and cfg.train.save_interval:
        _print_sample(ckpt_dir / checkpoint.tag_for(cfg.train.iters), out, say)
    barrier()
    _destroy_engine(engine)
    return TrainResult(cfg.train.iters, val_loss, train_loss, start)
