"""The pretraining loop: data -> model -> DeepSpeed engine -> train / eval / save / resume.

`train()` sets a run up (output directory, data, engine, the newest checkpoint if any), then
runs the iterations: an optimizer step that a non-finite loss or gradient skips, a metrics
record at each log interval, evaluation and checkpoint saves at theirs, and a sample from the
final checkpoint at the end. The helpers around it guard the optimizer step and say how to
continue after a stop.

Everything stateful lives somewhere a checkpoint reaches: weights, masks, layer counters and
the adapter switch in the module; Adam state in the optimizer; RNG per rank; the data
position is the iteration number (see data/order.py); the learning rate is a function of the
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
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from ..config import Config
from ..data.order import ORDER_VERSION, GlobalBatchOrder
from ..distributed import DistInfo, all_gather_float, all_reduce_mean, barrier
from ..errors import SlopeError
from ..model import dense_flops_per_token
from ..model.regions import compile_enabled
from ..sparsity import adapters_active, after_optimizer_step
from . import checkpoint, faults, stop_signals
from .adapter_schedule import (
    adapter_phase,
    adapters_on_since,
    iters_change_warning,
    previous_train_iters,
)
from .checkpoint import artifact_writer, sample_from_checkpoint
from .grad_norm import ClientGradNorm, global_grad_norm
from .metrics import (LogWindow, MetricsWriter, format_train_line, max_memory_gb, peak_flops,
                      resident_memory_gb)
from .optimizer import lr_at, set_lr, switch_on_adapters
from .startup import Run, start_run
from .step import eval_indices, eval_loss, guard_client_optimizer, guarded_train_step, make_batch

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

    every_rank = True  # the ranks decide to stop together: rank 0's line says it


def _device_sync() -> None:
    """Wait for the queued GPU work (before timing something that is not training)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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


@dataclass
class _LoopState:
    """The loop's counters: they come from the resumed checkpoint's client state and go into
    the next checkpoint's (`client_state`)."""
    start: int  # the first iteration this process runs
    skipped_total: int  # skipped steps so far: they do not advance the LR schedule
    consecutive: int  # skipped in a row: train.max_skipped_steps of them stop the run
    # adapters_active(model), kept here so that a pipeline stage without SLoPe layers
    # switches once, not at every iteration
    adapters_on: bool
    adapters_since: Optional[int]  # the iteration they switched on at
    old_iters: Optional[int]  # train.iters of the run that wrote the resumed checkpoint
    data_order: int  # GlobalBatchOrder's version: a resume keeps the checkpoint's
    val_loss: float = float("nan")
    train_loss: float = float("nan")

    @classmethod
    def resumed(cls, client: Optional[dict], cfg: Config, model, recorded) -> "_LoopState":
        """The counters as `client` (None: a fresh run) left them."""
        adapters_on = adapters_active(model)
        adapters_since = client.get("adapters_since") if client else None
        old_iters = previous_train_iters(client, recorded.as_dict()) if client else None
        if adapters_on:  # resumed with them on; an older checkpoint lacks adapters_since
            adapters_since = adapters_on_since(cfg, adapters_since, old_iters)
        return cls(start=client["iteration"] if client else 0,
                   skipped_total=client.get("skipped_total", 0) if client else 0,
                   consecutive=client.get("consecutive_skips", 0) if client else 0,
                   adapters_on=adapters_on, adapters_since=adapters_since, old_iters=old_iters,
                   # a checkpoint from before the version was recorded: the first order
                   data_order=client.get("data_order", 1) if client else ORDER_VERSION)

    def client_state(self, cfg: Config, done: int, time_s: float, log_window: dict) -> dict:
        """A checkpoint's client state after iteration `done` (what `resumed` reads back)."""
        return {"iteration": done, "skipped_total": self.skipped_total,
                "consecutive_skips": self.consecutive, "train_iters": cfg.train.iters,
                "adapters_since": self.adapters_since, "time_s": time_s,
                "log_window": log_window, "data_order": self.data_order}


