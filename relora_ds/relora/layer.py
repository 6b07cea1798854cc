"""ReLoRALinear: frozen W (+ bias) plus a trainable low-rank path s * B @ A; W stored as the run computes, or in its
own dtype (relora.base_dtype: fp32, bf16, int8 or fp8 with per-row scales, relora/quant.py)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from relora_ds.relora import functional, quant

KERNELS = ("auto", "triton", "torch")  # relora.kernels


class ReLoRALinear(nn.Module):
    """y = x W^T (+ b) + s * B(A(dropout(x))), W and b frozen, A (r x in) and B (out x r) trainable.

    Parameter names: `weight` and `bias` keep nn.Linear's names (so unwrapping and checkpoints stay
    simple), `lora_A`, `lora_B`, and `lora_scaling` (only with trainable scaling, s = tanh(g)).
    A is Kaiming-uniform and B is zero at construction, so the output equals the wrapped Linear's;
    B gets a gradient on the first step and A from the second (never both zero: the authors' bug).
    Built directly, W gets nn.Linear's init from a seeded generator (`init_base`); `from_linear` shares
    the wrapped Linear's tensors instead.

    base_dtype "auto": W is a frozen Parameter in the model's dtype (DeepSpeed casts it with the run). Any other
    (relora.base_dtype): W is a buffer `weight` of that storage dtype, with a buffer `weight_scale` (fp32, one per
    row) for int8 and fp8; DeepSpeed casts parameters only, so W keeps its dtype, stays out of the optimizer and is
    saved in the module's state dict. The forward dequantizes it (`functional.frozen_linear`): no dW, and no
    dequantized copy outlives the matmul that uses it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        bias: bool = False,
        trainable_scaling: bool = False,
        kernels: str = "auto",
        device=None,
        dtype=None,
        init_base: bool = True,
        base_dtype: str = "auto",
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"relora.rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"relora.dropout must be in [0, 1), got {dropout}")
        if kernels not in KERNELS:
            raise ValueError(f"relora.kernels must be one of {KERNELS}, got {kernels!r}")
        quant.check_base_dtype(base_dtype)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.alpha = float(alpha)
        self.kernels = kernels
        self.base_dtype = base_dtype
        shape = (out_features, in_features) if init_base else (0,)  # from_linear brings its own W and bias
        self.weight = nn.Parameter(torch.empty(shape, **factory), requires_grad=False)
        self.register_buffer("weight_scale", None)
        self.bias = nn.Parameter(torch.zeros(out_features if init_base else 0, **factory),
                                 requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))
        if trainable_scaling:
            # s = tanh(g); g starts at atanh(min(alpha/r, 0.99)) so s starts near the fixed value.
            g0 = math.atanh(min(self.alpha / rank, 0.99))
            self.lora_scaling = nn.Parameter(torch.tensor([g0], **factory))
        else:
            self.lora_scaling = None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            self.lora_A.copy_(functional.kaiming_uniform_A(rank, in_features, torch.Generator().manual_seed(0)))
            if init_base:  # nn.Linear's init, from its own seeded generator (the global RNG is left alone)
                weight = torch.empty(out_features, in_features, dtype=torch.float32)
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=torch.Generator().manual_seed(1))
                self.weight.copy_(weight)
                if base_dtype != "auto":
                    self.store_weight(weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                    trainable_scaling: bool = False, kernels: str = "auto",
                    generator: torch.Generator | None = None, base_dtype: str = "auto") -> "ReLoRALinear":
        """Wrap an existing nn.Linear, taking over its weight and bias Parameters themselves (frozen).

        The same Parameter objects, not copies: no second W is allocated, and a ZeRO-3-partitioned W keeps
        its partition (its shape is then (0,): the sizes come from in_features/out_features). With a
        base_dtype other than auto, W is stored in it (rounded to nearest) and the Linear's W is released.
        """
        dtype = getattr(linear.weight, "ds_tensor", linear.weight).dtype
        if base_dtype != "auto" and hasattr(linear.weight, "ds_tensor"):
            raise ValueError(f"relora.base_dtype {base_dtype}: W is ZeRO-3-partitioned; a stored W is replicated "
                             f"(ZeRO-0/1/2), use base_dtype auto on ZeRO-3")
        module = cls(linear.in_features, linear.out_features, rank, alpha, dropout,
                     bias=linear.bias is not None, trainable_scaling=trainable_scaling, kernels=kernels,
                     device=linear.weight.device, dtype=dtype, init_base=False, base_dtype=base_dtype)
        if base_dtype == "auto":
            module.weight = linear.weight.requires_grad_(False)
        else:
            module.store_weight(linear.weight.detach())
            linear.weight = None
        module.bias = linear.bias.requires_grad_(False) if linear.bias is not None else None
        if generator is not None:
            with torch.no_grad():
                module.lora_A.copy_(functional.kaiming_uniform_A(rank, linear.in_features, generator))
        return module

    @property
    def stored(self) -> bool:
        """W is a buffer in its own storage dtype (base_dtype other than auto), not a Parameter."""
        return self.base_dtype != "auto"

    @torch.no_grad()
    def store_weight(self, weight: torch.Tensor) -> None:
        """W ← `weight` (float, out x in) stored in base_dtype (rounded to nearest): the `weight` / `weight_scale`
        buffers, replaced (W may have been the Parameter of the wrapped Linear)."""
        q, scale = quant.quantize(weight, self.base_dtype)
        device = weight.device
        if "weight" in self._parameters:
            del self._parameters["weight"]
        self.register_buffer("weight", q.to(device))
        self.register_buffer("weight_scale", None if scale is None else scale.to(device))

    def track_merge_residual(self) -> None:
        """relora.track_drift: a buffer `merge_residual` (fp32, out x in, zeros) for the sum of the merges' rounding
        errors, saved and restored with the module like W."""
        if getattr(self, "merge_residual", None) is None:
            self.register_buffer("merge_residual", torch.zeros(self.out_features, self.in_features,
                                                               device=self.weight.device))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W as a float tensor of `dtype` (a new tensor for a stored W; the Parameter cast for auto)."""
        return quant.dequantize(self.weight, self.weight_scale, dtype)

    def weight_bytes(self) -> int:
        """Bytes this layer's W takes where it is held (its scales included; ZeRO-3: this rank's partition)."""
        weight = getattr(self.weight, "ds_tensor", self.weight)
        return quant.nbytes(weight, self.weight_scale)

    @torch.no_grad()
    def merge_delta_(self, delta: torch.Tensor, rounding: str = "nearest",
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """W ← round(W + delta), the sum in fp32, one rounding to W's storage (`rounding`: nearest or stochastic,
        its draws from `generator`; a stored int8/fp8 W gets the new rows' scales). Returns the rounding's error,
        deq(W') − (deq(W) + delta), in fp32 (the part of delta the stored W did not take)."""
        if not self.stored:
            return quant.add_rounded_(self.weight, delta.to(self.weight.device), rounding, generator)
        merged = self.dequantized_weight() + delta.to(self.weight.device)
        q, scale = quant.quantize(merged, self.base_dtype, rounding=rounding, generator=generator)
        self.weight.copy_(q)
        if scale is not None:
            self.weight_scale.copy_(scale)
        del q, scale
        return torch.sub(self.dequantized_weight(), merged, out=merged)  # (a stored fp32 W dequantizes to itself)

    @property
    def scale(self) -> torch.Tensor | float:
        """s: alpha / r, or tanh(g) with trainable scaling."""
        if self.lora_scaling is not None:
            return torch.tanh(self.lora_scaling)
        return self.alpha / self.rank

    def use_triton(self, x: torch.Tensor) -> bool:
        """Whether this forward takes a fused Triton path (the scale must be fixed). With dropout active
        (training) it is `fused_relora_linear_from_s`, S = dropout(x)·Aᵀ by torch; else `fused_relora_linear`."""
        if self.kernels == "torch" or self.lora_scaling is not None:
            return False
        if self.stored and self.weight_scale is None:
            return False  # a stored fp32/bf16 W takes the torch path; int8/fp8 are dequantized in the kernels
        if self.kernels == "triton":
            return True
        if not x.is_cuda:  # auto: Triton on CUDA when importable, torch otherwise
            return False
        from relora_ds.kernels import triton_available

        return triton_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropout_active = isinstance(self.dropout, nn.Dropout) and self.training
        if self.use_triton(x):
            from relora_ds.kernels import fused_relora_linear, fused_relora_linear_from_s

            if dropout_active:
                # The mask is drawn here exactly as on the torch path below (same call, same RNG order).
                S = F.linear(self.dropout(x), self.lora_A)
                return fused_relora_linear_from_s(x, self.weight, self.bias, S, self.lora_B, float(self.scale),
                                                  self.weight_scale)
            return fused_relora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, float(self.scale),
                                       self.weight_scale)
        if self.stored:
            base = functional.frozen_linear(x, self.weight, self.weight_scale, self.bias)
        else:
            base = F.linear(x, self.weight, self.bias)
        low_rank = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return base + self.scale * low_rank

    @torch.no_grad()
    def merge_and_reinit(self, generator: torch.Generator, rounding: str = "nearest",
                         rounding_generator: torch.Generator | None = None) -> float:
        """Single-process restart: W += s*B*A (fp32, added once, rounded to W's storage as `rounding` says, with
        draws from `rounding_generator`), A <- Kaiming(generator), B <- 0.

        Returns the Frobenius norm of the merged update. Under DeepSpeed use
        `relora_ds.engine.restart` instead: it also updates the fp32 masters and sharded weights.
        """
        delta = functional.lora_delta(self.lora_A, self.lora_B, float(self.scale))
        self.merge_delta_(delta, rounding, rounding_generator)
        self.lora_A.copy_(functional.kaiming_uniform_A(self.rank, self.in_features, generator))
        self.lora_B.zero_()
        return float(delta.norm())

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear with W + s*B*A (used by unwrap/export), in W's dtype (a stored int8/fp8 W: its
        adapters' dtype)."""
        dtype = self.lora_A.dtype if self.weight_scale is not None else self.weight.dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=dtype)
        delta = functional.lora_delta(self.lora_A, self.lora_B, float(self.scale))
        linear.weight.copy_((self.dequantized_weight() + delta).to(dtype))
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, bias={self.bias is not None}, kernels={self.kernels}"
                + (f", base_dtype={self.base_dtype}" if self.stored else ""))
