"""The pure-torch ReLoRA linear: the ground truth every fused kernel is tested against."""

import torch
import torch.nn.functional as F


def reference_relora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """y = x·Wᵀ (+ bias) + scale·(x·Aᵀ)·Bᵀ for x of shape (..., in_features).

    W is (out, in), A is (r, in), B is (out, r). Autograd gives dX, dA, dB (and dW only if the
    caller left W trainable, which ReLoRA never does).
    """
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, A), B)


def reference_relora_linear_from_s(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                   S: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """y = x·Wᵀ (+ bias) + scale·S·Bᵀ for x (..., in) and a given S (..., r): the ground truth of
    `fused_relora_linear_from_s`. With LoRA dropout S = F.linear(dropout(x), A)."""
    return F.linear(x, weight, bias) + scale * F.linear(S, B)
