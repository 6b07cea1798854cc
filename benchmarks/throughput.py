"""Throughput, MFU and memory of ReLoRA against full-rank training, side by side (the paper's Table 7).

    python benchmarks/throughput.py --preset 1b --seq-len 2048 --micro-batch 4            # GPU: ds_configs/zero1.json
    python benchmarks/throughput.py --preset 1b --seq-len 512 --max-microbatch            # largest micro batch per mode
    python benchmarks/throughput.py --preset tiny --rank 8 --vocab-size 8192 --seq-len 64  # CPU: trends only

Every mode (full-rank, ReLoRA on the torch path, ReLoRA on the Triton path when CUDA and triton are there)
trains the same model on the same DeepSpeed config and data in its own fresh process
(`throughput.py --worker MODE ...`, the order alternating over --repeats). A worker runs --warmup and then
--steps optimizer steps, times each step, reads the peak memory, the optimizer's state, and (ReLoRA) times
one restart, then prints one JSON line. This parent process aggregates the workers, prints a markdown table
with the ReLoRA / full-rank ratios, and writes `<results-dir>/<date>-<device>-<preset>[-<tag>].{json,md,png}`.

MFU uses the model module's FLOPs per token (relora_ds.model.llama.flops_per_token): the full-rank count for
every mode, so MFU is comparable across modes, and each mode's own count beside it. Peak FLOP/s come from
PEAK_TFLOPS by GPU name (bf16/fp16 dense) or --peak-tflops; on CPU, MFU is null unless --peak-tflops is given.
Memory on CUDA is torch.cuda.max_memory_allocated/reserved over the measured steps; on CPU it is the worker's
peak RSS (resource.getrusage), which covers the whole process. CPU numbers are for trends only.
"""

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import socket
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# mode → the `kernels` argument of ReLoRALinear (None: full-rank, no adapters)
MODES = {"full": None, "relora": "torch", "relora-triton": "triton"}

# Dense bf16/fp16 tensor-core peak, TFLOP/s, matched in order against the GPU name (first hit wins).
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),   # SXM
    ("H200 NVL", 835.0),
    ("H200", 989.0),   # SXM
    ("A100", 312.0),
)

OOM_EXIT_CODE = 3
GIB = 2 ** 30


