"""What a trainer callback is: a few named hooks the loop calls, and its own state for resume.

The loop (relora_ds/trainer.py) calls, on every callback in order:

    on_start(trainer)              after the engine is built (or resumed), before the first step
    pre_step(trainer)              before each optimizer step (trainer.state.step steps done)
    post_step(trainer, result)     after it (result: StepResult: loss, grad_norm, lr, logs)
    on_end(trainer)                after the last step
    on_stop(trainer)               instead of on_end when a stop signal ends the run early (relora_ds/stop.py):
                                   keep what a resume needs, skip what only the end of training wants
    before_event(trainer, name)    around each event (switch, restart, eval, checkpoint) that a callback runs
    on_event(trainer, name, fields)  through trainer.event(name, action): fields is what the action returned

A callback that changes the model or writes files does it through trainer.event, so that every other callback
hears of it (the metrics log it, the memory callback measures its phase). `state_dict()` is saved with every
checkpoint under the callback's `name` and handed back to `load_state_dict` on resume.
"""

from dataclasses import dataclass

import torch


@dataclass
class StepResult:
    loss: torch.Tensor          # this rank's mean loss of the step, on the device (read it only when logs)
    grad_norm: float | None     # the global gradient norm (steps that log), else None
    lr: float
    logs: bool                  # a step that logs (log.every, and the last step)


class Callback:
    name = "callback"

    def on_start(self, trainer) -> None: ...

    def pre_step(self, trainer) -> None: ...

    def post_step(self, trainer, result: StepResult) -> None: ...

    def on_end(self, trainer) -> None: ...

    def on_stop(self, trainer) -> None: ...

    def before_event(self, trainer, name: str) -> None: ...

    def on_event(self, trainer, name: str, fields: dict) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...
