"""LoRA: adapters placed once (at the start, or after relora.warm_start_steps full-rank steps), never merged."""

import math

import torch

from relora_ds.methods.base import Method
from relora_ds.relora import functional
from relora_ds.relora.wrap import wrap_from_config, wrap_targets


class LoRA(Method):
    name = "lora"

    @property
    def switch_step(self) -> int:
        return self.cfg.relora.warm_start_steps

    def check(self, model) -> None:
        wrap_targets(model, self.cfg.relora.target_modules, self.cfg.relora.rank)

    def wrap(self, model) -> None:
        wrap_from_config(model, self.cfg.relora, seed=self.cfg.train.seed)

    def next_event(self, state) -> int | None:
        return None if state.wrapped else self.switch_step

    def schedule_segments(self) -> list[tuple[int, dict]]:
        """The switch at S = relora.warm_start_steps starts a fresh optimizer, and the LR starts again there.

        schedule.at_switch restart (the reference code's handover): the full-rank schedule before S, then a new one
        for the N − S low-rank steps, counted from S: warm-up over schedule.switch_warmup_steps (null:
        warmup_steps), then the envelope from the peak. continue: one schedule over the run, re-warmed at S over
        restart_warmup_steps (restart point S) onto the full-rank cosine where it has got to."""
        [(_, full)] = super().schedule_segments()
        s, start = self.cfg.schedule, self.cfg.relora.warm_start_steps
        if s.at_switch == "continue":
            return [(0, {**full, "restart_offset": start})]
        low_rank = {**full, "total_steps": full["total_steps"] - start,
                    "warmup_steps": s.warmup_steps if s.switch_warmup_steps is None else s.switch_warmup_steps}
        return [(0, full), (start, low_rank)] if start > 0 else [(0, low_rank)]

    def lr_multiplier(self, state) -> float:
        """λ(step), times schedule.low_rank_lr_scale once the adapters train."""
        return super().lr_multiplier(state) * (self.cfg.schedule.low_rank_lr_scale if state.wrapped else 1.0)

    def exported_weight(self, weight: torch.Tensor, adapters: dict) -> torch.Tensor:
        """W + s·B·A in fp32 (s = tanh(g) with trainable scaling, else alpha / r), as ReLoRALinear.merged_linear."""
        g = adapters.get("lora_scaling")
        scale = math.tanh(float(g)) if g is not None else float(self.cfg.relora.alpha) / self.cfg.relora.rank
        return weight.add_(functional.lora_delta(adapters["lora_A"], adapters["lora_B"], scale))
