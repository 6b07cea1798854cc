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
