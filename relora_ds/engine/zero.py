"""Where a parameter's pieces live under each DeepSpeed optimizer, and how to read and write them.

The restart hook (`restart.py`) is written once against the `Layout` interface. `layout_for(engine)` picks one of
four layouts, once, when the engine is made, and runs the restart's fail-fast checks there:

- PlainLayout:   ZeRO-0 fp32. The torch optimizer steps the module parameters: the parameter *is* its fp32
                 master, its state is `optimizer.state[param]`; every rank holds everything.
- UnfusedLayout: ZeRO-0 bf16 (DeepSpeed 0.19 wraps it in FP16_UnfusedOptimizer): one fp32 master per parameter
                 in `optimizer.fp32_groups`, state keyed by that master; replicated on every rank.
- HpLayout:      ZeRO-1/2 and BF16_Optimizer: each rank owns a contiguous fragment of a parameter's flat fp32
                 master and moments, reachable through `param._hp_mapping` (None when it owns none). The
                 low-precision module parameter is whole on every rank; frozen weights are whole too.
- Zero3Layout:   ZeRO-3: module parameters are partitioned too (`param.ds_tensor` holds flat elements
                 [k*n, (k+1)*n) of rank k, n = ds_tensor.ds_numel, zero padding at the end of the last rank);
                 the fp32 master and moments of a trainable parameter are the same slice, reached through
                 DeepSpeed's local getters/setters.

DeepSpeed's full-tensor setters are avoided on purpose: on ZeRO-3 they fail on the last rank when a
tensor's size is not divisible by the world size (0.19.8). Every write here goes to the rank's own slice.
"""

from dataclasses import dataclass

import torch

from relora_ds.dist import all_reduce
from relora_ds.engine.ds_config import DSConfigError
from relora_ds.relora.reset import MOMENT_KEYS


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


class LayoutError(DSConfigError):
    """The engine's setup is one the restart cannot edit; one line naming the setting (the CLI prints it as such)."""


def stage(engine) -> int:
    return int(engine.zero_optimization_stage())


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
    # DeepSpeed marks a partition it keeps in memory 'not-nvme' (stage3.py, offload_param cpu) and a swapped one
    # OffloadDeviceEnum.nvme (a str enum): only the latter is refused.
    if getattr(param.ds_tensor, "final_location", None) == "nvme":
        raise ValueError(f"relora restart: {name} is offloaded to NVMe, which the restart does not support")


# --- the four layouts ----------------------------------------------------------------------------------------

class Layout:
    """How one engine's optimizer holds the fp32 masters and moments of its parameters; made by `layout_for`.

    `fragment`, `commit` and `has_state` are local (no communication); `check_coverage` is collective.
    `replicated_weight`: the module's weights are whole on every rank; `replicated_state`: so are the fp32
    masters and moments. `moments_checked`: whether `layout_for` checked the moments' coverage too.
    """

    name = ""
    replicated_weight = True
    replicated_state = True

    def __init__(self, engine):
        self.engine = engine
        self.moments_checked = False

    def fragment(self, param: torch.Tensor, key: str | None = None) -> Fragment:
        """This rank's fragment of `param`'s fp32 master (key None) or optimizer state `key`.

        `tensor` is None when the rank holds none of it; a missing optimizer state (before the first step)
        raises KeyError, so callers check `has_state` first.
        """
        raise NotImplementedError

    def commit(self, param: torch.Tensor, frag: Fragment, key: str | None = None) -> None:
        """Hand an edited fragment back to DeepSpeed: nothing to do here, the fragment is a view of its state."""

    def has_state(self, params, keys) -> bool:
        """Whether every fragment of `params` this rank holds has optimizer state `keys`."""
        for param in params:
            for key in keys:
                try:
                    self.fragment(param, key)
                except KeyError:
                    return False
        return True

    def check_moments(self, named_params: dict) -> None:
        """The moments' coverage check that `layout_for` could not run yet (ZeRO-0 makes the moments at the first
        optimizer step): `check_coverage` of MOMENT_KEYS, then `moments_checked`. Collective."""
        self.check_coverage(named_params, MOMENT_KEYS)
        self.moments_checked = True

    def check_coverage(self, named_params: dict, keys=(None,)) -> None:
        """All-gather every rank's fragment interval of each parameter's fp32 master (key None) and of optimizer
        state `keys`, and raise LayoutError on every rank alike unless each element is held exactly once
        (a layout DeepSpeed changed under us would otherwise make the restart merge and prune nothing)."""
        import torch.distributed as dist

        rows, labels = [], []
        for name, param in named_params.items():
            for key in keys:
                frag = self.fragment(param, key)
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
                raise LayoutError(f"the ReLoRA restart cannot read {name} ({key}) on this DeepSpeed {self.name!r} "
                                  f"layout: {problem}; this DeepSpeed version or setting is not supported "
                                  f"(docs/deepspeed.md)")


