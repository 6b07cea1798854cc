"""loss.png in the run directory, redrawn after each evaluation and at the end (rank 0)."""

import os

from relora_ds import dist
from relora_ds.callbacks.base import Callback
from relora_ds.plots import plot_loss


class LossPlot(Callback):
    name = "plots"

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def draw(self) -> None:
        if dist.is_rank_zero():
            plot_loss(os.path.join(self.output_dir, "metrics.jsonl"), os.path.join(self.output_dir, "loss.png"))

    def on_event(self, trainer, name: str, fields: dict) -> None:
        if name == "eval":
            self.draw()

    def on_end(self, trainer) -> None:
        self.draw()

    on_stop = on_end
