"""ReLoRA: LoRA's adapters, merged into W every relora.merge_every steps with an optimizer reset (and LR re-warm-up)
every relora.reset_every steps, counted from the switch (docs/algorithm.md)."""

from relora_ds.engine.restart import relora_restart
from relora_ds.methods.hooks import Restarts
from relora_ds.methods.lora import LoRA


def restart_action(step: int, start: int, merge_every: int, reset_every: int) -> tuple[bool, bool]:
    """(merge, reset) before `step` of a run whose adapters were placed at `start`: a merge every merge_every steps
    after it, an optimizer reset at the merges that fall on reset_every. Nothing at `start` itself."""
    since = step - start
    if since <= 0 or since % merge_every:
        return False, False
    return True, since % reset_every == 0


class ReLoRA(LoRA):
    name = "relora"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.restart_index = 0  # merges done: the generator index of A's last draw

    @classmethod
    def validate(cls, cfg) -> list[str]:
        errors = super().validate(cfg)
        r, s = cfg.relora, cfg.schedule
        merge_every = r.reset_every if r.merge_every is None else r.merge_every
        if merge_every >= 1 and r.reset_every % merge_every != 0:
            errors.append(f"relora.reset_every ({r.reset_every}) must be a multiple of relora.merge_every "
                          f"({merge_every})")
        if s.kind == "jagged_cosine":
            if r.reset_every <= s.restart_warmup_steps:
                errors.append(f"relora.reset_every ({r.reset_every}) must be > schedule.restart_warmup_steps "
                              f"({s.restart_warmup_steps}): each cycle needs room for its LR re-warm-up")
            setting, warmup = cls.first_warmup(cfg)
            if warmup > r.reset_every:
                errors.append(f"{setting} ({warmup}) must be <= relora.reset_every ({r.reset_every}): the first "
                              f"warm-up must end before the first restart")
        return errors

    @classmethod
    def compare_variants(cls) -> list:
        return [("relora", "the base config: warm start, merges, optimizer resets, jagged LR", lambda base: {}),
                ("no_reset", "ReLoRA without the optimizer reset (merges and LR re-warm-ups kept)",
                 lambda base: {"relora.optimizer_reset": "none"}),
                ("no_jagged", "ReLoRA without the LR re-warm-ups at its restarts: plain cosine (merges and resets kept)",
                 lambda base: {"schedule.kind": "cosine"}),
                ("no_warm", "ReLoRA without the full-rank warm start (adapters from step 0)",
                 lambda base: {"relora.warm_start_steps": 0})]

    def _action(self, step: int) -> tuple[bool, bool]:
        r = self.cfg.relora
        return restart_action(step, self.switch_step, r.merge_every, r.reset_every)

    def restart_due(self, step: int) -> bool:
        return self._action(step)[0]

    def restart(self, engine, step: int) -> dict:
        """Merge, re-init and (on reset steps) prune the adapters' moments of the TrainEngine on every rank; counts
        the merge in restart_index (A's generator index). Returns the restart's record (its step left out)."""
        r = self.cfg.relora
        _, reset = self._action(step)
        self.restart_index += 1
        record = relora_restart(engine.ds, restart_index=self.restart_index, step=step, seed=self.cfg.train.seed,
                                merge=True, reset_optimizer=reset, method=r.optimizer_reset, ratio=r.prune_ratio,
                                zero3_merge=r.zero3_merge, pair_moments=r.pair_moments, rounding=r.merge_rounding,
                                track_drift=r.track_drift, layout=engine.layout)
        return {k: v for k, v in record.to_dict().items() if k != "step"}

    def callbacks(self) -> list:
        return [*super().callbacks(), Restarts(self)]

    def next_event(self, step: int) -> int | None:
        if step < self.switch_step:
            return self.switch_step
        every, start = self.cfg.relora.merge_every, self.switch_step
        upcoming = start + ((step - start) // every + 1) * every
        return upcoming if upcoming < self.cfg.train.total_steps else None

    def schedule_segments(self) -> list[tuple[int, dict]]:
        """Jagged cosine: restart points every relora.reset_every steps from the switch, on the low-rank phase's
        schedule (the last segment)."""
        *before, (start, low_rank) = super().schedule_segments()
        return [*before, (start, {**low_rank, "cycle_length": self.cfg.relora.reset_every})]

    def state_dict(self) -> dict:
        return {"restart_index": self.restart_index}

    def load_state_dict(self, state: dict) -> None:
        self.restart_index = int(state["restart_index"])
