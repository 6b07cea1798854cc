"""Checkpoints: the reference one before its step (the W that `relora-ds analyze` subtracts), every
checkpoint.every steps, and the final one (checkpoint.save_final). The engine writes them (TrainEngine.save) with the
trainer's state (step, data position, the method's and the callbacks' state)."""

import os

from relora_ds.callbacks.base import Callback


class Checkpointing(Callback):
    name = "checkpoint"

    def __init__(self, ck_cfg, output_dir: str, reference_step: int | None):
        self.cfg, self.reference_step = ck_cfg, reference_step
        self.directory = os.path.join(output_dir, "checkpoints")

    def save(self, trainer, reference: bool = False) -> None:
        def action():
            path = trainer.engine.save(self.directory, step=trainer.state.step, state=trainer.state_dict(),
                                       keep_last=self.cfg.keep_last, reference=reference)
            return {"path": path, **({"reference": True} if reference else {})}

        trainer.event("checkpoint", action)

    def pre_step(self, trainer) -> None:
        if trainer.state.step == self.reference_step:  # before the switch: the full-rank W
            self.save(trainer, reference=True)

    def post_step(self, trainer, result) -> None:
        if self.cfg.every > 0 and trainer.state.step % self.cfg.every == 0:
            self.save(trainer)

    def on_end(self, trainer) -> None:
        if self.cfg.save_final and (self.cfg.every == 0 or trainer.state.step % self.cfg.every != 0):
            self.save(trainer)
