"""Autograd binding of the fused kernels, as torch.library custom ops (so torch.compile sees them).

What ReLoRALinear calls:
- `fused_relora_linear` (ops `relora_ds::relora_linear_fwd` / `_bwd`): the whole layer, S = x·Aᵀ inside;
- `fused_relora_linear_from_s` (ops `relora_ds::relora_linear_from_s_fwd` / `_bwd`): y from x and a
  given S, for LoRA dropout, where torch computes S = dropout(x)·Aᵀ and differentiates it.
The ops have fake implementations for tracing; Triton is imported only when an op actually runs.

Autocast: the wrappers cast like F.linear does. Under torch.autocast for the tensors' device type,
float32/float16/bfloat16 inputs are cast to the autocast dtype before the op (differentiable casts, so
fp32 parameters get fp32 gradients); float64 is left alone. torch.library.register_autocast is not used:
it fixes one cast dtype per device at registration and casts float64 too, while F.linear follows
torch.get_autocast_dtype at call time.
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
                      A: torch.Tensor, B: torch.Tensor, scale: float,
                      weight_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, in) → (y (M, out), S = x·Aᵀ (M, r)); W int8/fp8 with its row scales when weight_scale is given."""
    check_runnable(x)
    from relora_ds.kernels import triton_fused

    return triton_fused.relora_forward(x, weight, bias, A, B, scale, weight_scale)


@relora_linear_fwd.register_fake
def _relora_linear_fwd_fake(x, weight, bias, A, B, scale, weight_scale=None):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], A.shape[0])


@torch.library.custom_op("relora_ds::relora_linear_bwd", mutates_args=())
def relora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor,
                      B: torch.Tensor, S: torch.Tensor, scale: float, needs_dx: bool,
                      weight_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX (empty when not needed), dA, dB); W is frozen, so no dW."""
    check_runnable(dy)
    from relora_ds.kernels import triton_fused

    return triton_fused.relora_backward(dy, x, weight, A, B, S, scale, needs_dx, weight_scale)


@relora_linear_bwd.register_fake
def _relora_linear_bwd_fake(dy, x, weight, A, B, S, scale, needs_dx, weight_scale=None):
    dx = x.new_empty(x.shape) if needs_dx else x.new_empty(0)
    return dx, A.new_empty(A.shape), B.new_empty(B.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, scale, weight_scale = inputs
    ctx.save_for_backward(x, weight, A, B, output[1], weight_scale)
    ctx.scale = scale


def _backward(ctx, dy, _dS_unused):
    x, weight, A, B, S, weight_scale = ctx.saved_tensors
    needs_dx = ctx.needs_input_grad[0]
    dx, dA, dB = relora_linear_bwd(dy, x, weight, A, B, S, ctx.scale, needs_dx, weight_scale)
    return (dx if needs_dx else None), None, None, dA, dB, None, None


torch.library.register_autograd("relora_ds::relora_linear_fwd", _backward, setup_context=_setup_context)


@torch.library.custom_op("relora_ds::relora_linear_from_s_fwd", mutates_args=())
def relora_linear_from_s_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             S: torch.Tensor, B: torch.Tensor, scale: float,
                             weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, in), S (M, r) → y = x·Wᵀ (+ bias) + scale·S·Bᵀ (M, out)."""
    check_runnable(x)
    from relora_ds.kernels import triton_fused

    return triton_fused.relora_forward_from_s(x, weight, bias, S, B, scale, weight_scale)


@relora_linear_from_s_fwd.register_fake
def _relora_linear_from_s_fwd_fake(x, weight, bias, S, B, scale, weight_scale=None):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("relora_ds::relora_linear_from_s_bwd", mutates_args=())
def relora_linear_from_s_bwd(dy: torch.Tensor, weight: torch.Tensor, B: torch.Tensor, S: torch.Tensor,
                             scale: float, needs_dx: bool, weight_scale: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX = dY·W (empty when not needed), dS, dB); no dW, and x is not needed."""
    check_runnable(dy)
    from relora_ds.kernels import triton_fused

    return triton_fused.relora_backward_from_s(dy, weight, B, S, scale, needs_dx, weight_scale)


@relora_linear_from_s_bwd.register_fake
def _relora_linear_from_s_bwd_fake(dy, weight, B, S, scale, needs_dx, weight_scale=None):
    dx = dy.new_empty(dy.shape[0], weight.shape[1]) if needs_dx else dy.new_empty(0)
    return dx, S.new_empty(S.shape), B.new_empty(B.shape)


def _from_s_setup_context(ctx, inputs, output):
    x, weight, bias, S, B, scale, weight_scale = inputs
    ctx.save_for_backward(weight, S, B, weight_scale)
    ctx.scale = scale


def _from_s_backward(ctx, dy):
    weight, S, B, weight_scale = ctx.saved_tensors
    needs_dx = ctx.needs_input_grad[0]
    dx, dS, dB = relora_linear_from_s_bwd(dy, weight, B, S, ctx.scale, needs_dx, weight_scale)
    return (dx if needs_dx else None), None, None, dS, dB, None, None


torch.library.register_autograd("relora_ds::relora_linear_from_s_fwd", _from_s_backward,
                                setup_context=_from_s_setup_context)


_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts (not float64)


def _one_dtype_and_device(where: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors on one device and in one supported dtype, cast to the autocast dtype under autocast."""
    devices = {name: str(t.device) for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"{where}: all tensors must be on one device, got {devices}")
    device_type = next(iter(tensors.values())).device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        tensors = {name: t.to(dtype) if t.dtype in _AUTOCAST_CASTS else t for name, t in tensors.items()}
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) != 1:
        raise ValueError(f"{where}: all tensors must share one dtype, got {dtypes}; mixed float32/float16/"
                         f"bfloat16 tensors are allowed only under torch.autocast('{device_type}'), which "
                         "casts them to the autocast dtype (as F.linear does)")
    dtype = next(iter(dtypes.values()))
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{where}: dtype {dtype} is not supported; allowed: {SUPPORTED_DTYPES}")
    return tensors


