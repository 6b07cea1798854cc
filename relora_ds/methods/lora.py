"""LoRA: adapters placed once (at the start, or after relora.warm_start_steps full-rank steps), never merged."""

import math
from dataclasses import dataclass

import torch

from relora_ds.engine.restart import ZERO3_MERGES
from relora_ds.fields import setting
from relora_ds.memory import trim_heap
from relora_ds.methods.base import Method
from relora_ds.methods.hooks import WarmStartSwitch
from relora_ds.engine.ds_config import precision, zero_stage
from relora_ds.relora import functional, quant
from relora_ds.relora.layer import KERNELS
from relora_ds.relora.reset import PRUNE_METHODS
from relora_ds.model.families import target_modules_of
from relora_ds.relora.wrap import is_target, wrap, wrap_one, wrap_targets


@dataclass
class ReLoRAConfig:
    rank: int = setting(128, "adapter rank r")
    alpha: float = setting(32.0, "adapter scale numerator: s = alpha / rank")
    dropout: float = setting(0.0, "dropout on the adapter input")
    trainable_scaling: bool = setting(False, "learn the scale: s = tanh(g)")
    target_modules: list[str] | None = setting(None, "names of the nn.Linear modules to wrap; null: the model "
                                                    "family's attention and MLP projections (by model_type)")
    warm_start_steps: int = setting(0, "full-rank steps before wrapping; 0: wrap at step 0")
    warm_start_checkpoint: str | None = setting(None, "full-rank checkpoint to start ReLoRA from")
    reset_every: int = setting(1000, "cycle length C: steps between optimizer reset + LR re-warm-up")
    merge_every: int | None = setting(None, "steps between merges; null: reset_every (smaller: online ReLoRA)")
    optimizer_reset: str = setting("magnitude", "how adapter Adam moments are reset at a restart",
                                  PRUNE_METHODS)
    prune_ratio: float = setting(0.99, "fraction of adapter moments zeroed at a reset")
    pair_moments: bool = setting(True, "also zero exp_avg where the pruned exp_avg_sq is zero (avoids the "
                                      "post-restart loss spike; false: the paper's independent pruning)")
    kernels: str = setting("auto", "adapter forward/backward: fused triton kernels or plain torch", KERNELS)
    zero3_merge: str = setting("shard", "ZeRO-3 merge: into each rank's shard, or on the gathered weight",
                              ZERO3_MERGES)
    base_dtype: str = setting("auto", "storage of the frozen W of wrapped layers: auto = the run's precision; int8 and "
                                      "fp8 (e4m3) with one scale per row, re-quantized at every merge (ZeRO-0/1/2)",
                              quant.BASE_DTYPES)
    merge_rounding: str = setting("nearest", "rounding of W + s·B·A to W's storage at a merge (bf16, int8, fp8 W); "
                                             "stochastic: unbiased, drawn from the restart's generator",
                                  quant.MERGE_ROUNDINGS)
    track_drift: bool = setting(False, "a diagnostic: keep each W's merge rounding errors (an fp32 tensor as large as "
                                       "W) and log drift = ||deq(W) - W_exact|| / ||W_exact|| at every merge (ZeRO-0/1/2)")


