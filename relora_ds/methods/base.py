"""The interface every training method implements; the trainer asks it and never tests a mode string.

A method answers four questions, each a small method below:

- the model:      `check(meta_model)` (what would fail after start-up), `switch_step` (when adapters are placed,
                  None: never) and `wrap(model)` (place them);
- before a step:  `restart_due(state)` and `restart(engine, state)` (ReLoRA's merge and optimizer reset);
- the LR:         `lr_multiplier(state)`, on the peak `schedule.lr`;
- export:         `exported_weight(weight, adapters)`, the plain model's weight of a wrapped layer.

`state` is the trainer's TrainState (step, wrapped, relora_start, restart_index). Adding a method: a subclass in
its own file, registered in `relora_ds.methods.METHODS` under the name `relora.mode` selects (docs: DESIGN.md).
"""

import functools

import torch

from relora_ds.config import RunConfig
from relora_ds.schedule import check_schedule, piecewise_multiplier


class Method:
    """Full-rank training: nothing is wrapped, no restarts, warm-up + cosine (the defaults of every question)."""

    name = "full"

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self._segments = self.schedule_segments()
        for start, kwargs in self._segments:  # a ValueError naming the impossible setting, before anything is built
            try:
                check_schedule(**kwargs)
            except ValueError as e:
                raise ValueError(f"the schedule from step {start} (schedule.at_switch restart): {e}" if start
                                 else str(e)) from None

    # --- the model -------------------------------------------------------------------------------------------
    @property
    def switch_step(self) -> int | None:
        """The step before which the adapters are placed (0: at the start); None: the method never wraps."""
        return None

    def check(self, model) -> None:
        """Raise ValueError (one line, naming the setting) for what would fail after start-up; `model` may be on meta."""

    def wrap(self, model) -> None:
        raise NotImplementedError(f"relora.mode {self.name}: wraps nothing")

    def switch_due(self, state) -> bool:
        """Whether the adapters are placed before this step (the warm-start switch)."""
        return self.switch_step is not None and not state.wrapped and state.step >= self.switch_step

    def reference_step(self) -> int | None:
        """The step whose checkpoint is kept as the ΔW reference of `relora-ds analyze`: checkpoint.reference_step,
        else the switch (checkpoint.at_switch); None for none."""
        ck = self.cfg.checkpoint
        if ck.reference_step is not None:
            return ck.reference_step
        return self.switch_step if ck.at_switch else None

    # --- before a step ---------------------------------------------------------------------------------------
    def restart_due(self, state) -> bool:
        return False

    def restart(self, engine, state, layout=None):
        """The restart before this step (restart_due); `layout` is the engine's zero.Layout (None: made here)."""
        raise NotImplementedError(f"relora.mode {self.name}: has no restarts")

    def next_event(self, state) -> int | None:
        """The next step at which the method changes the model (shown in the progress bar); None: none left."""
        return None

    # --- the learning rate -----------------------------------------------------------------------------------
    def schedule_segments(self) -> list[tuple[int, dict]]:
        """The schedule's pieces, [(first step, schedule.lr_multiplier's arguments for the steps counted from it)]
        (schedule.piecewise_multiplier): here one, warm-up + cosine over the run, no restart points (override for
        a switch or restarts)."""
        s = self.cfg.schedule
        return [(0, dict(total_steps=self.cfg.train.total_steps, warmup_steps=s.warmup_steps,
                         restart_warmup_steps=s.restart_warmup_steps, cycle_length=None, min_lr_ratio=s.min_lr_ratio,
                         restart_offset=0, kind=s.kind))]

    @functools.cached_property
    def lr_lambda(self):
        """step → λ(step): the schedule alone (schedule.piecewise_multiplier of this method's segments)."""
        return functools.partial(piecewise_multiplier, segments=self._segments)

    def lr_multiplier(self, state) -> float:
        """The LR multiplier of the step about to run; the trainer sets lr = schedule.lr × this."""
        return self.lr_lambda(state.step)

    # --- export ----------------------------------------------------------------------------------------------
    def exported_weight(self, weight: torch.Tensor, adapters: dict) -> torch.Tensor:
        """The plain model's fp32 weight of a layer the run wrapped, from its W and adapters (lora_A, lora_B,
        lora_scaling: the checkpoint's fp32 tensors). Full-rank runs wrap nothing."""
        raise NotImplementedError(f"relora.mode {self.name}: wraps nothing, so exports no wrapped layer")
