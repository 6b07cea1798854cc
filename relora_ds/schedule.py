"""The learning-rate multiplier λ(t) on the peak LR: warm-up, cosine to a floor, ReLoRA's jagged restarts.

Notation (docs/algorithm.md, "The learning-rate schedule"): t step (0 where training starts), N total
steps, W0 first warm-up, Wr restart warm-up, C cycle length (relora.reset_every), m min LR ratio, S restart
offset (relora.warm_start_steps), env(p) = m + (1 − m)·½(1 + cos πp) with p clipped to [0, 1].

    t < W0:                      λ = t / W0
    t_r <= t < t_r + Wr:         λ = (t − t_r)/Wr · env((t_r + Wr − W0) / (N − W0))
    otherwise:                   λ = env((t − W0) / (N − W0))

Restart points t_r = S + k·C > 0 (k >= 0): the switch to adapters at S starts a fresh optimizer, so it
re-warms too. With S = 0 this is exactly the authors' jagged cosine. A schedule may also be made of pieces
(`piecewise_multiplier`): schedule.at_switch restart runs the full-rank schedule before the switch and a new one,
counted from the switch over the N − S remaining steps, after it. Which pieces and restart points a run has is its
training method's choice (relora_ds/methods/: `schedule_segments`). Pure python.
"""

import math
from dataclasses import dataclass

from relora_ds.fields import setting

SCHEDULE_KINDS = ("jagged_cosine", "cosine", "constant")
AT_SWITCH = ("restart", "continue")  # schedule.at_switch: the LR at the warm-start switch (methods/lora.py)



@dataclass
class ScheduleConfig:
    lr: float = setting(1e-3, "peak learning rate")
    warmup_steps: int = setting(100, "first linear warm-up W0")
    restart_warmup_steps: int = setting(50, "linear re-warm-up Wr after each restart")
    min_lr_ratio: float = setting(0.1, "cosine floor m as a fraction of the peak")
    low_rank_lr_scale: float = setting(1.0, "peak LR while the adapters train (lora/relora after the switch) as a "
                                           "multiple of schedule.lr (no effect in full mode); the paper's "
                                           "Appendix A suggests 1.5-2")
    kind: str = setting("jagged_cosine", "LR schedule", SCHEDULE_KINDS)
    at_switch: str = setting(
        "restart", "the LR at the warm-start switch (lora/relora): restart: a new schedule for the low-rank phase "
                   "(warm-up, then the cosine from the peak over the remaining steps; ReLoRA's restarts on it), as "
                   "the reference code does; continue: the full-rank run's cosine goes on", AT_SWITCH)
    switch_warmup_steps: int | None = setting(
        None, "the warm-up at the switch with at_switch restart; null: schedule.warmup_steps")

def check_schedule(*, total_steps: int, warmup_steps: int, restart_warmup_steps: int = 0,
                   cycle_length: int | None = None, min_lr_ratio: float = 0.1, restart_offset: int = 0,
                   kind: str = "jagged_cosine") -> None:
    """Raise ValueError naming the first impossible setting (C <= Wr, W0 > C, N <= W0, ...)."""
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"schedule kind must be one of {', '.join(SCHEDULE_KINDS)}, got {kind!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if restart_warmup_steps < 0:
        raise ValueError(f"restart_warmup_steps must be >= 0, got {restart_warmup_steps}")
    if restart_offset < 0:
        raise ValueError(f"restart_offset must be >= 0, got {restart_offset}")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps (N={total_steps}) must be > warmup_steps (W0={warmup_steps})")
    if kind != "jagged_cosine":
        return
    if cycle_length is not None:
        if cycle_length < 1:
            raise ValueError(f"cycle_length must be >= 1, got {cycle_length}")
        if cycle_length <= restart_warmup_steps:
            raise ValueError(f"cycle_length (C={cycle_length}) must be > restart_warmup_steps "
                             f"(Wr={restart_warmup_steps})")
        if warmup_steps > cycle_length:
            raise ValueError(f"warmup_steps (W0={warmup_steps}) must be <= cycle_length (C={cycle_length})")
    if 0 < restart_offset < warmup_steps:
        raise ValueError(f"restart_offset (S={restart_offset}) must be 0 or >= warmup_steps (W0={warmup_steps})")


def envelope(progress: float, min_lr_ratio: float) -> float:
    """env(p) = m + (1 − m)·½(1 + cos πp), p clipped to [0, 1]."""
    p = min(max(progress, 0.0), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def last_restart(step: int, cycle_length: int | None, restart_offset: int = 0) -> int | None:
    """The latest restart point t_r <= step (t_r = S + k·C > 0), or None before the first one.

    cycle_length None: the only restart point is S itself (when S > 0)."""
    if step < restart_offset:
        return None
    if cycle_length is None:
        t_r = restart_offset
    else:
        t_r = restart_offset + (step - restart_offset) // cycle_length * cycle_length
    return t_r if t_r > 0 else None


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, restart_warmup_steps: int = 0,
                  cycle_length: int | None = None, min_lr_ratio: float = 0.1, restart_offset: int = 0,
                  kind: str = "jagged_cosine") -> float:
    """λ(step). kind "cosine": warm-up + cosine, no restarts; "constant": warm-up then 1.0.

    cycle_length None with restart_offset 0: no restarts (plain warm-up + cosine). Steps past
    total_steps stay on the floor m (no restarts there)."""
    check_schedule(total_steps=total_steps, warmup_steps=warmup_steps, restart_warmup_steps=restart_warmup_steps,
                   cycle_length=cycle_length, min_lr_ratio=min_lr_ratio, restart_offset=restart_offset, kind=kind)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return step / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = total_steps - warmup_steps
    if kind == "jagged_cosine":
        t_r = last_restart(step, cycle_length, restart_offset)
        if t_r is not None and t_r < total_steps and step - t_r < restart_warmup_steps:
            target = envelope((t_r + restart_warmup_steps - warmup_steps) / decay_steps, min_lr_ratio)
            return (step - t_r) / restart_warmup_steps * target
    return envelope((step - warmup_steps) / decay_steps, min_lr_ratio)


def piecewise_multiplier(step: int, segments) -> float:
    """λ(step) of a schedule made of `segments`, [(first step, lr_multiplier's keyword arguments)] with first steps
    increasing from 0: the last segment that has begun, evaluated at the step counted from its first step."""
    start, kwargs = next((start, kwargs) for start, kwargs in reversed(segments) if start <= step)
    return lr_multiplier(step - start, **kwargs)
