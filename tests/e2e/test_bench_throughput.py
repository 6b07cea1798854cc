"""The throughput benchmark on CPU (benchmarks/throughput.py and `relora-ds bench`, both relora_ds/bench):
a short real run of both torch modes, the files it writes, the phase breakdown, the search, bad arguments.

The script and the CLI are run as subprocesses (as a user runs them).
"""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "throughput.py")
TINY = ["--preset", "tiny", "--rank", "8", "--vocab-size", "512", "--seq-len", "64", "--micro-batch", "2",
        "--threads", "1"]


def run_script(*args, timeout=120):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def repo_results() -> set[str]:
    folder = os.path.join(ROOT, "benchmarks", "results")
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


def test_cpu_run_of_both_torch_modes(tmp_path):
    before = repo_results()
    proc = run_script(*TINY, "--modes", "full", "relora", "--warmup", "2", "--steps", "3", "--profile",
                      "--results-dir", str(tmp_path), "--tag", "test")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert repo_results() == before, "the test run must not write into the repository"

    stems = {os.path.splitext(name)[0] for name in os.listdir(tmp_path)}
    assert len(stems) == 1
    stem = stems.pop()
    assert stem.endswith("-cpu-tiny-test")
    assert sorted(os.listdir(tmp_path)) == [stem + ext for ext in (".json", ".md", ".png")]
    with open(tmp_path / (stem + ".png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    report = json.loads((tmp_path / (stem + ".json")).read_text())
    assert report["hardware"]["gpu_name"] is None and report["hardware"]["cpu_count"] >= 1
    assert report["versions"]["torch"] and report["versions"]["deepspeed"]
    assert report["ds_config"]["train_micro_batch_size_per_gpu"] == 2
    assert report["args"]["preset"] == "tiny" and report["zero_stage"] == 0 and report["precision"] == "fp32"
    assert report["note"] == "CPU run: numbers are for trends only"
    assert report["peak_flops_per_device"] is None  # CPU: no MFU without --peak-tflops

    full, relora = report["modes"]["full"], report["modes"]["relora"]
    for mode, summary in (("full", full), ("relora", relora)):
        assert summary["oom"] is False
        assert len(report["runs"][mode]) == 1 and len(report["runs"][mode][0]["step_seconds"]) == 3
        assert summary["measured_steps"] == 3
        assert summary["tokens_per_step_per_device"] == 2 * 64
        assert summary["tokens_per_s_per_device"] > 0 and summary["tokens_per_s_total"] > 0
        steps = summary["step_seconds"]
        assert 0 < steps["min"] <= steps["q1"] <= steps["median"] <= steps["q3"] <= steps["max"]
        assert summary["mfu"] is None and summary["mfu_own_flops"] is None
        assert summary["model_tflops_per_s_per_device"] > 0
        assert summary["memory_kind"] == "cpu_rss" and summary["peak_rss_bytes"] > 0
        assert summary["peak_memory_allocated_bytes"] is None
        assert summary["optimizer_state_bytes"] > 0
        assert all(math.isfinite(x) for x in summary["loss_first_last"])
    # The model module's FLOPs: full-rank for both modes (comparable MFU), and each mode's own.
    assert full["flops_per_token_full"] == relora["flops_per_token_full"] == report["flops_per_token"]["full"]
    assert relora["flops_per_token_own"] == report["flops_per_token"]["relora"]
    assert full["flops_per_token_own"] == report["flops_per_token"]["full"]
    # ReLoRA trains fewer parameters and keeps less optimizer state; one restart was timed.
    assert relora["trainable_params"] < full["trainable_params"] == full["total_params"]
    assert relora["optimizer_state_bytes"] < full["optimizer_state_bytes"]
    assert full["restart_seconds"] is None and relora["restart_seconds"] > 0
    assert relora["restart_record"]["fraction_zeroed"] > 0.9

    ratios = report["ratios"]["relora"]
    for key in ("tokens_per_s", "step_time", "peak_memory", "optimizer_state", "trainable_params",
                "ideal_tokens_per_s"):
        assert math.isfinite(ratios[key]) and ratios[key] > 0, key
    assert ratios["tokens_per_s"] == pytest.approx(1 / ratios["step_time"])
    assert ratios["trainable_params"] == pytest.approx(relora["trainable_params"] / full["trainable_params"])

    # --profile: the top ops of one step, and one step's time by phase with the FLOP model's ratios beside.
    for mode, summary in (("full", full), ("relora", relora)):
        assert report["profile"][mode] and all(op["self_ms"] >= 0 for op in report["profile"][mode])
        phases = summary["phase_seconds"]
        assert list(phases) == ["forward", "backward", "optimizer step"] and all(t > 0 for t in phases.values())
    assert ratios["phase_seconds"]["backward"] == pytest.approx(
        relora["phase_seconds"]["backward"] / full["phase_seconds"]["backward"])

    table = (tmp_path / (stem + ".md")).read_text()
    assert "Where one optimizer step's time goes" in table
    assert "| phase | full (ms) | relora (ms) | relora / full | FLOP model relora / full |" in table
    assert "| metric | full | relora | relora / full |" in table
    assert "| tokens/s per device |" in table and "peak RSS of the worker process" in table
    assert "trends only" in table
    assert table in proc.stdout


def test_cli_bench_writes_under_the_current_directory(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "relora_ds", "bench", *TINY, "--modes", "relora", "galore", "--warmup",
                           "1", "--steps", "2"], capture_output=True, text=True, cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = sorted(os.listdir(tmp_path / "benchmarks" / "results"))
    assert [os.path.splitext(name)[1] for name in written] == [".json", ".md", ".png"]
    report = json.loads((tmp_path / "benchmarks" / "results" / written[0]).read_text())
    assert list(report["modes"]) == ["relora", "galore"] and report["ratios"] == {}  # no full-rank run: no ratios
    galore = report["modes"]["galore"]  # every method of the registry is a mode, built with its own optimizer
    assert galore["restart_seconds"] is None and galore["flops_per_token_own"] == galore["flops_per_token_full"]
    assert galore["trainable_params"] == galore["total_params"] and galore["optimizer_state_bytes"] > 0
    assert report["args"]["ds_config"].endswith(os.path.join("ds_configs", "cpu.json"))  # the shipped default
    assert "fn" not in report["args"] and "ds_configs/cpu.json (ZeRO-0, fp32)" in proc.stdout


def test_cli_bench_bad_argument_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "relora_ds", "bench", "--preset", "tiny", "--steps", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr == "error: --steps must be >= 1, got 0\n"


def test_ideal_phase_ratios_follow_the_flop_model():
    from relora_ds.bench.report import ideal_phase_ratios
    from relora_ds.model.build import preset_meta_model
    from relora_ds.model.counts import flops_per_token

    flops = flops_per_token(preset_meta_model("1b", 32100), 2048, relora_rank=128)
    ideal = ideal_phase_ratios(flops)
    # forward + backward FLOPs of each mode add up to the model module's totals
    full_fwd = 2 * flops["n_linear"] + flops["attention"] / 3
    full_bwd = 4 * flops["n_linear"] + 2 * flops["attention"] / 3
    assert full_fwd + full_bwd == pytest.approx(flops["full"])
    assert ideal["forward"] * full_fwd + ideal["backward"] * full_bwd == pytest.approx(flops["relora"])
    assert ideal["forward"] > 1 > ideal["backward"]  # adapters add forward work; frozen W drops its dW GEMM


def test_search_largest_doubles_then_bisects():
    from relora_ds.bench.throughput import search_largest

    def limit(n_max):
        tried = []

        def fits(n):
            tried.append(n)
            return n <= n_max
        return fits, tried

    fits, tried = limit(5)
    assert search_largest(fits, 1, None) == 5
    assert tried == [1, 2, 4, 8, 6, 5]
    fits, tried = limit(5)
    assert search_largest(fits, 16, None) == 5  # a failing start bisects downwards
    assert tried == [16, 8, 4, 6, 5]
    fits, tried = limit(100)
    assert search_largest(fits, 1, 6) == 6      # the cap bounds the search
    assert max(tried) == 6
    fits, tried = limit(0)
    assert search_largest(fits, 4, None) == 0   # even 1 does not fit
    fits, tried = limit(1)
    assert search_largest(fits, 1, 1) == 1 and tried == [1]


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "--preset must be one of"),
    (["--preset", "tiny", "--steps", "0"], "--steps must be >= 1"),
    (["--preset", "tiny", "--threads", "0"], "--threads must be >= 1"),
    (["--preset", "tiny", "--modes", "relora-triton"], "relora-triton needs a CUDA GPU"),
    (["--preset", "tiny", "--data", "/no/such/dir"], "--data must be 'synthetic' or a packed dataset directory"),
])
def test_bad_arguments_give_one_line_errors(args, message):
    from relora_ds.bench.throughput import parse_args

    with pytest.raises(SystemExit) as raised:
        parse_args(args)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_only_out_of_memory_errors_count_as_not_fitting():
    import torch

    from relora_ds.bench.worker import is_oom

    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(MemoryError())
    assert is_oom(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate ... out of memory"))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom(ValueError("out of memory"))


@pytest.mark.slow
def test_max_microbatch_on_cpu(tmp_path):
    proc = run_script(*TINY, "--modes", "relora", "--warmup", "1", "--steps", "2", "--max-microbatch",
                      "--max-mb-cap", "3", "--results-dir", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (name,) = [n for n in os.listdir(tmp_path) if n.endswith(".json")]
    report = json.loads((tmp_path / name).read_text())
    found = report["max_microbatch"]["relora"]
    # start 2 fits; 4 is above the cap of 3, so 3 is tried and fits: capped at 3, measured at 3.
    assert found == {"micro_batch": 3, "cap": 3, "capped": True, "trials": {"2": True, "3": True}}
    assert report["modes"]["relora"]["micro_batch"] == 3
    assert report["runs"]["relora"][0]["ds_config"]["train_micro_batch_size_per_gpu"] == 3
    assert "Largest micro batch that fits" in (tmp_path / name.replace(".json", ".md")).read_text()


def test_sweep_dry_run_lists_every_preset_and_rank():
    env = dict(os.environ, DRY_RUN="1", PRESETS="60m 1b", RANKS="64 128", SEQ="512", MICRO_BATCH="16")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "sweep.sh"), "--repeats", "3"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
    assert proc.returncode == 0, proc.stderr
    commands = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert len(commands) == 4
    for command, (preset, rank) in zip(commands, [("60m", 64), ("60m", 128), ("1b", 64), ("1b", 128)]):
        assert "benchmarks/throughput.py" in command
        assert f"--preset {preset} --rank {rank} --seq-len 512 --micro-batch 16" in command
        assert f"--tag r{rank}-s512-mb16" in command and command.endswith("--repeats 3")


def test_workers_do_not_inherit_the_callers_rendezvous(monkeypatch):
    """A process that trained in-process keeps RANK/WORLD_SIZE/MASTER_PORT in its environment (and may still hold
    that port); a benchmark worker started from it must make its own process group, not join or bind that one."""
    from relora_ds.bench import throughput

    for key, value in {"MASTER_PORT": "29512", "MASTER_ADDR": "10.0.0.9", "RANK": "3", "WORLD_SIZE": "4",
                       "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    env = throughput.worker_env()
    assert not {"MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK"} & set(env)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == throughput.PACKAGE_PARENT
