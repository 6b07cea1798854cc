"""Compiled Triton kernels on a CUDA GPU: bf16 at LLaMA shapes, fp16/fp32, torch.compile, a training step,
bf16 autocast with fp32 parameters, and LoRA dropout (the from-S op) in bf16.

All marked `gpu` (skipped without CUDA). Errors are measured against an fp64 reference on the GPU.
"""

import pytest
import torch

import torch.nn.functional as F

from relora_ds.kernels import (
    fused_relora_linear,
    fused_relora_linear_from_s,
    reference_relora_linear,
    reference_relora_linear_from_s,
)

pytestmark = pytest.mark.gpu


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def inputs(tokens, in_f, out_f, rank, dtype, bias=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, in_f, device="cuda", generator=g).to(dtype).requires_grad_()
    W = (torch.randn(out_f, in_f, device="cuda", generator=g) / in_f ** 0.5).to(dtype)
    b = torch.randn(out_f, device="cuda", generator=g).to(dtype) if bias else None
    A = (torch.randn(rank, in_f, device="cuda", generator=g) / in_f ** 0.5).to(dtype).requires_grad_()
    B = (torch.randn(out_f, rank, device="cuda", generator=g) / rank ** 0.5).to(dtype).requires_grad_()
    return x, W, b, A, B


def check_against_fp64(tokens, in_f, out_f, rank, dtype, tol, bias=False, scale=0.25):
    x, W, b, A, B = inputs(tokens, in_f, out_f, rank, dtype, bias)
    dy = torch.randn(tokens, out_f, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)).to(dtype)
    y = fused_relora_linear(x, W, b, A, B, scale)
    grads = torch.autograd.grad(y, (x, A, B), dy)
    exact = [t.detach().double().requires_grad_() for t in (x, A, B)]
    y64 = reference_relora_linear(exact[0], W.double(), None if b is None else b.double(), exact[1], exact[2], scale)
    grads64 = torch.autograd.grad(y64, exact, dy.double())
    assert y.dtype == dtype
    errors = {"y": rel_err(y, y64)} | {name: rel_err(g, g64) for name, g, g64 in zip(("dx", "dA", "dB"), grads, grads64)}
    assert max(errors.values()) < tol, errors


@pytest.mark.parametrize("rank", [8, 512])
@pytest.mark.parametrize("in_f,out_f", [(2048, 5461), (5461, 2048)])  # LLaMA-1.3B up/down projections
def test_bf16_llama_shapes(in_f, out_f, rank):
    check_against_fp64(4096, in_f, out_f, rank, torch.bfloat16, tol=1e-2)


def test_bf16_llama_7b_shape_ragged_tokens():
    check_against_fp64(2000 + 37, 4096, 11008, 128, torch.bfloat16, tol=1e-2, bias=True)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.float32, 1e-5)])
def test_fp16_fp32_ragged(dtype, tol, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 as exact as torch's
    check_against_fp64(1000 + 3, 768 + 5, 2048 + 11, 100, dtype, tol=tol, bias=True)


def test_torch_compile_inductor_matches_eager():
    x, W, b, A, B = inputs(512, 256, 384, 16, torch.bfloat16, bias=True)
    compiled = torch.compile(fused_relora_linear, fullgraph=True)
    y = compiled(x, W, b, A, B, 0.25)
    y_eager = fused_relora_linear(x, W, b, A, B, 0.25)
    torch.testing.assert_close(y, y_eager)
    grads = torch.autograd.grad(y.float().square().sum(), (x, A, B))
    grads_eager = torch.autograd.grad(y_eager.float().square().sum(), (x, A, B))
    for g, g_eager in zip(grads, grads_eager):
        torch.testing.assert_close(g, g_eager)


@pytest.mark.parametrize("dtype,autocast,dropout,tol", [
    (torch.float32, False, 0.0, 1e-4),
    (torch.bfloat16, False, 0.0, 2e-2),
    (torch.bfloat16, False, 0.1, 2e-2),   # the paper's dropout: the from-S op, same masks as torch
    (torch.float32, True, 0.1, 2e-2),     # fp32 parameters under bf16 autocast (a plain torch loop)
])
def test_tiny_llama_training_step_matches_torch_path(dtype, autocast, dropout, tol, monkeypatch):
    from relora_ds.model.families import target_modules_of
    from relora_ds.relora.wrap import wrap
    from tests.helpers.tiny import lm_loss, tiny_model, token_batches

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    losses = {}
    for kernels in ("torch", "triton"):
        model = tiny_model(seed=0, dtype=dtype).cuda()
        wrap(model, target_modules=target_modules_of(model), rank=8, alpha=16, dropout=dropout, kernels=kernels, seed=0)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        batches = token_batches(8, 64, seed=0)
        torch.manual_seed(0)  # the dropout masks
        losses[kernels] = []
        for _ in range(5):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = lm_loss(model, next(batches).cuda())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[kernels].append(loss.item())
    assert losses["torch"][-1] < losses["torch"][0]
    assert losses["triton"] == pytest.approx(losses["torch"], rel=tol)


@pytest.mark.parametrize("from_s", [False, True])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_with_fp32_params_matches_reference(x_dtype, from_s):
    """x bf16 or fp32, W/A/B/bias fp32, under torch.autocast(bf16): like F.linear, bf16 out, fp32 grads."""
    x, W, b, A, B = inputs(1000 + 3, 768 + 5, 1024 + 11, 64, torch.float32, bias=True)
    x = x.detach().to(x_dtype).requires_grad_()
    dy = torch.randn(1003, 1035, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    results = []
    for fn in ((fused_relora_linear_from_s, reference_relora_linear_from_s) if from_s
               else (fused_relora_linear, reference_relora_linear)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x, W, b, F.linear(x, A), B, 0.25) if from_s else fn(x, W, b, A, B, 0.25)
        results.append((y, torch.autograd.grad(y, (x, A, B), dy.bfloat16())))
    (y, grads), (y_ref, grads_ref) = results
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [x_dtype, torch.float32, torch.float32]
    assert rel_err(y, y_ref) < 1e-2
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-2


def test_bf16_layer_with_dropout_matches_torch_path_with_the_same_mask():
    from relora_ds.relora.layer import ReLoRALinear

    layers = {kernels: ReLoRALinear(768 + 5, 1024 + 11, rank=64, alpha=128, dropout=0.1, bias=True,
                                    kernels=kernels).cuda().bfloat16() for kernels in ("torch", "triton")}
    with torch.no_grad():
        layers["torch"].weight.normal_(0.0, 773 ** -0.5)  # the constructor leaves W uninitialised
        layers["torch"].lora_B.normal_()
        layers["torch"].bias.normal_()
    layers["triton"].load_state_dict(layers["torch"].state_dict())
    x = torch.randn(4, 250, 773, device="cuda").bfloat16()
    dy = torch.randn(4, 250, 1035, device="cuda").bfloat16()
    results = {}
    for kernels, layer in layers.items():
        torch.manual_seed(3)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        results[kernels] = (y, *torch.autograd.grad(y, (xi, layer.lora_A, layer.lora_B), dy))
    for got, want in zip(results["triton"], results["torch"]):
        assert got.dtype == torch.bfloat16
        assert rel_err(got, want) < 1e-2


def test_auto_switch_uses_triton_on_cuda():
    from relora_ds.relora.layer import ReLoRALinear

    layer = ReLoRALinear(64, 64, rank=8, alpha=16, kernels="auto").cuda()
    assert layer.use_triton(torch.randn(4, 64, device="cuda"))
