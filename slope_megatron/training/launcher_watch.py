"""Ranks started by the `deepspeed` command stop (and save) when that command goes away.

`deepspeed launch/pretrain.py ...` is three generations of processes: the runner (the
`deepspeed` command, deepspeed/launcher/runner.py), its child `python -m
deepspeed.launcher.launch`, and the ranks. launch.py passes SIGINT/SIGTERM on to the ranks and
ends them all when one fails; but for a launch on this node the runner installs no handler and
does not pass anything on: SIGTERM to it (a scheduler's, `kill <pid>`) ends the runner alone,
and launch.py - now a child of init - and the ranks train on to the end, next to the rerun that
a user or scheduler starts in the same directory.

So a rank whose parent is deepspeed.launcher.launch watches, once a second, that its parent is
still its parent and that the parent's parent is still the runner it started under. When
either has gone it sends itself SIGTERM (stop_signals.send_to_self): it finishes its
iteration, saves and exits 75, and launch.py, seeing a rank exit non-zero, ends the others
and exits with that status - no process is left behind. Linux only (/proc); elsewhere nothing
is watched.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Optional

from . import stop_signals

POLL_S = 1.0
LAUNCH_MODULE = "deepspeed.launcher.launch"


def _parent_of(pid: int) -> Optional[int]:
    """The parent pid of `pid` from /proc/<pid>/stat; None when it is gone (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return None if fields[0] == "Z" else int(fields[1])  # a zombie has gone too


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _watch(parent: int, runner: int) -> None:
    while True:
        threading.Event().wait(POLL_S)
        if os.getppid() != parent:
            stop_signals.send_to_self(f"the deepspeed launcher of this rank, pid {parent}, "
                                      f"exited")
            return
        if _parent_of(parent) != runner:
            stop_signals.send_to_self(f"the deepspeed command, pid {runner}, exited")
            return


def start() -> bool:
    """Start watching when this process was started by deepspeed.launcher.launch; whether
    it was."""
    parent = os.getppid()
    if LAUNCH_MODULE not in _cmdline(parent):
        return False
    runner = _parent_of(parent)
    if runner is None:
        return False
    if runner == 1 and not any("deepspeed" in arg for arg in _cmdline(1)):
        # the runner was gone before we looked (init adopted launch.py); in a container whose
        # first process is the `deepspeed` command itself, it is not
        stop_signals.send_to_self("the deepspeed command that started this rank had exited "
                                  "before it started")
        return True
    threading.Thread(target=_watch, args=(parent, runner), name="slope-launcher-watch",
                     daemon=True).start()
    return True