class LoRA(Method):
    name = "lora"
    section, Config = "relora", ReLoRAConfig  # the adapters' settings, shared with ReLoRA

    def __init__(self, cfg):
        self._switch = cfg.relora.warm_start_steps
        super().__init__(cfg)

    @classmethod
    def validate(cls, cfg) -> list[str]:
        r, s, t = cfg.relora, cfg.schedule, cfg.train
        errors = []
        if r.warm_start_steps >= t.total_steps:
            errors.append(f"relora.warm_start_steps ({r.warm_start_steps}) must be < train.total_steps "
                          f"({t.total_steps})")
        if 0 < r.warm_start_steps < s.warmup_steps:
            errors.append(f"relora.warm_start_steps ({r.warm_start_steps}) must be 0 or >= schedule.warmup_steps "
                          f"({s.warmup_steps}): the first warm-up ends before the switch to adapters")
        # schedule.at_switch restart: the low-rank phase has its own schedule, of N - S steps with its own warm-up.
        switch_warmup = s.warmup_steps if s.switch_warmup_steps is None else s.switch_warmup_steps
        if s.at_switch == "restart" and (r.warm_start_steps > 0 or s.switch_warmup_steps is not None) and \
                0 <= r.warm_start_steps < t.total_steps <= r.warm_start_steps + switch_warmup:
            errors.append(f"train.total_steps - relora.warm_start_steps ({t.total_steps - r.warm_start_steps}) must "
                          f"be > {cls.first_warmup(cfg)[0]} ({switch_warmup}): with schedule.at_switch restart the "
                          f"low-rank steps start with that warm-up")
        if r.base_dtype in ("fp32", "bf16") and r.kernels == "triton":
            errors.append(f"relora.kernels triton: the fused kernels take W in the run's dtype or as int8/fp8; with "
                          f"relora.base_dtype {r.base_dtype} use kernels auto or torch")
        return errors

    @staticmethod
    def first_warmup(cfg) -> tuple[str, int]:
        """(the setting, its steps) of the warm-up that starts the low-rank phase's schedule."""
        s = cfg.schedule
        if s.at_switch == "restart":
            if s.switch_warmup_steps is not None:
                return "schedule.switch_warmup_steps", s.switch_warmup_steps
        return "schedule.warmup_steps", s.warmup_steps

    @classmethod
    def compare_variants(cls) -> list:
        return [("lora", "LoRA: adapters from step 0, never merged",
                 lambda base: {"method": "lora", "relora.warm_start_steps": 0}),
                ("lora_warm", "LoRA after the full-rank warm start, never merged", lambda base: {"method": "lora"})]

    @property
    def switch_step(self) -> int:
        return self._switch

    def switch_due(self, step: int) -> bool:
        """Whether the adapters are placed before this step (the caller checks that they are not yet)."""
        return step >= self._switch

    def adopt_warm_start(self, step: int) -> None:
        """The switch is at the saved checkpoint's step: relora.warm_start_steps 0 takes it, another value must
        agree with it."""
        wanted = self.cfg.relora.warm_start_steps
        if wanted not in (0, step):
            raise ValueError(f"relora.warm_start_steps {wanted} disagrees with the warm-start checkpoint's step "
                             f"{step} (relora.warm_start_checkpoint); set it to 0 or {step}")
        self._switch = step
        self.cfg.relora.warm_start_steps = step  # this method's own copy of the config (methods.from_config)
        self._segments = self.schedule_segments()
        self.__dict__.pop("lr_lambda", None)

    def check_ds_config(self, ds_config: dict) -> None:
        """A stored W (relora.base_dtype other than auto) is replicated: ZeRO-0/1/2 in fp32 or bf16."""
        base_dtype = self.cfg.relora.base_dtype
        quant.check_base_dtype(base_dtype)
        if self.cfg.relora.track_drift and zero_stage(ds_config) == 3:
            raise ValueError("relora.track_drift: needs zero_optimization.stage 0, 1 or 2, got 3 (the residual is kept "
                             "beside a whole W)")
        if base_dtype == "auto":
            return
        if zero_stage(ds_config) == 3:
            raise ValueError(f"relora.base_dtype {base_dtype}: needs zero_optimization.stage 0, 1 or 2, got 3; a stored "
                             f"W is replicated, while ZeRO-3 already shards W (2/N bytes per weight on N ranks in bf16, "
                             f"no more than int8's 1 from N = 2); use base_dtype auto on ZeRO-3")
        if precision(ds_config) == "fp16":
            raise ValueError(f"relora.base_dtype {base_dtype}: runs in fp32 or bf16; fp16 is enabled in the DeepSpeed "
                             f"JSON (a dequantized row may overflow fp16)")

    def check(self, model) -> None:
        r = self.cfg.relora
        wrap_targets(model, target_modules_of(model, r.target_modules), r.rank)

    def wrap(self, model) -> None:
        """Place the adapters (relora.*: rank, alpha, dropout, scaling, kernels) on relora.target_modules, null: the
        model family's projections (model/families.py)."""
        r = self.cfg.relora
        wrap(model, rank=r.rank, alpha=r.alpha, target_modules=target_modules_of(model, r.target_modules),
             dropout=r.dropout, trainable_scaling=r.trainable_scaling, kernels=r.kernels, seed=self.cfg.train.seed,
             base_dtype=r.base_dtype, track_drift=r.track_drift)

    @property
    def stores_weight(self) -> bool:
        return self.cfg.relora.base_dtype != "auto"

    def wrap_while_building(self, param_dtype: torch.dtype):
        """Each target is wrapped as soon as the build has initialised it, when that saves memory. With a stored W
        (relora.base_dtype other than auto) W is stored at once: a 7b int8 build never holds the bf16 or fp32 W of
        the whole model. With auto in a bf16 or fp16 run the wrapped layer's parameters are cast to param_dtype at
        once, as DeepSpeed casts every parameter when it makes the engine (the same rounding): the build holds one
        layer's fp32 W, not the whole model's. An fp32 run with auto wraps after the build (None)."""
        r = self.cfg.relora
        if not self.stores_weight and param_dtype == torch.float32:
            return None
        settings = dict(rank=r.rank, alpha=r.alpha, dropout=r.dropout, trainable_scaling=r.trainable_scaling,
                        kernels=r.kernels, seed=self.cfg.train.seed, base_dtype=r.base_dtype,
                        track_drift=r.track_drift)

        def per_module(model, name, module) -> None:
            if is_target(name, module, target_modules_of(model, r.target_modules)):
                wrap_one(model, name, **settings)
                for parameter in model.get_submodule(name).parameters():
                    parameter.data = parameter.data.to(param_dtype)
                trim_heap()  # the Linear's W, freed: glibc keeps freed heap pages resident otherwise

        return per_module

    def callbacks(self) -> list:
        return [WarmStartSwitch(self)]

    def next_event(self, step: int) -> int | None:
        return self._switch if step < self._switch else None

    def schedule_segments(self) -> list[tuple[int, dict]]:
        """The switch at S = relora.warm_start_steps starts a fresh optimizer, and the LR starts again there.

        schedule.at_switch restart (the reference code's handover): the full-rank schedule before S, then a new one
        for the N − S low-rank steps, counted from S: warm-up over schedule.switch_warmup_steps (null:
        warmup_steps), then the envelope from the peak. continue: one schedule over the run, re-warmed at S over
        restart_warmup_steps (restart point S) onto the full-rank cosine where it has got to."""
        [(_, full)] = super().schedule_segments()
        s, start = self.cfg.schedule, self._switch
        if s.at_switch == "continue":
            return [(0, {**full, "restart_offset": start})]
        low_rank = {**full, "total_steps": full["total_steps"] - start,
                    "warmup_steps": s.warmup_steps if s.switch_warmup_steps is None else s.switch_warmup_steps}
        return [(0, full), (start, low_rank)] if start > 0 else [(0, low_rank)]

    def lr_multiplier(self, step: int) -> float:
        """λ(step), times schedule.low_rank_lr_scale once the adapters train (from the switch step on)."""
        return super().lr_multiplier(step) * (self.cfg.schedule.low_rank_lr_scale if step >= self._switch else 1.0)

    def exported_weight(self, weight: torch.Tensor, adapters: dict) -> torch.Tensor:
        """W + s·B·A in fp32 (s = tanh(g) with trainable scaling, else alpha / r), as ReLoRALinear.merged_linear."""
        g = adapters.get("lora_scaling")
        scale = math.tanh(float(g)) if g is not None else float(self.cfg.relora.alpha) / self.cfg.relora.rank
        return weight.add_(functional.lora_delta(adapters["lora_A"], adapters["lora_B"], scale))
