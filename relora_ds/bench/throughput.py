"""Throughput, MFU and memory of ReLoRA against full-rank training, side by side (the paper's Table 7).

    relora-ds bench --preset 1b --seq-len 2048 --micro-batch 4            # GPU: ds_configs/zero1.json
    relora-ds bench --preset 1b --seq-len 512 --max-microbatch            # largest micro batch per mode
    relora-ds bench --preset tiny --rank 8 --vocab-size 8192 --seq-len 64  # CPU: trends only
    (the same: python benchmarks/throughput.py ... or python -m relora_ds.bench.throughput ...)

Every mode (full-rank, ReLoRA on the torch path, ReLoRA on the Triton path when CUDA and triton are there)
trains the same model on the same DeepSpeed config and data in its own fresh process
(relora_ds.bench.worker, the order alternating over --repeats). This parent process aggregates the workers
(relora_ds.bench.report), prints a markdown table with the ReLoRA / full-rank ratios, and writes
`<results-dir>/<date>-<device>-<preset>[-<tag>].{json,md,png}`.

MFU uses the model module's FLOPs per token (relora_ds.model.counts.flops_per_token): the full-rank count for
every mode, so MFU is comparable across modes, and each mode's own count beside it. Peak FLOP/s come from
relora_ds.hardware.PEAK_TFLOPS by GPU name (bf16/fp16 dense) or --peak-tflops; on CPU, MFU is null unless --peak-tflops
is given. Memory on CUDA is torch.cuda.max_memory_allocated/reserved over the measured steps; on CPU it is
the worker's peak RSS (resource.getrusage), which covers the whole process. CPU numbers are for trends only.
"""

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys

import torch

from relora_ds import hardware
from relora_ds.dist import free_port
from relora_ds.bench import report as rep
from relora_ds.bench.worker import MODES, TRITON_MODE, mode_method, worker_main
from relora_ds.engine import ds_config as dsc
from relora_ds.files import atomic_write

