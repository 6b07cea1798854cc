"""The fused ops under torch.autocast behave like F.linear: fp32 parameters and an fp32/fp16 input are
cast to the autocast dtype, the result has that dtype, gradients reach each tensor in its own dtype.
fp16 autocast here (the interpreter's bf16 dot is wrong on CPU); bf16 on CUDA: test_fused_gpu.py.
"""

import pytest
import torch
import torch.nn.functional as F

from relora_ds.kernels import (
    fused_relora_linear,
    fused_relora_linear_from_s,
    reference_relora_linear,
    reference_relora_linear_from_s,
    triton_available,
)
from tests.kernels.common import DEVICE, forward_backward, make_inputs, make_layer_pair, randn, rel_err

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not usable here")

LOW = torch.float16  # the autocast dtype


def autocast_run(fn, x, W, b, A, B, scale, dy, low_rank_input=False):
    """Forward under autocast (S = F.linear(x, A) under autocast too for the from-S functions), backward
    outside it, as a training loop does; returns y and (dX, dA, dB)."""
    with torch.autocast(DEVICE, dtype=LOW):
        y = fn(x, W, b, F.linear(x, A), B, scale) if low_rank_input else fn(x, W, b, A, B, scale)
    return y, torch.autograd.grad(y, (x, A, B), dy)


@pytest.mark.parametrize("from_s", [False, True])
@pytest.mark.parametrize("x_dtype,bias", [(torch.float32, True), (LOW, False)])
def test_autocast_matches_reference_under_autocast(x_dtype, bias, from_s):
    x, W, b, A, B = make_inputs((3, 29), 70, 45, 12, bias=bias, seed=20)  # fp32 parameters
    x = x.detach().to(x_dtype).requires_grad_()
    dy = randn(3, 29, 45, seed=21).to(LOW)
    fused, reference = ((fused_relora_linear_from_s, reference_relora_linear_from_s) if from_s
                        else (fused_relora_linear, reference_relora_linear))
    y, grads = autocast_run(fused, x, W, b, A, B, 0.5, dy, low_rank_input=from_s)
    y_ref, grads_ref = autocast_run(reference, x, W, b, A, B, 0.5, dy, low_rank_input=from_s)
    assert y.dtype == y_ref.dtype == LOW
    assert [g.dtype for g in grads] == [x_dtype, torch.float32, torch.float32]
    assert rel_err(y, y_ref) < 2e-3
    for g, g_ref in zip(grads, grads_ref):  # both computed in fp16, rounded at different places
        assert rel_err(g, g_ref) < 2e-3


def test_mixed_dtypes_outside_autocast_raise_and_float64_is_not_cast():
    x, W, b, A, B = make_inputs((4,), 16, 12, 4, seed=22)
    S = F.linear(x, A)
    with pytest.raises(ValueError, match=r"one dtype.*only under torch.autocast"):
        fused_relora_linear(x.half(), W, b, A, B, 1.0)
    with pytest.raises(ValueError, match=r"one dtype.*only under torch.autocast"):
        fused_relora_linear_from_s(x, W, b, S.half(), B, 1.0)
    x64, W64, b64, A64, B64 = (t.detach().double() for t in (x, W, b, A, B))
    with torch.autocast(DEVICE, dtype=LOW):
        # Like F.linear: float64 stays float64 under autocast, and cannot mix with the cast tensors.
        assert F.linear(x64, W64, b64).dtype == torch.float64
        assert fused_relora_linear(x64, W64, b64, A64, B64, 1.0).dtype == torch.float64
        with pytest.raises(ValueError, match="one dtype"):
            fused_relora_linear(x64, W, b, A, B, 1.0)


def test_torch_compile_fullgraph_under_autocast_matches_eager():
    x, W, b, A, B = make_inputs((2, 20), 48, 40, 8, seed=23)
    compiled = torch.compile(fused_relora_linear, backend="aot_eager", fullgraph=True)
    dy = randn(2, 20, 40, seed=24).to(LOW)
    y, grads = autocast_run(compiled, x, W, b, A, B, 0.25, dy)
    y_eager, grads_eager = autocast_run(fused_relora_linear, x, W, b, A, B, 0.25, dy)
    assert y.dtype == LOW and grads[1].dtype == torch.float32
    torch.testing.assert_close(y, y_eager)
    for g, g_eager in zip(grads, grads_eager):
        torch.testing.assert_close(g, g_eager)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_layer_under_autocast_matches_torch_path(dropout):
    """A plain torch loop: fp32 ReLoRALinear under autocast, with and without dropout (same mask)."""
    torch_layer, triton_layer = make_layer_pair(72, 50, 8, dropout=dropout, bias=True, zero_B=False,
                                                dtype=torch.float32)
    x = randn(3, 30, 72, seed=25)
    dy = randn(3, 30, 50, seed=26).to(LOW)
    y_ref, grads_ref = forward_backward(torch_layer, x, dy, seed=5, autocast_dtype=LOW)
    y, grads = forward_backward(triton_layer, x, dy, seed=5, autocast_dtype=LOW)
    assert y.dtype == LOW and all(g.dtype == torch.float32 for g in grads)
    assert rel_err(y, y_ref) < 2e-3
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 2e-3
