"""DeepSpeed start-up, engine creation, LR setting and full-state gathering (for the warm-start switch)."""

import os

import torch


def prepare_deepspeed() -> None:
    """Settings that must precede `import deepspeed`'s first use on CPU machines.

    DeepSpeed compiles a shared-memory comm op (30-70 s) at start-up on a fresh CPU machine; training
    does not need it (reference/deepspeed-cpu.md), so it is switched off when there is no CUDA.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> None:
    """Join the process group the launcher (deepspeed, torchrun, SLURM) describes; single process otherwise."""
    prepare_deepspeed()
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def make_engine(model: torch.nn.Module, ds_config: dict):
    """deepspeed.initialize over the model's trainable parameters; returns the engine.

    A single process on ZeRO-0 skips DeepSpeed's gradient all-reduce: with one rank it is an exact no-op
    (a sum over one rank, divided by 1), yet DeepSpeed still flattens every gradient into buckets and copies
    them back, which cost a quarter of a full-rank 130m step on CPU (benchmarks/README.md). ZeRO-1/2/3 reduce
    inside their own optimizers and are left alone.
    """
    import deepspeed
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    if dist.get_world_size() == 1 and engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False
    return engine


def set_lr(engine, lr: float) -> None:
    """Set the LR of every param group (the run owns the schedule; see schedule.py)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def gather_full_state(engine) -> dict[str, torch.Tensor]:
    """Every parameter of the engine's module as a full fp32 CPU tensor, on every rank.

    Trainable parameters come from DeepSpeed's fp32 masters when there are any (bf16/ZeRO), so the
    full-rank weights are carried across the warm-start switch without a bf16 rounding; frozen ones and
    plain fp32 runs come from the (gathered, on ZeRO-3) module parameters. Collective: all ranks call it.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in engine.module.named_parameters():
        master = safe_get_full_fp32_param(param) if param.requires_grad else None
        if master is not None:
            state[name] = master.detach().float().cpu().clone()
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            state[name] = param.detach().float().cpu().clone()
    return state
