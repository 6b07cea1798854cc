"""data.skip: before the step after STEP, the data of the next STEPS steps is passed over (relora_ds/data/skip.py)."""

from relora_ds.callbacks.base import Callback


class DataSkip(Callback):
    name = "data_skip"

    def __init__(self, skips: dict[int, int], micro_batches_per_step: int, tokens_per_step: int):
        self.skips, self.micro_batches_per_step, self.tokens_per_step = skips, micro_batches_per_step, tokens_per_step

    def pre_step(self, trainer) -> None:
        step = trainer.state.step
        steps = self.skips.get(step)
        if steps and step not in trainer.batches.skipped:  # not again on a resume from after it
            trainer.batches.skip(steps * self.micro_batches_per_step, at_step=step)
            trainer.metrics.log_event("data", step, skipped_steps=steps, skipped_tokens=steps * self.tokens_per_step)
