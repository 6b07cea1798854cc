"""Held-out evaluation: at step 0 of a fresh run, every train.eval_every steps, and after the last step."""

from relora_ds.callbacks.base import Callback


class Evaluation(Callback):
    name = "eval"

    def __init__(self, batches: list[dict], every: int):
        self.batches, self.every = batches, every

    def _run(self, trainer) -> None:
        if self.batches:
            trainer.event("eval", lambda: trainer.engine.evaluate(self.batches))

    def pre_step(self, trainer) -> None:
        if trainer.state.step == 0 and self.every > 0:
            self._run(trainer)

    def post_step(self, trainer, result) -> None:
        if self.every > 0 and trainer.state.step % self.every == 0:
            self._run(trainer)

    def on_end(self, trainer) -> None:
        if self.every > 0 and trainer.state.step % self.every != 0:
            self._run(trainer)