def _check_frozen(where: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError(f"{where}: weight and bias must be frozen (requires_grad=False); "
                         "the fused kernels never compute dW or dbias — use the reference in "
                         "relora_ds.kernels.reference")


STORED_DTYPES = (torch.int8,) + ((torch.float8_e4m3fn,) if hasattr(torch, "float8_e4m3fn") else ())


def _check_stored(where: str, weight: torch.Tensor, weight_scale: torch.Tensor | None) -> None:
    """A W with row scales is int8 or fp8, its scales fp32 of shape (out,), on W's device."""
    if weight_scale is None:
        return
    if weight.dtype not in STORED_DTYPES or weight_scale.dtype != torch.float32 or \
            weight_scale.shape != (weight.shape[0],) or weight_scale.device != weight.device:
        raise ValueError(f"{where}: a W with row scales must be {' or '.join(map(str, STORED_DTYPES))} with fp32 "
                         f"scales of shape ({weight.shape[0]},) on its device; got W {weight.dtype}, scales "
                         f"{weight_scale.dtype} {tuple(weight_scale.shape)} on {weight_scale.device}")


def _check_bias(where: str, bias: torch.Tensor | None, out_features: int) -> None:
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"{where}: bias must have shape ({out_features},), got {tuple(bias.shape)}")


def fused_relora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        A: torch.Tensor, B: torch.Tensor, scale: float,
                        weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ (+ bias) + scale·(x·Aᵀ)·Bᵀ with the fused Triton kernels; x is (..., in_features).

    W and bias must be frozen: the kernels never compute their gradients. Gradients flow to x, A, B.
    All tensors share one dtype, except under torch.autocast (see the module docstring), and a W stored as int8 or
    fp8 with its fp32 row scales `weight_scale` (relora.base_dtype), dequantized tile by tile in the kernels.
    """
    where = "fused_relora_linear"
    _check_frozen(where, weight, bias)
    _check_stored(where, weight, weight_scale)
    out_features, in_features = weight.shape
    rank = A.shape[0]
    if x.shape[-1] != in_features or A.shape != (rank, in_features) or B.shape != (out_features, rank):
        raise ValueError(f"{where}: shapes do not fit: x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)} "
                         "(expected x (..., in), weight (out, in), A (r, in), B (out, r))")
    _check_bias(where, bias, out_features)
    t = _one_dtype_and_device(where, {"x": x, "A": A, "B": B} | ({} if weight_scale is not None else {"weight": weight})
                              | ({"bias": bias} if bias is not None else {}))
    y, _ = relora_linear_fwd(t["x"].reshape(-1, in_features), t.get("weight", weight), t.get("bias"), t["A"], t["B"],
                             float(scale), weight_scale)
    return y.reshape(*x.shape[:-1], out_features)


def fused_relora_linear_from_s(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               S: torch.Tensor, B: torch.Tensor, scale: float,
                               weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ (+ bias) + scale·S·Bᵀ for x (..., in) and S (..., r) with the fused Triton kernels.

    For LoRA dropout: the caller computes S = F.linear(dropout(x), A) with torch, so autograd owns dA
    and the dropout's share of dX; this op gives dX = dY·W, dS and dB. W and bias must be frozen.
    All tensors share one dtype, except under torch.autocast (see the module docstring).
    """
    where = "fused_relora_linear_from_s"
    _check_frozen(where, weight, bias)
    _check_stored(where, weight, weight_scale)
    out_features, in_features = weight.shape
    rank = S.shape[-1]
    if x.shape[-1] != in_features or S.shape[:-1] != x.shape[:-1] or B.shape != (out_features, rank):
        raise ValueError(f"{where}: shapes do not fit: x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}, S {tuple(S.shape)}, B {tuple(B.shape)} "
                         "(expected x (..., in), weight (out, in), S (..., r), B (out, r))")
    _check_bias(where, bias, out_features)
    t = _one_dtype_and_device(where, {"x": x, "S": S, "B": B} | ({} if weight_scale is not None else {"weight": weight})
                              | ({"bias": bias} if bias is not None else {}))
    y = relora_linear_from_s_fwd(t["x"].reshape(-1, in_features), t.get("weight", weight), t.get("bias"),
                                 t["S"].reshape(-1, rank), t["B"], float(scale), weight_scale)
    return y.reshape(*x.shape[:-1], out_features)
