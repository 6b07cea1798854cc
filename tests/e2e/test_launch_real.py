"""Real launches through launchers/: 2 CPU ranks on one node, and 2 "nodes" (no_ssh) on this machine.

Both must train, switch and restart identically (same data-parallel world of 2). A stop signal, sent the ways a
scheduler and a user send it, ends a launched run at a checkpoint with exit code 75."""

import os
import signal
import subprocess
import sys
import time

import pytest

from relora_ds.dist import free_port
from relora_ds.engine import checkpoint
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


STOPS = {  # case: (launcher script, signal, sent to every process of the launch or to the launcher alone, exit status)
    "SLURM time-limit warning": ("single_node.sh", signal.SIGUSR1, "every process", 75),
    "SLURM preemption": ("single_node.sh", signal.SIGTERM, "every process", 1),
    "kill the launcher": ("single_node.sh", signal.SIGTERM, "launcher", 1),
    "torchrun, USR1 to the launcher": ("torchrun.sh", signal.SIGUSR1, "launcher", 1),
}


@pytest.mark.parametrize("case", STOPS)
def test_a_stop_signal_ends_a_launched_run_at_a_checkpoint(tmp_path, case):
    """What a scheduler does (SLURM signals every process of the job step: SIGUSR1 before the time limit with
    --signal=USR1@600, SIGTERM on preemption) and what a user does (`kill` the launcher script): the 2 ranks and
    their data workers finish the step and save a complete checkpoint of it. The DeepSpeed launcher exits with the
    ranks' 75 after SIGUSR1; DeepSpeed's launch process, once sent SIGTERM itself, exits with 1 whatever its ranks
    returned, and torchrun reports a rank's 75 as a failure (1)."""
    script, sig, to, expected = STOPS[case]
    train_file, val_file = write_corpus(tmp_path)
    out = str(tmp_path / "run")
    cfg = tiny_run_config(tmp_path, train_file, val_file, write_ds_config(tmp_path, stage=2),
                          **{"train.output_dir": out, "train.eval_every": 0, "train.total_steps": 100000,
                             "data.num_workers": 1, "checkpoint.every": 0})
    config = str(tmp_path / "run.yaml")
    cfg.save(config)
    ranks = ["--num_gpus", "2"] if script == "single_node.sh" else ["--nproc_per_node", "2"]
    record = tmp_path / "stop-record"  # as launchers/slurm.sbatch passes it
    launcher = subprocess.Popen([os.path.join(ROOT, "launchers", script), *ranks, "--master_port", str(free_port()),
                                 "--config", config], env={**_env(), "RELORA_DS_STOP_RECORD": str(record)},
                                cwd=str(tmp_path), start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not any(r.get("step", 0) >= 3 and "loss" in r for r in _records(out)):
            assert launcher.poll() is None and time.monotonic() < deadline, "the run did not reach step 3"
            time.sleep(0.2)
        if to == "every process":
            os.killpg(launcher.pid, sig)
        else:
            launcher.send_signal(sig)
        status = launcher.wait(timeout=120)
    finally:
        for pid in _training_processes(out):  # torchrun's ranks run in sessions of their own
            os.kill(pid, signal.SIGKILL)
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    [stop] = [r for r in _records(out) if r.get("event") == "stop"]
    assert stop["signal"] == sig.name and stop["step"] >= 3
    tag_dir = os.path.join(out, "checkpoints", checkpoint.tag_for(stop["step"]))
    checkpoint.verify(tag_dir, checksums=True)
    assert checkpoint.read_state(tag_dir)["step"] == stop["step"]
    assert status == expected
    assert record.read_text().startswith(f"{sig.name} stopped by {sig.name} after step {stop['step']} of 100000")


def _training_processes(run_dir) -> list[int]:
    """Pids of processes still running with this run's config on their command line."""
    found = subprocess.run(["pgrep", "-f", os.path.dirname(run_dir) + "/run.yaml"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def _records(run_dir):
    try:
        return read_metrics(run_dir)
    except (OSError, ValueError):  # not written yet, or a line half written
        return []
