"""The ReLoRA restart on a DeepSpeed engine, ZeRO stages 0-3, fp32 and bf16.

For every wrapped layer, in model order (so every rank runs the same collectives in the same order):
  1. gather A and B from their fp32 masters (the rank's fragments, summed into full tensors);
  2. W += s*B*A, computed in fp32 and added once, rounded to W's storage (relora.merge_rounding: nearest, or
     stochastic with draws from rounding_generator(seed, restart_index, name), the same on every rank): the whole
     W on stages 0-2 (a stored int8/fp8 W is dequantized, merged and re-quantized, new scales included); on ZeRO-3
     only the elements of W's flat partition this rank holds ("shard", the default), or on the gathered W
     with modifier rank 0 ("gathered"); both give bitwise the same W;
  3. A <- Kaiming-uniform from restart_generator(seed, restart_index, name) (same on every rank),
     B <- 0, written into the module parameters *and* the fp32 masters (a module-only write is
     overwritten from the master at the next step, so B*A would be counted twice);
then, for the adapters only, prune exp_avg and exp_avg_sq in place on each rank's own fragment, with
the threshold of the whole tensor (`reset.magnitude_threshold` over the gathered values, so the result
is identical to the single-process reset). Adam's step counters are kept. Stage-specific access
lives in the engine's `zero.Layout`.
"""

import math
import time
from dataclasses import asdict, dataclass

import torch

from relora_ds import dist
from relora_ds.engine import zero
from relora_ds.relora import functional, quant
from relora_ds.relora.reset import (MOMENT_KEYS, PRUNE_METHODS, check_prune_ratio, magnitude_threshold, prune_,
                                   zero_unpaired_)
from relora_ds.relora.wrap import relora_modules

ZERO3_MERGES = ("shard", "gathered")  # relora.zero3_merge: into each rank's shard, or on the gathered weight



class RestartError(RuntimeError):
    """The restart cannot run on this engine now (e.g. before the first optimizer step)."""


@dataclass
class RestartRecord:
    """What one restart did, identical on every rank (timings are rank 0's)."""

    index: int
    step: int
    merged_norm: float       # Frobenius norm of all merged s*B*A together (0 without a merge)
    merge_error: float       # ||rounding error|| / ||s*B*A||: what W's storage did not take, relative (0: all taken)
    merge_kept: float        # <update W took, s*B*A> / ||s*B*A||^2: the share taken along the update (1: all)
    drift: float | None      # relora.track_drift: ||deq(W) - W_exact|| / ||W_exact|| over the wrapped layers, W_exact
                             # the same merges without rounding since the process started (None: not tracked)
    fraction_zeroed: float   # of all adapter moment entries (0 without an optimizer reset)
    seconds: float
    merge_seconds: float
    prune_seconds: float
    stage: int

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def merge_sums(delta: torch.Tensor, error: torch.Tensor) -> tuple[float, float, float]:
    """(||delta||^2, ||error||^2, <error, delta>) in float64, a chunk of rows at a time (no float64 copy of W)."""
    delta, error = delta.reshape(-1), error.reshape(-1)
    sums = torch.zeros(3, dtype=torch.float64)
    for start in range(0, delta.numel(), 1 << 20):
        d, e = delta[start:start + (1 << 20)].double(), error[start:start + (1 << 20)].double()
        sums += torch.stack([d.dot(d), e.dot(e), e.dot(d)]).cpu()
    return tuple(sums.tolist())


def squared_norm(tensor: torch.Tensor) -> float:
    """||tensor||^2 in float64, a chunk of elements at a time."""
    return sum(float(c.double().dot(c.double())) for c in tensor.reshape(-1).split(1 << 20))


def _check_arguments(restart_index, method, ratio, zero3_merge) -> None:
    if restart_index < 1:
        raise ValueError(f"restart_index must be >= 1 (0 is the wrap-time draw of A), got {restart_index}")
    if method not in PRUNE_METHODS:
        raise ValueError(f"relora.optimizer_reset must be one of {', '.join(PRUNE_METHODS)}, got {method!r}")
    check_prune_ratio(ratio)
    if zero3_merge not in ZERO3_MERGES:
        raise ValueError(f"relora.zero3_merge must be one of {', '.join(ZERO3_MERGES)}, got {zero3_merge!r}")


