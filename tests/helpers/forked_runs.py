"""Fork-started runs of launch/pretrain.py's main(): torch and DeepSpeed are already imported
in the test process, so a child starts in milliseconds. A fault is injected through
SLOPE_FAULT (slope_megatron/training/faults.py); a killed child dies by SIGKILL - no handler,
no flush - and, as a cluster scheduler would, its peer ranks are then killed too."""
from __future__ import annotations

import importlib
import os
import signal
import socket
import sys
import time
import traceback

import torch
from helpers.launch import pretrain_main

from slope_megatron.training import faults

importlib.import_module("slope_megatron.training.loop")  # before forking: fast children


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv, world: int = 1, fault: str | None = None) -> list[int]:
    """Fork `world` ranks running pretrain main(argv); their pids (see `wait`)."""
    port = _free_port()
    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                                  LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=str(port), OMP_NUM_THREADS="1")
                os.environ.pop(faults.ENV, None)
                if fault:
                    os.environ[faults.ENV] = fault
                torch.set_num_threads(1)
                code = pretrain_main(argv)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    return pids


def wait(pids: list[int], timeout: float = 120.0, stop_on_error: bool = False) -> list[int]:
    """Exit codes of the ranks `start` forked (negative: killed by that signal).

    When one rank dies by a signal, the others are killed too (the job is gone); with
    `stop_on_error` also when one exits with an error status, as torchrun does (its peers
    may be left waiting in a collective for it)."""
    codes: dict[int, int] = {}
    deadline = time.time() + timeout
    while len(codes) < len(pids):
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) \
                    else os.WEXITSTATUS(status)
                if codes[pid] < 0 or (stop_on_error and codes[pid] != 0):
                    # pre-empted: the scheduler takes the whole job down
                    for other in pids:
                        if other not in codes:
                            os.kill(other, signal.SIGKILL)
        if time.time() > deadline:
            for pid in pids:
                if pid not in codes:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)  # reaped: no zombie for the rest of the session
            raise TimeoutError(f"run did not finish in {timeout}s")
        time.sleep(0.02)
    return [codes[p] for p in pids]


def launch(argv, world: int = 1, fault: str | None = None, timeout: float = 120.0,
           stop_on_error: bool = False) -> list[int]:
    """Run pretrain main() on `world` forked ranks; exit codes (negative: killed by signal)."""
    return wait(start(argv, world, fault), timeout, stop_on_error)
