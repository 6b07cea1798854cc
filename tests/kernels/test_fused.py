"""Fused Triton ReLoRA linear vs the pure-torch reference: under TRITON_INTERPRET=1 on a CPU-only
machine (conftest sets it), compiled on the GPU when CUDA is present.

Shapes are small and ragged (not multiples of the 64-wide interpreter tiles); fp32, fp16 and an
fp64 gradcheck. bf16 is GPU-only (the interpreter's bf16 dot is wrong): see test_fused_gpu.py.
LoRA dropout (the from-S op): test_fused_dropout.py; torch.autocast: test_fused_autocast.py.
"""

import os
import subprocess
import sys

import pytest
import torch

from relora_ds.kernels import fused_relora_linear, reference_relora_linear, triton_available
from relora_ds.kernels.autograd import check_runnable
from relora_ds.relora.layer import ReLoRALinear
from tests.helpers import ROOT
from tests.kernels.common import DEVICE, make_inputs, randn, rel_err, run


pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not usable here")


# Ragged shapes: tokens, in and out are not multiples of the 64 tiles; r = 100 spans two rank tiles.
CASES = [
    # lead dims, in, out, rank, scale, bias, zero_B
    ((3, 50), 130, 70, 8, 0.25, True, False),
    ((37,), 65, 129, 24, 1.7, False, False),
    ((2, 41), 96, 33, 100, 0.5, True, False),
    ((70,), 80, 90, 16, 2.0, False, True),
]


@pytest.mark.parametrize("lead,in_f,out_f,rank,scale,bias,zero_B", CASES)
def test_fp32_forward_and_grads_match_reference(lead, in_f, out_f, rank, scale, bias, zero_B):
    x, W, b, A, B = make_inputs(lead, in_f, out_f, rank, bias=bias, zero_B=zero_B)
    dy = randn(*lead, out_f, seed=1)
    y, (dx, dA, dB) = run(fused_relora_linear, x, W, b, A, B, scale, dy)
    y_ref, (dx_ref, dA_ref, dB_ref) = run(reference_relora_linear, x, W, b, A, B, scale, dy)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dA, dA_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dB, dB_ref, rtol=1e-5, atol=1e-4)
    if zero_B:
        # B = 0: the low-rank term adds nothing and A gets a zero gradient; B's gradient is not zero.
        assert torch.equal(dA, torch.zeros_like(dA))
        assert dB.abs().max() > 0
        torch.testing.assert_close(y, torch.nn.functional.linear(x, W, b), rtol=1e-5, atol=1e-5)


def test_fp16_matches_fp32_math():
    """fp16 inputs, fp32 accumulation: within fp16 rounding of the exact (fp64) result."""
    x, W, b, A, B = make_inputs((2, 45), 100, 77, 24, dtype=torch.float16, seed=3)
    dy = randn(2, 45, 77, seed=4).half()
    y, grads = run(fused_relora_linear, x, W, b, A, B, 0.25, dy)
    assert y.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    exact = [t.detach().double().requires_grad_() for t in (x, A, B)]
    y64, grads64 = run(reference_relora_linear, exact[0], W.double(), b.double(), exact[1], exact[2], 0.25,
                       dy.double())
    assert rel_err(y, y64) < 2e-3
    for g, g64 in zip(grads, grads64):
        assert rel_err(g, g64) < 2e-3
    # ...and no worse than torch's own fp16 path (which rounds between its three matmuls).
    y16, _ = run(reference_relora_linear, x, W, b, A, B, 0.25, dy)
    assert rel_err(y, y64) <= rel_err(y16, y64) * 1.5


def test_gradcheck_float64():
    x, W, b, A, B = make_inputs((3,), 7, 6, 2, dtype=torch.float64, seed=5)
    assert torch.autograd.gradcheck(lambda x, A, B: fused_relora_linear(x, W, b, A, B, 0.7), (x, A, B),
                                    fast_mode=True)


def test_input_without_grad_gives_only_adapter_grads():
    x, W, b, A, B = make_inputs((20,), 40, 30, 8, seed=6)
    x = x.detach()
    y = fused_relora_linear(x, W, b, A, B, 0.5)
    y_ref = reference_relora_linear(x, W, b, A, B, 0.5)
    dA, dB = torch.autograd.grad(y.square().sum(), (A, B))
    dA_ref, dB_ref = torch.autograd.grad(y_ref.square().sum(), (A, B))
    torch.testing.assert_close(dA, dA_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dB, dB_ref, rtol=1e-4, atol=1e-4)


def test_non_contiguous_input_and_empty_batch():
    _, W, b, A, B = make_inputs((1,), 30, 20, 8, seed=7)
    xt = randn(30, 40, seed=7).t()  # (40, 30), strided
    assert not xt.is_contiguous()
    torch.testing.assert_close(fused_relora_linear(xt, W, b, A, B, 0.5),
                               reference_relora_linear(xt, W, b, A, B, 0.5), rtol=1e-5, atol=1e-5)
    empty = fused_relora_linear(torch.empty(0, 3, 30, device=DEVICE), W, b, A, B, 0.5)
    assert empty.shape == (0, 3, 20)


def test_split_k_reduction_matches_torch():
    """The split-K path (used for dA and dB on GPU) with uneven slices and strided operands."""
    from relora_ds.kernels import triton_fused

    X = randn(40, 700, seed=8)
    Y = randn(700, 24, seed=9)
    for split in (1, 3):
        out = triton_fused.matmul_splitk(X, Y, alpha=0.5, split_k=split)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, 0.5 * X @ Y, rtol=1e-5, atol=1e-4)
    out_t = triton_fused.matmul_splitk(Y.t(), X.t(), split_k=2, out_dtype=torch.float16)  # strided views
    assert out_t.dtype == torch.float16
    torch.testing.assert_close(out_t, (Y.t() @ X.t()).half(), rtol=2e-3, atol=2e-2)
    with pytest.raises(ValueError, match="split_k"):
        triton_fused.matmul_splitk(X, Y, split_k=0)


