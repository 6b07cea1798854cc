"""Fused ReLoRA linear kernels (Triton) beside their pure-torch reference.

Importing this package never imports triton: the kernels module loads on the first fused call.

    triton_available() -> bool
    fused_relora_linear(x, weight, bias, A, B, scale) -> Tensor     # Triton, autograd-aware
    reference_relora_linear(x, weight, bias, A, B, scale) -> Tensor # pure torch, the ground truth
    # with LoRA dropout: S = F.linear(dropout(x), A) by torch, then
    fused_relora_linear_from_s(x, weight, bias, S, B, scale) -> Tensor      # x·Wᵀ + b + s·S·Bᵀ, Triton
    reference_relora_linear_from_s(x, weight, bias, S, B, scale) -> Tensor  # pure torch
"""

from relora_ds.kernels.autograd import (
    SUPPORTED_DTYPES,
    fused_relora_linear,
    fused_relora_linear_from_s,
    triton_available,
)
from relora_ds.kernels.reference import reference_relora_linear, reference_relora_linear_from_s

__all__ = ["SUPPORTED_DTYPES", "fused_relora_linear", "fused_relora_linear_from_s", "reference_relora_linear",
           "reference_relora_linear_from_s", "triton_available"]
