"""A trainer killed with SIGKILL (a node failure, the OOM killer) takes its data workers with it, even when they
are blocked sending batches the trainer will never take (workers.py: the parent-death signal)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT
from tests.helpers.runs import write_corpus

# A trainer's process: a rank's stream with 2 workers; it takes two batches, then stops taking. Each batch is
# 64 KiB of token ids and 4 more are prefetched, more than the workers' pipe holds: the workers block on it.
TRAINER = """\
import os, sys, time
from relora_ds.data import loader
batches = loader.stream_batches(sys.argv[1], seq_len=256, micro_batch_size=32, num_workers=2, prefetch_batches=4)
next(batches); next(batches)
print(os.getpid(), flush=True)
while True:
    time.sleep(60)
"""


def _stat(pid):
    """(state, ppid, start time) of a process from /proc/<pid>/stat, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (command)": the command may hold spaces
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1]), fields[19]


def _children(pid):
    """{pid: start time} of the processes whose parent is `pid`."""
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _stat(int(name))
            if stat is not None and stat[1] == pid:
                found[int(name)] = stat[2]
    return found


def _alive(pid, start):
    """The process `pid` that started at `start` still runs (an exited one awaiting its reaper does not)."""
    stat = _stat(pid)
    return stat is not None and stat[2] == start and stat[0] != "Z"


@pytest.mark.slow  # a training loop or a child process: `make test`, not the edit loop
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_workers_exit_when_the_trainer_is_killed(tmp_path):
    train_file, _ = write_corpus(tmp_path)
    with open(tmp_path / "stderr.txt", "w") as err:
        trainer = subprocess.Popen([sys.executable, "-c", TRAINER, train_file], stdout=subprocess.PIPE,
                                   stderr=err, text=True, cwd=ROOT)
    workers = {}
    try:
        line = trainer.stdout.readline()
        assert line.strip() == str(trainer.pid), open(tmp_path / "stderr.txt").read()
        workers = _children(trainer.pid)
        assert len(workers) == 2
        time.sleep(1)  # the workers make the prefetched batches and block on the full pipe
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        deadline = time.monotonic() + 5
        while any(_alive(pid, start) for pid, start in workers.items()) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = {pid: _stat(pid) for pid, start in workers.items() if _alive(pid, start)}
        assert not left, f"data workers still running 5 s after their trainer was killed: {left}"
    finally:
        trainer.kill()
        trainer.wait()
        trainer.stdout.close()
        for pid, start in workers.items():
            if _alive(pid, start):
                os.kill(pid, signal.SIGKILL)
