"""The fused kernels with a W stored as int8 or fp8 and per-row scales (relora.base_dtype): dequantized tile by tile
inside the GEMMs, against the reference on the dequantized W (fp64), forward and backward, both ops (x·Aᵀ inside,
and S given for dropout); the layer takes the kernels with a stored int8/fp8 W and matches its torch path.
Under TRITON_INTERPRET=1 on a CPU (fp32, fp16 compute; the interpreter multiplies bf16's bit patterns in tl.dot),
compiled on a GPU (bf16 compute: the `gpu` tests at the end)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relora_ds.kernels import fused_relora_linear, fused_relora_linear_from_s, triton_available
from relora_ds.relora import quant
from relora_ds.relora.layer import ReLoRALinear
from tests.kernels.common import DEVICE, rel_err

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not usable here")
FP8 = pytest.mark.skipif("fp8" not in quant.STORAGE, reason="this torch has no float8_e4m3fn")


def _inputs(lead, in_f, out_f, rank, dtype, fmt, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, scale = quant.quantize(torch.randn(out_f, in_f, generator=g) * 0.05, fmt)
    x = torch.randn(*lead, in_f, generator=g).to(DEVICE, dtype).requires_grad_()
    A = (torch.randn(rank, in_f, generator=g) / in_f ** 0.5).to(DEVICE, dtype).requires_grad_()
    B = (torch.randn(out_f, rank, generator=g) * 0.1).to(DEVICE, dtype).requires_grad_()
    bias = torch.randn(out_f, generator=g).to(DEVICE, dtype)
    return x, q.to(DEVICE), scale.to(DEVICE), bias, A, B


def _check(lead, in_f, out_f, rank, dtype, fmt, tol, from_s):
    x, q, scale, bias, A, B = _inputs(lead, in_f, out_f, rank, dtype, fmt)
    w = quant.dequantize(q, scale, torch.float64)
    xr, Ar, Br = (t.detach().double().requires_grad_() for t in (x, A, B))
    if from_s:
        S = F.linear(x, A)
        y = fused_relora_linear_from_s(x, q, bias, S, B, 0.5, scale)
    else:
        y = fused_relora_linear(x, q, bias, A, B, 0.5, scale)
    y_ref = F.linear(xr, w, bias.double()) + 0.5 * F.linear(F.linear(xr, Ar), Br)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    grads = torch.autograd.grad(y, (x, A, B), dy)
    grads_ref = torch.autograd.grad(y_ref, (xr, Ar, Br), dy.double())
    assert rel_err(y, y_ref) < tol
    for got, want in zip(grads, grads_ref):
        assert rel_err(got, want) < tol


@pytest.mark.parametrize("from_s", [False, True], ids=["fused", "from_s"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead,in_f,out_f,rank", [((3, 50), 130, 70, 8), ((37,), 65, 129, 24)])
@pytest.mark.parametrize("fmt", ["int8", pytest.param("fp8", marks=FP8)])
def test_a_stored_w_is_dequantized_in_the_kernels(fmt, lead, in_f, out_f, rank, dtype, tol, from_s):
    _check(lead, in_f, out_f, rank, dtype, fmt, tol, from_s)


@pytest.mark.parametrize("fmt", ["int8", pytest.param("fp8", marks=FP8)])
def test_the_layer_takes_the_kernels_with_a_stored_w_and_matches_its_torch_path(fmt):
    layers = [ReLoRALinear.from_linear(nn.Linear(72, 40), rank=8, alpha=16, kernels=kernels, base_dtype=fmt,
                                       generator=torch.Generator().manual_seed(1)).to(DEVICE)
              for kernels in ("torch", "triton")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(3, 30, 72, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    assert layers[1].use_triton(x) and not layers[0].use_triton(x)
    outputs = []
    for layer in layers:
        with torch.no_grad():
            layer.lora_B.fill_(0.05)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.square().mean().backward()
        outputs.append((y.detach(), xi.grad, layer.lora_A.grad, layer.lora_B.grad))
    for got, want in zip(outputs[1], outputs[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_scales_that_do_not_fit_w_are_one_line():
    x, q, scale, bias, A, B = _inputs((4,), 32, 16, 4, torch.float32, "int8")
    with pytest.raises(ValueError, match=r"^fused_relora_linear: a W with row scales must be torch.int8"):
        fused_relora_linear(x, q, bias, A, B, 0.5, scale[:8])
    with pytest.raises(ValueError, match=r"^fused_relora_linear: a W with row scales must be"):
        fused_relora_linear(x, q.float(), bias, A, B, 0.5, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("from_s", [False, True], ids=["fused", "from_s"])
def test_bf16_with_a_stored_w_on_the_gpu(fmt, from_s):
    _check((4, 300), 4096, 11008 // 8, 64, torch.bfloat16, fmt, 1e-2, from_s)
