"""Where a parameter's pieces live under each DeepSpeed optimizer, and how to read and write them.

The restart hook (`restart.py`) is written once against this module. Four layouts exist:

- "plain":   ZeRO-0 fp32. The torch optimizer steps the module parameters: the parameter *is* its
             fp32 master, its state is `optimizer.state[param]`; every rank holds everything.
- "unfused": ZeRO-0 bf16 (DeepSpeed 0.19 wraps it in FP16_UnfusedOptimizer): one fp32 master per
             parameter in `optimizer.fp32_groups`, state keyed by that master; replicated on every rank.
- "hp":      ZeRO-1/2 and BF16_Optimizer: each rank owns a contiguous fragment of a parameter's flat
             fp32 master and moments, reachable through `param._hp_mapping` (None when it owns none).
             The low-precision module parameter is whole on every rank; frozen weights are whole too.
- "zero3":   ZeRO-3: module parameters are partitioned too (`param.ds_tensor` holds flat elements
             [k*n, (k+1)*n) of rank k, n = ds_tensor.ds_numel, zero padding at the end of the last rank);
             the fp32 master and moments of a trainable parameter are the same slice, reached through
             DeepSpeed's local getters/setters.

DeepSpeed's full-tensor setters are avoided on purpose: on ZeRO-3 they fail on the last rank when a
tensor's size is not divisible by the world size (0.19.8). Every write here goes to the rank's own slice.
"""

from dataclasses import dataclass

import torch

from relora_ds.engine.ds_config import DSConfigError

LAYOUTS = ("plain", "unfused", "hp", "zero3")


@dataclass
class Fragment:
    """The flat slice of one parameter's fp32 master (key None) or optimizer moment that this rank holds.

    `tensor` covers flat elements [start, start + tensor.numel()) of the full tensor (None when the rank
    holds none of it); `numel` is the full tensor's size; `replicated` means every rank holds all of it.
    `storage` is what must be handed back to DeepSpeed after an in-place edit (ZeRO-3 only).
    """

    tensor: torch.Tensor | None
    start: int
    numel: int
    replicated: bool
    storage: torch.Tensor | None = None


def stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def layout(engine) -> str:
    """Which of LAYOUTS the engine's optimizer uses; a clear error for the ones the restart cannot edit."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    optimizer = engine.optimizer
    if optimizer is None:
        raise ValueError("the DeepSpeed engine has no optimizer (set an \"optimizer\" section in the ds_config)")
    if stage(engine) == 3:
        return "zero3"
    if isinstance(optimizer, FP16_UnfusedOptimizer):
        return "unfused"
    if isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, "optimizer"):
        return "plain"
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(hasattr(p, "_hp_mapping") for p in params) or hasattr(optimizer, "bit16_groups") \
            or hasattr(optimizer, "bf16_groups"):
        return "hp"
    raise ValueError(f"relora restart does not support DeepSpeed optimizer {type(optimizer).__name__} "
                     "(supported: ZeRO 0-3 with fp32 or bf16; fp16 is not supported)")


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that holds the Adam state (DeepSpeed's wrappers keep it in `.optimizer`)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's real shape (ZeRO-3 keeps it in `ds_shape`; `shape` is (0,) while partitioned)."""
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape


def zero3_slice(param: torch.Tensor) -> tuple[int, int]:
    """[start, end) of the flat elements of a ZeRO-3 parameter that this rank's partition holds (no padding)."""
    import torch.distributed as dist

    n = param.ds_tensor.ds_numel
    start = n * dist.get_rank(group=param.ds_process_group)
    end = min(start + n, param.ds_numel)
    return start, max(start, end)


def check_zero3_weight(param: torch.Tensor, name: str) -> None:
    """Refuse ZeRO-3 features under which a direct write into `ds_tensor` would not be the whole story."""
    if getattr(param, "ds_secondary_tensor", None) is not None:
        raise ValueError(f"relora restart: {name} has a ZeRO++ secondary partition "
                         "(zero_hpz_partition_size > 1), which the restart does not support")
    if hasattr(param.ds_tensor, "ds_quant_scale"):
        raise ValueError(f"relora restart: {name} is quantized (zero_quantized_nontrainable_weights), "
                         "which the restart does not support")
    if str(getattr(param.ds_tensor, "final_location", None)).endswith("nvme"):
        raise ValueError(f"relora restart: {name} is offloaded to NVMe, which the restart does not support")


def _unfused_master(engine, param: torch.Tensor) -> torch.Tensor:
    for lp_group, fp32_group in zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups):
        for lp, fp32 in zip(lp_group, fp32_group):
            if lp is param:
                return fp32
    raise ValueError(f"parameter of shape {tuple(param.shape)} is not in the DeepSpeed optimizer")


def _plain_or_unfused(engine, kind: str, param: torch.Tensor, key: str | None) -> torch.Tensor | None:
    master = param if kind == "plain" else _unfused_master(engine, param)
    if key is None:
        return master.data
    state = inner_optimizer(engine).state.get(master, {})
    return state.get(key)