def _print_banner(run: Run, s: _LoopState) -> None:
    """What this run is, and what it resumed from. After the resume: with the adapters
    already on it says since when (as the warning of a resume with another train.iters
    does), not this run's switch point."""
    cfg, say = run.cfg, run.say
    say(f"model: {cfg.model.arch}, {run.stored:,} stored parameters on rank 0, "
        f"sparsity {'%d:%d' % (cfg.sparsity.n, cfg.sparsity.m) if cfg.sparsity.enabled else 'off'}"
        f", ZeRO-{cfg.zero.stage}, tp={cfg.parallel.tensor}, pp={cfg.parallel.pipeline}, "
        f"dp={run.dp_size}, {adapter_phase(cfg, s.adapters_on, s.adapters_since, s.start)}, "
        f"torch.compile {'on (first step compiles)' if compile_enabled() else 'off'}, "
        f"optimizer {type(run.engine.optimizer).__name__}")
    if not cfg.train.save_interval:
        say("train.save_interval=0: this run writes no checkpoints; if it stops, it cannot be "
            "resumed from where it stopped")
    if run.client:
        say(f"resumed from {run.ckpt_dir / checkpoint.tag_for(s.start)} (iteration {s.start})")
        warning = iters_change_warning(cfg, s.old_iters, s.start, s.skipped_total,
                                       s.adapters_on, s.adapters_since)
        if run.main and warning and s.start < cfg.train.iters:
            print(warning, file=sys.stderr, flush=True)


@dataclass
class _LoopSetup:
    """What the iterations use, set up once before the first."""
    client_norm: Optional[ClientGradNorm]  # None unless ZeRO-0 in fp32
    metrics: MetricsWriter
    order: GlobalBatchOrder
    tokens_per_iter: int
    flops_per_token: float
    val_batches: list
    peak: Optional[float]
    save_artifact: Callable[[Path], None]
    t0: float
    window: LogWindow  # the open log window, as the checkpoint left it


def _set_up_loop(run: Run, s: _LoopState) -> _LoopSetup:
    """The optimizer guard, metrics, batch order and validation batches; the clock starts
    last, and a window the checkpoint left open mid-interval goes on."""
    cfg, client, engine = run.cfg, run.client, run.engine
    guard_client_optimizer(engine)
    client_norm = ClientGradNorm.attach(engine)
    metrics = MetricsWriter(run.out, run.main, s.start, client.get("time_s") if client else None)
    order = GlobalBatchOrder(len(run.data.train), cfg.train.global_batch_size, cfg.train.seed,
                             s.data_order)
    tokens_per_iter = cfg.train.global_batch_size * cfg.model.seq_len
    flops_per_token = dense_flops_per_token(cfg.model)
    val_batches = [make_batch(run.data.val, idx, engine.device)
                   for idx in eval_indices(cfg, len(run.data.val), run.dp_rank, run.dp_size)]
    peak = peak_flops()
    save_artifact = artifact_writer(engine, cfg, run.data, run.par)
    t0 = time.time()
    window = LogWindow.restore(client.get("log_window") if client else None, run.dist.rank,
                               run.dist.world_size, t0)
    return _LoopSetup(client_norm, metrics, order, tokens_per_iter, flops_per_token,
                      val_batches, peak, save_artifact, t0, window)


def _switch_on_adapters(run: Run, s: _LoopState, it: int) -> None:
    """The lazy low-rank adapters' switch, at iteration `it`."""
    faults.point("before_adapter_switch", it)
    n = switch_on_adapters(run.model, run.optimizer, run.cfg)
    s.adapters_on, s.adapters_since = True, it
    run.say(f"iter {it}: lazy low-rank adapters switched on ({n} layers on rank 0)")
    faults.point("after_adapter_switch", it)


