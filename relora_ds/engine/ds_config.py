"""Load, validate and reconcile a DeepSpeed JSON config with the run config.

Who owns what (see ds_configs/README.md): DeepSpeed's JSON owns batch sizes, gradient accumulation,
gradient clipping, precision, ZeRO and the optimizer type and its betas/eps/weight decay. The run config
owns the peak LR and its schedule (the jagged cosine), so a `scheduler` section is refused and an
`optimizer.params.lr` that differs from `schedule.lr` is an error, not a silent override.
"""

import copy
import json
import os


class DSConfigError(ValueError):
    """A DeepSpeed JSON that cannot be used for this run; the message names the file and field."""


SHIPPED_DIR = "ds_configs"


def shipped_dir() -> str:
    """The folder of the shipped DeepSpeed JSONs: inside the installed package (a wheel puts ds_configs/ at
    relora_ds/ds_configs/), or the checkout's top-level ds_configs/ (source tree, editable install)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    installed = os.path.join(package, SHIPPED_DIR)
    return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(package), SHIPPED_DIR)


def shipped_configs() -> list[str]:
    folder = shipped_dir()
    return sorted(name for name in os.listdir(folder) if name.endswith(".json")) if os.path.isdir(folder) else []


def resolve_path(path: str) -> str:
    """`path` itself when it is a file; otherwise a relative `ds_configs/NAME.json` is the shipped NAME.json,
    so configs naming the shipped files work from any directory and from an installed wheel."""
    if os.path.isfile(path) or os.path.isabs(path):
        return path
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) == 2 and parts[0] == SHIPPED_DIR:
        shipped = os.path.join(shipped_dir(), parts[1])
        if os.path.isfile(shipped):
            return shipped
    return path


def load_ds_config(path: str) -> dict:
    """Read a DeepSpeed JSON file (see resolve_path), with one-line errors for a missing or malformed file."""
    path = resolve_path(path)
    if not os.path.isfile(path):
        raise DSConfigError(f"{path}: DeepSpeed config file not found (train.deepspeed_config); shipped configs: "
                            + ", ".join(f"{SHIPPED_DIR}/{name}" for name in shipped_configs()))
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise DSConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(config, dict):
        raise DSConfigError(f"{path}: expected a JSON object at the top level")
    return config


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def offloaded(config: dict) -> tuple[bool, bool]:
    """(the optimizer, the parameters) offloaded to CPU memory by zero_optimization.offload_optimizer /
    offload_param (the latter only on ZeRO-3, where DeepSpeed reads it)."""
    zero = config.get("zero_optimization", {}) or {}

    def to_cpu(key: str) -> bool:
        return str((zero.get(key) or {}).get("device", "none")).lower() == "cpu"

    return to_cpu("offload_optimizer"), to_cpu("offload_param") and zero_stage(config) == 3


def precision(config: dict) -> str:
    """'bf16', 'fp16' or 'fp32'."""
    if config.get("bf16", {}).get("enabled", False):
        return "bf16"
    if config.get("fp16", {}).get("enabled", False):
        return "fp16"
    return "fp32"


def param_dtype(config: dict):
    """The dtype DeepSpeed casts every parameter to when it makes the engine (ZeRO-0/1/2)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision(config)]


def micro_batch_size(config: dict) -> int:
    return int(config["train_micro_batch_size_per_gpu"])


def grad_accum_steps(config: dict) -> int:
    return int(config.get("gradient_accumulation_steps", 1))