def _all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """dist.all_reduce of a small float64 vector on DeepSpeed's collective device."""
    from deepspeed.accelerator import get_accelerator

    return dist.all_reduce(values, op, device=get_accelerator().current_device_name())


def _check_ready(engine, layout: zero.Layout, modules: dict) -> None:
    """Raise on every rank alike when there is no optimizer state to edit (no hang, no silent no-op)."""
    if engine.global_steps == 0:
        raise RestartError("relora restart before the first optimizer step: the optimizer has no state yet "
                           "(restart only after at least one engine.step())")
    params = [p for m in modules.values() for p in (m.lora_A, m.lora_B)]
    missing = 0.0 if layout.has_state(params, MOMENT_KEYS) else 1.0
    if _all_reduce(torch.tensor([missing], dtype=torch.float64), op="max").item() > 0:
        raise RestartError("relora restart: the adapters' optimizer state (exp_avg, exp_avg_sq) is missing on "
                           "some rank; restart only after an optimizer step on this engine")


@torch.no_grad()
def merge_into_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, *, name: str = "weight",
                      zero3_merge: str = "shard", rounding: str = "nearest",
                      generator: torch.Generator | None = None) -> tuple[float, float, float]:
    """The merge of a ZeRO-3-partitioned W: W += scale * B @ A (fp32 math, one rounding to W's dtype: `rounding`,
    stochastic draws from `generator`, made for the whole W and sliced on "shard"); returns this rank's share of
    merge_sums(delta, rounding error). A W whole on every rank (stages 0-2) merges through
    ReLoRALinear.merge_delta_.

    "shard": each rank adds the delta elements of its own flat slice of W (computing only the
    rows the slice touches) and returns their sum, so the shares add up over ranks. ZeRO-3 "gathered":
    W is gathered, rank 0 adds the delta and DeepSpeed re-partitions it; rank 0 returns the sum.
    A and B are the full fp32 adapters, identical on every rank. Collective only for "gathered".
    """
    if not hasattr(W, "ds_tensor"):
        raise ValueError(f"merge_into_weight: {name} is not ZeRO-3-partitioned; a whole W merges through "
                         f"ReLoRALinear.merge_delta_")
    zero.check_zero3_weight(W, name)
    if zero3_merge == "gathered":
        import deepspeed
        import torch.distributed as tdist

        share = (0.0, 0.0, 0.0)
        with deepspeed.zero.GatheredParameters([W], modifier_rank=0):
            if tdist.get_rank(group=W.ds_process_group) == 0:
                delta = functional.lora_delta(A, B, scale).to(W.device)
                share = merge_sums(delta, quant.add_rounded_(W.data, delta, rounding, generator))
        return share
    start, end = zero.zero3_slice(W)
    share = (0.0, 0.0, 0.0)
    if end > start:
        in_features = zero.full_shape(W)[1]
        row_start, row_end = start // in_features, -(-end // in_features)
        rows = functional.lora_delta_rows(A, B, scale, row_start, row_end).view(-1)
        delta = rows[start - row_start * in_features:end - row_start * in_features]
        local = W.ds_tensor.data.view(-1)[: end - start]
        delta = delta.to(local.device)
        noise = None
        if rounding == "stochastic" and quant.format_of(local.dtype) != "fp32":  # the whole W's draws, this slice
            noise = quant.uniform_noise((W.ds_numel,), generator, local.device)[start:end]
        share = merge_sums(delta, quant.add_rounded_(local, delta, rounding, noise=noise))
    zero.release_gathered(W)  # a gathered (persistent) copy would otherwise be used stale
    return share


@torch.no_grad()
def _track_residual(module, error: torch.Tensor) -> tuple[float, float]:
    """relora.track_drift: the layer's residual R = W_exact - deq(W) (the sum of its merges' rounding errors, the
    fp32 buffer `merge_residual` beside W, saved with every checkpoint) updated by this merge's error; returns
    (||R||^2, ||W_exact||^2)."""
    module.track_merge_residual()  # the method registers it when it wraps; a layer wrapped by hand gets it here
    residual = module.merge_residual
    residual.sub_(error)
    exact = module.dequantized_weight().add(residual)
    return squared_norm(residual), squared_norm(exact)


