"""relora_ds/stop.py on one process: the handlers are set and restored, a signal only sets the flag, names and the
thread are checked with one line each."""

import os
import signal
import threading

import pytest

from relora_ds.config import ConfigError, load_config
from relora_ds.errors import RunError
from relora_ds.stop import StopSignals, signal_name


def test_a_signal_sets_the_flag_and_the_previous_handlers_come_back():
    before = signal.getsignal(signal.SIGUSR2)
    with StopSignals(["SIGUSR2", "SIGUSR2"]) as stop:
        assert stop.received == 0 and signal_name(stop.received) is None
        os.kill(os.getpid(), signal.SIGUSR2)  # the process lives on: the handler only records it
        assert signal_name(stop.received) == "SIGUSR2"
    assert signal.getsignal(signal.SIGUSR2) is before


def test_no_signals_set_no_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals([]) as stop:
        assert signal.getsignal(signal.SIGTERM) is before and stop.received == 0


def test_unknown_names_and_other_threads_are_one_line_errors():
    with pytest.raises(RunError, match=r"^checkpoint.stop_signals: must name signals among SIGTERM, .*got 'SIGKILL'$"):
        StopSignals(["SIGTERM", "SIGKILL"])
    with pytest.raises(ConfigError, match=r"checkpoint.stop_signals: must name signals among .*got 'USR1'"):
        load_config(None, ["checkpoint.stop_signals=[USR1]"])

    errors = []

    def in_a_thread():
        try:
            with StopSignals(["SIGTERM"]):
                pass
        except RunError as e:
            errors.append(str(e))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert errors == ["checkpoint.stop_signals: signal handlers can only be set in the main thread; set it to [] "
                      "to train in another thread"]


def test_a_signal_a_launcher_ignored_gets_its_default_action_unless_listed():
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # as launchers/_common.sh starts the training process
    try:
        with StopSignals(["SIGTERM"]):
            assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
        with StopSignals(["SIGUSR1"]) as stop:
            assert signal.getsignal(signal.SIGUSR1) == stop._handle
    finally:
        signal.signal(signal.SIGUSR1, previous)
