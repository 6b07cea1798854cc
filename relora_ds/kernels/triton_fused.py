"""Triton kernels for the ReLoRA linear with a frozen W (no dW is ever computed).

One GEMM kernel serves every product; its epilogue can add a bias and a low-rank term:

    C = alpha·X·Y (+ bias) (+ beta·P·Q)        X (M, K), Y (K, N), P (M, R), Q (R, N), any strides

Forward (x: (M, in), W: (out, in), A: (r, in), B: (out, r)):
    S = x·Aᵀ                      rank-r GEMM, saved for backward (M × r)
    y = x·Wᵀ + bias + s·S·Bᵀ       one GEMM, low-rank term in the epilogue
Backward:
    dS = s·dY·B                   rank-r GEMM (M × r)
    dB = s·dYᵀ·S                  reduction over tokens
    dA = dSᵀ·x                    reduction over tokens
A W stored as int8 or fp8 with one scale per row (relora.base_dtype) is dequantized tile by tile: in the forward
y = x·Wᵀ its row scales are W's output columns, so the int8/fp8 tile is cast to x's dtype (exactly: every int8
and e4m3 value is a bf16 value) and the accumulator's columns are scaled in the epilogue; in dX = dY·W they scale
W's rows, the reduction dimension, so each loaded tile is multiplied by its rows' scales in fp32 before the dot.
No dequantized W is ever written to memory.
The four rank-r products have small outputs and long reductions: on a GPU they split the reduction
across programs (fp32 workspace, summed afterwards) when the output has too few tiles for the SMs.
    dX = dY·W + dS·A              one GEMM, low-rank term in the epilogue

With LoRA dropout the low-rank input is dropout(x), not x, so S comes from the caller (torch computes
S = dropout(x)·Aᵀ and owns dA and the dropout's share of dX). The "from S" functions below are the
same GEMMs without that part: y as above, and backward dS, dB as above and dX_base = dY·W (plain GEMM).
dY is read by the dS and dB kernels separately: a single-read kernel would need atomic adds of an
(out × r) tile per token tile, which moves more bytes than the second read of dY.

Accumulation is fp32 (fp64 for fp64 inputs). fp32 inputs use TF32 only when
torch.backends.cuda.matmul.allow_tf32 is set, like torch. The default path is a plain `tl.dot`,
which Triton lowers to mma on Ampere (sm80) and wgmma on Hopper (sm90). Autotuning runs over a
few configs on GPU and uses a single config under TRITON_INTERPRET=1 (the interpreter cannot
autotune over several configs).
"""

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if INTERPRET:
    # Large tiles: the interpreter's cost is per program and per op, not per element.
    _CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4})]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
    ]

