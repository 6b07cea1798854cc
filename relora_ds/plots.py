"""`loss.png` from a run's metrics.jsonl: training loss (raw + smoothed), eval loss, lr, switch and restarts; and the
LR schedule of a config before any run (`relora-ds schedule`).

    plot_loss("runs/x/metrics.jsonl", "runs/x/loss.png")
    plot_schedule({"restart": [lr, ...], "continue": [lr, ...]}, "lr.png", switch_step=300, restart_steps=[600, 900])

Uses matplotlib's Agg canvas directly (no pyplot, no global state), so it is safe inside training.
"""

import os
from dataclasses import dataclass, field

from relora_ds.files import atomic_write
from relora_ds.metrics import read_records

MAX_RESTART_LABELS = 20  # beyond this many restarts the lines are drawn but not each labelled


@dataclass
class LossCurves:
    """What plot_loss draws, read from metrics.jsonl."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lr_steps: list[int] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    switch_steps: list[int] = field(default_factory=list)
    restart_steps: list[int] = field(default_factory=list)


def read_curves(metrics_jsonl: str) -> LossCurves:
    """The training/eval losses, lr, warm-start switch and restart steps of one metrics.jsonl."""
    if not os.path.isfile(metrics_jsonl):
        raise ValueError(f"{metrics_jsonl}: metrics file not found")
    curves = LossCurves()
    for record in read_records(metrics_jsonl):
        event, step = record.get("event"), record["step"]
        if event is None:
            if isinstance(record.get("loss"), (int, float)):
                curves.steps.append(step)
                curves.losses.append(float(record["loss"]))
            if isinstance(record.get("lr"), (int, float)):
                curves.lr_steps.append(step)
                curves.lrs.append(float(record["lr"]))
        elif event == "eval" and isinstance(record.get("loss"), (int, float)):
            curves.eval_steps.append(step)
            curves.eval_losses.append(float(record["loss"]))
        elif event == "switch":
            curves.switch_steps.append(step)
        elif event == "restart":
            curves.restart_steps.append(step)
    return curves


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_figure(curves: LossCurves, title: str | None = None):
    """A matplotlib Figure of `curves` (not attached to pyplot)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if curves.steps:
        window = max(1, len(curves.losses) // 25)
        if window == 1:
            ax.plot(curves.steps, curves.losses, color="tab:blue", linewidth=1.5, label="train loss")
        else:
            ax.plot(curves.steps, curves.losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss")
            ax.plot(curves.steps, smooth(curves.losses, window), color="tab:blue", linewidth=1.8,
                    label=f"train loss (mean of {window})")
    if curves.eval_steps:
        ax.plot(curves.eval_steps, curves.eval_losses, "o-", color="tab:orange", markersize=5, label="eval loss")
    if not curves.steps and not curves.eval_steps:
        ax.text(0.5, 0.5, "no losses logged yet", transform=ax.transAxes, ha="center", va="center")

    top = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for i, step in enumerate(curves.switch_steps):
        ax.axvline(step, color="tab:green", linestyle="--", linewidth=1.2,
                   label="warm start → ReLoRA" if i == 0 else None)
        ax.text(step, 0.98, " switch", transform=top, color="tab:green", fontsize=8, va="top")
    for i, step in enumerate(curves.restart_steps):
        ax.axvline(step, color="tab:red", linestyle="--", linewidth=0.8, alpha=0.7,
                   label="restart" if i == 0 else None)
        if len(curves.restart_steps) <= MAX_RESTART_LABELS:
            ax.text(step, 0.98, f" R{i + 1}", transform=top, color="tab:red", fontsize=8, va="top")

    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if curves.lr_steps:
        ax_lr = ax.twinx()
        ax_lr.plot(curves.lr_steps, curves.lrs, color="tab:gray", linewidth=0.8, alpha=0.8, label="lr")
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        lr_handles, lr_labels = ax_lr.get_legend_handles_labels()
        handles, labels = handles + lr_handles, labels + lr_labels
    if handles:
        ax.legend(handles, labels, loc="upper right", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_loss(metrics_jsonl: str, out_png: str, title: str | None = None) -> str:
    """Draw `metrics_jsonl` into `out_png` (written atomically) and return `out_png`.

    The default title is the run directory's name.
    """
    curves = read_curves(metrics_jsonl)
    if title is None:
        title = os.path.basename(os.path.dirname(os.path.abspath(metrics_jsonl)))
    return save_figure(loss_figure(curves, title), out_png)


def schedule_figure(series: dict, *, switch_step: int | None = None, restart_steps=(), title: str | None = None):
    """A matplotlib Figure of LR curves, one per label ({label: the LR of steps 0, 1, ...}), with the warm-start
    switch and the restarts marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for label, lrs in series.items():
        ax.plot(range(len(lrs)), lrs, linewidth=1.5, label=label)
    if switch_step:
        ax.axvline(switch_step, color="tab:green", linestyle="--", linewidth=1.2, label="warm start → adapters")
    for i, step in enumerate(restart_steps):
        ax.axvline(step, color="tab:red", linestyle=":", linewidth=0.8, label="restart" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_schedule(series: dict, out_png: str, **kwargs) -> str:
    """Draw `schedule_figure(series, **kwargs)` into `out_png` (atomically) and return `out_png`."""
    return save_figure(schedule_figure(series, **kwargs), out_png)


def save_figure(fig, out_png: str) -> str:
    """Write a (pyplot-free) matplotlib Figure to `out_png` atomically, on an Agg canvas; return `out_png`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return atomic_write(out_png, lambda f: fig.savefig(f, format="png"))


__all__ = ["LossCurves", "read_curves", "smooth", "loss_figure", "plot_loss", "schedule_figure", "plot_schedule",
           "save_figure"]
