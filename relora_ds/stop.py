"""Stopping a run early, on a signal, with a checkpoint to resume from.

Schedulers warn a job before they end it: SLURM sends SIGTERM on preemption or cancellation (and SIGKILL after its
KillWait, 30 s by default), and `sbatch --signal=USR1@600` sends SIGUSR1 ten minutes before the time limit. A run
that dies there loses every step since its last periodic checkpoint.

While a run trains, the signals of checkpoint.stop_signals only record that they came (the handler sets a flag: no
I/O in a handler). The launchers (launchers/_common.sh) start their command with SIGTERM, SIGUSR1 and SIGUSR2 ignored,
so that they outlive the step in flight and its checkpoint; a signal of those left out of the list gets its default
action back in the training process. The loop asks `requested()` before each step; every rank gets the same answer (the largest flag
over the ranks, on a CPU gloo group, so a GPU run waits on no device), so a signal that reached one rank stops all
of them before the same step. The loop then saves a checkpoint and the process exits with EXIT_STOPPED, which tells
a job script to requeue the run (launchers/slurm.sbatch does) rather than treat it as finished or failed.
"""

import signal
import threading

import torch

from relora_ds import dist
from relora_ds.errors import RunError

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


class Stopped(Exception):
    """A run (or a command that trains) ended early by a stop signal, at a checkpoint. The command line prints this
    one line and exits with EXIT_STOPPED (relora_ds/train.py's run_guarded)."""


def check_finished(summary: dict, total_steps: int, then: str) -> None:
    """Raise Stopped when trainer.train's `summary` is of a run a stop signal ended; `then`: how to go on."""
    if summary["stopped"] is not None:
        raise Stopped(f"stopped by {summary['stopped']} after step {summary['step']} of {total_steps}: checkpoint "
                      f"{summary['checkpoint']}; {then} (exit code {EXIT_STOPPED})")


class StopSignals:
    """Within `with StopSignals(names) as stop:` the named signals set a flag instead of their usual action;
    `stop.requested()` (collective) says whether any rank got one. The previous handlers come back on exit."""

    def __init__(self, names: list[str]):
        unknown = [n for n in names if n not in STOP_SIGNALS]
        if unknown:
            raise RunError(f"checkpoint.stop_signals: must name signals among {', '.join(STOP_SIGNALS)}, "
                             f"got {', '.join(map(repr, unknown))}")
        self.signals = [signal.Signals[n] for n in dict.fromkeys(names)]
        self.received = 0          # the first signal's number on this rank; 0: none
        self.name: str | None = None  # the agreed signal's name once requested() said yes
        self._previous: dict = {}
        self._group = None

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
        if self._group is not None and dist.is_initialized():
            import torch.distributed

            torch.distributed.destroy_process_group(self._group)
        self._group = None

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum

    def requested(self) -> bool:
        """Whether any rank got a stop signal (collective on every rank when there are signals to watch)."""
        if not self.signals:
            return False
        flag = self.received
        if dist.is_initialized() and dist.world_size() > 1:
            import torch.distributed

            if self._group is None:  # made on first use, by every rank at the same point of the loop
                self._group = torch.distributed.new_group(backend="gloo")
            flags = torch.tensor([flag], dtype=torch.int64)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self._group)
            flag = int(flags.item())
        if flag:
            self.name = signal.Signals(flag).name
        return bool(flag)