def _whole_fragment(engine, master: torch.Tensor, param: torch.Tensor, key: str | None) -> Fragment:
    """The whole fp32 `master` of `param` (key None) or its optimizer state `key` (keyed by the master)."""
    tensor = master.data if key is None else inner_optimizer(engine).state.get(master, {}).get(key)
    if tensor is None:
        raise KeyError(key)
    return Fragment(tensor.view(-1), 0, full_shape(param).numel(), replicated=True)


class PlainLayout(Layout):
    """ZeRO-0 fp32: the parameter is its own fp32 master; its state is `optimizer.state[param]`; all replicated."""

    name = "plain"

    def fragment(self, param: torch.Tensor, key: str | None = None) -> Fragment:
        return _whole_fragment(self.engine, param, param, key)


class UnfusedLayout(Layout):
    """ZeRO-0 bf16 (FP16_UnfusedOptimizer): one fp32 master per parameter in `fp32_groups`, paired with
    `fp16_groups`; the state is keyed by the master; all replicated."""

    name = "unfused"

    def fragment(self, param: torch.Tensor, key: str | None = None) -> Fragment:
        return _whole_fragment(self.engine, self._master(param), param, key)

    def _master(self, param: torch.Tensor) -> torch.Tensor:
        optimizer = self.engine.optimizer
        for lp_group, fp32_group in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            for lp, fp32 in zip(lp_group, fp32_group):
                if lp is param:
                    return fp32
        raise ValueError(f"parameter of shape {tuple(param.shape)} is not in the DeepSpeed optimizer")


class HpLayout(Layout):
    """ZeRO-1/2 and BF16_Optimizer: the rank's contiguous fragment of the flat fp32 master and moments, views
    reached through `param._hp_mapping` (None where the rank owns none); module weights whole on every rank."""

    name = "hp"
    replicated_state = False

    def fragment(self, param: torch.Tensor, key: str | None = None) -> Fragment:
        numel = full_shape(param).numel()
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            return Fragment(None, 0, numel, replicated=False)
        if key is not None and (mapping.optim_fragment is None or key not in mapping.optim_fragment):
            raise KeyError(key)
        return Fragment(mapping.get_hp_fragment(key), mapping.lp_fragment_address.start, numel, replicated=False)


class Zero3Layout(Layout):
    """ZeRO-3: module parameters are partitioned too (`param.ds_tensor`, see `zero3_slice`); the fp32 master
    and moments are the same slice, read and written through DeepSpeed's local getters and setters."""

    name = "zero3"
    replicated_weight = False
    replicated_state = False

    def fragment(self, param: torch.Tensor, key: str | None = None) -> Fragment:
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        # A view of the local partition on CPU (a copy with offload on GPU machines: see `commit`). Before the
        # first step the optimizer has no state for the partition and the getter raises KeyError.
        storage = safe_get_local_fp32_param(param) if key is None else safe_get_local_optimizer_state(param, key)
        start, end = zero3_slice(param)
        return Fragment(storage.view(-1)[: end - start], start, full_shape(param).numel(), replicated=False,
                        storage=storage)

    def commit(self, param: torch.Tensor, frag: Fragment, key: str | None = None) -> None:
        """Hand the edited partition back to DeepSpeed (it may be a copy, with offload)."""
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        if key is None:
            safe_set_local_fp32_param(param, frag.storage)
        else:
            safe_set_local_optimizer_state(param, frag.storage, key)


