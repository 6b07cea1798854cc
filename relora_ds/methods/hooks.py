"""The methods' own trainer callbacks: the warm-start switch (adapters placed, a new engine) and ReLoRA's restarts
(merge, re-init, optimizer reset). Each runs through trainer.event, so the logs and the memory phases hear of it."""

from relora_ds.callbacks.base import Callback


class WarmStartSwitch(Callback):
    """Before the method's switch step (also when resuming at it): place the adapters on the engine's module and
    make a new engine over it (TrainEngine.remake: the old optimizer is freed first)."""

    name = "switch"

    def __init__(self, method):
        self.method = method

    def pre_step(self, trainer) -> None:
        if self.method.switch_due(trainer.state.step) and not trainer.engine.wrapped:
            trainer.event("switch", lambda: trainer.engine.remake(self.method.wrap))


class Restarts(Callback):
    """Before each step the method says is due: its restart (ReLoRA: merge, re-init, moments pruned), logged with
    its record."""

    name = "restarts"

    def __init__(self, method):
        self.method = method

    def pre_step(self, trainer) -> None:
        step = trainer.state.step
        if self.method.restart_due(step):
            trainer.event("restart", lambda: self.method.restart(trainer.engine, step))