def _step(run: Run, loop: _LoopSetup, it: int, logged: bool) -> tuple[float, bool, bool]:
    """Iteration `it`'s optimizer step -> (loss, non-finite loss on any rank, applied). A
    non-finite loss that was applied stops the run: the weights took it."""
    cfg = run.cfg
    batches = [make_batch(run.data.train, mb, run.engine.device) for mb in
               loop.order.micro_batches(it, run.dp_rank, run.dp_size, cfg.train.micro_batch_size)]
    if loop.client_norm is not None:
        loop.client_norm.wanted = logged  # the norm of a step that is not logged: not needed
    loss, loss_bad = guarded_train_step(run.engine, batches, it)
    applied = run.engine.was_step_applied()
    if applied and not math.isfinite(loss):
        raise TrainingStopped(f"iteration {it + 1}: the loss is {loss} but the optimizer "
                              f"step was applied; the model is no longer trustworthy - "
                              f"{rerun_advice(cfg, 'with a lower optimizer.lr')}")
    return loss, loss_bad, applied


def _record_skip(run: Run, s: _LoopState, metrics: MetricsWriter, done: int, loss: float,
                 loss_bad: bool) -> None:
    """A skipped step: counted, recorded and said; too many in a row stop the run."""
    cfg = run.cfg
    s.skipped_total, s.consecutive = s.skipped_total + 1, s.consecutive + 1
    reason = "loss" if loss_bad else "gradient"
    metrics.write({"iter": done, "skipped": True, "reason": f"non-finite {reason}",
                   # not "loss": that tag's curve holds applied steps only
                   "skipped_loss": loss if math.isfinite(loss) else None,
                   "skipped_steps": s.skipped_total, "consecutive_skips": s.consecutive})
    run.say(f"iter {done:>6} | step skipped: non-finite {reason} "
            f"({s.consecutive} in a row, {s.skipped_total} in total)")
    if s.consecutive >= cfg.train.max_skipped_steps:
        raise TrainingStopped(
            f"stopping at iteration {done}: {s.consecutive} consecutive optimizer steps "
            f"were skipped for a non-finite loss or gradient (train.max_skipped_steps "
            f"= {cfg.train.max_skipped_steps}); lower optimizer.lr, raise "
            f"optimizer.warmup_iters or check the data, then "
            f"{rerun_advice(cfg, '', run.ckpt_dir)}")


def _log_window(run: Run, s: _LoopState, loop: _LoopSetup, done: int, lr: float) -> float:
    """The train record of the window ending at `done` (none if it had no applied step),
    then the next window -> the mean loss over ranks (NaN without an applied step)."""
    window = loop.window
    now = time.time()
    train_loss = all_reduce_mean(window.loss_sum / window.steps) if window.steps \
        else float("nan")
    tps = loop.tokens_per_iter * window.iters / window.elapsed(now)
    peak = loop.peak
    record = {"iter": done, "loss": train_loss if window.steps else None, "lr": lr,
              "tokens": done * loop.tokens_per_iter, "tokens_per_s": tps,
              "adapters_active": s.adapters_on, "time_s": now - loop.t0,
              "mfu": loop.flops_per_token * tps / (peak * run.dist.world_size) if peak else None,
              "skipped_steps": s.skipped_total, "max_mem_gb": max_memory_gb(),
              "resident_mem_gb": resident_memory_gb(),
              "grad_norm": global_grad_norm(run.engine)}
    if window.steps:
        loop.metrics.write(record)
        run.say(format_train_line(record))
    window.reset(now)
    return train_loss


def _evaluate(run: Run, loop: _LoopSetup, it: int, done: int) -> float:
    """The validation loss (mean over ranks), recorded and said; its time is taken out of
    the log window's (which counts training only)."""
    _device_sync()
    began = time.time()
    val_loss = all_reduce_mean(eval_loss(run.engine, faults.during("eval", it,
                                                                   loop.val_batches)))
    eval_s = time.time() - began
    loop.window.exclude(eval_s)
    loop.metrics.write({"iter": done, "val_loss": val_loss,
                        "val_ppl": math.exp(val_loss) if val_loss < 700 else float("inf"),
                        "eval_s": eval_s})
    run.say(f"iter {done:>6} | val loss {val_loss:.4f} | "
            f"val ppl {math.exp(min(val_loss, 700)):.2f}")
    return val_loss