DEFAULT_RESULTS_DIR = os.path.join("benchmarks", "results")
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- arguments (one parser for the parent and the workers) ---------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (also those of `relora-ds bench`)."""
    parser.add_argument("--preset", required=True, help="LLaMA model preset (relora_ds/model/families.py)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="vocabulary size (default: the paper's 32100, or the --data manifest's)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--micro-batch", type=int, default=8,
                        help="train_micro_batch_size_per_gpu (replaces the DeepSpeed config's value)")
    parser.add_argument("--ds-config", default=None,
                        help="DeepSpeed JSON (default: ds_configs/zero1.json with CUDA, ds_configs/cpu.json without)")
    parser.add_argument("--modes", nargs="+", default=None, choices=list(MODES),
                        help="every training method (relora_ds/methods/) and relora-triton; default: full relora, and "
                             "relora-triton when CUDA and triton are available")
    parser.add_argument("--rank", type=int, default=128, help="ReLoRA rank r")
    parser.add_argument("--alpha", type=float, default=32.0, help="ReLoRA alpha (scale = alpha / r)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout of the adapters (default 0)")
    parser.add_argument("--warmup", type=int, default=5, help="optimizer steps before timing")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--repeats", type=int, default=1, help="worker runs per mode (the order alternates)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per worker, launched with torchrun")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads in every worker (on a shared CPU machine 1 is the steadiest)")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate of the benchmark steps (default 1e-4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init, adapters and synthetic data")
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic' (uniform random tokens) or a packed dataset dir (relora-ds pretokenize)")
    parser.add_argument("--attn", default="auto", help="attention implementation: auto, sdpa, eager, flash_attention_2")
    parser.add_argument("--activation-checkpointing", default="none", choices=("none", "full", "selective"),
                        help="as train.activation_checkpointing (default none)")
    parser.add_argument("--grad-checkpointing", action="store_const", dest="activation_checkpointing",
                        const="full", help="= --activation-checkpointing full")
    parser.add_argument("--compile", action="store_true", help="engine.compile() (torch.compile) before warm-up")
    parser.add_argument("--profile", action="store_true",
                        help="profile one extra step per mode with torch.profiler (top ops) and time 3 more by phase "
                             "(forward, backward, optimizer step); both go into the results")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s per device for MFU (default: by GPU name; none on CPU)")
    parser.add_argument("--max-microbatch", action="store_true",
                        help="first find each mode's largest micro batch (doubling, then bisection; OOM = does "
                             "not fit), then measure every mode at its own largest micro batch")
    parser.add_argument("--max-mb-cap", type=int, default=None,
                        help="upper bound of the micro-batch search (default: none with CUDA, 8 on CPU)")
    parser.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR,
                        help="where the .json, .md and .png go (default: benchmarks/results under the current "
                             "directory; benchmarks/throughput.py: the checkout's benchmarks/results)")
    parser.add_argument("--tag", default=None, help="appended to the result file names (e.g. r128-s2048)")
    parser.add_argument("--worker-timeout", type=int, default=3600, help="seconds one worker process may run")
    parser.add_argument("--worker", default=None, choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--no-restart", action="store_true", help=argparse.SUPPRESS)


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """One-line errors for values the workers would otherwise fail on much later."""
    from relora_ds.model.families import MODEL_PRESETS as PRESETS

    if args.preset not in PRESETS:
        raise SystemExit(f"--preset must be one of {', '.join(PRESETS)}, got {args.preset!r}")
    for name in ("seq_len", "micro_batch", "steps", "repeats", "nproc", "rank"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    if args.vocab_size is not None and args.vocab_size < 2:
        raise SystemExit(f"--vocab-size must be >= 2, got {args.vocab_size}")
    if args.max_mb_cap is not None and args.max_mb_cap < 1:
        raise SystemExit(f"--max-mb-cap must be >= 1, got {args.max_mb_cap}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise SystemExit(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if args.ds_config is not None:
        args.ds_config = dsc.resolve_path(args.ds_config)  # ds_configs/NAME.json: the shipped file
        if not os.path.isfile(args.ds_config):
            raise SystemExit(f"--ds-config {args.ds_config}: file not found")
    if args.data != "synthetic" and not os.path.isdir(args.data):
        raise SystemExit(f"--data must be 'synthetic' or a packed dataset directory, got {args.data!r}")
    if args.tag is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", args.tag):
        raise SystemExit(f"--tag may contain only letters, digits, '.', '_' and '-', got {args.tag!r}")
    modes = args.modes or []
    if TRITON_MODE in modes and not torch.cuda.is_available():
        raise SystemExit(f"--modes {TRITON_MODE} needs a CUDA GPU (the Triton kernels do not run compiled on CPU)")


def default_modes() -> list[str]:
    import importlib.util

    modes = ["full", "relora"]
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        modes.append(TRITON_MODE)
    return modes


def default_ds_config() -> str:
    name = "zero1.json" if torch.cuda.is_available() else "cpu.json"
    return dsc.resolve_path(f"{dsc.SHIPPED_DIR}/{name}")


# --- the parent: run the workers, aggregate, write ----------------------------------------------------------

def worker_command(args, mode: str, micro_batch: int, *, warmup: int, steps: int, restart: bool) -> list[str]:
    """The command line of one worker: the parent's settings, one mode, one micro batch."""
    module = ["-m", "relora_ds.bench.throughput"]
    if args.nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                    "--master_port", str(free_port()), *module]
    else:
        launcher = [sys.executable, *module]
    options = ["--worker", mode, "--preset", args.preset, "--vocab-size", str(args.vocab_size),
               "--seq-len", str(args.seq_len), "--micro-batch", str(micro_batch), "--ds-config", args.ds_config,
               "--rank", str(args.rank), "--alpha", str(args.alpha), "--lora-dropout", str(args.lora_dropout),
               "--warmup", str(warmup), "--steps", str(steps), "--lr", str(args.lr), "--seed", str(args.seed),
               "--data", args.data, "--attn", args.attn]
    if args.threads is not None:
        options += ["--threads", str(args.threads)]
    options += ["--activation-checkpointing", args.activation_checkpointing]
    for flag in ("compile", "profile"):
        if getattr(args, flag):
            options.append("--" + flag.replace("_", "-"))
    if not restart:
        options.append("--no-restart")
    return launcher + options


