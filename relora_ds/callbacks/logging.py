"""The step records (loss, lr, grad norm, tokens/s, MFU; with a data.mixture each source's training loss per token
since the previous record, `loss_<name>`) and the event records of the run, into trainer.metrics
(relora_ds/metrics.py: the JSONL file, the progress bar, wandb, TensorBoard); and the run summary's losses."""

import time

from relora_ds.callbacks.base import Callback


class StepLogging(Callback):
    name = "logging"

    def __init__(self, tokens_per_step: int, mfu_per_tokens_per_s: float | None, mean_over_ranks,
                 source_names: list[str] | None = None):
        # MFU = tokens/s per device × full-rank FLOPs per token / peak FLOP/s per device (None: left out of the log)
        self.tokens_per_step, self.mfu_per_tokens_per_s = tokens_per_step, mfu_per_tokens_per_s
        self.mean_over_ranks = mean_over_ranks  # value → mean over the ranks (a collective)
        self.source_names = source_names  # a data.mixture's (the engine sums each one's loss: track_sources)
        self.last_step = self.last_time = None

    def on_start(self, trainer) -> None:
        self.last_step, self.last_time = trainer.state.step, time.perf_counter()

    def post_step(self, trainer, result) -> None:
        if not result.logs:
            return
        step = trainer.state.step
        loss = self.mean_over_ranks(result.loss.item())
        now = time.perf_counter()
        tokens_per_s = self.tokens_per_step * (step - self.last_step) / max(now - self.last_time, 1e-9)
        # Values the run cannot measure (no grad norm from DeepSpeed, no known peak) are left out.
        values = {"loss": loss, "lr": result.lr, "grad_norm": result.grad_norm,
                  "tokens_seen": trainer.state.tokens_seen, "tokens_per_s": tokens_per_s,
                  "mfu": tokens_per_s * self.mfu_per_tokens_per_s if self.mfu_per_tokens_per_s else None}
        if self.source_names:
            values.update(zip([f"loss_{name}" for name in self.source_names], trainer.engine.take_source_losses()))
        trainer.metrics.log_step(step, **{k: v for k, v in values.items() if v is not None},
                                 next_restart=trainer.method.next_event(step))
        trainer.summary["losses"][step] = loss
        if result.grad_norm is not None:
            trainer.summary["grad_norms"][step] = result.grad_norm
        self.last_step, self.last_time = step, now

    def on_event(self, trainer, name: str, fields: dict) -> None:
        trainer.metrics.log_event(name, trainer.state.step, **fields)
        if name == "eval" and "loss" in fields:  # not an evaluation a stop signal abandoned
            trainer.summary["evals"].append({"step": trainer.state.step, **fields})
        elif name == "restart":
            trainer.summary["restarts"].append({"step": trainer.state.step, **fields})