def _save(run: Run, s: _LoopState, loop: _LoopSetup, done: int) -> None:
    """A checkpoint after iteration `done`; its time is taken out of the log window's."""
    _device_sync()
    began = time.time()
    time_s = loop.metrics.run_time(began - loop.t0)
    log_window = loop.window.state(began, all_gather_float(loop.window.loss_sum))
    path = checkpoint.save(run.engine, run.ckpt_dir, done,
                           s.client_state(run.cfg, done, time_s, log_window), run.dist.rank,
                           loop.save_artifact, run.cfg.train.keep_checkpoints, run.identity)
    save_s = time.time() - began
    loop.window.exclude(save_s)
    run.say(f"saved checkpoint {path} ({save_s:.1f} s)")


def _stop_on_signal(run: Run, s: _LoopState, loop: _LoopSetup, done: int, saved: bool,
                    what: str) -> None:
    """Every rank, after iteration `done`, when any rank received a stop signal: save (unless
    this iteration just did), then stop with the one line and exit status 75."""
    if run.cfg.train.save_interval:
        if not saved:
            _save(run, s, loop, done)
        stop_signals.mark_finished()
        message = f"saved iter {done} on {what}; rerun the same command to resume"
    else:
        message = (f"stopped after iter {done} on {what}; train.save_interval=0, so nothing "
                   f"was saved and this run cannot be resumed")
    stop = stop_signals.StoppedBySignal(message)
    stop.agreed = True  # every rank stops here: the end of the run may meet at a barrier
    raise stop


def train(cfg: Config, dist: DistInfo) -> TrainResult:
    """Set the run up, run its iterations (or the rest of them, after a resume), end it."""
    run = start_run(cfg, dist)
    s = _LoopState.resumed(run.client, cfg, run.model, run.recorded)
    _print_banner(run, s)
    loop = _set_up_loop(run, s)
    iters = cfg.train.iters
    bar = tqdm(total=iters, initial=s.start, disable=not run.main, desc="train",
               dynamic_ncols=True)
    stop_signals.enter_loop()  # from here a stop signal saves before it stops the run
    try:  # on any way out, the bar ends its line before an error is printed
        for it in range(s.start, iters):
            faults.point("step_start", it)
            # `>=`: a resume that starts past the switch point (train.iters changed) switches too
            if it >= cfg.adapter_start_iter and not s.adapters_on:
                _switch_on_adapters(run, s, it)
            lr = lr_at(cfg, it - s.skipped_total)  # skipped steps do not advance the schedule
            set_lr(run.optimizer, lr)
            done = it + 1
            logged = done % cfg.train.log_interval == 0 or done == iters
            loss, loss_bad, applied = _step(run, loop, it, logged)
            faults.point("after_step", it)
            bar.update(1)
            loop.window.add(loss, applied)
            if applied:
                after_optimizer_step(run.model)
                s.consecutive = 0
            else:
                _record_skip(run, s, loop.metrics, done, loss, loss_bad)
            if logged:
                s.train_loss = _log_window(run, s, loop, done, lr)
            if (cfg.train.eval_interval and done % cfg.train.eval_interval == 0) or done == iters:
                s.val_loss = _evaluate(run, loop, it, done)
            saved = bool(cfg.train.save_interval) and (done % cfg.train.save_interval == 0
                                                       or done == iters)
            if saved:
                _save(run, s, loop, done)
            stop = stop_signals.agreed_stop() if done < iters else None  # collective
            if stop is not None:
                _stop_on_signal(run, s, loop, done, saved, stop)
    finally:
        stop_signals.leave_loop()
        bar.close()
        loop.metrics.close()
    if s.start >= iters:
        run.say(f"nothing to do: {run.out} already holds a checkpoint at iteration {s.start} "
                f"(train.iters = {iters})")
    elif run.main and cfg.train.save_interval:
        _print_sample(run.ckpt_dir / checkpoint.tag_for(iters), run.out, run.say)
    barrier()
    _destroy_engine(run.engine)
    return TrainResult(iters, s.val_loss, s.train_loss, s.start)
