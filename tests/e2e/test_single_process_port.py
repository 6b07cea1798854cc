"""Two single-process runs side by side (no launcher, no MASTER_PORT) each join their own process group:
runtime.init_distributed takes a free port instead of both binding 29500."""

import os
import subprocess
import sys

from tests.helpers import ROOT


# Init, say so, and stay in the group until the other process has initialised too (so both hold their port).
CHILD = """
import os, sys, time
from relora_ds.engine import runtime
import torch.distributed as dist
runtime.init_distributed()
assert dist.get_world_size() == 1
me, other = sys.argv[1:3]
open(me, "w").write(os.environ["MASTER_PORT"])
deadline = time.monotonic() + 90
while not os.path.exists(other):
    if time.monotonic() > deadline:
        sys.exit("the other process never initialised")
    time.sleep(0.1)
"""


def test_two_single_process_runs_get_different_ports(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    ready = [str(tmp_path / "a"), str(tmp_path / "b")]
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, ready[i], ready[1 - i]], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    ports = [open(path).read() for path in ready]
    assert ports[0] != ports[1] and "29500" not in ports