def link_loaded_moments(engine) -> None:
    """Make the moments a checkpoint load restored reachable through `param._hp_mapping` (ZeRO-1/2, BF16_Optimizer).

    DeepSpeed 0.19.8 links each parameter's view of its Adam moments lazily, inside `optimizer.step()`, and a
    checkpoint load re-makes the mappings without those views. An engine that resumes from a checkpoint taken on a
    restart step would then restart before its first step, find no moments and stop (every requeue alike). After
    an optimizer-state load the engine must look as it did when it was saved: the views are linked here, exactly as
    DeepSpeed's own step would link them. Other layouts keep their state keyed by the parameters: nothing to do.
    Local; a no-op when the optimizer holds no state for its flat partitions (nothing was loaded).
    """
    optimizer = engine.optimizer
    link = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
    flats = getattr(optimizer, "single_partition_of_fp32_groups", None) or \
        getattr(optimizer, "fp32_groups_flat_partition", None)
    if link is None or flats is None or stage(engine) == 3:
        return
    state = inner_optimizer(engine).state
    if not all(flat in state for flat in flats):
        return
    optimizer._hp_optimizer_states_linked = False  # re-link: the load made new mappings
    link()


# --- choosing the layout, and failing fast -------------------------------------------------------------------

def layout_for(engine, adapters: dict | None = None) -> Layout:
    """The engine's Layout, chosen once when the engine is made; every fail-fast check of the restart is here.

    Raises LayoutError (one line naming the setting) for what the restart cannot edit: the settings of
    `check_engine_settings`, then an optimizer no layout reads. With `adapters` ({name: parameter}), also
    checks, collectively, that the ranks' fragments of each adapter's fp32 master and, where they exist on every
    rank yet, its moments cover each tensor exactly once; `moments_checked` says whether the moments were (ZeRO-0
    makes them at the first step: check them then with `check_moments(adapters)`).
    """
    check_engine_settings(engine)
    layout = _layout_class(engine)(engine)
    if adapters:
        moments = _on_every_rank(layout.has_state(list(adapters.values()), MOMENT_KEYS))
        layout.check_coverage(adapters, (None,) + (MOMENT_KEYS if moments else ()))
        layout.moments_checked = moments
    return layout


def _layout_class(engine) -> type[Layout]:
    """Which layout the optimizer DeepSpeed built uses; LayoutError for one the restart cannot edit."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    optimizer = engine.optimizer
    if optimizer is None:
        raise LayoutError("optimizer: the DeepSpeed engine has no optimizer; set an \"optimizer\" section in the "
                          "ds_config")
    if stage(engine) == 3:
        return Zero3Layout
    if isinstance(optimizer, FP16_UnfusedOptimizer):
        return UnfusedLayout
    if isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, "optimizer"):
        return PlainLayout
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(hasattr(p, "_hp_mapping") for p in params) or hasattr(optimizer, "bit16_groups") \
            or hasattr(optimizer, "bf16_groups"):
        return HpLayout
    raise LayoutError(f"optimizer.type {engine.optimizer_name()}: the ReLoRA restart cannot edit DeepSpeed's "
                      f"{type(optimizer).__name__} (supported: ZeRO 0-3, fp32 or bf16, a torch optimizer such as "
                      f"AdamW)")


def _on_every_rank(flag: bool) -> bool:
    """Whether `flag` holds on every rank (one all_reduce when distributed), so that all ranks branch alike."""
    from deepspeed.accelerator import get_accelerator

    missing = torch.tensor([0.0 if flag else 1.0], dtype=torch.float64)
    return all_reduce(missing, "max", device=get_accelerator().current_device_name()).item() == 0.0


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
        if offload is not None and getattr(offload, "device", None) == "nvme":  # OffloadDeviceEnum is a str enum
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


# --- full tensors and module writes ---------------------------------------------------------------------------

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
    return gather_full([layout_for(engine).fragment(param, key)])[0].view(full_shape(param))


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
