"""Swap nn.Linear modules for ReLoRALinear by name pattern, and back (merged) for export."""

import fnmatch

import torch
from torch import nn

from relora_ds.relora import functional
from relora_ds.relora.layer import ReLoRALinear


def _matches(name: str, patterns) -> bool:
    """A pattern matches a module's last name component exactly, or its full dotted name by glob."""
    leaf = name.rsplit(".", 1)[-1]
    return any(leaf == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def wrap_targets(model: nn.Module, target_modules, rank: int) -> list[str]:
    """The names of the nn.Linear modules `wrap` replaces, in model order (`target_modules`: name patterns, e.g. the
    model family's defaults, model.families.target_modules_of); a one-line ValueError when none match or when `rank`
    exceeds both dims of one. Reads only module types and sizes: works on a meta-device model."""
    targets = [name for name, module in model.named_modules() if is_target(name, module, target_modules)]
    if not targets:
        linears = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"relora.target_modules {list(target_modules)} matched no nn.Linear in the model "
                         f"(its linears: {', '.join(linears)})")
    for name in targets:
        linear = model.get_submodule(name)
        if linear.out_features < rank and linear.in_features < rank:
            raise ValueError(f"relora.rank {rank} is larger than both dims of {name} "
                             f"({linear.out_features}, {linear.in_features}); lower relora.rank")
    return targets


def wrap(model: nn.Module, *, rank: int, alpha: float, target_modules, dropout: float = 0.0,
         trainable_scaling: bool = False, kernels: str = "auto", seed: int = 0, base_dtype: str = "auto",
         track_drift: bool = False) -> list[str]:
    """Replace every nn.Linear whose name matches `target_modules` (name patterns) with a ReLoRALinear.

    W (and bias) become frozen; A is drawn from `restart_generator(seed, 0, name)` so every rank
    wraps identically; B is zero, so the model's output is unchanged. All other parameters keep
    their requires_grad. base_dtype other than auto: W is stored in it (layer by layer, each Linear's W released
    as soon as it is stored). track_drift: each layer gets its `merge_residual` buffer (relora.track_drift). Returns
    the wrapped module names, in model order.
    """
    targets = wrap_targets(model, target_modules, rank)
    for name in targets:
        wrap_one(model, name, rank=rank, alpha=alpha, dropout=dropout, trainable_scaling=trainable_scaling,
                 kernels=kernels, seed=seed, base_dtype=base_dtype, track_drift=track_drift)
    return targets


def wrap_one(model: nn.Module, name: str, *, rank: int, alpha: float, dropout: float = 0.0,
             trainable_scaling: bool = False, kernels: str = "auto", seed: int = 0, base_dtype: str = "auto",
             track_drift: bool = False) -> None:
    """Replace the nn.Linear `name` of `model` with a ReLoRALinear, as `wrap` does each of its targets."""
    module = ReLoRALinear.from_linear(model.get_submodule(name), rank, alpha, dropout, trainable_scaling, kernels,
                                      generator=functional.restart_generator(seed, 0, name), base_dtype=base_dtype)
    if track_drift:
        module.track_merge_residual()
    _set_submodule(model, name, module)


def is_target(name: str, module: nn.Module, target_modules) -> bool:
    """Whether `wrap` would replace this module (an nn.Linear matching a pattern of `target_modules`)."""
    return isinstance(module, nn.Linear) and not isinstance(module, ReLoRALinear) and _matches(name, target_modules)


def relora_modules(model: nn.Module) -> dict[str, ReLoRALinear]:
    """Name → ReLoRALinear for every wrapped layer, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ReLoRALinear)}


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Full parameter names of every lora_A and lora_B (what the optimizer reset prunes)."""
    names = []
    for name in relora_modules(model):
        names += [f"{name}.lora_A", f"{name}.lora_B"]
    return names


@torch.no_grad()
def merge_and_reinit(model: nn.Module, *, seed: int, restart_index: int, rounding: str = "nearest") -> float:
    """Single-process restart of every wrapped layer; returns the total norm of the merged updates.

    A is drawn from `restart_generator(seed, restart_index, name)`; restart_index starts at 1
    (index 0 is the wrap-time draw). Stochastic rounding draws from `rounding_generator(seed, restart_index, name)`.
    """
    total = 0.0
    for name, module in relora_modules(model).items():
        norm = module.merge_and_reinit(functional.restart_generator(seed, restart_index, name), rounding,
                                       functional.rounding_generator(seed, restart_index, name))
        total += norm * norm
    return total ** 0.5


@torch.no_grad()
def unwrap(model: nn.Module) -> list[str]:
    """Replace every ReLoRALinear by a plain nn.Linear holding W + s*B*A. Returns the names."""
    names = list(relora_modules(model))
    for name in names:
        _set_submodule(model, name, model.get_submodule(name).merged_linear())
    return names
