"""Stopping a run early, on a signal, with a checkpoint to resume from.

Schedulers warn a job before they end it: SLURM sends SIGTERM on preemption or cancellation (and SIGKILL after its
KillWait, 30 s by default), and `sbatch --signal=USR1@600` sends SIGUSR1 ten minutes before the time limit. A run
that dies there loses every step since its last periodic checkpoint.

While a command trains (relora_ds.train, compare, demo: they enter StopSignals and hand it to trainer.train), the
signals of checkpoint.stop_signals only record that they came (the handler sets a flag: no I/O in a handler). The
launchers (launchers/_common.sh) start their command with SIGTERM, SIGUSR1 and SIGUSR2 ignored, so that they outlive
the ranks' last step and checkpoint; a signal of those left out of the list gets its default action back in the
training process.

Every rank must stop before the same step, though a scheduler's signal may reach the ranks at different moments (or
one rank only). So each step carries this rank's `received` in the all-reduce it makes anyway (the check that every
rank's loss is finite: TrainEngine.step), and the loop stops after the step in which any rank had one, before the next
(and once before the first step, for a signal that came while the run was set up). It then saves a checkpoint and the
process exits with EXIT_STOPPED (resumable: neither finished nor failed); rank 0 also notes the signal in the file
$RELORA_DS_STOP_RECORD names (record_stop), from which launchers/slurm.sbatch decides to requeue the job.
"""

import os
import signal
import threading

from relora_ds.errors import RunError
from relora_ds.files import atomic_write

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2")  # checkpoint.stop_signals may name these
LAUNCHER_IGNORED = ("SIGTERM", "SIGUSR1", "SIGUSR2")  # what launchers/_common.sh starts its command with ignored
EXIT_STOPPED = 75  # EX_TEMPFAIL (sysexits.h): stopped before the end, resumable; "try again later"


def check_names(names: list[str]) -> str | None:
    """The one-line error for names that are not among STOP_SIGNALS; None when they all are."""
    unknown = [n for n in names if n not in STOP_SIGNALS]
    if unknown:
        return (f"checkpoint.stop_signals: must name signals among {', '.join(STOP_SIGNALS)}, got "
                f"{', '.join(map(repr, unknown))}")
    return None


STOP_RECORD = "RELORA_DS_STOP_RECORD"  # environment: a file where a stopped command notes its signal (record_stop)


class Stopped(Exception):
    """A run (or a command that trains) ended early by a stop signal, at a checkpoint. The command line prints this
    one line and exits with EXIT_STOPPED (relora_ds/train.py's run_guarded)."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.signal_name = signal_name


def check_finished(summary: dict, total_steps: int, then: str) -> None:
    """Raise Stopped when trainer.train's `summary` is of a run a stop signal ended; `then`: how to go on."""
    if summary["stopped"] is not None:
        raise Stopped(f"stopped by {summary['stopped']} after step {summary['step']} of {total_steps}: checkpoint "
                      f"{summary['checkpoint']}; {then} (exit code {EXIT_STOPPED})", summary["stopped"])


def record_stop(stopped: Stopped) -> None:
    """Write "SIGNAL message" to the file $RELORA_DS_STOP_RECORD names, when it names one (rank 0 calls this).

    A job script learns from it that the run stopped on a signal, and on which, where an exit status cannot tell it:
    torchrun reports a rank's 75 as a failure (1), and srun --kill-on-bad-exit may kill another node's launcher
    while it exits, which makes srun's status that of the kill (launchers/slurm.sbatch reads the file)."""
    path = os.environ.get(STOP_RECORD)
    if path:
        atomic_write(path, f"{stopped.signal_name} {stopped}\n")


class StopSignals:
    """Within `with StopSignals(names) as stop:` the named signals set `stop.received` (the first one's number; 0:
    none) instead of their usual action. The previous handlers come back on exit."""

    def __init__(self, names: list[str]):
        if error := check_names(names):
            raise RunError(error)
        self.signals = [signal.Signals[n] for n in dict.fromkeys(names)]
        self.received = 0
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if self.signals and threading.current_thread() is not threading.main_thread():
            raise RunError("checkpoint.stop_signals: signal handlers can only be set in the main thread; set it to "
                           "[] to train in another thread")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        for sig in (signal.Signals[n] for n in LAUNCHER_IGNORED):  # left out of the list: their default action,
            if sig not in self.signals and signal.getsignal(sig) is signal.SIG_IGN:  # not the launcher's ignore
                self._previous[sig] = signal.signal(sig, signal.SIG_DFL)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum


def signal_name(number: int) -> str | None:
    """"SIGUSR1" for its number; None for 0 (no signal)."""
    return signal.Signals(number).name if number else None
