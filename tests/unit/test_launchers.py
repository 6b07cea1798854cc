"""The shell launchers: syntax, -h, and the command each builds (DRY_RUN=1 prints it; nothing trains)."""

import os
import re
import shlex
import subprocess

import pytest

LAUNCHERS = os.path.join(os.path.dirname(__file__), "..", "..", "launchers")
SCRIPTS = ["single_node.sh", "multi_node_hostfile.sh", "multi_node_no_ssh.sh", "torchrun.sh", "slurm.sbatch"]


def script(name):
    return os.path.abspath(os.path.join(LAUNCHERS, name))


def clean_env(**extra):
    """The caller's environment without the variables the launchers read, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES", "DRY_RUN",
                                                       "DEEPSPEED", "TORCHRUN", "RELORA_DS_LAUNCHERS")}
    env.update(extra)
    return env


def run(name, *args, dry=True, gpus="", cwd=None, **env):
    """Run a launcher with `gpus` as CUDA_VISIBLE_DEVICES ("" = no GPU); returns the CompletedProcess."""
    extra = dict(env, CUDA_VISIBLE_DEVICES=gpus)
    if dry:
        extra["DRY_RUN"] = "1"
    return subprocess.run(["bash", script(name), *args], env=clean_env(**extra), capture_output=True, text=True,
                          cwd=cwd, timeout=30)


def command(name, *args, **kwargs):
    """The printed command, split like the shell would."""
    result = run(name, *args, **kwargs)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout.strip())


def error(name, *args, **kwargs):
    result = run(name, *args, **kwargs)
    assert result.returncode == 2 and result.stdout == ""
    return result.stderr


@pytest.fixture
def files(tmp_path):
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text("train:\n  total_steps: 4\n")
    ds_cfg = tmp_path / "ds.json"
    ds_cfg.write_text("{}\n")
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# two nodes\nnode0 slots=1\nnode1 slots=1  # second\n")
    return {"run": str(run_cfg), "ds": str(ds_cfg), "hosts": str(hosts), "dir": tmp_path}


@pytest.mark.parametrize("name", SCRIPTS + ["_common.sh"])
def test_shell_syntax(name):
    result = subprocess.run(["bash", "-n", script(name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_documents_every_option(name):
    result = run(name, "-h", dry=False)
    assert result.returncode == 0 and result.stdout.startswith("Usage:")
    with open(script(name)) as f:
        options = set(re.findall(r"^\s+(--[a-z_]+)\)", f.read(), flags=re.M))
    assert options, "no options parsed from the script"
    for option in options:
        assert option in result.stdout, f"{name} -h does not mention {option}"


def test_single_node_cpu_defaults(files):
    cmd = command("single_node.sh", "--config", files["run"], "--deepspeed_config", files["ds"],
                  "--set", "log.tags=[a, b]", "--resume")
    assert cmd == ["DS_ACCELERATOR=cpu", "deepspeed", "--num_gpus", "1", "--master_port", "29500",
                   "--module", "relora_ds.train", "--config", files["run"], "--deepspeed_config", files["ds"],
                   "--set", "log.tags=[a, b]", "--resume"]


def test_single_node_gpus_and_explicit_options(files):
    cmd = command("single_node.sh", "--config", files["run"], gpus="0,1,2,3")
    assert cmd[:5] == ["deepspeed", "--num_gpus", "4", "--master_port", "29500"]  # all GPUs, no CPU accelerator
    cmd = command("single_node.sh", "--num_gpus", "2", "--master_port", "29611", "--config", files["run"],
                  "--", "--num_gpus", "x")
    assert cmd == ["DS_ACCELERATOR=cpu", "deepspeed", "--num_gpus", "2", "--master_port", "29611", "--module",
                   "relora_ds.train", "--config", files["run"], "--num_gpus", "x"]  # after --: verbatim
    assert command("single_node.sh", "--config", files["run"], DS_ACCELERATOR="xpu")[0] == "deepspeed"


def test_single_node_bad_input(files):
    assert "--config RUN.yaml is required" in error("single_node.sh", "--num_gpus", "1")
    assert "--config: file not found: nope.yaml" in error("single_node.sh", "--config", "nope.yaml")
    assert "--deepspeed_config: file not found: no.json" in error(
        "single_node.sh", "--config", files["run"], "--deepspeed_config=no.json")
    assert "--num_gpus must be an integer >= 1, got 'two'" in error(
        "single_node.sh", "--num_gpus", "two", "--config", files["run"])
    assert "--master_port needs a value" in error("single_node.sh", "--config", files["run"], "--master_port")


def test_real_launch_runs_the_binary_with_the_environment(files):
    fake = files["dir"] / "fake-deepspeed"
    fake.write_text('#!/bin/sh\necho "accelerator=$DS_ACCELERATOR args=$*"\n')
    fake.chmod(0o755)
    result = run("single_node.sh", "--config", files["run"], dry=False, DEEPSPEED=str(fake))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"accelerator=cpu args=--num_gpus 1 --master_port 29500 --module "
                                     f"relora_ds.train --config {files['run']}")
    assert "single_node.sh: DS_ACCELERATOR=cpu" in result.stderr  # the command is printed before it runs
    missing = run("single_node.sh", "--config", files["run"], dry=False, DEEPSPEED="/nonexistent/deepspeed")
    assert missing.returncode == 2 and "deepspeed not found: '/nonexistent/deepspeed'" in missing.stderr


def test_multi_node_hostfile(files):
    cmd = command("multi_node_hostfile.sh", "--hostfile", files["hosts"], "--config", files["run"], gpus="0")
    assert cmd == ["deepspeed", "--hostfile", files["hosts"], "--launcher", "pdsh", "--master_addr", "node0",
                   "--master_port", "29500", "--module", "relora_ds.train", "--config", files["run"]]
    cmd = command("multi_node_hostfile.sh", "--hostfile", files["hosts"], "--master_addr", "10.0.0.1",
                  "--num_nodes", "2", "--num_gpus", "4", "--launcher", "openmpi", "--config", files["run"], gpus="0")
    assert cmd[1:] == ["--hostfile", files["hosts"], "--launcher", "openmpi", "--master_addr", "10.0.0.1",
                       "--master_port", "29500", "--num_nodes", "2", "--num_gpus", "4", "--module",
                       "relora_ds.train", "--config", files["run"]]
    assert "--num_nodes 3: the hostfile lists only 2 hosts" in error(
        "multi_node_hostfile.sh", "--hostfile", files["hosts"], "--num_nodes", "3", "--config", files["run"])
    assert "--launcher must be one of: pdsh, openmpi" in error(
        "multi_node_hostfile.sh", "--hostfile", files["hosts"], "--launcher", "ssh", "--config", files["run"])
    assert "--hostfile HOSTFILE is required" in error("multi_node_hostfile.sh", "--config", files["run"])


@pytest.mark.parametrize("content, message", [
    ("node0 slots=1\nnode0 slots=1\n", "host 'node0' is listed twice"),
    ("node0\n", "expected lines 'HOST slots=N', got 'node0'"),
    ("node0 slots=0\n", "expected lines 'HOST slots=N'"),
    ("# nothing\n\n", "no hosts listed"),
])
def test_bad_hostfiles(files, content, message):
    bad = files["dir"] / "bad.txt"
    bad.write_text(content)
    for name in ("multi_node_hostfile.sh", "multi_node_no_ssh.sh"):
        assert message in error(name, "--hostfile", str(bad), "--node_rank", "0", "--config", files["run"])
    assert "--hostfile: file not found: /no/hosts" in error("multi_node_no_ssh.sh", "--hostfile", "/no/hosts",
                                                           "--node_rank", "0", "--config", files["run"])


def test_no_ssh_two_nodes_on_loopback(files):
    for rank in ("0", "1"):
        cmd = command("multi_node_no_ssh.sh", "--hostfile", files["hosts"], "--node_rank", rank,
                      "--master_addr", "127.0.0.1", "--master_port", "29700", "--config", files["run"],
                      "--deepspeed_config", files["ds"])
        assert cmd == ["DS_ACCELERATOR=cpu", "deepspeed", "--hostfile", files["hosts"], "--no_ssh", "--node_rank",
                       rank, "--master_addr", "127.0.0.1", "--master_port", "29700", "--module", "relora_ds.train",
                       "--config", files["run"], "--deepspeed_config", files["ds"]]
    # Default master: the first host; default node rank: SLURM_NODEID.
    cmd = command("multi_node_no_ssh.sh", "--hostfile", files["hosts"], "--config", files["run"], SLURM_NODEID="1")
    assert cmd[cmd.index("--node_rank") + 1] == "1" and cmd[cmd.index("--master_addr") + 1] == "node0"
    assert "--node_rank R is required" in error("multi_node_no_ssh.sh", "--hostfile", files["hosts"],
                                                "--config", files["run"])
    assert "--node_rank must be below the number of hosts" in error(
        "multi_node_no_ssh.sh", "--hostfile", files["hosts"], "--node_rank", "2", "--config", files["run"])


def test_torchrun(files):
    cmd = command("torchrun.sh", "--config", files["run"], "--set", "train.seed=1")
    assert cmd == ["DS_ACCELERATOR=cpu", "torchrun", "--nnodes", "1", "--nproc_per_node", "1", "--node_rank", "0",
                   "--master_addr", "127.0.0.1", "--master_port", "29500", "-m", "relora_ds.train",
                   "--config", files["run"], "--set", "train.seed=1"]
    cmd = command("torchrun.sh", "--nnodes", "2", "--node_rank", "1", "--master_addr", "node0",
                  "--config", files["run"], gpus="0,1")
    assert cmd[:11] == ["torchrun", "--nnodes", "2", "--nproc_per_node", "2", "--node_rank", "1",
                        "--master_addr", "node0", "--master_port", "29500"]
    cmd = command("torchrun.sh", "--master_addr", "n0", "--config", files["run"], SLURM_NNODES="4",
                  SLURM_NODEID="3")
    assert cmd[cmd.index("--nnodes") + 1] == "4" and cmd[cmd.index("--node_rank") + 1] == "3"
    assert "--master_addr is required with --nnodes 2" in error("torchrun.sh", "--nnodes", "2",
                                                                "--config", files["run"])
    assert "--node_rank must be below --nnodes (2), got 2" in error(
        "torchrun.sh", "--nnodes", "2", "--node_rank", "2", "--master_addr", "a", "--config", files["run"])


@pytest.fixture
def slurm_env(files):
    """A fake `scontrol` and the variables sbatch sets for a 2-node job with 4 GPUs per node."""
    bin_dir = files["dir"] / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1" = requeue ] && { echo "$*" >> "$(dirname "$0")/requeued"; exit 0; }\n'
                        '[ "$1 $2 $3" = "show hostnames gpu[01-02]" ] || exit 1\n'
                        'echo gpu01\necho gpu02\n')
    scontrol.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "4321",
            "SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "a100:4", "SLURM_SUBMIT_DIR": str(files["dir"]),
            "RELORA_DS_LAUNCHERS": os.path.abspath(LAUNCHERS)}


def test_slurm_builds_hostfile_and_starts_one_no_ssh_launcher_per_node(files, slurm_env):
    cmd = command("slurm.sbatch", "--config", files["run"], "--set", "train.output_dir=runs/x", **slurm_env)
    hostfile = str(files["dir"] / ".relora-ds" / "hostfile-4321")
    with open(hostfile) as f:
        assert f.read() == "gpu01 slots=4\ngpu02 slots=4\n"
    per_node = script("multi_node_no_ssh.sh")
    assert cmd == [f"RELORA_DS_STOP_RECORD={files['dir']}/.relora-ds/stop-4321",
                   "srun", "--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1", "bash", per_node,
                   "--hostfile", hostfile, "--master_addr", "gpu01", "--master_port", "24321", "--",
                   "--config", files["run"], "--set", "train.output_dir=runs/x"]
    # What srun starts on the second node (SLURM_NODEID=1, GPUs visible there):
    node_cmd = command("multi_node_no_ssh.sh", *cmd[cmd.index(per_node) + 1:], gpus="0,1,2,3", SLURM_NODEID="1")
    assert node_cmd == ["deepspeed", "--hostfile", hostfile, "--no_ssh", "--node_rank", "1", "--master_addr",
                        "gpu01", "--master_port", "24321", "--module", "relora_ds.train", "--config", files["run"],
                        "--set", "train.output_dir=runs/x"]


def test_slurm_with_torchrun_and_bad_input(files, slurm_env):
    cmd = command("slurm.sbatch", "--launcher", "torchrun", "--master_port", "29999", "--config", files["run"],
                  **slurm_env)
    per_node = script("torchrun.sh")
    assert cmd[cmd.index("bash"):] == ["bash", per_node, "--nnodes", "2", "--nproc_per_node", "4",
                                       "--master_addr", "gpu01", "--master_port", "29999", "--",
                                       "--config", files["run"]]
    node_cmd = command("torchrun.sh", *cmd[cmd.index(per_node) + 1:], gpus="0,1,2,3", SLURM_NODEID="1")
    assert node_cmd[:11] == ["torchrun", "--nnodes", "2", "--nproc_per_node", "4", "--node_rank", "1",
                             "--master_addr", "gpu01", "--master_port", "29999"]
    assert "--launcher must be deepspeed or torchrun, got 'mpi'" in error(
        "slurm.sbatch", "--launcher", "mpi", "--config", files["run"], **slurm_env)
    no_slurm = {k: v for k, v in slurm_env.items() if k != "SLURM_JOB_NODELIST"}
    assert "SLURM_JOB_NODELIST is not set" in error("slurm.sbatch", "--config", files["run"], **no_slurm)
    missing = dict(slurm_env, RELORA_DS_LAUNCHERS=str(files["dir"]))
    assert "launchers not found in" in error("slurm.sbatch", "--config", files["run"], **missing)


@pytest.mark.parametrize("record, status, requeued", [
    ("SIGUSR1", 75, True),    # the time-limit warning: the ranks saved and exited 75
    ("SIGUSR1", 137, True),   # the same, another node's launcher killed by srun --kill-on-bad-exit as it exited
    ("SIGTERM", 1, False),    # preemption or scancel: SLURM's own business
    (None, 75, False),        # no record, no requeue
    (None, 0, False),
])
def test_slurm_requeues_a_run_the_time_limit_warning_stopped(files, slurm_env, record, status, requeued):
    """The script reads the record a stopped run writes ($RELORA_DS_STOP_RECORD, which it sets for srun) and requeues
    the job after SIGUSR1 only; it exits with srun's status."""
    bin_dir = files["dir"] / "bin"
    srun = bin_dir / "srun"
    write = f'echo "{record} stopped by {record} after step 5" > "$RELORA_DS_STOP_RECORD"\n' if record else ""
    srun.write_text(f"#!/bin/sh\n{write}exit {status}\n")
    srun.chmod(0o755)
    result = run("slurm.sbatch", "--config", files["run"], "--resume", "auto", dry=False, **slurm_env)
    assert result.returncode == status, result.stderr
    log = bin_dir / "requeued"
    if requeued:
        assert log.read_text() == "requeue 4321\n"
        assert "the run stopped at a checkpoint on SIGUSR1; requeueing job 4321" in result.stderr
    else:
        assert not log.exists()
    assert f"RELORA_DS_STOP_RECORD={files['dir']}/.relora-ds/stop-4321 srun" in result.stderr


