"""Training methods: full-rank, LoRA, ReLoRA; `relora.mode` picks one (methods/base.py: the interface)."""

from relora_ds.config import RunConfig
from relora_ds.methods.base import Method
from relora_ds.methods.full import FullRank
from relora_ds.methods.lora import LoRA
from relora_ds.methods.relora import ReLoRA

METHODS: dict[str, type[Method]] = {"full": FullRank, "lora": LoRA, "relora": ReLoRA}


def from_config(cfg: RunConfig) -> Method:
    """The run's method, holding the resolved config (RunConfig.resolved: relora.merge_every filled in); a one-line
    ValueError for an unknown relora.mode or an impossible LR schedule. config.MODES (relora.mode's choices) names
    the same methods (a unit test keeps them equal)."""
    if cfg.relora.mode not in METHODS:
        raise ValueError(f"relora.mode must be one of {', '.join(METHODS)}, got {cfg.relora.mode!r}")
    return METHODS[cfg.relora.mode](cfg.resolved())
