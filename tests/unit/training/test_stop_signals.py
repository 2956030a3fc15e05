"""stop_signals: what a stop signal does in each phase of a run, and a second one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from slope_megatron.config import ConfigError, load_config
from slope_megatron.errors import EXIT_STOPPED_BY_SIGNAL
from slope_megatron.training import stop_signals


@pytest.fixture
def handled():
    stop_signals.install(["SIGTERM", "SIGUSR1"])
    yield
    stop_signals.uninstall()


def test_during_start_up_a_signal_stops_at_once_with_nothing_to_save(handled):
    with pytest.raises(stop_signals.StoppedBySignal) as e:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs here
    assert "stopped on SIGTERM during start-up" in str(e.value)
    assert e.value.exit_code == EXIT_STOPPED_BY_SIGNAL == 75
    assert not isinstance(e.value, Exception)  # library code catching Exception lets it pass


def test_during_the_iterations_a_signal_is_recorded_and_agreed_on(handled):
    stop_signals.enter_loop()
    assert stop_signals.agreed_stop() is None
    os.kill(os.getpid(), signal.SIGUSR1)
    assert stop_signals.received() == "SIGUSR1"
    assert stop_signals.agreed_stop() == "SIGUSR1"  # a world of one


def test_after_the_iterations_a_signal_changes_nothing(handled):
    stop_signals.enter_loop()
    stop_signals.leave_loop()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop_signals.received() == "SIGTERM"


def test_a_repeat_at_once_is_the_same_request_and_a_later_second_signal_exits_at_once():
    """Launchers forward a signal the scheduler already sent to every process: a repeat within
    REPEAT_S is not a second request. A later one is: the default action, no saving."""
    code = ("import os, signal, time; from slope_megatron.training import stop_signals; "
            "stop_signals.REPEAT_S = 0.5; stop_signals.install(['SIGTERM']); "
            "stop_signals.enter_loop(); os.kill(os.getpid(), signal.SIGTERM); "
            "os.kill(os.getpid(), signal.SIGTERM); print('repeat survived', flush=True); "
            "time.sleep(1); os.kill(os.getpid(), signal.SIGTERM); time.sleep(5); "
            "print('second survived')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert "repeat survived" in done.stdout and "second survived" not in done.stdout
    assert done.returncode == -signal.SIGTERM
    assert "SIGTERM again: stopping at once, without saving" in done.stderr


def test_an_ignored_signal_stays_ignored():
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        stop_signals.install(["SIGUSR1"])
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
        stop_signals.uninstall()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_stop_signals_config_names_catchable_signals():
    assert load_config(None, ["train.stop_signals=[SIGUSR2]"]).train.stop_signals == ["SIGUSR2"]
    assert load_config(None, ["train.stop_signals=[]"]).train.stop_signals == []
    for bad in ("[SIGKILL]", "[TERM]", "SIGTERM", "[SIG_DFL]"):
        with pytest.raises(ConfigError, match="train.stop_signals"):
            load_config(None, [f"train.stop_signals={bad}"])


def test_once_the_stop_is_complete_the_signals_are_ignored_while_the_process_exits(handled):
    """srun --kill-on-bad-exit and deepspeed's launch.py SIGTERM the ranks still exiting once
    the first one has: that must not turn a saved stop (75) into a kill (143)."""
    stop_signals.enter_loop()
    os.kill(os.getpid(), signal.SIGTERM)
    stop_signals.mark_finished()
    assert stop_signals.finished()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    os.kill(os.getpid(), signal.SIGTERM)  # ignored