def reconcile(config: dict, *, lr: float, world_size: int, max_grad_norm: float | None = None,
              source: str = "deepspeed_config", cuda_available: bool | None = None) -> dict:
    """Check the JSON against the run config and return the dict handed to deepspeed.initialize.

    - `scheduler` sections are refused: the run config owns the LR schedule;
    - `optimizer.params.lr`, when present, must equal `schedule.lr`; otherwise it is filled in;
    - `train_micro_batch_size_per_gpu` is required. With `train_batch_size` and no
      `gradient_accumulation_steps` it is the largest micro batch allowed: see fit_batch; otherwise
      `train_batch_size`, when present, must equal micro batch x gradient accumulation x world size;
    - `train.max_grad_norm`, when set, must agree with `gradient_clipping` (or fills it in);
    - fp16 needs CUDA (`cuda_available`; None asks torch).
    The result is then checked by DeepSpeed's own config class.
    """
    config = copy.deepcopy(config)
    if "scheduler" in config:
        raise DSConfigError(f"{source}: remove the 'scheduler' section; the LR schedule is owned by the run "
                            f"config (schedule.kind, schedule.lr, schedule.warmup_steps, ...)")
    if "optimizer" not in config:
        raise DSConfigError(f"{source}: an 'optimizer' section is required (e.g. {{\"type\": \"AdamW\"}})")
    params = config["optimizer"].setdefault("params", {})
    if "lr" in params and abs(float(params["lr"]) - lr) > 1e-12 * max(1.0, abs(lr)):
        raise DSConfigError(f"{source}: optimizer.params.lr {params['lr']} disagrees with schedule.lr {lr}; "
                            f"remove it from the JSON (the run config owns the LR)")
    params["lr"] = lr
    if "train_micro_batch_size_per_gpu" not in config:
        raise DSConfigError(f"{source}: 'train_micro_batch_size_per_gpu' is required")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if key in config and (not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] < 1):
            raise DSConfigError(f"{source}: {key} must be a positive integer, got {config[key]!r}")
    if "train_batch_size" in config and "gradient_accumulation_steps" not in config:
        config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"] = fit_batch(
            config["train_batch_size"], micro_batch_size(config), world_size, source)
    expected = micro_batch_size(config) * grad_accum_steps(config) * world_size
    if "train_batch_size" in config and config["train_batch_size"] != expected:
        raise DSConfigError(
            f"{source}: train_batch_size {config['train_batch_size']} != train_micro_batch_size_per_gpu "
            f"{micro_batch_size(config)} x gradient_accumulation_steps {grad_accum_steps(config)} x "
            f"world size {world_size} = {expected}")
    if max_grad_norm is not None:
        if "gradient_clipping" in config and float(config["gradient_clipping"]) != float(max_grad_norm):
            raise DSConfigError(f"{source}: gradient_clipping {config['gradient_clipping']} disagrees with "
                                f"train.max_grad_norm {max_grad_norm}; set only one of them")
        config["gradient_clipping"] = float(max_grad_norm)
    if config.get("bf16", {}).get("enabled") and config.get("fp16", {}).get("enabled"):
        raise DSConfigError(f"{source}: bf16 and fp16 are both enabled; choose one")
    if precision(config) == "fp16":
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        if not cuda_available:
            raise DSConfigError(f"{source}: fp16.enabled is true but CUDA is not available (DeepSpeed's fp16 needs "
                                f"a GPU); on CPU use bf16 or fp32 (e.g. {SHIPPED_DIR}/cpu.json)")
    if zero_stage(config) not in (0, 1, 2, 3):
        raise DSConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got {zero_stage(config)}")
    check_with_deepspeed(config, world_size, source)
    return config


def fit_batch(train_batch_size: int, max_micro_batch: int, world_size: int,
              source: str = "deepspeed_config") -> tuple[int, int]:
    """(micro batch, gradient accumulation) giving `train_batch_size` sequences per step on `world_size` ranks:
    the smallest accumulation whose micro batch, train_batch_size / (world size x accumulation), is a whole
    number <= `max_micro_batch`. A world size that does not divide train_batch_size is a DSConfigError."""
    if train_batch_size % world_size:
        working = ", ".join(str(n) for n in range(1, min(train_batch_size, 1024) + 1) if train_batch_size % n == 0)
        raise DSConfigError(f"{source}: train_batch_size {train_batch_size} is not divisible by the world size "
                            f"{world_size} (GPUs over all nodes); GPU counts that work: {working}")
    per_rank = train_batch_size // world_size
    accum = next(a for a in range(1, per_rank + 1) if per_rank % a == 0 and per_rank // a <= max_micro_batch)
    return per_rank // accum, accum


def check_with_deepspeed(config: dict, world_size: int = 1, source: str = "deepspeed_config") -> None:
    """Run DeepSpeed's own validator (unknown keys, types, batch arithmetic) with a one-line error."""
    from deepspeed.runtime.config import DeepSpeedConfig

    checked = copy.deepcopy(config)
    # DeepSpeed's offline check assumes world size 1 unless told otherwise; give it per-rank numbers.
    checked.pop("train_batch_size", None)
    try:
        DeepSpeedConfig(checked)
    except Exception as e:  # pydantic ValidationError, AssertionError: keep DeepSpeed's words, one line
        message = " ".join(str(e).split())
        raise DSConfigError(f"{source}: rejected by DeepSpeed: {message}") from None
