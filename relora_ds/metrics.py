"""Run logging: a progress bar or plain lines, `metrics.jsonl` (always), wandb and TensorBoard (optional).

    with Metrics(run_dir, total_steps=1000, rank=rank, every=10) as metrics:
        metrics.log_step(10, loss=4.2, lr=1e-3, grad_norm=0.8, tokens_seen=40960, tokens_per_s=5e3, mfu=0.41,
                         next_restart=200)
        metrics.log_event("restart", 200, restart=1, fraction_zeroed=0.99, merged_norm=1.3, seconds=0.4)

Everything happens on global rank 0; on other ranks every method is a cheap no-op. wandb and
TensorBoard are imported only when enabled. JSONL records: {"step", "time", ...values} for steps,
{"event", "step", "time", ...values} for events. A value the run cannot measure (mfu without a known peak,
grad_norm where DeepSpeed computes none) is left out by the caller, so every sink lacks it alike.

The progress bar (tqdm, on stderr) is drawn only when stderr is a terminal (relora_ds/progress.py decides, and
makes the bar): redirected to a file (SLURM, nohup) its carriage-return redraws would garble the log, so each record
is printed as one plain line on stdout instead, as with `progress=False`. With the bar on a terminal but stdout
redirected, the plain lines go to stdout as well.
"""

import json
import numbers
import os
import uuid
import sys
import time
from dataclasses import dataclass

from relora_ds.fields import setting
from relora_ds.files import atomic_write
from relora_ds.progress import clock, draws_bar, is_terminal, make_bar

EVENTS = ("switch", "restart", "eval", "checkpoint", "resume", "memory", "data", "stop", "plan")
METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"


def _plain(value):
    """A JSON-serialisable version of `value` (tensors and numpy scalars become Python numbers)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def _numeric(values: dict) -> dict:
    """The finite-or-not numbers among `values` (what wandb and TensorBoard can plot)."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# How the plain lines and the progress bar show the step values they know (others: `_fmt`).
_LINE_FORMATS = {"loss": ".4f", "lr": ".3e", "grad_norm": ".4g", "tokens_per_s": ".0f"}
_BAR_FIELDS = (("loss", "loss", ".4f"), ("lr", "lr", ".2e"), ("grad_norm", "gnorm", ".3g"),
               ("tokens_per_s", "tok/s", ".0f"))


def _fmt_step_value(key: str, value) -> str:
    if key == "mfu" and isinstance(value, (int, float)):
        return f"{100 * value:.1f}%"
    if key in _LINE_FORMATS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, _LINE_FORMATS[key])
    return _fmt(value)


def read_records(path: str) -> list[dict]:
    """All records of a metrics.jsonl file, in order. Raises ValueError naming the line on corruption."""
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with an integer 'step'")
            records.append(record)
    return records


