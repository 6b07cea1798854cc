"""ReLoRA: LoRA's adapters, merged into W every relora.merge_every steps with an optimizer reset (and LR re-warm-up)
every relora.reset_every steps, counted from the switch (docs/algorithm.md)."""

from relora_ds.engine.restart import relora_restart
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

    def restart_due(self, state) -> bool:
        return state.wrapped and self._action(state)[0]

    def _action(self, state) -> tuple[bool, bool]:
        r = self.cfg.relora
        return restart_action(state.step, state.relora_start, r.merge_every, r.reset_every)

    def restart(self, engine, state, layout=None):
        """Merge, re-init and (on reset steps) prune the adapters' moments on every rank; counts the merge in
        state.restart_index (A's generator index). Returns the restart's record."""
        r = self.cfg.relora
        _, reset = self._action(state)
        state.restart_index += 1
        return relora_restart(engine, restart_index=state.restart_index, step=state.step, seed=self.cfg.train.seed,
                              merge=True, reset_optimizer=reset, method=r.optimizer_reset, ratio=r.prune_ratio,
                              zero3_merge=r.zero3_merge, pair_moments=r.pair_moments, layout=layout)

    def next_event(self, state) -> int | None:
        if not state.wrapped:
            return self.switch_step
        every = self.cfg.relora.merge_every
        upcoming = state.relora_start + ((state.step - state.relora_start) // every + 1) * every
        return upcoming if upcoming < self.cfg.train.total_steps else None

    def schedule_segments(self) -> list[tuple[int, dict]]:
        """Jagged cosine: restart points every relora.reset_every steps from the switch, on the low-rank phase's
        schedule (the last segment)."""
        *before, (start, low_rank) = super().schedule_segments()
        return [*before, (start, {**low_rank, "cycle_length": self.cfg.relora.reset_every})]
