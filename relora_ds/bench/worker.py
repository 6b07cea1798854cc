"""One benchmark worker: one mode (full-rank or ReLoRA) in one fresh process, printing one JSON line.

`python -m relora_ds.bench.throughput --worker MODE ...` lands here (relora_ds.bench.throughput starts the
workers). The worker builds the model and the DeepSpeed engine, runs the warm-up and the timed optimizer
steps, reads the peak memory and the optimizer's state, optionally profiles one step and times its phases,
and (ReLoRA) times one restart.
"""

import json
import math
import resource
import statistics
import time

import torch

from relora_ds.hardware import host

from relora_ds.methods import METHODS

# The modes: every training method of the registry (relora_ds/methods/; the adapter methods on the torch path), and
# ReLoRA on the Triton kernels.
TRITON_MODE = "relora-triton"
MODES = (*METHODS, TRITON_MODE)

OOM_EXIT_CODE = 3
PHASES = ("forward", "backward", "optimizer step")


def mode_method(mode: str, args):
    """(the mode's training method, its adapters' `kernels` or None when it places none), from a run config holding
    the benchmark's settings: adapters (if any) from step 0, with --rank, --alpha, --lora-dropout."""
    from relora_ds.config import RunConfig

    cfg = RunConfig()
    cfg.method, kernels = ("relora", "triton") if mode == TRITON_MODE else (mode, "torch")
    r = cfg.relora
    r.rank, r.alpha, r.dropout, r.kernels, r.warm_start_steps = args.rank, args.alpha, args.lora_dropout, kernels, 0
    cfg.train.seed = args.seed
    method = METHODS[cfg.method](cfg.resolved())
    return method, kernels if method.switch_step is not None else None


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
    """One optimizer step over the micro batches, through the trainer's own step function (what `relora-ds train`
    runs: forward, backward and engine.step() per micro batch, the collective non-finite check); its mean loss."""
    from relora_ds.engine.train_module import train_step as trainer_step

    micro_batches = iter({"input_ids": ids, "labels": ids} for ids in batches)
    loss, _, _ = trainer_step(engine, micro_batches, len(batches), step=engine.global_steps + 1, grad_norm=False)
    return loss


def phase_seconds(engine, batches: list[torch.Tensor]) -> dict:
    """Seconds of one optimizer step by phase (forward, backward, optimizer step; summed over micro batches),
    the device synchronized at each boundary, so the phases add up to a step without any overlap."""
    seconds = dict.fromkeys(PHASES, 0.0)
    for ids in batches:
        for phase in PHASES:
            synchronize()
            started = time.perf_counter()
            if phase == "forward":
                loss = engine(input_ids=ids, labels=ids).loss
            elif phase == "backward":
                engine.backward(loss)
            else:
                engine.step()
            synchronize()
            seconds[phase] += time.perf_counter() - started
    return seconds


def phase_breakdown(engine, batches: list[torch.Tensor], steps: int = 3) -> dict:
    """Median seconds per phase over `steps` extra optimizer steps (after the timed ones)."""
    runs = [phase_seconds(engine, batches) for _ in range(steps)]
    return {phase: statistics.median(run[phase] for run in runs) for phase in PHASES}


def peak_memory() -> dict:
    if torch.cuda.is_available():
        return {"memory_kind": "cuda", "peak_memory_allocated_bytes": torch.cuda.max_memory_allocated(),
                "peak_memory_reserved_bytes": torch.cuda.max_memory_reserved(), "peak_rss_bytes": None}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    return {"memory_kind": "cpu_rss", "peak_memory_allocated_bytes": None, "peak_memory_reserved_bytes": None,
            "peak_rss_bytes": rss}


def hardware() -> dict:
    """The machine the worker ran on."""
    info = {**host(), "torch_threads": torch.get_num_threads(), "gpu_name": None, "gpu_count": 0}
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
    from relora_ds.engine.train_module import TrainEngine, optimizer_bytes
    from relora_ds.model.build import build_model, enable_activation_checkpointing
    from relora_ds.model.counts import parameter_counts
    from relora_ds.model.families import preset_shape

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

    max_positions = max(args.seq_len, preset_shape("llama", args.preset)["max_position_embeddings"])
    model = build_model(args.preset, args.vocab_size, max_position_embeddings=max_positions,
                        attn_implementation=args.attn, seed=args.seed)
    enable_activation_checkpointing(model, args.activation_checkpointing)  # as train.activation_checkpointing
    method, kernels = mode_method(mode, args)
    if kernels == "triton":
        from relora_ds.kernels import triton_available

        if not triton_available():
            raise SystemExit(f"{TRITON_MODE}: the Triton kernels are not available on this machine")
    try:
        method.check_ds_config(ds_config)
    except ValueError as e:
        raise SystemExit(f"{mode}: {e}") from None
    if kernels is not None:
        method.wrap(model)  # adapters from step 0
    train_engine = TrainEngine(method, ds_config)  # the method's parameters and optimizer, as `relora-ds train` has
    train_engine.build(model)
    engine = train_engine.ds
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
    result = {"mode": mode, "kernels": kernels, "micro_batch": args.micro_batch, "grad_accum": grad_accum,
              "world_size": world_size, "seq_len": args.seq_len,
              "tokens_per_step_per_device": args.micro_batch * grad_accum * args.seq_len,
              "warmup_steps": args.warmup, "step_seconds": step_seconds,
              "first_loss": losses[0], "last_loss": losses[-1],
              **peak_memory(), **optimizer_bytes(engine), **parameter_counts(engine.module),
              "zero_stage": dsc.zero_stage(ds_config), "precision": dsc.precision(ds_config),
              "ds_config": ds_config, "hardware": hardware(), "profile": None, "phases": None, "restart": None}
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit(f"{mode}: non-finite loss during the benchmark: {losses}")
    if args.profile:
        result["profile"] = profile_step(engine, batches)
        result["phases"] = phase_breakdown(engine, batches)
    if hasattr(method, "restart") and not args.no_restart:  # a method with restarts: one full one (merge, prune)
        from relora_ds.engine.restart import relora_restart

        synchronize()
        started = time.perf_counter()
        record = relora_restart(engine, restart_index=1, step=engine.global_steps, seed=args.seed,
                                layout=train_engine.layout)
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
