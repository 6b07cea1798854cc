"""DeepSpeed start-up, engine creation and release (for the warm-start switch), LR setting, gradient norms."""

import os

import torch


def prepare_deepspeed() -> None:
    """Settings that must precede `import deepspeed`'s first use on CPU machines.

    DeepSpeed compiles a shared-memory comm op (30-70 s) at start-up on a fresh CPU machine; training
    does not need it (docs/deepspeed.md, "CPU ranks and gloo"), so it is switched off without CUDA.
    An untested DeepSpeed version is refused first (engine/versions.py).
    """
    from relora_ds.engine.versions import check_deepspeed_version

    check_deepspeed_version()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> None:
    """Join the process group the launcher (deepspeed, torchrun, SLURM) describes; single process otherwise.

    A single process with no MASTER_PORT set takes a free port, so two such runs on one machine do not both
    need 29500 (the rendezvous port of a world of 1 is used by nobody else).
    """
    prepare_deepspeed()
    import deepspeed
    import torch.distributed as dist

    from relora_ds.dist import free_port

    if dist.is_initialized():
        return
    if "MASTER_PORT" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1":
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK on a CUDA machine, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def make_engine(model: torch.nn.Module, ds_config: dict, *, params=None, optimizer=None):
    """deepspeed.initialize over `params` (default: the model's trainable parameters; or parameter groups) with
    `optimizer` (default: the one the DeepSpeed JSON names; a torch optimizer over the same parameters replaces it,
    and the JSON's "optimizer" section is then left out); returns the engine.

    A single process on ZeRO-0 skips DeepSpeed's gradient all-reduce: with one rank it is an exact no-op
    (a sum over one rank, divided by 1), yet DeepSpeed still flattens every gradient into buckets and copies
    them back, which cost a quarter of a full-rank 130m step on CPU (benchmarks/README.md). ZeRO-1/2/3 reduce
    inside their own optimizers and are left alone.
    """
    import deepspeed
    import torch.distributed as dist

    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is not None:
        ds_config = {k: v for k, v in ds_config.items() if k != "optimizer"}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                           config=ds_config)
    if dist.get_world_size() == 1 and engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False
    return engine


def set_lr(engine, lr: float) -> None:
    """Set the LR of every param group (the run owns the schedule; see schedule.py)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


# Attributes DeepSpeed 0.19 sets on module parameters that point back into an engine's optimizer (fp32 masters,
# moments, the optimizer itself): removed when a module outlives its engine, or they keep all of it alive.
OPTIMIZER_LINKS = ("_hp_mapping", "_z3_optimizer", "_dp_group")
# Hook handles a DeepSpeedEngine keeps for the hooks it puts on its module (they hold the engine).
ENGINE_MODULE_HOOKS = ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check")


def release_module(engine) -> torch.nn.Module:
    """The engine's module, cut loose from the engine so that the engine, its optimizer, fp32 masters and
    moments are freed; for handing the module to a new engine (the warm-start switch). Local, no communication.

    Nothing of the module is copied: on ZeRO-3 its parameters stay partitioned, elsewhere whole. The module holds
    the weights the optimizer wrote last (on bf16 runs the bf16 rounding of the fp32 masters). engine.destroy()
    removes the ZeRO-3 module hooks; the engine's own module hooks and the parameters' links back to the optimizer
    are removed here (a test checks that the optimizer is then garbage).
    """
    module = engine.module
    engine.destroy()
    for attr in ENGINE_MODULE_HOOKS:  # the engine's own hooks on the module (destroy leaves them)
        handle = getattr(engine, attr, None)
        if handle is not None:
            handle.remove()
    for param in module.parameters():
        param.grad = None
        for attr in OPTIMIZER_LINKS:
            if hasattr(param, attr):
                delattr(param, attr)
    return module


def global_grad_norm(engine) -> float | None:
    """The global gradient norm DeepSpeed computed in the last step (ZeRO-1/2/3, bf16), identical on every rank;
    None where it keeps none (ZeRO-0 fp32: see step_with_grad_norm)."""
    norm = engine.get_global_grad_norm() if hasattr(engine.optimizer, "_global_grad_norm") else None
    return None if norm is None else float(norm)


def step_with_grad_norm(engine) -> float | None:
    """engine.step() at a gradient-accumulation boundary, returning the global L2 norm of the step's gradients
    (all ranks and shards, after the loss-scale is undone, before clipping); None where none is computed.

    Call it instead of engine.step() on the last micro-batch of the steps that log (the norm costs a sync).
    Where the norm comes from, DeepSpeed 0.19.8:
    - ZeRO-1/2/3, BF16_Optimizer, the fp16/bf16 wrappers (ZeRO-0 bf16 is FP16_UnfusedOptimizer): the optimizer's
      own `_global_grad_norm`, which it computes in step() over its (partitioned, all-reduced) gradients, clipping
      on or off; read with engine.get_global_grad_norm() after the step. ZeRO-1/2 with
      zero_optimization.compute_grad_norm=false (allowed only without clipping) compute none: None.
      FP16_UnfusedOptimizer stores the loss-scaled norm; it is divided by the scale it stepped with (1 for bf16).
    - ZeRO-0 fp32 (a plain torch optimizer): DeepSpeed keeps no norm (its fp32 clipping discards it), so it is
      computed here from the module's gradients, which hold the rank-averaged gradient after the boundary
      backward and are released by engine.step(): read before the step.
    """
    optimizer = engine.optimizer
    own = None
    if not hasattr(optimizer, "_global_grad_norm"):  # plain torch optimizer: ZeRO-0 fp32
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        own = _l2_norm(grads) if grads else 0.0
        scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
        if scaler is not None:
            own /= float(scaler.get_scale())
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    scale = float(optimizer.loss_scale) if isinstance(optimizer, FP16_UnfusedOptimizer) else 1.0
    engine.step()
    if own is not None:
        return own
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm) / scale


@torch.no_grad()
def _l2_norm(tensors: list[torch.Tensor]) -> float:
    """sqrt(sum of squares) over `tensors`, accumulated in fp64 like DeepSpeed's ZeRO norms (an fp32 norm of a
    large gradient on CPU is off by up to ~1e-4 relative: 2.8e-5 on the tiny preset with an 8000-token vocabulary)."""
    norms = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors])
    return torch.linalg.vector_norm(norms).item()
