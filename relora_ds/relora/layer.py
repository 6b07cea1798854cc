"""ReLoRALinear: frozen W (+ bias) plus a trainable low-rank path s * B @ A."""

import math

import torch
import torch.nn.functional as F
from torch import nn

KERNELS = ("auto", "triton", "torch")  # relora.kernels
from relora_ds.relora import functional



class ReLoRALinear(nn.Module):
    """y = x W^T (+ b) + s * B(A(dropout(x))), W and b frozen, A (r x in) and B (out x r) trainable.

    Parameter names: `weight` and `bias` keep nn.Linear's names (so unwrapping and checkpoints stay
    simple), `lora_A`, `lora_B`, and `lora_scaling` (only with trainable scaling, s = tanh(g)).
    A is Kaiming-uniform and B is zero at construction, so the output equals the wrapped Linear's;
    B gets a gradient on the first step and A from the second (never both zero: the authors' bug).
    Built directly, W gets nn.Linear's init from a seeded generator (`init_base`); `from_linear` shares
    the wrapped Linear's tensors instead.
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
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"relora.rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"relora.dropout must be in [0, 1), got {dropout}")
        if kernels not in KERNELS:
            raise ValueError(f"relora.kernels must be one of {KERNELS}, got {kernels!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.alpha = float(alpha)
        self.kernels = kernels
        shape = (out_features, in_features) if init_base else (0,)  # from_linear brings its own W and bias
        self.weight = nn.Parameter(torch.empty(shape, **factory), requires_grad=False)
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

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                    trainable_scaling: bool = False, kernels: str = "auto",
                    generator: torch.Generator | None = None) -> "ReLoRALinear":
        """Wrap an existing nn.Linear, taking over its weight and bias Parameters themselves (frozen).

        The same Parameter objects, not copies: no second W is allocated, and a ZeRO-3-partitioned W keeps
        its partition (its shape is then (0,): the sizes come from in_features/out_features).
        """
        dtype = getattr(linear.weight, "ds_tensor", linear.weight).dtype
        module = cls(linear.in_features, linear.out_features, rank, alpha, dropout,
                     bias=linear.bias is not None, trainable_scaling=trainable_scaling, kernels=kernels,
                     device=linear.weight.device, dtype=dtype, init_base=False)
        module.weight = linear.weight.requires_grad_(False)
        module.bias = linear.bias.requires_grad_(False) if linear.bias is not None else None
        if generator is not None:
            with torch.no_grad():
                module.lora_A.copy_(functional.kaiming_uniform_A(rank, linear.in_features, generator))
        return module

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
                return fused_relora_linear_from_s(x, self.weight, self.bias, S, self.lora_B, float(self.scale))
            return fused_relora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, float(self.scale))
        base = F.linear(x, self.weight, self.bias)
        low_rank = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return base + self.scale * low_rank

    @torch.no_grad()
    def merge_and_reinit(self, generator: torch.Generator) -> float:
        """Single-process restart: W += s*B*A (fp32, added once), A <- Kaiming(generator), B <- 0.

        Returns the Frobenius norm of the merged update. Under DeepSpeed use
        `relora_ds.engine.restart` instead: it also updates the fp32 masters and sharded weights.
        """
        delta = functional.lora_delta(self.lora_A, self.lora_B, float(self.scale))
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        self.lora_A.copy_(functional.kaiming_uniform_A(self.rank, self.in_features, generator))
        self.lora_B.zero_()
        return float(delta.norm())

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear with W + s*B*A (used by unwrap/export)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        delta = functional.lora_delta(self.lora_A, self.lora_B, float(self.scale))
        linear.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, bias={self.bias is not None}, kernels={self.kernels}")
