"""The math of a ReLoRA restart, free of modules and of DeepSpeed.

Everything here works on plain tensors so the same functions serve the single-process path
(`ReLoRALinear.merge_and_reinit`) and the sharded path in `relora_ds/engine/restart.py`.
"""

import hashlib
import math

import torch
import torch.nn.functional as F

from relora_ds.relora import quant


def restart_generator(seed: int, restart_index: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, restart index, layer name).

    Every process builds the same generator from the same triple, so every data-parallel rank
    draws the same A without communication. Python's `hash` is salted per process, so a stable
    digest is used instead.
    """
    digest = hashlib.sha256(f"{seed}:{restart_index}:{name}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def rounding_generator(seed: int, restart_index: int, name: str) -> torch.Generator:
    """The generator of a merge's stochastic rounding of layer `name`'s W (relora.merge_rounding stochastic):
    `restart_generator` of the weight's name, so apart from A's draws and the same on every rank."""
    return restart_generator(seed, restart_index, f"{name}.weight")


def kaiming_uniform_A(rank: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """A fresh fp32 A (rank x in_features), Kaiming-uniform with a=sqrt(5) like nn.Linear.

    bound = 1/sqrt(in_features). Drawn on the CPU in fp32 so the values do not depend on the
    device or the parameter dtype; callers cast when they copy.
    """
    bound = 1.0 / math.sqrt(in_features)
    A = torch.empty(rank, in_features, dtype=torch.float32)
    A.uniform_(-bound, bound, generator=generator)
    return A


def lora_delta(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """s * B @ A in fp32 (out_features x in_features)."""
    return (B.float() @ A.float()).mul_(float(scale))


def lora_delta_rows(A: torch.Tensor, B: torch.Tensor, scale: float, row_start: int, row_end: int) -> torch.Tensor:
    """Rows [row_start, row_end) of s * B @ A in fp32, computed without the other rows.

    Used by the ZeRO-3 shard-local merge, where a rank only owns a slice of W's rows.
    """
    return (B[row_start:row_end].float() @ A.float()).mul_(float(scale))


class _FrozenLinear(torch.autograd.Function):
    """y = x·deq(W)ᵀ (+ b) for a stored W: W dequantized to x's dtype for the forward matmul and again for the
    backward one, each copy dropped as soon as it is used. Only W's stored tensors are kept for the backward (no
    copy), and no dW or db is formed."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias):
        ctx.save_for_backward(weight, weight_scale)
        return F.linear(x, quant.dequantize(weight, weight_scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        weight, weight_scale = ctx.saved_tensors
        dx = dy @ quant.dequantize(weight, weight_scale, dy.dtype) if ctx.needs_input_grad[0] else None
        return dx, None, None, None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x·Wᵀ (+ bias) with W stored as `weight` (fp32, bf16, int8, fp8) and its per-row `weight_scale` (or None);
    W and bias frozen: gradients flow to x only."""
    return _FrozenLinear.apply(x, weight, weight_scale, bias)