@torch.no_grad()
def _merge_and_reinit(layout: zero.Layout, name: str, module, *, seed: int, restart_index: int,
                      zero3_merge: str, rounding: str = "nearest",
                      track_drift: bool = False) -> tuple[float, float, float, float, float]:
    """Merge one layer and re-init its adapters in module and masters; returns the local shares of merge_sums and,
    with track_drift (W whole on this rank), of (||R||^2, ||W_exact||^2) (else zeros)."""
    params = [module.lora_A, module.lora_B]
    if module.lora_scaling is not None:
        params.append(module.lora_scaling)
    frags = [layout.fragment(p) for p in params]
    full = zero.gather_full(frags)
    A = full[0].view(module.rank, module.in_features)
    B = full[1].view(module.out_features, module.rank)
    scale = math.tanh(float(full[2])) if module.lora_scaling is not None else module.alpha / module.rank
    generator = functional.rounding_generator(seed, restart_index, name) if rounding == "stochastic" else None
    drift = (0.0, 0.0)
    if not hasattr(module.weight, "ds_tensor"):  # W whole on this rank (ZeRO-0/1/2; a stored W or the Parameter)
        delta = functional.lora_delta(A, B, scale).to(module.weight.device)
        error = module.merge_delta_(delta, rounding, generator)
        share = merge_sums(delta, error)
        if track_drift:
            drift = _track_residual(module, error)
        del delta, error
    else:
        share = merge_into_weight(module.weight, A, B, scale, name=f"{name}.weight", zero3_merge=zero3_merge,
                                  rounding=rounding, generator=generator)
    new_A = functional.kaiming_uniform_A(module.rank, module.in_features,
                                         functional.restart_generator(seed, restart_index, name))
    new_B = torch.zeros(module.out_features, module.rank)
    for param, frag, value in ((module.lora_A, frags[0], new_A), (module.lora_B, frags[1], new_B)):
        if frag.tensor is not None and frag.tensor.numel() > 0:
            frag.tensor.copy_(value.view(-1)[frag.start:frag.start + frag.tensor.numel()])
        layout.commit(param, frag)
        zero.write_module_param(param, value)
    return (*share, *drift)


@torch.no_grad()
def _prune_layer(layout: zero.Layout, name: str, module, *, method: str, ratio: float, seed: int,
                 restart_index: int, pair_moments: bool = True) -> tuple[int, int]:
    """Prune one layer's adapter moments on this rank's fragments; returns (local zeroed, full total).

    pair_moments: afterwards also zero exp_avg wherever exp_avg_sq is zero (see reset.zero_unpaired_);
    both moments of a parameter share one fragment layout, so this is local to each rank.
    """
    targets = [(label, param, key, layout.fragment(param, key))
               for label, param in (("lora_A", module.lora_A), ("lora_B", module.lora_B)) for key in MOMENT_KEYS]
    thresholds = [None] * len(targets)
    if method == "magnitude":  # the whole tensor's threshold, exactly as the single-process reset computes it
        full = zero.gather_full([frag for _, _, _, frag in targets])
        thresholds = [magnitude_threshold(values.abs(), ratio) for values in full]
    zeroed = total = 0
    for (label, param, key, frag), threshold in zip(targets, thresholds):
        total += frag.numel
        if frag.tensor is None or frag.tensor.numel() == 0:
            continue
        if method == "magnitude":
            zeroed += prune_(frag.tensor, method, ratio, threshold=threshold) if threshold is not None else 0
        elif method == "random":  # the full tensor's draw (as prune_ makes it), sliced to this fragment
            generator = functional.restart_generator(seed, restart_index, f"{name}.{label}.{key}")
            draw = torch.rand(zero.full_shape(param), generator=generator).view(-1)
            mask = (draw[frag.start:frag.start + frag.tensor.numel()] < ratio).to(frag.tensor.device)
            frag.tensor.masked_fill_(mask, 0)
            zeroed += int(mask.sum())
        else:
            zeroed += prune_(frag.tensor, method, ratio)
    if pair_moments:
        moments = {(label, key): frag for label, _, key, frag in targets}
        for label in ("lora_A", "lora_B"):
            exp_avg, exp_avg_sq = moments[(label, "exp_avg")], moments[(label, "exp_avg_sq")]
            if exp_avg.tensor is not None and exp_avg.tensor.numel() > 0:
                zeroed += zero_unpaired_(exp_avg.tensor, exp_avg_sq.tensor)
    for _, param, key, frag in targets:
        if frag.tensor is not None and frag.tensor.numel() > 0:
            layout.commit(param, frag, key)
    return zeroed, total


