"""The interface every training method implements; the trainer asks it and never tests a method's name.

A method is one file in relora_ds/methods/ holding a subclass of `Method` whose `name` is the file's name (the registry,
relora_ds.methods.METHODS, is made of those files: the only list of method names); the config's `method:` key picks
it. It answers:

- its settings:    `section` (the config section it owns, or None) and `validate(cfg)` (one line per problem);
- the model:       `check(meta_model)` (what would fail after start-up), `switch_step` (when adapters are placed,
                   None: never) and `wrap(model)` (place them);
- the optimizer:   `check_ds_config(ds_config)` (what the DeepSpeed JSON must allow) and `optimizer(model,
                   ds_config)` (the parameters, or groups, and a torch optimizer; None: the JSON's own);
- the LR:          `lr_multiplier(step)`, on the peak `schedule.lr`;
- its hooks:       `callbacks()`, run by the trainer's loop (the switch and ReLoRA's restarts), and its
                   `state_dict()` / `load_state_dict()`, saved with every checkpoint;
- export:          `exported_weight(weight, adapters)`, the plain model's weight of a wrapped layer.
"""

import functools

from relora_ds.schedule import check_schedule, piecewise_multiplier

class Method:
    """Full-rank training: nothing is wrapped, no restarts, warm-up + cosine (the defaults of every question)."""

    name: str | None = None
    section: str | None = None  # the config section this method owns (None: none) ...
    Config = None               # ... and its dataclass (fields declared with relora_ds.fields.setting)

    def __init__(self, cfg):
        self.cfg = cfg
        self._segments = self.schedule_segments()
        for start, kwargs in self._segments:  # a ValueError naming the impossible setting, before anything is built
            try:
                check_schedule(**kwargs)
            except ValueError as e:
                raise ValueError(f"the schedule from step {start} (schedule.at_switch restart): {e}" if start
                                 else str(e)) from None

    # --- its settings ----------------------------------------------------------------------------------------
    @classmethod
    def validate(cls, cfg) -> list[str]:
        """Every problem of `cfg` for this method, one line each naming the dotted field (config.validate adds them
        to its own). Full-rank training has no switch: a warm start is meaningless."""
        r = cfg.relora
        errors = []
        if r.warm_start_steps > 0:
            errors.append(f"relora.warm_start_steps: must be 0 with method {cls.name} (nothing to switch to), "
                          f"got {r.warm_start_steps}")
        if r.warm_start_checkpoint is not None:
            errors.append(f"relora.warm_start_checkpoint: must be null with method {cls.name} (nothing to switch to)")
        if r.base_dtype != "auto":
            errors.append(f"relora.base_dtype: must be auto with method {cls.name} (it freezes no W to store in "
                          f"{r.base_dtype})")
        return errors

    # --- the model -------------------------------------------------------------------------------------------
    @property
    def switch_step(self) -> int | None:
        """The step before which the adapters are placed (0: at the start); None: the method never wraps."""
        return None

    def check(self, model) -> None:
        """Raise ValueError (one line, naming the setting) for what would fail after start-up; `model` may be on meta."""

    def wrap(self, model) -> None:
        raise NotImplementedError(f"method {self.name}: wraps nothing")

    @property
    def stores_weight(self) -> bool:
        """Whether the wrapped layers store their frozen W in a dtype of its own (relora.base_dtype)."""
        return False

    def wrap_while_building(self, param_dtype):
        """None, or per_module(model, name, module): places the adapters module by module while the model is built
        (model.build.build_from_config), when they are placed at step 0; `wrap` is then not called. param_dtype: what
        DeepSpeed will cast every parameter to (ZeRO-0/1/2)."""
        return None

    def adopt_warm_start(self, step: int) -> None:
        """Start from a saved full-rank checkpoint of `step` (relora.warm_start_checkpoint): the switch is there."""
        raise ValueError(f"relora.warm_start_checkpoint: method {self.name} has no warm start")

    def reference_step(self) -> int | None:
        """The step whose checkpoint is kept as the ΔW reference of `relora-ds analyze`: checkpoint.reference_step,
        else the switch (checkpoint.at_switch); None for none."""
        ck = self.cfg.checkpoint
        if ck.reference_step is not None:
            return ck.reference_step
        return self.switch_step if ck.at_switch else None

    def switch_due(self, step: int) -> bool:
        """Whether the adapters are placed before this step (if they are not yet)."""
        return False

    def restart_due(self, step: int) -> bool:
        """Whether the method changes the trained model before this step (ReLoRA: a merge)."""
        return False

    def next_event(self, step: int) -> int | None:
        """The next step at which the method changes the model (shown in the progress bar); None: none left."""
        return None

    # --- the optimizer ---------------------------------------------------------------------------------------
    def check_ds_config(self, ds_config: dict) -> None:
        """Raise ValueError (one line, naming the DeepSpeed setting) for a JSON this method cannot train under."""

    def optimizer(self, model, ds_config: dict):
        """(the parameters or parameter groups to train, a torch optimizer over them or None for the one the
        DeepSpeed JSON names): here every trainable parameter, with the JSON's optimizer."""
        return [p for p in model.parameters() if p.requires_grad], None

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

    def lr_multiplier(self, step: int) -> float:
        """The LR multiplier of the step about to run (a pure function of the step); lr = schedule.lr × this."""
        return self.lr_lambda(step)

    # --- its hooks and state ---------------------------------------------------------------------------------
    def callbacks(self) -> list:
        """The trainer callbacks (relora_ds/callbacks/base.py) this method adds to the loop."""
        return []

    def state_dict(self) -> dict:
        """What a resume needs of this method (JSON values), saved with every checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` (from a checkpoint's run state)."""

    # --- relora-ds compare ------------------------------------------------------------------------------------
    @classmethod
    def compare_variants(cls) -> list:
        """[(variant name, description, base config → {dotted key: value})]: the runs `relora-ds compare` makes of
        this method from its base config (a ReLoRA run with a full-rank warm start of W steps)."""
        return []

    # --- export ----------------------------------------------------------------------------------------------
    def exported_weight(self, weight, adapters: dict):
        """The plain model's fp32 weight of a layer the run wrapped, from its W and adapters (lora_A, lora_B,
        lora_scaling: the checkpoint's fp32 tensors). Full-rank runs wrap nothing."""
        raise NotImplementedError(f"method {self.name}: wraps nothing, so exports no wrapped layer")
