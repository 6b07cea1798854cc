"""Memory events: the peak of each phase of the run on every rank (build or resume, the steps between events, and
each event: switch, restart, eval, checkpoint), logged as a "memory" record (relora_ds/memory.py measures), with the
bytes the wrapped layers' frozen W takes on rank 0 as stored (frozen_w_gib: relora.base_dtype's saving) and, for the
phases relora-ds plan models, its prediction (plan_gib): every run checks the plan on its own hardware."""

from relora_ds.callbacks.base import Callback
from relora_ds.memory import GIB
from relora_ds.plan import phase_of


class MemoryEvents(Callback):
    name = "memory"

    def __init__(self, phases, build_peak: int | None, resumed: bool, over_ranks, plan=None):
        self.phases, self.build_peak, self.resumed, self.plan = phases, build_peak, resumed, plan
        self.over_ranks = over_ranks  # value → every rank's value (a collective)
        self.steps_since_event = 0

    def log(self, trainer, phase: str, peak: int | None = None) -> None:
        """Log the peak of the phase that just ended on every rank (collective)."""
        peak = self.phases.end(phase) if peak is None else peak
        per_rank = self.over_ranks(float(peak or 0) / GIB)
        planned = phase_of(phase, trainer.engine.wrapped, self.plan) if self.plan is not None else None
        trainer.metrics.log_event("memory", trainer.state.step, phase=phase, peak_gib=round(max(per_rank), 3),
                                  rank_peak_gib=[round(v, 3) for v in per_rank], kind=self.phases.kind,
                                  frozen_w_gib=round(trainer.engine.frozen_weight_bytes() / GIB, 4),
                                  **({"plan_gib": round(self.plan.phases[planned].total / GIB, 3)} if planned else {}))

    def on_start(self, trainer) -> None:
        self.log(trainer, "resume" if self.resumed else "build", self.build_peak)

    def post_step(self, trainer, result) -> None:
        self.steps_since_event += 1

    def before_event(self, trainer, name: str) -> None:
        self.log(trainer, "steps")

    def on_event(self, trainer, name: str, fields: dict) -> None:
        self.log(trainer, name)
        self.steps_since_event = 0

    def on_end(self, trainer) -> None:
        if self.steps_since_event:
            self.log(trainer, "steps")

    on_stop = on_end
