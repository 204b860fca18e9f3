"""The rule for repeated signals (deblur/training/stop.py), in process: signals within the window
are one request to save and stop, a later one aborts, forked children keep their own behaviour."""

from __future__ import annotations

import os
import signal
import time

import pytest

from deblur.training.stop import REPEAT_WINDOW_S, STOP_SIGNALS, StopRequest


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    saved = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    yield Clock()
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def deliver(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.01)  # the handler runs at the next bytecode boundary of the main thread


def test_any_number_of_signals_within_the_window_are_one_request(clock):
    stop = StopRequest(clock=clock)
    deliver(signal.SIGTERM)  # Slurm signals every process of the step...
    assert stop.requested and stop.first == ("SIGTERM", 100.0)
    clock.now += 0.5
    deliver(signal.SIGTERM)  # ...then the launcher forwards its own copy
    clock.now += REPEAT_WINDOW_S - 0.6
    deliver(signal.SIGUSR1)
    deliver(signal.SIGINT)  # a terminal's Ctrl-C reaches the launcher and the workers at once
    assert stop.requested and stop.first == ("SIGTERM", 100.0)  # still the first request, not aborted


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_after_the_window_aborts_without_saving(clock, second):
    stop = StopRequest(clock=clock)
    deliver(signal.SIGINT)
    clock.now += REPEAT_WINDOW_S + 1
    with pytest.raises(KeyboardInterrupt, match=f"{signal.Signals(second).name} 4 s after SIGINT: aborting"):
        deliver(second)
    assert stop.requested


def test_the_main_process_says_what_happens_once(clock, capfd):
    StopRequest(announce=True, clock=clock)
    deliver(signal.SIGUSR1)
    deliver(signal.SIGTERM)
    err = capfd.readouterr().err
    assert err.count("SIGUSR1: saving a checkpoint at the next step, then stopping") == 1
    assert "a later one aborts without saving" in err and "SIGTERM" not in err
    StopRequest(announce=False, clock=clock)
    deliver(signal.SIGTERM)
    assert capfd.readouterr().err == ""


def test_forked_children_keep_the_signals_default_behaviour(clock):
    # A DataLoader worker is a fork of the trainer: SIGTERM must still end it (the DataLoader's
    # shutdown relies on that), while SIGUSR1, the trainer's save request, must not kill it.
    StopRequest(clock=clock)
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