# A worker starts its own process group (one process: a free port of its own; several: torchrun's); the parent's
# rendezvous, if any (a launcher's, or one left by a run in the calling process), is not handed down.
RENDEZVOUS_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                        "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def worker_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARIABLES}
    # the workers import this very package, also when it runs from a checkout that is not installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def worker_result(stdout: str, mode: str) -> dict | None:
    """The worker's JSON line: the last stdout line that parses as an object for `mode` (libraries print too)."""
    for line in reversed(stdout.splitlines()):
        if not line.startswith("{"):
            continue
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(result, dict) and result.get("mode") == mode:
            return result
    return None


def run_worker(args, mode: str, micro_batch: int, *, warmup: int, steps: int, restart: bool = True) -> dict:
    """Run one worker process; its JSON result, or {"oom": True, ...}. Any other failure stops the benchmark."""
    command = worker_command(args, mode, micro_batch, warmup=warmup, steps=steps, restart=restart)
    proc = subprocess.run(command, capture_output=True, text=True, env=worker_env(),
                          timeout=args.worker_timeout)
    result = worker_result(proc.stdout, mode)
    if result is not None and (proc.returncode == 0 or result.get("oom")):
        return result
    if proc.returncode == -9:  # SIGKILL: on CPU machines this is the kernel's out-of-memory killer
        return {"mode": mode, "micro_batch": micro_batch, "oom": True, "error": "worker killed (SIGKILL)"}
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    raise SystemExit(f"worker {mode} (micro batch {micro_batch}) failed with exit code {proc.returncode}:\n{tail}")


def search_largest(fits, start: int, cap: int | None) -> int:
    """The largest n >= 1 (and <= cap) with fits(n), for a monotone `fits`; 0 when even 1 does not fit.

    Doubles from `start` while it fits, then bisects between the largest fitting and smallest failing size.
    """
    lo = 0                                 # largest size known to fit (0: none yet)
    hi = None if cap is None else cap + 1  # smallest size known not to fit (or above the cap)
    n = start if cap is None else min(start, cap)
    if fits(n):
        lo = n
        while hi is None or 2 * lo < hi:
            if not fits(2 * lo):
                hi = 2 * lo
                break
            lo *= 2
    else:
        hi = n
    while hi - lo > 1:
        middle = (lo + hi) // 2
        if fits(middle):
            lo = middle
        else:
            hi = middle
    return lo


def largest_micro_batch(args, mode: str) -> dict:
    """Each trial is a fresh worker (1 warm-up + 2 steps, no restart); out of memory = does not fit."""
    trials = {}

    def fits(micro_batch: int) -> bool:
        result = run_worker(args, mode, micro_batch, warmup=1, steps=2, restart=False)
        trials[micro_batch] = not result.get("oom", False)
        print(f"[throughput] {mode}: micro batch {micro_batch} {'fits' if trials[micro_batch] else 'does not fit'}",
              file=sys.stderr, flush=True)
        return trials[micro_batch]

    largest = search_largest(fits, args.micro_batch, args.max_mb_cap)
    return {"micro_batch": largest, "cap": args.max_mb_cap, "capped": args.max_mb_cap is not None
            and largest == args.max_mb_cap, "trials": {str(k): v for k, v in sorted(trials.items())}}


# --- main ----------------------------------------------------------------------------------------------------