@triton.autotune(configs=_CONFIGS, key=["M", "N", "K_PER_SPLIT", "R", "HAS_LOWRANK", "IS_FP64", "SCALE_AXIS"])
@triton.jit
def _gemm_lowrank_kernel(
    X, Y, C, P, Q, BIAS, SCALE,
    M, N, K, R, K_PER_SPLIT,
    stride_xm, stride_xk, stride_yk, stride_yn,
    stride_cs, stride_cm, stride_cn,
    stride_pm, stride_pr, stride_qr, stride_qn,
    alpha, beta,
    HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, IS_FP64: tl.constexpr, SCALE_AXIS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share the same column tiles of Y while in L2.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if IS_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # Main loop over this split's share of the reduction dimension.
    k_start = split * K_PER_SPLIT
    k_end = min(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        y = tl.load(Y + offs_k[:, None] * stride_yk + offs_n[None, :] * stride_yn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # 0.0: the interpreter cannot cast int 0 to fp8
        if SCALE_AXIS == 1:  # Y = q[k, n] * scale[k]: dequantize the tile (in fp32) before the dot
            y = y.to(tl.float32) * tl.load(SCALE + offs_k, mask=mask_k, other=0.0)[:, None]
        elif SCALE_AXIS == 2:  # int8/fp8 values are exact in fp32 and in x's dtype
            y = y.to(tl.float32)
        acc = tl.dot(x, y.to(x.dtype), acc, input_precision=DOT_PRECISION)
    if SCALE_AXIS == 2:  # Y = q[k, n] * scale[n]: scale the accumulator's columns
        acc = acc * tl.load(SCALE + offs_n, mask=mask_n, other=0.0)[None, :]
    acc = acc * alpha

    # Epilogue: the low-rank term beta·P·Q, rank tiles padded to BLOCK_R (>= 16) and masked.
    if HAS_LOWRANK:
        if IS_FP64:
            low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
        else:
            low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            p = tl.load(P + offs_m[:, None] * stride_pm + offs_r[None, :] * stride_pr,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            q = tl.load(Q + offs_r[:, None] * stride_qr + offs_n[None, :] * stride_qn,
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            low = tl.dot(p, q, low, input_precision=DOT_PRECISION)
        acc = acc + beta * low
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(acc.dtype)[None, :]

    c_ptrs = C + split * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _rank_block(R: int) -> int:
    """Rank tile: a power of two, at least 16 (NVIDIA's dot needs K >= 16), at most 64."""
    return min(64, max(16, triton.next_power_of_2(max(R, 1))))


def _launch(X, Y, C, *, M, N, K, alpha, split_k=1, k_per_split=None, bias=None, P=None, Q=None, beta=0.0,
            y_scale=None, scale_axis=0):
    """Run the kernel; C is (M, N), or (split_k, M, N) when split_k > 1. y_scale: Y's fp32 scales along its rows
    (scale_axis 1, the reduction dimension) or its columns (scale_axis 2)."""
    has_lowrank = P is not None
    R = P.shape[1] if has_lowrank else 0
    if k_per_split is None:
        k_per_split = K
    dummy = X  # never read: the constexpr flags switch the loads off
    P_, Q_ = (P, Q) if has_lowrank else (dummy, dummy)
    stride_cs = C.stride(0) if C.dim() == 3 else 0
    stride_cm, stride_cn = C.stride(-2), C.stride(-1)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split_k)

    _gemm_lowrank_kernel[grid](
        X, Y, C, P_, Q_, bias if bias is not None else dummy, y_scale if y_scale is not None else dummy,
        M, N, K, R, k_per_split,
        X.stride(0), X.stride(1), Y.stride(0), Y.stride(1),
        stride_cs, stride_cm, stride_cn,
        P_.stride(0) if has_lowrank else 0, P_.stride(1) if has_lowrank else 0,
        Q_.stride(0) if has_lowrank else 0, Q_.stride(1) if has_lowrank else 0,
        float(alpha), float(beta),
        HAS_BIAS=bias is not None, HAS_LOWRANK=has_lowrank, IS_FP64=X.dtype == torch.float64,
        SCALE_AXIS=scale_axis if y_scale is not None else 0,
        DOT_PRECISION=_dot_precision(X.dtype), BLOCK_R=_rank_block(R),
    )


def matmul(X: torch.Tensor, Y: torch.Tensor, *, alpha: float = 1.0, bias: torch.Tensor | None = None,
           P: torch.Tensor | None = None, Q: torch.Tensor | None = None, beta: float = 1.0,
           out_dtype: torch.dtype | None = None, y_scale: torch.Tensor | None = None,
           scale_axis: int = 0) -> torch.Tensor:
    """alpha·X·Y (+ bias) (+ beta·P·Q) in one kernel; 2-D operands of any strides. With `y_scale`, Y is int8/fp8
    and dequantized in the kernel: Y[k, n]·y_scale[k] (scale_axis 1) or Y[k, n]·y_scale[n] (scale_axis 2)."""
    M, K = X.shape
    N = Y.shape[1]
    C = torch.empty(M, N, device=X.device, dtype=out_dtype or X.dtype)
    if M == 0 or N == 0:
        return C
    _launch(X, Y, C, M=M, N=N, K=K, alpha=alpha, bias=bias, P=P, Q=Q, beta=beta, y_scale=y_scale,
            scale_axis=scale_axis)
    return C


def _split_count(M: int, N: int, K: int, device: torch.device) -> int:
    """How many slices of the reduction dimension K to run in parallel: enough that an output with
    few (128 × 128) tiles still gives every SM a program; 1 off the GPU."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
    return max(1, min(sms // tiles, K // 512, 64))


def matmul_splitk(X: torch.Tensor, Y: torch.Tensor, *, alpha: float = 1.0, split_k: int | None = None,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """alpha·X·Y for a small output and a long reduction dimension (the rank-r products).

    With split_k > 1 each slice of K writes its own part of an fp32 workspace and the parts are
    summed afterwards: deterministic, no atomics. split_k defaults to a heuristic (1 off the GPU).
    The result is out_dtype, fp32 by default (fp64 for fp64 inputs).
    """
    M, K = X.shape
    N = Y.shape[1]
    acc_dtype = torch.float64 if X.dtype == torch.float64 else torch.float32
    out_dtype = out_dtype or acc_dtype
    if split_k is None:
        split_k = _split_count(M, N, K, X.device)
    if split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    if M == 0 or N == 0 or K == 0:
        return torch.zeros(M, N, device=X.device, dtype=out_dtype)
    # Slices in multiples of 256 so every BLOCK_K divides them.
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), 256) * 256
    split_k = triton.cdiv(K, k_per_split)
    if split_k == 1:
        return matmul(X, Y, alpha=alpha, out_dtype=out_dtype)
    work = torch.empty(split_k, M, N, device=X.device, dtype=acc_dtype)
    _launch(X, Y, work, M=M, N=N, K=K, alpha=alpha, split_k=split_k, k_per_split=k_per_split)
    return work.sum(0).to(out_dtype)


def relora_forward_from_s(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          S: torch.Tensor, B: torch.Tensor, scale: float,
                          weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·Wᵀ (+ bias) + s·S·Bᵀ for x (M, in) and a given S (M, r): one GEMM, S·Bᵀ in the epilogue (W int8/fp8
    with its row scales: W's rows are y's columns, scaled in the epilogue)."""
    return matmul(x, weight.t(), bias=bias, P=S, Q=B.t(), beta=scale, y_scale=weight_scale, scale_axis=2)


def relora_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   A: torch.Tensor, B: torch.Tensor, scale: float,
                   weight_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, in) → (y (M, out), S = x·Aᵀ (M, r)); S is what the backward needs besides the inputs."""
    S = matmul_splitk(x, A.t(), out_dtype=x.dtype)
    return relora_forward_from_s(x, weight, bias, S, B, scale, weight_scale), S


def _lowrank_grads(dy: torch.Tensor, B: torch.Tensor, S: torch.Tensor, scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dS = s·dY·B (M, r), dB = s·dYᵀ·S (out, r)) for the term s·S·Bᵀ."""
    dS = matmul_splitk(dy, B, alpha=scale, out_dtype=S.dtype)
    dB = matmul_splitk(dy.t(), S, alpha=scale, out_dtype=B.dtype)
    return dS, dB


def relora_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor,
                    B: torch.Tensor, S: torch.Tensor, scale: float, needs_dx: bool,
                    weight_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX or an empty tensor when not needed, dA, dB) for y = x·Wᵀ + b + s·S·Bᵀ, S = x·Aᵀ."""
    dS, dB = _lowrank_grads(dy, B, S, scale)                          # (M, r), (out, r)
    dA = matmul_splitk(dS.t(), x, out_dtype=A.dtype)                  # (r, in)
    if needs_dx:
        dx = matmul(dy, weight, P=dS, Q=A, beta=1.0, y_scale=weight_scale, scale_axis=1)  # (M, in)
    else:
        dx = x.new_empty(0)
    return dx, dA, dB


def relora_backward_from_s(dy: torch.Tensor, weight: torch.Tensor, B: torch.Tensor, S: torch.Tensor,
                           scale: float, needs_dx: bool, weight_scale: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX_base = dY·W or an empty tensor when not needed, dS, dB) for y = x·Wᵀ + b + s·S·Bᵀ with S
    an input: the caller's autograd turns dS into dA and the low-rank share of dX."""
    dS, dB = _lowrank_grads(dy, B, S, scale)
    dx = matmul(dy, weight, y_scale=weight_scale, scale_axis=1) if needs_dx else dy.new_empty(0)  # (M, in)
    return dx, dS, dB
