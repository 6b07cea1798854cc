"""Helpers shared by the kernel tests (CPU under TRITON_INTERPRET=1, CUDA otherwise)."""

import os

import torch

from relora_ds.relora.layer import ReLoRALinear

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def make_inputs(lead, in_f, out_f, rank, dtype=torch.float32, bias=True, zero_B=False, seed=0):
    """Random x (lead..., in), frozen W and bias, trainable A and B (B = 0 when zero_B)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=g).to(DEVICE, dtype).requires_grad_()
    W = (torch.randn(out_f, in_f, generator=g) / in_f ** 0.5).to(DEVICE, dtype)
    b = torch.randn(out_f, generator=g).to(DEVICE, dtype) if bias else None
    A = (torch.randn(rank, in_f, generator=g) / in_f ** 0.5).to(DEVICE, dtype).requires_grad_()
    B = torch.zeros(out_f, rank) if zero_B else torch.randn(out_f, rank, generator=g)
    return x, W, b, A, B.to(DEVICE, dtype).requires_grad_()


def run(fn, x, W, b, A, B, scale, dy):
    """Output and (dX, dA, dB) of fn for the upstream gradient dy (A is S for the from-S functions)."""
    y = fn(x, W, b, A, B, scale)
    grads = torch.autograd.grad(y, (x, A, B), dy)
    return y, grads


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_layer_pair(in_f, out_f, rank, *, dropout, bias, zero_B, dtype):
    """Two ReLoRALinear with identical parameters, kernels='torch' and kernels='triton'."""
    torch_layer = ReLoRALinear(in_f, out_f, rank=rank, alpha=2 * rank, dropout=dropout, bias=bias, kernels="torch")
    with torch.no_grad():
        g = torch.Generator().manual_seed(12)
        torch_layer.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f ** 0.5)
        if not zero_B:
            torch_layer.lora_B.copy_(torch.randn(out_f, rank, generator=g) * 0.1)
        if bias:
            torch_layer.bias.copy_(torch.randn(out_f, generator=g))
    triton_layer = ReLoRALinear(in_f, out_f, rank=rank, alpha=2 * rank, dropout=dropout, bias=bias, kernels="triton")
    triton_layer.load_state_dict(torch_layer.state_dict())
    return torch_layer.to(DEVICE, dtype), triton_layer.to(DEVICE, dtype)


def forward_backward(layer, x, dy, seed, autocast_dtype=None):
    """Output and (dX, dA, dB) with the global RNG (the dropout mask) seeded first; the forward under
    torch.autocast when autocast_dtype is given."""
    torch.manual_seed(seed)
    xi = x.clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None):
        y = layer(xi)
    return y.detach(), torch.autograd.grad(y, (xi, layer.lora_A, layer.lora_B), dy)
