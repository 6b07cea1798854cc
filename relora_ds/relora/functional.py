"""The math of a ReLoRA restart, free of modules and of DeepSpeed.

Everything here works on plain tensors so the same functions serve the single-process path
(`ReLoRALinear.merge_and_reinit`) and the sharded path in `relora_ds/engine/restart.py`.
"""

import hashlib
import math

import torch


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