def resolve_defaults(args) -> None:
    """Fill in the defaults that depend on the machine or the data, before any worker starts."""
    from relora_ds.model.counts import PAPER_VOCAB_SIZE

    args.ds_config = os.path.abspath(args.ds_config or default_ds_config())
    args.results_dir = os.path.abspath(args.results_dir)
    args.modes = args.modes or default_modes()
    if args.max_mb_cap is None and not torch.cuda.is_available():
        args.max_mb_cap = 8
    if args.data != "synthetic":
        args.data = os.path.abspath(args.data)
        from relora_ds.data.pretokenize import read_manifest

        data_vocab = read_manifest(args.data)["vocab_size"]
        if args.vocab_size is not None and args.vocab_size < data_vocab:
            raise SystemExit(f"--vocab-size {args.vocab_size} is smaller than --data's vocabulary {data_vocab}")
        args.vocab_size = args.vocab_size or data_vocab
    args.vocab_size = args.vocab_size or PAPER_VOCAB_SIZE


def main(argv=None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    if args.worker is not None:
        return worker_main(args)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """The parent: (find the largest micro batches,) run every mode's workers, aggregate, print and write."""
    resolve_defaults(args)
    from relora_ds.model.build import preset_meta_model
    from relora_ds.model.counts import flops_per_token

    relora_modes = [m for m in args.modes if mode_method(m, args)[1] is not None]
    flops = flops_per_token(preset_meta_model(args.preset, args.vocab_size), args.seq_len,
                            relora_rank=args.rank if relora_modes else None)

    micro_batches = {mode: args.micro_batch for mode in args.modes}
    max_microbatch = None
    if args.max_microbatch:
        max_microbatch = {mode: largest_micro_batch(args, mode) for mode in args.modes}
        micro_batches = {mode: found["micro_batch"] for mode, found in max_microbatch.items()}
        for mode, micro_batch in micro_batches.items():
            if micro_batch == 0:
                raise SystemExit(f"{mode}: even micro batch 1 does not fit in memory")

    runs = {mode: [] for mode in args.modes}
    for repeat in range(args.repeats):
        order = args.modes if repeat % 2 == 0 else list(reversed(args.modes))
        for mode in order:
            result = run_worker(args, mode, micro_batches[mode], warmup=args.warmup, steps=args.steps)
            runs[mode].append(result)
            done = "out of memory" if result.get("oom") else \
                f"{result['tokens_per_step_per_device'] / statistics.median(result['step_seconds']):,.0f} tokens/s"
            print(f"[throughput] repeat {repeat + 1}/{args.repeats} {mode}: {done}", file=sys.stderr, flush=True)

    measured = [run for mode_runs in runs.values() for run in mode_runs if not run.get("oom")]
    if not measured:
        raise SystemExit("every mode ran out of memory; lower --micro-batch or --seq-len")
    first = measured[0]
    hw = first["hardware"]
    peak_flops, peak_source = hardware.peak_flops_per_device(args.peak_tflops, hw["gpu_name"], first["precision"])
    summaries = {mode: rep.summarize(mode_runs, flops, peak_flops) for mode, mode_runs in runs.items()}
    now = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "date": now.isoformat(timespec="seconds"), "command": [sys.executable] + sys.argv,
        "args": {k: v for k, v in vars(args).items() if k not in ("fn", "command")}, "hardware": hw, "versions": rep.versions(), "world_size": first["world_size"],
        "ds_config": first["ds_config"], "zero_stage": first["zero_stage"], "precision": first["precision"],
        "flops_per_token": flops, "peak_flops_per_device": peak_flops, "peak_flops_source": peak_source,
        "note": "CPU run: numbers are for trends only" if hw["gpu_name"] is None else None,
        "modes": summaries, "ratios": rep.ratios(summaries, flops), "max_microbatch": max_microbatch,
        "profile": {mode: mode_runs[0].get("profile") for mode, mode_runs in runs.items()},
        "runs": runs,
    }
    table = rep.markdown(report)
    print("\n" + table)
    os.makedirs(args.results_dir, exist_ok=True)
    stem = f"{now.date().isoformat()}-{rep.device_label(hw)}-{args.preset}" + (f"-{args.tag}" if args.tag else "")
    path = os.path.join(args.results_dir, stem)
    atomic_write(path + ".json", json.dumps(report, indent=2))
    atomic_write(path + ".md", table)
    rep.plot(report, path + ".png")
    print(f"wrote {path}.json, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