def fragment(engine, param: torch.Tensor, key: str | None = None, kind: str | None = None) -> Fragment:
    """This rank's fragment of `param`'s fp32 master (key None) or optimizer state `key`.

    Local, no communication. `tensor` is None when the rank holds none of it; a missing optimizer state
    (before the first step) raises KeyError, so callers check `has_state` first.
    """
    kind = kind or layout(engine)
    numel = full_shape(param).numel()
    if kind in ("plain", "unfused"):
        tensor = _plain_or_unfused(engine, kind, param, key)
        if tensor is None:
            raise KeyError(key)
        return Fragment(tensor.view(-1), 0, numel, replicated=True)
    if kind == "hp":
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            return Fragment(None, 0, numel, replicated=False)
        if key is not None and (mapping.optim_fragment is None or key not in mapping.optim_fragment):
            raise KeyError(key)
        return Fragment(mapping.get_hp_fragment(key), mapping.lp_fragment_address.start, numel, replicated=False)
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    # A view of the local partition on CPU (a copy with offload on GPU machines: see `commit`). Before the
    # first step the optimizer has no state for the partition and the getter raises KeyError.
    storage = safe_get_local_fp32_param(param) if key is None else safe_get_local_optimizer_state(param, key)
    start, end = zero3_slice(param)
    return Fragment(storage.view(-1)[: end - start], start, numel, replicated=False, storage=storage)


def commit(param: torch.Tensor, frag: Fragment, key: str | None = None) -> None:
    """Hand an edited ZeRO-3 fragment back to DeepSpeed (a no-op where the fragment is a view, or elsewhere)."""
    if frag.storage is None or frag.tensor is None:
        return
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    if key is None:
        safe_set_local_fp32_param(param, frag.storage)
    else:
        safe_set_local_optimizer_state(param, frag.storage, key)


def has_state(engine, params, keys, kind: str | None = None) -> bool:
    """Whether every fragment of `params` this rank holds has optimizer state `keys` (local check)."""
    kind = kind or layout(engine)
    for param in params:
        for key in keys:
            try:
                fragment(engine, param, key, kind)
            except KeyError:
                return False
    return True


@torch.no_grad()
def gather_full(fragments: list[Fragment], group=None) -> list[torch.Tensor]:
    """The full flat fp32 tensors the fragments belong to, on every rank (one all_reduce if sharded).

    Collective when the fragments are sharded: every rank must call it with the same tensors in the
    same order. Fragments are disjoint, so summing zero-padded buffers assembles each tensor exactly.
    """
    if all(f.replicated for f in fragments):
        return [f.tensor.detach().float().clone() for f in fragments]
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().current_device_name())  # where the collective runs
    buffer = torch.zeros(sum(f.numel for f in fragments), dtype=torch.float32, device=device)
    views, offset = [], 0
    for f in fragments:
        view = buffer.narrow(0, offset, f.numel)
        if f.tensor is not None and f.tensor.numel() > 0:
            view.narrow(0, f.start, f.tensor.numel()).copy_(f.tensor.detach())
        views.append(view)
        offset += f.numel
    dist.all_reduce(buffer, group=group)
    return views


@torch.no_grad()
def full_tensor(engine, param: torch.Tensor, key: str | None = None) -> torch.Tensor:
    """The full fp32 master (key None) or optimizer state of `param`, shaped like it, on every rank.

    Collective on ZeRO-1/2/3. Used by tests and benchmarks to compare with DeepSpeed's safe_get_full_*.
    """
    return gather_full([fragment(engine, param, key)])[0].view(full_shape(param))


