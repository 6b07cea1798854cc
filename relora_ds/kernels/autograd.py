"""Autograd binding of the fused kernels, as torch.library custom ops (so torch.compile sees them).

`fused_relora_linear` is what ReLoRALinear calls. The two ops (`relora_ds::relora_linear_fwd`,
`relora_ds::relora_linear_bwd`) have fake implementations for tracing; Triton is imported only
when an op actually runs.
"""

import importlib.util
import os

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    """Triton is importable and can run here: on a CUDA GPU of compute capability >= 8.0
    (Ampere, Hopper and newer), or anywhere under TRITON_INTERPRET=1 (CPU tensors)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if _interpreting():
        return True
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def check_runnable(x: torch.Tensor) -> None:
    """Raise a clear error when the kernels cannot run on x's device."""
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("relora_ds.kernels: triton is not installed (pip install 'relora-ds[kernels]'); "
                           "use kernels='torch'")
    if _interpreting():
        if x.is_cuda:
            raise RuntimeError("relora_ds.kernels: TRITON_INTERPRET=1 runs on CPU tensors only, got a CUDA tensor")
        return
    if not x.is_cuda:
        raise RuntimeError(f"relora_ds.kernels: the Triton kernels need CUDA tensors (got {x.device}); "
                           "set TRITON_INTERPRET=1 to run them on the CPU, or use kernels='torch'")
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        raise RuntimeError("relora_ds.kernels: the Triton kernels need compute capability >= 8.0 (Ampere or newer)")


@torch.library.custom_op("relora_ds::relora_linear_fwd", mutates_args=())
def relora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      A: torch.Tensor, B: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, in) → (y (M, out), S = x·Aᵀ (M, r))."""
    check_runnable(x)
    from relora_ds.kernels import triton_fused

    return triton_fused.relora_forward(x, weight, bias, A, B, scale)


@relora_linear_fwd.register_fake
def _relora_linear_fwd_fake(x, weight, bias, A, B, scale):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], A.shape[0])


@torch.library.custom_op("relora_ds::relora_linear_bwd", mutates_args=())
def relora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor,
                      B: torch.Tensor, S: torch.Tensor, scale: float, needs_dx: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX (empty when not needed), dA, dB); W is frozen, so no dW."""
    check_runnable(dy)
    from relora_ds.kernels import triton_fused

    return triton_fused.relora_backward(dy, x, weight, A, B, S, scale, needs_dx)


@relora_linear_bwd.register_fake
def _relora_linear_bwd_fake(dy, x, weight, A, B, S, scale, needs_dx):
    dx = x.new_empty(x.shape) if needs_dx else x.new_empty(0)
    return dx, A.new_empty(A.shape), B.new_empty(B.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, scale = inputs
    ctx.save_for_backward(x, weight, A, B, output[1])
    ctx.scale = scale


def _backward(ctx, dy, _dS_unused):
    x, weight, A, B, S = ctx.saved_tensors
    needs_dx = ctx.needs_input_grad[0]
    dx, dA, dB = relora_linear_bwd(dy, x, weight, A, B, S, ctx.scale, needs_dx)
    return (dx if needs_dx else None), None, None, dA, dB, None


torch.library.register_autograd("relora_ds::relora_linear_fwd", _backward, setup_context=_setup_context)


def fused_relora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """y = x·Wᵀ (+ bias) + scale·(x·Aᵀ)·Bᵀ with the fused Triton kernels; x is (..., in_features).

    W and bias must be frozen: the kernels never compute their gradients. Gradients flow to x, A, B.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("fused_relora_linear: weight and bias must be frozen (requires_grad=False); "
                         "the fused kernels never compute dW or dbias — use reference_relora_linear")
    out_features, in_features = weight.shape
    rank = A.shape[0]
    if x.shape[-1] != in_features or A.shape != (rank, in_features) or B.shape != (out_features, rank):
        raise ValueError(f"fused_relora_linear: shapes do not fit: x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)} "
                         "(expected x (..., in), weight (out, in), A (r, in), B (out, r))")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"fused_relora_linear: bias must have shape ({out_features},), got {tuple(bias.shape)}")
    tensors = {"x": x, "weight": weight, "A": A, "B": B} | ({"bias": bias} if bias is not None else {})
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) != 1:
        raise ValueError(f"fused_relora_linear: all tensors must share one dtype, got {dtypes}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"fused_relora_linear: dtype {x.dtype} is not supported; allowed: {SUPPORTED_DTYPES}")
    devices = {name: str(t.device) for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"fused_relora_linear: all tensors must be on one device, got {devices}")
    y, _ = relora_linear_fwd(x.reshape(-1, in_features), weight, bias, A, B, float(scale))
    return y.reshape(*x.shape[:-1], out_features)
