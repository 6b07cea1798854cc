"""The frozen W's storage: fp32, bf16, or int8 / fp8 with one fp32 scale per output row; and its rounding.

    q, scale = quantize(w, "int8")                          # w: fp32 (out, in) → int8 (out, in), fp32 (out,)
    w = dequantize(q, scale, torch.bfloat16)                # q * scale, computed in fp32, then cast
    q, scale = quantize(w, "int8", rounding="stochastic", generator=g)

int8 is symmetric: scale = max|row| / 127, q = round(w / scale) in [-127, 127]. fp8 is float8_e4m3fn: scale =
max|row| / 448 (its largest finite value), q = (w / scale) cast to float8_e4m3fn. fp32 and bf16 carry no scale. The
primitives are torch's own (round, clamp and the float8 cast, which rounds to nearest even); torchao's
quantize_affine rounds to nearest only and its import loads CUDA extensions, so the few lines live here.

Rounding: `nearest` (round half to even), or `stochastic`: x is rounded up to the next representable value with
probability equal to its distance from the one below, divided by their gap, so E[round(x)] = x and an update smaller
than half a step survives in expectation instead of being lost every time. The uniform draws come from the caller's
generator (the restart's: identical on every rank, so replicated copies of W stay bitwise equal).
"""

import torch

BASE_DTYPES = ("auto", "fp32", "bf16", "int8", "fp8")  # relora.base_dtype
MERGE_ROUNDINGS = ("nearest", "stochastic")  # relora.merge_rounding

STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
if hasattr(torch, "float8_e4m3fn"):
    STORAGE["fp8"] = torch.float8_e4m3fn
SCALED = ("int8", "fp8")  # stored with one fp32 scale per row
QMAX = {"int8": 127.0, "fp8": 448.0}
MANTISSA_BITS = {"bf16": 7, "fp8": 3}
MIN_NORMAL_EXPONENT = {"bf16": -126, "fp8": -6}  # below it the gap is that of the subnormals


def check_base_dtype(base_dtype: str) -> None:
    """One-line ValueErrors for a base_dtype that is not one of BASE_DTYPES, or fp8 on a torch without float8."""
    if base_dtype not in BASE_DTYPES:
        raise ValueError(f"relora.base_dtype must be one of {', '.join(BASE_DTYPES)}, got {base_dtype!r}")
    if base_dtype != "auto" and base_dtype not in STORAGE:
        raise ValueError(f"relora.base_dtype {base_dtype}: this torch ({torch.__version__}) has no float8_e4m3fn; "
                         f"use int8 or bf16")


def check_rounding(rounding: str) -> None:
    if rounding not in MERGE_ROUNDINGS:
        raise ValueError(f"relora.merge_rounding must be one of {', '.join(MERGE_ROUNDINGS)}, got {rounding!r}")


def format_of(dtype: torch.dtype) -> str:
    """The base_dtype name of a storage dtype ("fp32", "bf16", "int8", "fp8"); float16 and float64 count as fp32
    (added in fp32 without a rounding of ours: the cast rounds to nearest)."""
    for name, storage in STORAGE.items():
        if storage == dtype:
            return name
    return "fp32"


def uniform_noise(shape, generator: torch.Generator | None, device=None) -> torch.Tensor:
    """The U[0, 1) fp32 draws of a stochastic rounding, made on the generator's device, moved to `device`."""
    return torch.rand(shape, generator=generator, dtype=torch.float32,
                      device=generator.device if generator is not None else device).to(device)


def stochastic_round(x: torch.Tensor, gap: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
    """x rounded to a multiple of `gap` (a power of two, elementwise or one), up where noise < frac(x / gap)."""
    return torch.floor(x / gap + noise) * gap


def _float_gap(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """The gap between the representable values of format `fmt` (bf16, fp8) around each |x| (fp32)."""
    _, exponent = torch.frexp(x)  # x = m * 2**exponent, 0.5 <= |m| < 1: floor(log2|x|) = exponent - 1
    exponent = torch.clamp(exponent - 1, min=MIN_NORMAL_EXPONENT[fmt])
    return torch.ldexp(torch.ones_like(x), exponent - MANTISSA_BITS[fmt])


def round_to(x: torch.Tensor, fmt: str, rounding: str = "nearest", generator: torch.Generator | None = None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 x (already scaled for int8/fp8) as format `fmt`'s storage dtype, rounded as asked; stochastic rounding
    draws x's shape from `generator`, or takes the given `noise` (a slice of a whole tensor's draws)."""
    check_rounding(rounding)
    if fmt == "fp32":
        return x.float()
    if rounding == "stochastic" and noise is None:
        noise = uniform_noise(x.shape, generator, x.device)
    if fmt == "int8":
        x = torch.round(x) if rounding == "nearest" else stochastic_round(x, 1.0, noise)
        return x.clamp_(-QMAX["int8"], QMAX["int8"]).to(torch.int8)
    if fmt == "fp8":
        x = x.clamp(-QMAX["fp8"], QMAX["fp8"])
    if rounding == "stochastic":  # a multiple of the local gap: exactly representable, so the cast is exact
        x = stochastic_round(x, _float_gap(x, fmt), noise)
        if fmt == "fp8":
            x = x.clamp_(-QMAX["fp8"], QMAX["fp8"])
    return x.to(STORAGE[fmt])


def add_rounded_(target: torch.Tensor, delta: torch.Tensor, rounding: str = "nearest",
                 generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """target ← round(target + delta) for a tensor stored in a float format without scales (fp32, bf16: its own
    dtype's), the sum in fp32 and one rounding (`rounding`, draws as round_to takes them); returns the rounding's error,
    target' − (target + delta), in fp32: the part of delta the target did not take."""
    merged = target.float() + delta
    target.copy_(round_to(merged, format_of(target.dtype), rounding, generator, noise))
    return torch.sub(target, merged, out=merged)


def row_scales(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """One fp32 scale per row, max|row| / QMAX (1 for an all-zero row)."""
    amax = w.abs().amax(dim=1).float()
    return torch.where(amax > 0, amax / QMAX[fmt], torch.ones_like(amax))


def quantize(w: torch.Tensor, fmt: str, *, rounding: str = "nearest",
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stored W, per-row fp32 scales or None) of a float W (out, in) in format `fmt`; see the module docstring."""
    w = w.float()
    if fmt not in SCALED:
        return round_to(w, fmt, rounding, generator), None
    scale = row_scales(w, fmt)
    return round_to(w / scale[:, None], fmt, rounding, generator), scale


DEQUANT_CHUNK_BYTES = 16 << 20  # fp32 bytes of the rows dequantized at once into a narrower dtype


def dequantize(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float W of a stored one: q * scale per row, computed in fp32, cast to `dtype`. Into a narrower dtype the
    rows go a chunk at a time, so no fp32 copy of the whole W is ever made: the only new tensor is the result."""
    if scale is None:
        return q.to(dtype)
    scale = scale.float()[:, None]
    if dtype == torch.float32:
        return q.float().mul_(scale)  # one fp32 tensor, scaled in place
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    rows = max(1, DEQUANT_CHUNK_BYTES // (4 * max(1, q.shape[1])))
    for start in range(0, q.shape[0], rows):
        out[start:start + rows].copy_(q[start:start + rows].float().mul_(scale[start:start + rows]))
    return out


def nbytes(q: torch.Tensor, scale: torch.Tensor | None) -> int:
    """Bytes of a stored W with its scales."""
    return q.numel() * q.element_size() + (0 if scale is None else scale.numel() * scale.element_size())
