"""Pretrain a SLoPe (or dense) language model.

    deepspeed launch/pretrain.py --config configs/demo.yaml [--set section.key=value ...]
    torchrun --nproc-per-node 2 launch/pretrain.py --config ...
    mpirun -n 2 python launch/pretrain.py --config ...
    python launch/pretrain.py --config ...            (one process)

Rerunning the same command resumes from the newest complete checkpoint in
train.output_dir. `--help-config` prints every config key with its default and meaning.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def parse_args(argv=None):
    from slope_megatron.cli import Once, add_set_argument

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action=Once, help="YAML config (see configs/)")
    add_set_argument(p, "override config keys, e.g. --set train.iters=100 zero.stage=2")
    p.add_argument("--help-config", action="store_true", help="print the config reference")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p.parse_args(argv)


def _stdout_closed() -> int:
    """The reader of our stdout went away (`--help-config | head`): what was wanted was read,
    so stop quietly instead of a BrokenPipeError traceback. stdout is pointed at devnull so
    the interpreter's final flush of what is still buffered cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (e.g. a captured stdout)
        pass
    return 0


def _raised_on_every_rank(error: BaseException) -> bool:
    """Whether every rank raises this same error, so that rank 0's `error:` line says it for
    all: errors marked so (`every_rank`: config errors - every rank checks the same config -,
    a stopped run, a failure the ranks shared, e.g. preparing the data, or a check of the
    checkpoint they all read). Anything else - one rank's own checkpoint file refused, say -
    may be that rank's alone."""
    return bool(getattr(error, "every_rank", False))


def main(argv=None) -> int:
    args = parse_args(argv)  # --help: argparse itself ignores a closed stdout
    from slope_megatron.config import config_reference, load_config
    from slope_megatron.disk_space import is_disk_full, no_space_error
    from slope_megatron.errors import (EXIT_OUT_OF_MEMORY, EXIT_USER_ERROR, SlopeError,
                                       out_of_memory_message)

    if args.help_config:
        try:
            print(config_reference())
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        except BrokenPipeError:
            return _stdout_closed()
        return 0
    from slope_megatron.distributed import process_rank

    rank = process_rank()  # before any process group, by init_distributed's rules: who prints
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch  # here, not at the top: --help-config stays quick

    from slope_megatron.distributed import shutdown_distributed
    from slope_megatron.training import run_lock, stop_signals

    completed = started = False
    cfg = None
    try:
        cfg = load_config(args.config, args.set)  # validated before any process group exists
        _prepare_process(cfg)
        from slope_megatron.training import train
        from slope_megatron.distributed import init_distributed

        dist = init_distributed()  # builds DeepSpeed's CPU communication op (build_lock.py)
        started = True
        train(cfg, dist)
        completed = True
    except stop_signals.StoppedBySignal as e:  # saved (or nothing to save yet): not an error
        stop_signals.mark_finished()  # a launcher's SIGTERM on the way out: still status 75
        if rank == 0:
            print(e, file=sys.stderr, flush=True)
        completed = bool(getattr(e, "agreed", False))  # every rank stopped at one iteration
        return e.exit_code
    except SlopeError as e:  # config, data, checkpoint or a stopped run: one line, no traceback
        # rank 0 says what every rank raised alike (all of it before train(): the config and
        # the launch checks); a rank that failed in train() on its own says so itself, as with
        # out-of-memory - its peers may be left waiting for it, with nothing to say
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        elif started and not _raised_on_every_rank(e):
            print(f"error: rank {rank}: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except torch.cuda.OutOfMemoryError as e:  # torch.OutOfMemoryError from 2.5 on is this
        # whichever rank ran out says so (it may not be rank 0); no traceback to scroll past
        print(f"error: {'' if rank == 0 else f'rank {rank}: '}{out_of_memory_message(e)}",
              file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        # a full disk wherever it was met (metrics, TensorBoard, run_config.yaml, ...): one line
        error = no_space_error(e, Path(cfg.train.output_dir if cfg else "."))
        print(f"error: {'' if rank == 0 else f'rank {rank}: '}{error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # Ctrl-C before its handler was installed (or SIGINT not in
        # train.stop_signals): one line instead of a traceback from every rank
        if rank == 0:
            print("interrupted (SIGINT); nothing was saved since the last checkpoint",
                  file=sys.stderr)
        return 130
    finally:
        stop_signals.leave_loop()  # a signal from here on no longer raises (nor saves)
        # every rank, every way out: barrier (only after a finished run), destroy every group,
        # drop the references that keep gloo's threads alive (see shutdown_distributed)
        shutdown_distributed(completed)
        run_lock.release_all()
        if not stop_signals.finished():  # a stopped run keeps them until it has exited
            stop_signals.uninstall()
    return 0


def _prepare_process(cfg) -> None:
    """Before the process group (and DeepSpeed's first JIT build) exists: the signals that stop
    and save (train.stop_signals), the watch on a `deepspeed` launcher that goes away, and
    kernel build locks that a dead process left behind cleared instead of waited for."""
    from slope_megatron.build_lock import install as install_build_lock
    from slope_megatron.training import launcher_watch, stop_signals

    stop_signals.install(cfg.train.stop_signals)
    launcher_watch.start()
    install_build_lock()


if __name__ == "__main__":
    sys.exit(main())