def relora_restart(engine, *, restart_index: int, step: int, seed: int, merge: bool = True,
                   reset_optimizer: bool = True, method: str = "magnitude", ratio: float = 0.99,
                   zero3_merge: str = "shard", pair_moments: bool = True, rounding: str = "nearest",
                   track_drift: bool = False, layout: zero.Layout | None = None) -> RestartRecord:
    """One ReLoRA restart of every wrapped layer of `engine.module`; all ranks call it and get the same record.

    merge: W += s*B*A and re-init A (from restart_generator(seed, restart_index, name)) and B = 0;
    reset_optimizer: prune the adapters' Adam moments (`method`: magnitude / random / full / none, at
    `ratio`; pair_moments also zeroes first moments whose second moment was pruned); rounding: of the merged W to its
    storage (relora.merge_rounding); track_drift: keep each W's residual and report the drift (ZeRO-0/1/2). Online
    ReLoRA is merge=True, reset_optimizer=False. `layout`: the engine's `zero.layout_for(engine)`, made once with the
    engine (chosen now when None). Raises RestartError (on every rank) before the first optimizer step.
    """
    _check_arguments(restart_index, method, ratio, zero3_merge)
    quant.check_rounding(rounding)
    started = time.perf_counter()
    if layout is None:
        layout = zero.layout_for(engine)
    elif layout.engine is not engine:
        raise ValueError("relora restart: `layout` was made for another engine (make it with zero.layout_for(engine))")
    modules = relora_modules(engine.module)
    if not modules:
        raise ValueError("relora restart: the engine's model has no ReLoRALinear layers (was it wrapped?)")
    _check_ready(engine, layout, modules)
    if track_drift and not layout.replicated_weight:
        raise ValueError("relora.track_drift: W is ZeRO-3-partitioned; drift is tracked on ZeRO-0/1/2 only")
    sums = torch.zeros(5, dtype=torch.float64)  # ||delta||^2, ||error||^2, <error, delta>, ||R||^2, ||W_exact||^2
    zeroed = total = 0.0

    merge_started = time.perf_counter()
    if merge:
        for name, module in modules.items():
            sums += torch.tensor(_merge_and_reinit(layout, name, module, seed=seed, restart_index=restart_index,
                                                   zero3_merge=zero3_merge, rounding=rounding,
                                                   track_drift=track_drift), dtype=torch.float64)
    merge_seconds = time.perf_counter() - merge_started

    prune_started = time.perf_counter()
    if reset_optimizer and method != "none":
        for name, module in modules.items():
            layer_zeroed, layer_total = _prune_layer(layout, name, module, method=method, ratio=ratio,
                                                     seed=seed, restart_index=restart_index,
                                                     pair_moments=pair_moments)
            zeroed += layer_zeroed
            total += layer_total
    prune_seconds = time.perf_counter() - prune_started

    # One reduction: sharded shares are summed; replicated values (W whole on every rank: each rank has the full
    # norm; moments whole: full counts) and timings are taken from rank 0.
    is_rank0 = 1.0 if not dist.is_initialized() or dist.rank() == 0 else 0.0
    seconds = time.perf_counter() - started
    stats = torch.cat([sums * is_rank0 if layout.replicated_weight else sums,
                       torch.tensor([zeroed * is_rank0 if layout.replicated_state else zeroed,
                                     seconds * is_rank0, merge_seconds * is_rank0, prune_seconds * is_rank0],
                                    dtype=torch.float64)])
    (merged_sq, error_sq, error_dot, residual_sq, exact_sq,
     zeroed, seconds, merge_seconds, prune_seconds) = _all_reduce(stats).tolist()
    return RestartRecord(index=restart_index, step=step, merged_norm=math.sqrt(merged_sq),
                         merge_error=math.sqrt(error_sq / merged_sq) if merged_sq else 0.0,
                         merge_kept=1.0 + error_dot / merged_sq if merged_sq else 1.0,
                         drift=math.sqrt(residual_sq / exact_sq) if track_drift and exact_sq else None,
                         fraction_zeroed=zeroed / total if total else 0.0, seconds=seconds,
                         merge_seconds=merge_seconds, prune_seconds=prune_seconds, stage=zero.stage(engine))
