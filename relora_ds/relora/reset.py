"""ReLoRA's optimizer reset: prune the adapters' Adam moments in place (paper Section 2, Algorithm 1).

The pure functions (`magnitude_threshold`, `prune_`) define the pruning once; the plain-torch path
(`reset_optimizer_state`) and the sharded DeepSpeed path in `relora_ds/engine/restart.py` both use
them, so a threshold means the same thing everywhere.
"""

from collections.abc import Mapping

import torch

PRUNE_METHODS = ("magnitude", "random", "full", "none")  # relora.optimizer_reset

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def check_prune_ratio(ratio: float) -> None:
    """relora.prune_ratio is in [0, 1), as config.validate requires (zeroing everything is optimizer_reset full)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"relora.prune_ratio must be in [0, 1), got {ratio}")


def _check(method: str, ratio: float) -> None:
    if method not in PRUNE_METHODS:
        raise ValueError(f"relora.optimizer_reset must be one of {', '.join(PRUNE_METHODS)}, got {method!r}")
    check_prune_ratio(ratio)


def magnitude_threshold(abs_values: torch.Tensor, ratio: float) -> torch.Tensor | None:
    """The ratio-quantile of a flat tensor of |x|: the k-th smallest value, k = floor(ratio * numel).

    Returns None when k == 0 (nothing to prune). Entries with |x| <= threshold are the ones zeroed,
    so ties at the threshold are all zeroed (at least k entries go).
    """
    check_prune_ratio(ratio)
    flat = abs_values.reshape(-1)
    k = int(ratio * flat.numel())
    if k == 0:
        return None
    return torch.kthvalue(flat.float(), k).values


@torch.no_grad()
def prune_(t: torch.Tensor, method: str, ratio: float, *, threshold: torch.Tensor | float | None = None,
           generator: torch.Generator | None = None) -> int:
    """Zero entries of `t` in place; return how many entries were selected (all zero afterwards).

    magnitude: |x| <= threshold, the threshold from `magnitude_threshold(|t|, ratio)` unless given
    (the sharded path passes the whole tensor's threshold for a fragment); random: each entry with
    probability `ratio`, drawn from `generator`; full: every entry; none: nothing.
    """
    _check(method, ratio)
    if method == "none" or t.numel() == 0:
        return 0
    if method == "full":
        t.zero_()
        return t.numel()
    if method == "magnitude":
        if threshold is None:
            threshold = magnitude_threshold(t.abs(), ratio)
            if threshold is None:
                return 0
        mask = t.abs().float() <= torch.as_tensor(threshold, dtype=torch.float32, device=t.device)
    else:  # random
        draw_device = generator.device if generator is not None else t.device
        mask = (torch.rand(t.shape, generator=generator, device=draw_device) < ratio).to(t.device)
    t.masked_fill_(mask, 0)
    return int(mask.sum())


@torch.no_grad()
def zero_unpaired_(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> int:
    """Zero exp_avg wherever exp_avg_sq is zero, in place; return how many non-zero entries that zeroed.

    Pruning the two moments independently (the paper's way) keeps some first moments whose second
    moment was pruned. Adam then steps those entries by lr·m̂/(√v̂ + eps) with v̂ ≈ 0: up to lr·m̂/eps.
    Right after a restart A's gradient is exactly zero (B = 0), so v stays 0 and the step is huge:
    on a tiny LLaMA the loss jumped from 0.7 to 4.6 one step after the LR re-warm-up began.
    Works on a whole tensor or on one rank's fragment (same layout for both moments).
    """
    unpaired = (exp_avg_sq == 0) & (exp_avg != 0)
    exp_avg.masked_fill_(unpaired, 0)
    return int(unpaired.sum())


def _named(params) -> list[tuple[str, torch.Tensor]]:
    """(label, tensor) pairs from a name→tensor mapping or an iterable of tensors."""
    if isinstance(params, Mapping):
        return list(params.items())
    return [(f"parameter #{i} {tuple(p.shape)}", p) for i, p in enumerate(params)]


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer, params, *, method: str = "magnitude",
                          ratio: float = 0.99, generator: torch.Generator | None = None,
                          pair_moments: bool = True) -> float:
    """Prune exp_avg and exp_avg_sq of `params` only (per tensor, per state), in place; `step` is kept.

    `params`: the adapter parameters (A and B), as a name→tensor mapping (names appear in errors) or
    an iterable of tensors. `pair_moments`: afterwards also zero every first moment whose second
    moment is zero (`zero_unpaired_`; off = the paper's independent pruning, which can spike the
    loss after a restart). Returns the fraction of those moment entries that were zeroed. Raises
    ValueError when a parameter is not in the optimizer or has no state yet (reset before the first
    optimizer step): the reset would otherwise silently do nothing.
    """
    _check(method, ratio)
    named = _named(params)
    if not named:
        raise ValueError("reset_optimizer_state got no parameters to reset (expected the adapters' A and B)")
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    zeroed = 0
    total = 0
    for label, p in named:
        if id(p) not in in_optimizer:
            raise ValueError(f"optimizer reset: {label} is not in the optimizer's param groups "
                             "(was the optimizer built before the model was wrapped?)")
        state = optimizer.state.get(p)
        if not state:
            raise ValueError(f"optimizer reset: no optimizer state for {label}; "
                             "reset only after the first optimizer step")
        for key in MOMENT_KEYS:
            if key not in state:
                raise ValueError(f"optimizer reset: state of {label} has no {key!r} "
                                 f"(has {sorted(state)}); only Adam/AdamW are supported")
        for key in MOMENT_KEYS:
            zeroed += prune_(state[key], method, ratio, generator=generator)
            total += state[key].numel()
        if pair_moments:
            zeroed += zero_unpaired_(state["exp_avg"], state["exp_avg_sq"])
    return zeroed / total if total else 0.0
