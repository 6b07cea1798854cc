"""Real launches through launchers/: 2 CPU ranks on one node, and 2 "nodes" (no_ssh) on this machine.

Both must train, switch and restart identically (same data-parallel world of 2)."""

import os
import subprocess
import sys

import pytest

from relora_ds.dist import free_port
from tests.helpers import ROOT
from tests.helpers.runs import cpu_env, read_metrics, tiny_run_config, write_corpus, write_ds_config

pytestmark = pytest.mark.slow


def _env():
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return cpu_env(PATH=path, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _config(tmp_path, name):
    train_file, val_file = write_corpus(tmp_path)
    cfg = tiny_run_config(tmp_path, train_file, val_file, write_ds_config(tmp_path, stage=2),
                          **{"train.output_dir": str(tmp_path / name), "train.eval_every": 0,
                             "train.total_steps": 12})
    path = str(tmp_path / f"{name}.yaml")
    cfg.save(path)
    return path, cfg.train.output_dir


def _losses(run_dir):
    records = read_metrics(run_dir)
    losses = {r["step"]: r["loss"] for r in records if "event" not in r}
    restarts = [r["step"] for r in records if r.get("event") == "restart"]
    return losses, restarts


def test_single_node_two_ranks_and_two_nodes_no_ssh_agree(tmp_path):
    config, single_dir = _config(tmp_path, "single")
    subprocess.run([os.path.join(ROOT, "launchers", "single_node.sh"), "--num_gpus", "2",
                    "--master_port", str(free_port()), "--config", config],
                   check=True, env=_env(), cwd=str(tmp_path), timeout=300)
    single, single_restarts = _losses(single_dir)
    assert sorted(single) == list(range(1, 13)) and single_restarts == [8]

    config, multi_dir = _config(tmp_path, "multi")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    procs = [subprocess.Popen([os.path.join(ROOT, "launchers", "multi_node_no_ssh.sh"), "--hostfile", str(hostfile),
                               "--node_rank", str(r), "--master_addr", "127.0.0.1", "--master_port", port,
                               "--config", config], env=_env(), cwd=str(tmp_path))
             for r in (0, 1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    multi, multi_restarts = _losses(multi_dir)
    assert multi_restarts == single_restarts
    for step, loss in single.items():
        assert multi[step] == pytest.approx(loss, rel=1e-5), step
