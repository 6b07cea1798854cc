"""Checkpoints: the reference one before its step (the W that `relora-ds analyze` subtracts), every
checkpoint.every steps or checkpoint.every_minutes, the final one (checkpoint.save_final), and one when a stop signal ends the run early
(checkpoint.stop_signals, relora_ds/stop.py). The engine writes them (TrainEngine.save) with the
trainer's state (step, data position, the method's and the callbacks' state)."""

import os
import time
from dataclasses import dataclass

from relora_ds.callbacks.base import Callback
from relora_ds.fields import setting
from relora_ds.stop import EXIT_STOPPED, STOP_SIGNALS


@dataclass
class CheckpointConfig:
    every: int = setting(500, "steps between checkpoints; 0: only at the end")
    every_minutes: float | None = setting(
        None, "also save when this many minutes have passed since the newest checkpoint (or the start), by rank 0's "
              "clock on the steps that log (log.every): bounds what a crash (which sends no signal) loses in time; "
              "null: by steps only")
    keep_last: int = setting(3, "periodic checkpoints kept on disk; 0: keep all")
    save_final: bool = setting(True, "save a checkpoint at the end of training")
    at_switch: bool = setting(True, "save a checkpoint at the warm-start switch (step relora.warm_start_steps, before "
                                   "wrapping; step 0 when wrapping at the start): the reference W of `relora-ds "
                                   "analyze RUN_DIR`, kept whatever keep_last says")
    reference_step: int | None = setting(
        None, "a step whose checkpoint is saved and kept as that reference instead; set it on full-rank runs "
              "compared with low-rank ones (relora-ds compare sets it); null: the switch, with at_switch")
    stop_signals: list[str] = setting(
        ["SIGTERM", "SIGUSR1"],
        f"signals that end the run early, resumable: the ranks learn of one in the next step's all-reduce, stop "
        f"after that step, save a checkpoint and exit with code {EXIT_STOPPED} (a scheduler's preemption, or its "
        f"warning before the time limit: sbatch --signal=USR1@600; --resume continues); []: the signals' usual "
        f"action. Among: {', '.join(STOP_SIGNALS)}")


class Checkpointing(Callback):
    name = "checkpoint"

    def __init__(self, ck_cfg, output_dir: str, reference_step: int | None, over_ranks):
        self.cfg, self.reference_step = ck_cfg, reference_step
        self.over_ranks = over_ranks  # value → every rank's value (a collective)
        self.directory = os.path.join(output_dir, "checkpoints")
        self.saved_step = None  # the step of the newest checkpoint this run has (saved, or resumed from)
        self.saved_at = time.monotonic()

    def on_start(self, trainer) -> None:
        self.saved_step = trainer.state.step  # resumed from it; a fresh run (step 0) has nothing to lose yet
        self.saved_at = time.monotonic()

    def save(self, trainer, reference: bool = False) -> None:
        def action():
            path = trainer.engine.save(self.directory, step=trainer.state.step, state=trainer.state_dict(),
                                       keep_last=self.cfg.keep_last, reference=reference)
            return {"path": path, **({"reference": True} if reference else {})}

        trainer.event("checkpoint", action)
        self.saved_step, self.saved_at = trainer.state.step, time.monotonic()

    def pre_step(self, trainer) -> None:
        if trainer.state.step == self.reference_step:  # before the switch: the full-rank W
            self.save(trainer, reference=True)

    def post_step(self, trainer, result) -> None:
        if self.cfg.every > 0 and trainer.state.step % self.cfg.every == 0:
            self.save(trainer)
        elif self.cfg.every_minutes and result.logs and self.minutes_since_save() >= self.cfg.every_minutes:
            self.save(trainer)

    def minutes_since_save(self) -> float:
        """Minutes since the newest checkpoint (or the start) by rank 0's clock, the same on every rank (collective:
        the ranks' clocks and step times differ, and a save is collective)."""
        return self.over_ranks((time.monotonic() - self.saved_at) / 60)[0]

    def on_end(self, trainer) -> None:
        if self.cfg.save_final and (self.cfg.every == 0 or trainer.state.step % self.cfg.every != 0):
            self.save(trainer)

    def on_stop(self, trainer) -> None:
        if trainer.state.step != self.saved_step:
            self.save(trainer)
