"""Held-out evaluation: at step 0 of a fresh run, every train.eval_every steps, and after the last step.

One held-out set logs its loss and perplexity. A mixture's sources' held-out sets (data.mixture) are evaluated one by
one: each logs `loss_<name>`, and `loss` is their mean weighted by the mixture's weights (the expected held-out loss
of a row drawn as training draws it), `perplexity` its exp.

A stop signal (relora_ds/stop.py) that comes during an evaluation ends it on every rank at the same batch: the event
logs `abandoned` (the signal's name) instead of a loss, the loop stops before the next step, and the evaluation is
owed: the run resumed from that stop's checkpoint evaluates before its first step.
"""

import math

from relora_ds.callbacks.base import Callback
from relora_ds.stop import signal_name


class Evaluation(Callback):
    name = "eval"

    def __init__(self, sets: list[tuple[str | None, float, list[dict]]], every: int):
        """sets: (name, weight, this rank's batches) of each held-out set (loader.held_out_sets); name None: the only
        one."""
        self.sets, self.every = [s for s in sets if s[2]], every
        self.owed = False  # an evaluation a stop signal abandoned: the resumed run makes it before its first step

    def _evaluate(self, trainer) -> dict:
        results = []
        watch = (lambda: trainer.stop.received) if trainer.stop.signals else None  # the same on every rank
        for name, weight, batches in self.sets:
            result = trainer.engine.evaluate(batches, stop_signal=watch)
            if "stopped" in result:  # every rank, at the same batch
                trainer.signalled, self.owed = result["stopped"], True
                return {"abandoned": signal_name(result["stopped"])}
            results.append((name, weight, result))
        self.owed = False
        if len(results) == 1 and results[0][0] is None:
            return results[0][2]
        loss = sum(weight * result["loss"] for _, weight, result in results)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                **{f"loss_{name}": result["loss"] for name, _, result in results}}

    def _run(self, trainer) -> None:
        if self.sets:
            trainer.event("eval", lambda: self._evaluate(trainer))

    def pre_step(self, trainer) -> None:
        if (trainer.state.step == 0 and self.every > 0) or self.owed:
            self._run(trainer)

    def post_step(self, trainer, result) -> None:
        if self.every > 0 and trainer.state.step % self.every == 0:
            self._run(trainer)

    def on_end(self, trainer) -> None:
        if self.every > 0 and trainer.state.step % self.every != 0:
            self._run(trainer)

    def state_dict(self) -> dict:
        return {"owed": self.owed}

    def load_state_dict(self, state: dict) -> None:
        self.owed = state.get("owed", False)