class Metrics:
    """The logging sinks of one run. See the module docstring."""

    def __init__(self, run_dir: str, *, total_steps: int, rank: int, every: int = 10, progress: bool = True,
                 wandb: bool = False, wandb_project: str = "relora-ds", wandb_entity: str | None = None,
                 run_name: str | None = None, tags=(), tensorboard: bool = False, config: dict | None = None):
        if every < 1:
            raise ValueError(f"log.every must be >= 1, got {every}")
        if total_steps < 0:
            raise ValueError(f"train.total_steps must be >= 0, got {total_steps}")
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.total_steps = total_steps
        self.every = every
        self.active = rank == 0
        self._start_step = 0
        self._first_record = None  # (step, time) of this process's first step record: the ETA of plain lines
        self._file = None
        self._bar = None
        self._wandb_run = None
        self._tb_writer = None
        if not self.active:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._file = open(self.path, "a")
        self._progress = draws_bar(progress)
        self._lines = not self._progress or not is_terminal(sys.stdout)
        name = run_name or os.path.basename(os.path.normpath(run_dir))
        try:
            if wandb:
                self._wandb_run = self._start_wandb(wandb_project, wandb_entity, name, list(tags), config)
            if tensorboard:
                self._tb_writer = self._start_tensorboard()
        except BaseException:
            self.close()
            raise

    # ---- sinks ---------------------------------------------------------------------------------

    def _start_wandb(self, project, entity, name, tags, config):
        try:
            import wandb
        except ImportError:
            raise ValueError("log.wandb=true needs the wandb package: pip install 'relora-ds[wandb]'") from None
        env_mode = os.environ.get("WANDB_MODE")
        if env_mode == "disabled":
            mode = "disabled"
        elif not os.environ.get("WANDB_API_KEY") or env_mode == "offline":
            mode = "offline"
        else:
            mode = "online"
        # The run id is kept in the run dir so a resumed run continues the same wandb run.
        id_path = os.path.join(self.run_dir, WANDB_ID_FILE)
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:8]  # wandb run ids: short [a-z0-9] strings
            with open(id_path, "w") as f:
                f.write(run_id + "\n")
        return wandb.init(project=project, entity=entity, name=name, tags=tags, config=config or {},
                          dir=self.run_dir, id=run_id, resume="allow", mode=mode)

    def _start_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("log.tensorboard=true needs the tensorboard package: "
                             "pip install 'relora-ds[tensorboard]'") from None
        return SummaryWriter(log_dir=os.path.join(self.run_dir, "tensorboard"))

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def _to_dashboards(self, prefix: str, step: int, values: dict) -> None:
        numbers_only = {f"{prefix}/{k}": v for k, v in _numeric(values).items()}
        if not numbers_only:
            return
        if self._wandb_run is not None:
            self._wandb_run.log(numbers_only, step=step)
        if self._tb_writer is not None:
            for key, value in numbers_only.items():
                self._tb_writer.add_scalar(key, value, step)

    def _print(self, line: str) -> None:
        """One line on stdout, above the progress bar (which lives on stderr)."""
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def _update_bar(self, step: int, values: dict) -> None:
        if self._bar is None:
            self._bar = make_bar(self.total_steps, "train", "step", initial=min(self._start_step, step))
        self._bar.update(max(0, step - self._bar.n))
        postfix = {}
        for key, label, spec in _BAR_FIELDS:
            if isinstance(values.get(key), (int, float)):
                postfix[label] = format(values[key], spec)
        if isinstance(values.get("mfu"), (int, float)):
            postfix["mfu"] = _fmt_step_value("mfu", values["mfu"])
        if values.get("next_restart") is not None:
            postfix["next restart"] = values["next_restart"]
        self._bar.set_postfix(postfix, refresh=True)

    # ---- public API ----------------------------------------------------------------------------

    def step_line(self, step: int, values: dict, now: float | None = None) -> str:
        """The plain line of a step record: "step 20/1000 loss 3.2500 lr 1.000e-03 grad_norm 0.81 ... eta 0:12:05"
        (values in the given order, None left out; mfu in percent; the ETA from this process's records)."""
        now = time.time() if now is None else now
        shown = " ".join(f"{k} {_fmt_step_value(k, v)}" for k, v in values.items() if v is not None)
        line = f"step {step}/{self.total_steps} {shown}".rstrip()
        if self._first_record is None:
            self._first_record = (step, now)
        elif step > self._first_record[0]:
            first_step, first_time = self._first_record
            eta = (now - first_time) / (step - first_step) * max(0, self.total_steps - step)
            line += f" eta {clock(eta)}"
        return line

    def log_step(self, step: int, **values) -> None:
        """Record one training step: loss, lr, grad_norm, tokens_seen, tokens_per_s, mfu, next_restart, ...

        The progress bar moves on every call; the JSONL/wandb/TensorBoard record (and the plain line, when
        there is no bar or stdout is not a terminal) is written when `step` is a multiple of `every` or the last step.
        """
        if not self.active:
            return
        values = {k: _plain(v) for k, v in values.items()}
        if self._progress:
            self._update_bar(step, values)
        if step % self.every != 0 and step != self.total_steps:
            return
        self._write({"step": step, "time": time.time(), **values})
        self._to_dashboards("train", step, values)
        if self._lines:
            self._print(self.step_line(step, values))

    def log_event(self, event: str, step: int, **values) -> None:
        """Record one event (EVENTS) and print it on one line."""
        if event not in EVENTS:
            raise ValueError(f"metrics event must be one of {', '.join(EVENTS)}, got {event!r}")
        if not self.active:
            return
        values = {k: _plain(v) for k, v in values.items()}
        self._write({"event": event, "step": step, "time": time.time(), **values})
        self._to_dashboards(event, step, values)
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        self._print(f"[step {step}] {event} {shown}".rstrip())

    def truncate_after(self, step: int) -> int:
        """Resume at `step`: keep the records written up to that step's checkpoint, drop the rest.

        Records with a larger step are dropped. Records at `step` written after its "checkpoint"
        event (e.g. a restart at that step) are dropped too, since the resumed run writes them again;
        without such an event every record at `step` is kept. The progress bar (and its ETA) starts at
        `step`. Returns the number of records dropped.
        """
        if not self.active:
            return 0
        self._start_step = step
        self._file.close()
        records = read_records(self.path)
        end = len(records)
        for i in range(len(records) - 1, -1, -1):
            if records[i].get("event") == "checkpoint" and records[i]["step"] == step:
                end = i + 1
                break
        kept = [r for r in records[:end] if r["step"] <= step]
        atomic_write(self.path, "".join(json.dumps(record) + "\n" for record in kept))
        self._file = open(self.path, "a")
        return len(records) - len(kept)

    def close(self) -> None:
        """Close the progress bar, the JSONL file and the dashboards. Safe to call twice."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


__all__ = ["Metrics", "EVENTS", "METRICS_FILE", "read_records"]


@dataclass
class LogConfig:
    every: int = setting(10, "steps between log records")
    wandb: bool = setting(False, "log to Weights & Biases (offline without a key)")
    wandb_project: str = setting("relora-ds", "wandb project")
    wandb_entity: str | None = setting(None, "wandb entity")
    run_name: str | None = setting(None, "run name; null: the output dir's name")
    tags: list[str] = setting([], "wandb tags")
    tensorboard: bool = setting(False, "also write TensorBoard events")
    progress: bool = setting(True, "progress bar on rank 0 (one plain line per record when stderr is not a terminal)")
    peak_tflops: float | None = setting(
        None, "peak TFLOP/s per device for the logged MFU; null: the GPU's dense bf16/fp16 peak by name "
              "(relora_ds/hardware.py), no MFU on CPU, on fp32 runs or on an unlisted GPU")