def test_fused_with_split_reductions_matches_reference(monkeypatch):
    """Every rank-r product split in two slices (what a GPU does when the output has few tiles)."""
    from relora_ds.kernels import triton_fused

    monkeypatch.setattr(triton_fused, "_split_count", lambda M, N, K, device: 2)
    x, W, b, A, B = make_inputs((300,), 260, 270, 8, seed=14)
    dy = randn(300, 270, seed=15)
    y, grads = run(fused_relora_linear, x, W, b, A, B, 0.5, dy)
    y_ref, grads_ref = run(reference_relora_linear, x, W, b, A, B, 0.5, dy)
    assert rel_err(y, y_ref) < 1e-6
    for g, g_ref in zip(grads, grads_ref):  # sums of ~300 fp32 terms in another order
        assert rel_err(g, g_ref) < 1e-6


def test_bad_inputs_raise_clear_errors(monkeypatch):
    x, W, b, A, B = make_inputs((4,), 16, 12, 4, seed=9)
    with pytest.raises(ValueError, match="frozen"):
        fused_relora_linear(x, W.clone().requires_grad_(), b, A, B, 1.0)
    with pytest.raises(ValueError, match="frozen"):
        fused_relora_linear(x, W, b.clone().requires_grad_(), A, B, 1.0)
    with pytest.raises(ValueError, match="one dtype"):
        fused_relora_linear(x, W.double(), b, A, B, 1.0)
    with pytest.raises(ValueError, match="shapes do not fit"):
        fused_relora_linear(x, W, b, A, B[:, :3], 1.0)
    with pytest.raises(ValueError, match="bias must have shape"):
        fused_relora_linear(x, W, b[:5], A, B, 1.0)
    with pytest.raises(ValueError, match="not supported"):
        fused_relora_linear(x.detach().int(), W.int(), b.int(), A.detach().int(), B.detach().int(), 1.0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        check_runnable(x.detach().cpu())


def test_importing_the_package_does_not_import_triton():
    code = "import sys, relora_ds.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_torch_compile_fullgraph_matches_eager():
    """The custom ops trace under dynamo + AOT autograd (fake impls), one graph, same values."""
    x, W, b, A, B = make_inputs((2, 20), 48, 40, 8, seed=10)
    compiled = torch.compile(fused_relora_linear, backend="aot_eager", fullgraph=True)
    dy = randn(2, 20, 40, seed=11)
    y, grads = run(compiled, x, W, b, A, B, 0.25, dy)
    y_ref, grads_ref = run(reference_relora_linear, x, W, b, A, B, 0.25, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-4)


def make_layer_pair(bias: bool):
    """Two ReLoRALinear with identical parameters, kernels='torch' and kernels='triton', B ≠ 0."""
    torch_layer = ReLoRALinear(72, 50, rank=8, alpha=16, bias=bias, kernels="torch")
    with torch.no_grad():
        g = torch.Generator().manual_seed(12)
        torch_layer.weight.copy_(torch.randn(50, 72, generator=g) / 72 ** 0.5)
        torch_layer.lora_B.copy_(torch.randn(50, 8, generator=g) * 0.1)
        if bias:
            torch_layer.bias.copy_(torch.randn(50, generator=g))
    triton_layer = ReLoRALinear(72, 50, rank=8, alpha=16, bias=bias, kernels="triton")
    triton_layer.load_state_dict(torch_layer.state_dict())
    return torch_layer.to(DEVICE), triton_layer.to(DEVICE)


@pytest.mark.parametrize("bias", [False, True])
def test_layer_triton_switch_matches_torch_and_keeps_state_dict(bias):
    torch_layer, triton_layer = make_layer_pair(bias)
    assert list(torch_layer.state_dict()) == list(triton_layer.state_dict())
    x = randn(3, 30, 72, seed=13)
    assert triton_layer.use_triton(x) and not torch_layer.use_triton(x)
    outputs = []
    for layer in (torch_layer, triton_layer):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.square().mean().backward()
        outputs.append((y.detach(), xi.grad, layer.lora_A.grad, layer.lora_B.grad))
        assert layer.weight.grad is None
    for got, want in zip(outputs[1], outputs[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a training loop or a child process: `make test`, not the edit loop
def test_tiny_llama_training_steps_match_torch_path():
    """The switch in training: a wrapped tiny LLaMA gives the same losses with kernels='triton'."""
    from relora_ds.model.families import target_modules_of
    from relora_ds.relora.wrap import wrap
    from tests.helpers.tiny import lm_loss, tiny_model, token_batches

    losses = {}
    for kernels in ("torch", "triton"):
        model = tiny_model(seed=0)
        wrap(model, target_modules=target_modules_of(model), rank=8, alpha=16, kernels=kernels, seed=0)
        model.to(DEVICE)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        batches = token_batches(2, 16, seed=0)
        losses[kernels] = []
        for _ in range(3):
            loss = lm_loss(model, next(batches).to(DEVICE))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[kernels].append(loss.item())
    assert losses["torch"][-1] < losses["torch"][0]  # the adapters train (B ≠ 0 after step 1)
    # fp32 either way; only the order of the sums differs (more so between cuBLAS and compiled Triton).
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-5 if DEVICE == "cpu" else 1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_benchmark_without_cuda_says_so_and_writes_nothing(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernel_bench.py"), "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "needs a CUDA GPU" in result.stdout
    assert list(tmp_path.iterdir()) == []