# --- arguments (one parser for the parent and the workers) ---------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, help="model preset of relora_ds.model.llama.PRESETS")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="vocabulary size (default: the paper's 32100, or the --data manifest's)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8,
                        help="train_micro_batch_size_per_gpu (replaces the DeepSpeed config's value)")
    parser.add_argument("--ds-config", default=None,
                        help="DeepSpeed JSON (default: ds_configs/zero1.json with CUDA, ds_configs/cpu.json without)")
    parser.add_argument("--modes", nargs="+", default=None, choices=list(MODES),
                        help="default: full relora, and relora-triton when CUDA and triton are available")
    parser.add_argument("--rank", type=int, default=128, help="ReLoRA rank r")
    parser.add_argument("--alpha", type=float, default=32.0, help="ReLoRA alpha (scale = alpha / r)")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=5, help="optimizer steps before timing")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--repeats", type=int, default=1, help="worker runs per mode (the order alternates)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per worker, launched with torchrun")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads in every worker (on a shared CPU machine 1 is the steadiest)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic' (uniform random tokens) or a packed dataset dir (relora-ds pretokenize)")
    parser.add_argument("--attn", default="auto", help="attention implementation: auto, sdpa, eager, flash_attention_2")
    parser.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing in every layer")
    parser.add_argument("--compile", action="store_true", help="engine.compile() (torch.compile) before warm-up")
    parser.add_argument("--profile", action="store_true",
                        help="profile one extra step per mode with torch.profiler; top ops go into the results")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s per device for MFU (default: by GPU name; none on CPU)")
    parser.add_argument("--max-microbatch", action="store_true",
                        help="first find each mode's largest micro batch (doubling, then bisection; OOM = does "
                             "not fit), then measure every mode at its own largest micro batch")
    parser.add_argument("--max-mb-cap", type=int, default=None,
                        help="upper bound of the micro-batch search (default: none with CUDA, 8 on CPU)")
    parser.add_argument("--results-dir", default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument("--tag", default=None, help="appended to the result file names (e.g. r128-s2048)")
    parser.add_argument("--worker-timeout", type=int, default=3600, help="seconds one worker process may run")
    parser.add_argument("--worker", default=None, choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--no-restart", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """One-line errors for values the workers would otherwise fail on much later."""
    from relora_ds.model.llama import PRESETS

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
    if args.ds_config is not None and not os.path.isfile(args.ds_config):
        raise SystemExit(f"--ds-config {args.ds_config}: file not found")
    if args.data != "synthetic" and not os.path.isdir(args.data):
        raise SystemExit(f"--data must be 'synthetic' or a packed dataset directory, got {args.data!r}")
    if args.tag is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", args.tag):
        raise SystemExit(f"--tag may contain only letters, digits, '.', '_' and '-', got {args.tag!r}")
    modes = args.modes or []
    if "relora-triton" in modes and not torch.cuda.is_available():
        raise SystemExit("--modes relora-triton needs a CUDA GPU (the Triton kernels do not run compiled on CPU)")
    if "relora-triton" in modes and args.lora_dropout > 0:
        raise SystemExit("--modes relora-triton needs --lora-dropout 0 (the fused kernels have no dropout)")


def default_modes() -> list[str]:
    import importlib.util

    modes = ["full", "relora"]
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        modes.append("relora-triton")
    return modes


def default_ds_config() -> str:
    name = "zero1.json" if torch.cuda.is_available() else "cpu.json"
    return os.path.join(REPO, "ds_configs", name)


# --- the worker: one mode, one process -----------------------------------------------------------------------

def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_batches(args, device, micro_batch: int, count: int) -> list[torch.Tensor]:
    """`count` (micro_batch, seq_len) token batches on `device`, made before any timing starts."""
    if args.data == "synthetic":
        generator = torch.Generator().manual_seed(args.seed)
        return [torch.randint(0, args.vocab_size, (micro_batch, args.seq_len), generator=generator).to(device)
                for _ in range(count)]
    from relora_ds.data.loader import PackedDataset

    dataset = PackedDataset(args.data)
    if dataset.seq_len != args.seq_len:
        raise SystemExit(f"--data {args.data}: packed with seq_len {dataset.seq_len}, but --seq-len is {args.seq_len}")
    needed = micro_batch * count
    if len(dataset) < needed:
        raise SystemExit(f"--data {args.data}: {len(dataset)} sequences, the benchmark needs {needed}")
    return [dataset.get_batch(range(i * micro_batch, (i + 1) * micro_batch)).to(device) for i in range(count)]


def train_step(engine, batches: list[torch.Tensor]) -> torch.Tensor:
    """One optimizer step: every micro batch of it through forward, backward and engine.step()."""
    for ids in batches:
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    return loss


def base_optimizer(engine):
    """The torch optimizer that holds the state (inside DeepSpeed's bf16 / ZeRO wrappers, if any)."""
    optimizer = engine.optimizer
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def optimizer_bytes(engine) -> dict:
    """This rank's optimizer-state bytes (Adam moments, step counters) and fp32 master copies it keeps."""
    optimizer = base_optimizer(engine)
    state = sum(tensor_bytes(value) for per_param in optimizer.state.values()
                for value in per_param.values() if torch.is_tensor(value))
    module_storage = {p.data_ptr() for p in engine.module.parameters()}
    masters = sum(tensor_bytes(p) for group in optimizer.param_groups for p in group["params"]
                  if p.data_ptr() not in module_storage)
    return {"optimizer_state_bytes": state, "optimizer_master_bytes": masters}


def parameter_counts(module: torch.nn.Module) -> dict:
    """Total and trainable parameters (full sizes, also when ZeRO-3 has partitioned them)."""
    total = trainable = 0
    for param in module.parameters():
        numel = getattr(param, "ds_numel", param.numel())
        total += numel
        trainable += numel if param.requires_grad else 0
    return {"total_params": total, "trainable_params": trainable}


def peak_memory() -> dict:
    if torch.cuda.is_available():
        return {"memory_kind": "cuda", "peak_memory_allocated_bytes": torch.cuda.max_memory_allocated(),
                "peak_memory_reserved_bytes": torch.cuda.max_memory_reserved(), "peak_rss_bytes": None}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    return {"memory_kind": "cpu_rss", "peak_memory_allocated_bytes": None, "peak_memory_reserved_bytes": None,
            "peak_rss_bytes": rss}


def hardware() -> dict:
    """The machine the worker ran on."""
    cpu_model = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu_model = names[0] if names else cpu_model
    info = {"cpu_model": cpu_model, "cpu_count": os.cpu_count(),
            "cpu_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "torch_threads": torch.get_num_threads(), "gpu_name": None, "gpu_count": 0}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu_name=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_bytes=props.total_memory,
                    gpu_capability=f"{props.major}.{props.minor}", gpu_sm_count=props.multi_processor_count)
    return info


def profile_step(engine, batches: list[torch.Tensor], top: int = 20) -> list[dict]:
    """The ops of one optimizer step, by self time on the device (CUDA) or on the CPU, largest first."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        train_step(engine, batches)
        synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total_us = sum(getattr(e, key) for e in events)
    return [{"op": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3,
             "share": getattr(e, key) / total_us if total_us else 0.0} for e in events[:top]]


def measure(args) -> dict:
    """Build the model (wrapped for ReLoRA modes) and the engine, run and time the steps; the worker's result."""
    import torch.distributed

    from relora_ds.engine import ds_config as dsc, runtime
    from relora_ds.model.llama import PRESETS, build_model
    from relora_ds.relora.wrap import wrap

    mode = args.worker
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    runtime.init_distributed()
    world_size = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    config = dsc.load_ds_config(args.ds_config)
    config["train_micro_batch_size_per_gpu"] = args.micro_batch
    config.pop("train_batch_size", None)
    ds_config = dsc.reconcile(config, lr=args.lr, world_size=world_size, source=args.ds_config)
    grad_accum = dsc.grad_accum_steps(ds_config)

    max_positions = max(args.seq_len, PRESETS[args.preset]["max_position_embeddings"])
    model = build_model(args.preset, args.vocab_size, max_position_embeddings=max_positions,
                        attn_implementation=args.attn, seed=args.seed)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
    if MODES[mode] is not None:
        if MODES[mode] == "triton":
            from relora_ds.kernels import triton_available

            if not triton_available():
                raise SystemExit("relora-triton: the Triton kernels are not available on this machine")
        wrap(model, rank=args.rank, alpha=args.alpha, dropout=args.lora_dropout, kernels=MODES[mode], seed=args.seed)
    engine = runtime.make_engine(model, ds_config)
    if args.compile:
        engine.compile()
    batches = make_batches(args, engine.device, args.micro_batch, grad_accum)

    losses = []
    for _ in range(args.warmup):
        losses.append(train_step(engine, batches).item())
    synchronize()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    step_seconds = []
    for _ in range(args.steps):
        started = time.perf_counter()
        loss = train_step(engine, batches)
        synchronize()
        step_seconds.append(time.perf_counter() - started)
        losses.append(loss.item())
    result = {"mode": mode, "kernels": MODES[mode], "micro_batch": args.micro_batch, "grad_accum": grad_accum,
              "world_size": world_size, "seq_len": args.seq_len,
              "tokens_per_step_per_device": args.micro_batch * grad_accum * args.seq_len,
              "warmup_steps": args.warmup, "step_seconds": step_seconds,
              "first_loss": losses[0], "last_loss": losses[-1],
              **peak_memory(), **optimizer_bytes(engine), **parameter_counts(engine.module),
              "zero_stage": dsc.zero_stage(ds_config), "precision": dsc.precision(ds_config),
              "ds_config": ds_config, "hardware": hardware(), "profile": None, "restart": None}
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit(f"{mode}: non-finite loss during the benchmark: {losses}")
    if args.profile:
        result["profile"] = profile_step(engine, batches)
    if MODES[mode] is not None and not args.no_restart:
        from relora_ds.engine.restart import relora_restart

        synchronize()
        started = time.perf_counter()
        record = relora_restart(engine, restart_index=1, step=engine.global_steps, seed=args.seed)
        synchronize()
        result["restart"] = {"seconds": time.perf_counter() - started, "record": record.to_dict()}
    engine.destroy()
    return result if rank == 0 else None


def is_oom(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def worker_main(args) -> int:
    """Run one mode; print its result as one JSON line (rank 0). Exit code OOM_EXIT_CODE when out of memory."""
    if "RANK" not in os.environ:  # no launcher: a free port, so concurrent jobs do not clash on 29500
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    try:
        result = measure(args)
    except Exception as error:  # only an out-of-memory error is a result ("does not fit"); the rest propagate
        if not is_oom(error):
            raise
        message = " ".join(str(error).split())[:300]
        print(json.dumps({"mode": args.worker, "micro_batch": args.micro_batch, "oom": True, "error": message}),
              flush=True)
        return OOM_EXIT_CODE
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0


# --- the parent: run the workers, aggregate, write ----------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_command(args, mode: str, micro_batch: int, *, warmup: int, steps: int, restart: bool) -> list[str]:
    """The command line of one worker: the parent's settings, one mode, one micro batch."""
    script = os.path.abspath(__file__)
    if args.nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                    "--master_port", str(free_port()), script]
    else:
        launcher = [sys.executable, script]
    options = ["--worker", mode, "--preset", args.preset, "--vocab-size", str(args.vocab_size),
               "--seq-len", str(args.seq_len), "--micro-batch", str(micro_batch), "--ds-config", args.ds_config,
               "--rank", str(args.rank), "--alpha", str(args.alpha), "--lora-dropout", str(args.lora_dropout),
               "--warmup", str(warmup), "--steps", str(steps), "--lr", str(args.lr), "--seed", str(args.seed),
               "--data", args.data, "--attn", args.attn]
    if args.threads is not None:
        options += ["--threads", str(args.threads)]
    for flag in ("grad_checkpointing", "compile", "profile"):
        if getattr(args, flag):
            options.append("--" + flag.replace("_", "-"))
    if not restart:
        options.append("--no-restart")
    return launcher + options


def worker_env() -> dict:
    env = dict(os.environ)
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
    proc = subprocess.run(command, capture_output=True, text=True, env=worker_env(), cwd=REPO,
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


def spread(values: list[float]) -> dict:
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return {"median": statistics.median(ordered), "q1": q1, "q3": q3, "min": ordered[0], "max": ordered[-1]}


def peak_flops_per_device(args, gpu_name: str | None) -> tuple[float | None, str]:
    """(peak FLOP/s per device, where it came from) for MFU; None when unknown (CPU, unlisted GPU, fp32)."""
    if args.peak_tflops is not None:
        return args.peak_tflops * 1e12, "--peak-tflops"
    if gpu_name is None:
        return None, "CPU: no peak known (pass --peak-tflops)"
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in gpu_name.lower():
            return tflops * 1e12, f"table: {name} dense bf16/fp16 {tflops:g} TFLOP/s"
    return None, f"{gpu_name}: not in the table (pass --peak-tflops)"


def summarize(runs: list[dict], flops: dict, peak_flops: float | None) -> dict:
    """One mode's figures over its worker runs (step times pooled over repeats)."""
    if runs[0].get("oom"):
        return {"oom": True, "micro_batch": runs[0]["micro_batch"]}
    first = runs[0]
    times = spread([t for run in runs for t in run["step_seconds"]])
    per_device = first["tokens_per_step_per_device"] / times["median"]
    own_flops = flops["relora"] if first["kernels"] is not None else flops["full"]

    def worst(key):
        values = [run[key] for run in runs if run[key] is not None]
        return max(values) if values else None

    restarts = [run["restart"]["seconds"] for run in runs if run["restart"] is not None]
    return {
        "oom": False, "micro_batch": first["micro_batch"], "grad_accum": first["grad_accum"],
        "world_size": first["world_size"], "tokens_per_step_per_device": first["tokens_per_step_per_device"],
        "tokens_per_s_per_device": per_device, "tokens_per_s_total": per_device * first["world_size"],
        "tokens_per_s_per_repeat": [first["tokens_per_step_per_device"] / statistics.median(run["step_seconds"])
                                    for run in runs],
        "step_seconds": times, "measured_steps": sum(len(run["step_seconds"]) for run in runs),
        "flops_per_token_full": flops["full"], "flops_per_token_own": own_flops,
        "model_tflops_per_s_per_device": per_device * flops["full"] / 1e12,
        "mfu": per_device * flops["full"] / peak_flops if peak_flops else None,
        "mfu_own_flops": per_device * own_flops / peak_flops if peak_flops else None,
        "memory_kind": first["memory_kind"],
        "peak_memory_allocated_bytes": worst("peak_memory_allocated_bytes"),
        "peak_memory_reserved_bytes": worst("peak_memory_reserved_bytes"),
        "peak_rss_bytes": worst("peak_rss_bytes"),
        "optimizer_state_bytes": first["optimizer_state_bytes"],
        "optimizer_master_bytes": first["optimizer_master_bytes"],
        "trainable_params": first["trainable_params"], "total_params": first["total_params"],
        "restart_seconds": statistics.median(restarts) if restarts else None,
        "restart_record": first["restart"]["record"] if first["restart"] else None,
        "loss_first_last": [first["first_loss"], first["last_loss"]],
    }


def peak_memory_of(summary: dict) -> int | None:
    """The memory figure compared across modes: CUDA peak allocated, or the worker's peak RSS on CPU."""
    if summary["memory_kind"] == "cuda":
        return summary["peak_memory_allocated_bytes"]
    return summary["peak_rss_bytes"]


def ratios(summaries: dict, flops: dict) -> dict:
    """ReLoRA mode / full-rank for every ReLoRA mode that ran (None where either side ran out of memory)."""
    full = summaries.get("full")
    out = {}
    for mode, summary in summaries.items():
        if mode == "full" or full is None:
            continue
        if full["oom"] or summary["oom"]:
            out[mode] = None
            continue
        out[mode] = {
            "tokens_per_s": summary["tokens_per_s_per_device"] / full["tokens_per_s_per_device"],
            "step_time": summary["step_seconds"]["median"] / full["step_seconds"]["median"],
            "peak_memory": peak_memory_of(summary) / peak_memory_of(full),
            "optimizer_state": summary["optimizer_state_bytes"] / full["optimizer_state_bytes"],
            "trainable_params": summary["trainable_params"] / full["trainable_params"],
            "ideal_tokens_per_s": flops["full"] / flops["relora"],  # at equal MFU (the FLOP model's speed-up)
        }
    return out


def versions() -> dict:
    found = {"python": platform.python_version(), "cuda": torch.version.cuda}
    for package in ("torch", "deepspeed", "transformers", "triton"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def device_label(hw: dict) -> str:
    if hw["gpu_name"] is None:
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", hw["gpu_name"].lower().replace("nvidia", "")).strip("-")


# --- the report ----------------------------------------------------------------------------------------------

def _gib(value) -> str:
    return "—" if value is None else f"{value / GIB:.4g}"


def _ms(value) -> str:
    return f"{value * 1e3:.1f}"


def _ratio(value) -> str:
    return "—" if value is None else f"{value:.3f}×"


def params_text(summaries: dict) -> str:
    for summary in summaries.values():
        if not summary["oom"]:
            return f"{summary['total_params'] / 1e6:.2f}M params"
    return "params unknown (every mode ran out of memory)"


def markdown(report: dict) -> str:
    args, hw, summaries = report["args"], report["hardware"], report["modes"]
    modes = list(summaries)
    relora_modes = [m for m in modes if m != "full" and report["ratios"].get(m)]
    cpu = hw["gpu_name"] is None
    device = (f"{hw['cpu_model']} ({hw['cpu_usable']} of {hw['cpu_count']} cores usable, "
              f"{hw['memory_bytes'] / GIB:.0f} GiB)" if cpu else hw["gpu_name"])
    device += f", {report['world_size']} process(es) per mode"
    lines = [f"# Throughput: ReLoRA vs full-rank, preset {args['preset']}, {report['date']}", ""]
    if cpu:
        lines += ["**CPU run: the numbers are for trends only, not GPU performance.**", ""]
    lines += [f"Device: {device}, torch threads {hw['torch_threads']}. Versions: "
              + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v) + ".", "",
              f"Model {args['preset']} (vocab {args['vocab_size']}, {params_text(summaries)}), "
              f"seq {args['seq_len']}, "
              f"ReLoRA r={args['rank']} α={args['alpha']:g} dropout {args['lora_dropout']:g}; "
              f"DeepSpeed {os.path.relpath(args['ds_config'], REPO)} (ZeRO-{report['zero_stage']}, "
              f"{report['precision']}); data {args['data']}; attention {args['attn']}"
              f"{', activation checkpointing' if args['grad_checkpointing'] else ''}"
              f"{', torch.compile' if args['compile'] else ''}; {args['warmup']} warm-up + {args['steps']} "
              f"measured steps × {args['repeats']} repeat(s), one process per mode, alternating order.", "",
              f"MFU peak: {report['peak_flops_source']}. FLOPs/token (model module): full-rank "
              f"{report['flops_per_token']['full'] / 1e9:.4g} GFLOP"
              + (f", ReLoRA {report['flops_per_token']['relora'] / 1e9:.4g} GFLOP"
                 if "relora" in report["flops_per_token"] else "") + ".", ""]
    memory_name = "peak RSS of the worker process (GiB)" if cpu else "peak memory allocated (GiB)"

    def row(label, cell, ratio_key=None):
        cells = [("OOM" if summaries[m]["oom"] else cell(summaries[m])) for m in modes]
        if ratio_key is not None:
            cells += [_ratio(report["ratios"][m][ratio_key]) for m in relora_modes]
        else:
            cells += [""] * len(relora_modes)
        return "| " + " | ".join([label] + cells) + " |"

    header = ["metric"] + modes + [f"{m} / full" for m in relora_modes]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        row("micro batch × grad accum", lambda s: f"{s['micro_batch']} × {s['grad_accum']}"),
        row("tokens/s per device", lambda s: f"{s['tokens_per_s_per_device']:,.0f}", "tokens_per_s"),
        row("tokens/s total", lambda s: f"{s['tokens_per_s_total']:,.0f}"),
        row("ideal tokens/s ratio (FLOP model)", lambda s: "", "ideal_tokens_per_s"),
        row("step time median (ms)", lambda s: _ms(s["step_seconds"]["median"]), "step_time"),
        row("step time IQR (ms)", lambda s: f"{_ms(s['step_seconds']['q1'])}–{_ms(s['step_seconds']['q3'])}"),
        row("step time min–max (ms)", lambda s: f"{_ms(s['step_seconds']['min'])}–{_ms(s['step_seconds']['max'])}"),
        row("model TFLOP/s per device (full-rank FLOPs)", lambda s: f"{s['model_tflops_per_s_per_device']:.4g}"),
        row("MFU (full-rank FLOPs)", lambda s: "—" if s["mfu"] is None else f"{s['mfu']:.1%}"),
        row("MFU (own FLOPs)", lambda s: "—" if s["mfu_own_flops"] is None else f"{s['mfu_own_flops']:.1%}"),
        row(memory_name, lambda s: _gib(peak_memory_of(s)), "peak_memory"),
    ]
    if not cpu:
        lines.append(row("peak memory reserved (GiB)", lambda s: _gib(s["peak_memory_reserved_bytes"])))
    lines += [
        row("optimizer state (GiB, per rank)", lambda s: _gib(s["optimizer_state_bytes"]), "optimizer_state"),
        row("fp32 master copies (GiB, per rank)", lambda s: _gib(s["optimizer_master_bytes"])),
        row("trainable params", lambda s: f"{s['trainable_params']:,}", "trainable_params"),
        row("restart (s)", lambda s: "—" if s["restart_seconds"] is None else f"{s['restart_seconds']:.3f}"),
    ]
    if report.get("max_microbatch"):
        lines += ["", "Largest micro batch that fits (each trial a fresh process; out of memory = does not fit):", "",
                  "| mode | largest micro batch | trials (size: fits) |", "|---|---|---|"]
        for mode, found in report["max_microbatch"].items():
            capped = f" (the --max-mb-cap {found['cap']})" if found["capped"] else ""
            trials = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in found["trials"].items())
            lines.append(f"| {mode} | {found['micro_batch']}{capped} | {trials} |")
    for mode in modes:
        profile = report["profile"].get(mode)
        if profile:
            lines += ["", f"Profile of one step, {mode} (top ops by self {'CPU' if cpu else 'device'} time):", "",
                      "| op | calls | self ms | share |", "|---|---|---|---|"]
            lines += [f"| `{p['op']}` | {p['calls']} | {p['self_ms']:.2f} | {p['share']:.1%} |" for p in profile]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    """Bar chart: tokens/s per device and peak memory per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m, s in report["modes"].items() if not s["oom"]]
    cpu = report["hardware"]["gpu_name"] is None
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.bar(modes, [report["modes"][m]["tokens_per_s_per_device"] for m in modes], color="tab:blue")
    left.set_ylabel("tokens/s per device")
    right.bar(modes, [peak_memory_of(report["modes"][m]) / GIB for m in modes], color="tab:orange")
    right.set_ylabel("peak RSS of the worker (GiB)" if cpu else "peak memory allocated (GiB)")
    where = "CPU, trends only" if cpu else report["hardware"]["gpu_name"]
    fig.suptitle(f"{report['args']['preset']}, seq {report['args']['seq_len']}, {where}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------------------------------

def resolve_defaults(args) -> None:
    """Fill in the defaults that depend on the machine or the data, before any worker starts."""
    from relora_ds.model.llama import PAPER_VOCAB_SIZE

    args.ds_config = os.path.abspath(args.ds_config or default_ds_config())
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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args)
    resolve_defaults(args)
    from relora_ds.model.llama import flops_per_token

    relora_modes = [m for m in args.modes if MODES[m] is not None]
    flops = flops_per_token(args.preset, args.vocab_size, args.seq_len,
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
    peak_flops, peak_source = peak_flops_per_device(args, hw["gpu_name"])
    if peak_flops is not None and args.peak_tflops is None and first["precision"] == "fp32":
        peak_flops, peak_source = None, "fp32 run: the table holds bf16/fp16 peaks (pass --peak-tflops)"
    summaries = {mode: summarize(mode_runs, flops, peak_flops) for mode, mode_runs in runs.items()}
    now = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "date": now.isoformat(timespec="seconds"), "command": [sys.executable] + sys.argv,
        "args": vars(args), "hardware": hw, "versions": versions(), "world_size": first["world_size"],
        "ds_config": first["ds_config"], "zero_stage": first["zero_stage"], "precision": first["precision"],
        "flops_per_token": flops, "peak_flops_per_device": peak_flops, "peak_flops_source": peak_source,
        "note": "CPU run: numbers are for trends only" if hw["gpu_name"] is None else None,
        "modes": summaries, "ratios": ratios(summaries, flops), "max_microbatch": max_microbatch,
        "profile": {mode: mode_runs[0].get("profile") for mode, mode_runs in runs.items()},
        "runs": runs,
    }
    table = markdown(report)
    print("\n" + table)
    os.makedirs(args.results_dir, exist_ok=True)
    stem = f"{now.date().isoformat()}-{device_label(hw)}-{args.preset}" + (f"-{args.tag}" if args.tag else "")
    path = os.path.join(args.results_dir, stem)
    with open(path + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(path + ".md", "w") as f:
        f.write(table)
    plot(report, path + ".png")
    print(f"wrote {path}.json, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