def test_slurm_headers():
    with open(script("slurm.sbatch")) as f:
        headers = [line.split()[1] for line in f if line.startswith("#SBATCH")]
    names = {h.split("=")[0] for h in headers}
    assert {"--nodes", "--ntasks-per-node", "--gpus-per-node", "--time", "--signal"} <= names


def test_slurm_forwards_resume_auto_for_requeued_jobs(files, slurm_env):
    """A requeued job reruns the same command: `--resume auto` reaches relora_ds.train unchanged on every
    node, and the script adds no --resume of its own (also not on a requeue, SLURM_RESTART_COUNT=1)."""
    per_node = script("multi_node_no_ssh.sh")
    for requeue in ({}, {"SLURM_RESTART_COUNT": "1"}):
        cmd = command("slurm.sbatch", "--config", files["run"], "--resume", "auto", **slurm_env, **requeue)
        assert cmd[cmd.index("--"):] == ["--", "--config", files["run"], "--resume", "auto"]
        node_cmd = command("multi_node_no_ssh.sh", *cmd[cmd.index(per_node) + 1:], gpus="0,1,2,3", SLURM_NODEID="0")
        assert node_cmd[-4:] == ["--config", files["run"], "--resume", "auto"]
        cmd = command("slurm.sbatch", "--config", files["run"], **slurm_env, **requeue)
        assert "--resume" not in cmd
    result = run("slurm.sbatch", "-h", dry=False)
    assert "--resume [auto]" in result.stdout and "--requeue" in result.stdout