@torch.no_grad()
def write_module_param(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write the full fp32 `value` into the module's (low-precision) parameter; local, no communication.

    Stages 0-2: the whole tensor. ZeRO-3: only this rank's slice of `ds_tensor`; a copy kept gathered
    after a forward (small parameters below stage3_param_persistence_threshold) is released with
    `partition()` so the next forward gathers the new values instead of reusing the stale ones.
    """
    if not hasattr(param, "ds_tensor"):
        param.data.copy_(value.view(param.shape))
        return
    start, end = zero3_slice(param)
    local = param.ds_tensor.data.view(-1)[: end - start]
    local.copy_(value.reshape(-1)[start:end])
    release_gathered(param)


def release_gathered(param: torch.Tensor) -> None:
    """After writing a ZeRO-3 parameter's `ds_tensor`, drop a gathered copy so it is not used stale."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if param.ds_status == ZeroParamStatus.AVAILABLE:
        param.partition()


# --- fail fast: everything the restart needs, checked when the engine is made -------------------------------

class LayoutError(DSConfigError):
    """The engine's setup is one the restart cannot edit; one line naming the setting (the CLI prints it as such)."""


def check_engine_settings(engine) -> None:
    """Refuse, with the setting's name, what the restart does not support: fp16, ZeRO++ hpZ, quantized weights,
    NVMe offload. Local; identical on every rank (the config is)."""
    if engine.fp16_enabled():
        raise LayoutError("fp16.enabled: the ReLoRA restart supports fp32 and bf16 only (fp16's loss scaling and "
                          "master layout are not handled); use \"bf16\": {\"enabled\": true}")
    if stage(engine) != 3:
        return
    if engine.zero_hpz_partition_size() > 1:
        raise LayoutError(f"zero_optimization.zero_hpz_partition_size {engine.zero_hpz_partition_size()}: ZeRO++ "
                          f"secondary partitions are not supported by the ReLoRA restart; set it to 1")
    if engine.zero_quantized_weights() or engine.zero_quantized_nontrainable_weights():
        raise LayoutError("zero_optimization.zero_quantized_weights / zero_quantized_nontrainable_weights: quantized "
                          "weights are not supported by the ReLoRA restart; set them to false")
    for what, offload in (("offload_param", engine.zero_offload_param()),
                          ("offload_optimizer", engine.zero_offload_optimizer())):
        if offload is not None and str(getattr(offload, "device", "")).endswith("nvme"):
            raise LayoutError(f"zero_optimization.{what}.device nvme: NVMe offload is not supported by the ReLoRA "
                              f"restart; use \"cpu\" or no offload")


def coverage_errors(intervals, numel: int, replicated: bool) -> str | None:
    """Why the ranks' fragments [(start, length) per rank] do not cover [0, numel) exactly once; None if they do.

    Replicated layouts: every rank must hold the whole tensor. Sharded: the non-empty fragments, sorted, must tile
    [0, numel) without a gap or an overlap.
    """
    if replicated:
        bad = [r for r, (start, length) in enumerate(intervals) if (start, length) != (0, numel)]
        return f"ranks {bad} do not hold the whole tensor" if bad else None
    covered = 0
    for start, length in sorted((s, n) for s, n in intervals if n > 0):
        if start != covered:
            return (f"elements [{covered}, {start}) are held by no rank" if start > covered
                    else f"elements from {start} are held by two ranks")
        covered = start + length
    return None if covered == numel else f"elements [{covered}, {numel}) are held by no rank"


def check_coverage(engine, named_params: dict, keys=(None,), kind: str | None = None) -> None:
    """All-gather every rank's fragment interval of each parameter's fp32 master (key None) and of optimizer
    state `keys`, and raise LayoutError on every rank alike unless each element is held exactly once
    (a layout DeepSpeed changed under us would otherwise make the restart merge and prune nothing)."""
    import torch.distributed as dist

    kind = kind or layout(engine)
    rows, labels = [], []
    for name, param in named_params.items():
        for key in keys:
            frag = fragment(engine, param, key, kind)
            length = frag.tensor.numel() if frag.tensor is not None else 0
            rows.append((frag.start, length, frag.numel))
            labels.append((name, key or "fp32 master", frag.numel, frag.replicated))
    local = torch.tensor(rows, dtype=torch.int64).view(-1, 3)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from deepspeed.accelerator import get_accelerator

        device = get_accelerator().current_device_name()
        gathered = [torch.zeros_like(local, device=device) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local.to(device))
        everyone = torch.stack([g.cpu() for g in gathered])
    else:
        everyone = local.unsqueeze(0)
    for i, (name, key, numel, replicated) in enumerate(labels):
        intervals = [(int(s), int(n)) for s, n, _ in everyone[:, i].tolist()]
        problem = coverage_errors(intervals, numel, replicated)
        if problem:
            raise LayoutError(f"the ReLoRA restart cannot read {name} ({key}) on this DeepSpeed {kind!r} layout: "
                              f"{problem}; this DeepSpeed version or setting is not supported (docs/deepspeed.md)")


def check_restart_support(engine, named_adapters: dict) -> bool:
    """Fail fast, when an engine over wrapped layers is made: the settings (check_engine_settings), the optimizer
    layout (`layout`), and the coverage of every adapter's fp32 master and, where they exist yet, its moments.
    Returns whether the moments were checked (they appear at the first optimizer step on ZeRO-0: check again
    then with `check_coverage(..., keys=MOMENT_KEYS)`). Collective."""
    from relora_ds.relora.reset import MOMENT_KEYS

    check_engine_settings(engine)
    try:
        kind = layout(engine)
    except ValueError as e:
        raise LayoutError(str(e)) from None
    moments = has_state(engine, list(named_adapters.values()), MOMENT_KEYS, kind)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:  # the same answer everywhere
        from deepspeed.accelerator import get_accelerator

        flag = torch.tensor([0.0 if moments else 1.0], device=get_accelerator().current_device_name())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        moments = flag.item() == 0.0
    check_coverage(engine, named_adapters, (None,) + (MOMENT_KEYS if moments else ()), kind)
    return moments
