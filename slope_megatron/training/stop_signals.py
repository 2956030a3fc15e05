"""Stop and save on a signal: SIGTERM, SIGINT, SIGUSR1 (train.stop_signals).

A scheduler ends a job with SIGTERM (pre-emption, the time limit; SLURM sends SIGKILL
KillWait seconds later), a user with Ctrl-C, and SLURM can send SIGUSR1 ahead of the time limit
(`sbatch --signal=USR1@120`). Without a handler each of them threw away every iteration since
the last checkpoint. With it:

- during the iterations, the handler only records the signal. The loop asks once per iteration,
  collectively (`agreed_stop`: one all-reduce), whether any rank got one, so every rank stops
  after the same iteration; it then saves through the normal save path and raises
  StoppedBySignal: `saved iter N on SIGTERM; rerun the same command to resume`, exit status 75
  (errors.EXIT_STOPPED_BY_SIGNAL);
- during start-up (config checks, data, engine, resume) there is nothing new to save: the
  handler raises StoppedBySignal at once (same status, no traceback);
- a second signal exits at once, by the signal's default action, without saving. A repeat
  within REPEAT_S of the first is the same request delivered twice - launchers forward a
  signal the scheduler (or the terminal, for Ctrl-C) has already sent to every process of the
  job - and is not counted;
- once the stop is complete (saved, or nothing to save), the stop signals are ignored while
  the process exits with 75: a launcher that ends the other ranks as soon as one of them exits
  (srun --kill-on-bad-exit, deepspeed's launch.py) must not turn the saved stop into a
  failure, and Python restores default actions during its shutdown for handlers, not for
  ignored signals.

A signal the process inherited as ignored (nohup, `&` in a script) stays ignored.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Iterable, Optional

from ..distributed import all_gather_object, any_rank
from ..errors import EXIT_STOPPED_BY_SIGNAL

REPEAT_S = 2.0  # a second signal sooner than this after the first is the same request
DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class StoppedBySignal(BaseException):
    """The run stopped on a signal, after saving (or during start-up, with nothing to save).
    Not an error: launch/pretrain.py prints the message as it is and exits 75. A
    BaseException, as KeyboardInterrupt is: raised from the handler during start-up, wherever
    the main thread is, it must not be swallowed by library code that catches Exception."""

    every_rank = True  # the ranks agree on the stop; rank 0 says it
    exit_code = EXIT_STOPPED_BY_SIGNAL
    agreed = False  # True when every rank stopped after the same iteration (and saved)


class _State:
    def __init__(self):
        self.previous: dict[int, object] = {}  # signal -> the handler before ours
        self.signum: Optional[int] = None  # the first signal received
        self.first_at = 0.0
        self.phase = "startup"  # startup | loop | done | finished (a stop, complete)
        self.cause: Optional[str] = None  # why a signal was sent to ourselves


_state = _State()


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _say(text: str) -> None:
    """One line on stderr from a signal handler, on rank 0 only: os.write, not print (a
    handler may interrupt a print to the same stream)."""
    if os.environ.get("RANK", "0") == "0":
        try:
            os.write(2, f"\n{text}\n".encode())
        except OSError:
            pass


def _handle(signum, frame) -> None:
    now = time.monotonic()
    name = signal_name(signum)
    if _state.signum is not None:
        if now - _state.first_at >= REPEAT_S:
            _say(f"{name} again: stopping at once, without saving")
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        return
    _state.signum, _state.first_at = signum, now
    if _state.phase == "startup":
        raise StoppedBySignal(f"stopped on {name}{_cause()} during start-up, before any "
                              f"iteration ran (nothing to save); rerun the same command to "
                              f"resume")
    if _state.phase == "loop":
        _say(f"{name}{_cause()} received: finishing this iteration, then saving a checkpoint "
             f"and stopping (send {name} again to stop at once, without saving)")


def _cause() -> str:
    return f" ({_state.cause})" if _state.cause else ""


def install(names: Iterable[str] = DEFAULT_SIGNALS) -> None:
    """Handle the signals `names` (e.g. "SIGTERM") from now on, in the start-up phase.
    Main thread only (Python's rule for signal handlers)."""
    reset()
    for name in names:
        signum = getattr(signal, name)
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN:
            continue
        _state.previous[signum] = current
        signal.signal(signum, _handle)


def uninstall() -> None:
    """Put the handlers back as install() found them."""
    for signum, previous in _state.previous.items():
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    reset()


def reset() -> None:
    global _state
    previous = _state.previous
    _state = _State()
    _state.previous = previous


def enter_loop() -> None:
    """The iterations begin: a signal from now on stops after saving. One that came at the
    very end of start-up (after its handler could raise) stops at the first check."""
    _state.phase = "loop"


def leave_loop() -> None:
    """The iterations are over (finished, or stopped): a signal no longer saves anything."""
    if _state.phase != "finished":
        _state.phase = "done"


def mark_finished() -> None:
    """The stop is complete - its checkpoint saved, or nothing to save: the stop signals are
    ignored from now on, while the process exits with status 75 (`finished` tells the caller
    not to `uninstall`)."""
    for signum in _state.previous:
        signal.signal(signum, signal.SIG_IGN)
    _state.phase = "finished"


def finished() -> bool:
    return _state.phase == "finished"


def send_to_self(cause: str, signum: int = signal.SIGTERM) -> None:
    """Stop this process as `signum` would, saying why (a watchdog thread's way to stop the
    run: the main thread handles the signal)."""
    _state.cause = cause
    os.kill(os.getpid(), signum)


def received() -> Optional[str]:
    """The first signal this process received (its name and cause), None when none came."""
    return None if _state.signum is None else signal_name(_state.signum) + _cause()


def agreed_stop() -> Optional[str]:
    """Collective, once per iteration: what stops the run when any rank received a signal
    (rank 0's signal, else the first rank's that got one, named with its rank), else None."""
    mine = received()
    if not any_rank(mine is not None):
        return None
    every = all_gather_object(mine)
    for rank, name in enumerate(every):
        if name is not None:
            return name if rank == 0 else f"{name} on rank {rank}"
    return "a signal"
