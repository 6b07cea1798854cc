"""Checkpoints: the reference one before its step (the W that `relora-ds analyze` subtracts), every
checkpoint.every steps, and the final one (checkpoint.save_final). The engine writes them (TrainEngine.save) with the
trainer's state (step, data position, the method's and the callbacks' state)."""

import os
from dataclasses import dataclass

from relora_ds.callbacks.base import Callback
from relora_ds.fields import setting


@dataclass
class CheckpointConfig:
    every: int = setting(500, "steps between checkpoints; 0: only at the end")
    keep_last: int = setting(3, "periodic checkpoints kept on disk; 0: keep all")
    save_final: bool = setting(True, "save a checkpoint at the end of training")
    at_switch: bool = setting(True, "save a checkpoint at the warm-start switch (step relora.warm_start_steps, before "
                                   "wrapping; step 0 when wrapping at the start): the reference W of `relora-ds "
                                   "analyze RUN_DIR`, kept whatever keep_last says")
    reference_step: int | None = setting(
        None, "a step whose checkpoint is saved and kept as that reference instead; set it on full-rank runs "
              "compared with low-rank ones (relora-ds compare sets it); null: the switch, with at_switch")


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
