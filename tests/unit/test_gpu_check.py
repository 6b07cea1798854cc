"""benchmarks/gpu_check.sh (`make gpu-check`): syntax, the dry run's steps and time budget, the refusal without
CUDA, and the step runner (timeouts, failures, skips, summary) driven by a stub python; nothing needs a GPU."""

import json
import os
import re
import shutil
import subprocess

import pytest

from tests.helpers import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
BUDGET_S = 540  # 9 minutes: the whole check must fit in a 15-minute GPU lease with room to spare
STEP = re.compile(r"^step (\S+) \(timeout (\d+) s\): (.+)$")


def env(**extra):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "PYTHON"}
    clean.update(extra)
    return clean


def run(*args, **extra):
    return subprocess.run(["bash", SCRIPT, *args], env=env(**extra), capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def dry_run_steps(result) -> dict[str, tuple[int, str]]:
    assert result.returncode == 0, result.stderr
    steps = {}
    for line in result.stdout.splitlines():
        match = STEP.match(line)
        if match:
            steps[match[1]] = (int(match[2]), match[3])
    return steps


def test_script_syntax():
    subprocess.run(["bash", "-n", SCRIPT], check=True, timeout=30)


@pytest.mark.parametrize("how", ["--dry-run", "GPU_CHECK_DRY_RUN=1"])
def test_dry_run_lists_gpu_tests_kernels_and_both_zero_benchmarks_within_the_budget(how):
    result = run("--dry-run") if how == "--dry-run" else run(GPU_CHECK_DRY_RUN="1")
    steps = dry_run_steps(result)
    commands = {name: command for name, (_, command) in steps.items()}
    assert any("-m pytest" in c and "-m gpu" in c for c in commands.values())
    kernels = [c for c in commands.values() if "benchmarks/kernel_bench.py" in c]
    assert kernels and all(flag in kernels[0] for flag in ("--models", "--ranks", "--tokens"))  # a subset
    for stage in (0, 3):
        bench = [c for c in commands.values() if "relora_ds bench" in c and f"ds_configs/zero{stage}.json" in c]
        assert len(bench) == 1, commands
        assert "--preset 1b" in bench[0] and "--repeats" in bench[0] and "--results-dir benchmarks/results/" in bench[0]
    assert "install" in steps and "--no-index" in result.stdout and "--no-deps" in result.stdout
    assert ".venv" not in result.stdout and "torch==" in result.stdout  # the constraints file pins torch
    assert all(timeout > 0 for timeout, _ in steps.values())
    total = sum(timeout for timeout, _ in steps.values())
    assert total <= BUDGET_S, steps
    assert f"{len(steps)} steps, {total} s of step timeouts" in result.stdout


def test_without_cuda_it_refuses_with_one_line_and_writes_nothing(tmp_path):
    no_cuda = tmp_path / "python"
    no_cuda.write_text("#!/bin/sh\nexit 1\n")  # torch.cuda.is_available() is not True
    no_cuda.chmod(0o755)
    result = run(PYTHON=str(no_cuda), GPU_CHECK_RESULTS=str(tmp_path / "results"))
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "CUDA" in result.stderr
    assert not (tmp_path / "results").exists()


def test_runner_records_pass_fail_timeout_and_skips_under_the_deadline(tmp_path):
    """A stub python that "has CUDA": pytest fails, kernel_bench.py hangs until its timeout (cut to the deadline),
    the rest is skipped; summary.tsv and the logs say so and the exit status is 1."""
    stub = tmp_path / "python"
    stub.write_text("#!/bin/sh\n"
                    'case "$*" in\n'
                    "  *\"-m pytest\"*) echo 'stub: 1 failed'; exit 1 ;;\n"
                    "  *kernel_bench.py*) sleep 60 ;;\n"
                    "esac\n"
                    '[ "$1" = - ] && echo "{}" > "$2"\n'  # the env step: `python - env.json`
                    "exit 0\n")
    stub.chmod(0o755)
    results = tmp_path / "results"
    result = run(PYTHON=str(stub), GPU_CHECK_RESULTS=str(results), GPU_CHECK_DEADLINE="9", GPU_CHECK_MIN_STEP="1")
    assert result.returncode == 1, result.stdout + result.stderr
    rows = [line.split("\t") for line in (results / "summary.tsv").read_text().splitlines()[1:]]
    status = {row[0]: row[1] for row in rows}
    assert status["install"] == "passed" and status["env"] == "passed"
    assert status["pytest-gpu"] == "failed (exit 1)"
    assert status["kernels"].startswith("timed out")
    assert status["ds-build"] == "skipped (deadline)"
    assert status["bench-zero0"].startswith("skipped") and status["bench-zero3"].startswith("skipped")
    assert float(dict((row[0], row[2]) for row in rows)["kernels"]) < 9
    assert "stub: 1 failed" in (results / "03-pytest-gpu.log").read_text()
    assert json.loads((results / "env.json").read_text()) == {}
    assert "| kernels | timed out" in result.stdout and "FAILED" in result.stdout


def test_env_json_records_versions_and_commit(tmp_path):
    import sys

    out = tmp_path / "env.json"
    result = run("--env-json", str(out), PYTHON=sys.executable)
    assert result.returncode == 0, result.stderr
    recorded = json.loads(out.read_text())
    assert {"torch", "triton", "transformers", "deepspeed"} <= set(recorded["versions"])
    assert recorded["versions"]["torch"] and recorded["date"] and recorded["git_commit"]
    assert {"driver", "nvidia_smi", "gpu", "python"} <= set(recorded)


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_gpu_check_uses_the_script_and_not_the_venv():
    result = subprocess.run(["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "benchmarks/gpu_check.sh" in result.stdout
    assert "venv" not in result.stdout and "pip install" not in result.stdout
    result = subprocess.run(["make", "-s", "gpu-check-dry-run"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env=env())
    assert result.returncode == 0, result.stderr
    assert dry_run_steps(result)
