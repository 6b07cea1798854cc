"""LoRA dropout on the fused path: `fused_relora_linear_from_s` (y = x·Wᵀ + b + s·S·Bᵀ with S given)
against its reference, and ReLoRALinear with dropout in training against the torch path with the same
dropout mask (same seed, same RNG calls in the same order). Interpreter on CPU, compiled on a GPU.
"""

import pytest
import torch
import torch.nn.functional as F

import relora_ds.kernels as kernels
from relora_ds.kernels import (
    fused_relora_linear_from_s,
    reference_relora_linear,
    reference_relora_linear_from_s,
    triton_available,
)
from relora_ds.relora.layer import ReLoRALinear
from tests.kernels.common import DEVICE, forward_backward, make_inputs, make_layer_pair, randn, rel_err, run

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not usable here")


def make_s_inputs(lead, in_f, out_f, rank, dtype=torch.float32, bias=True, zero_B=False, seed=0):
    """x, frozen W and bias, a trainable S (lead..., r) standing for dropout(x)·Aᵀ, and B."""
    x, W, b, _, B = make_inputs(lead, in_f, out_f, rank, dtype, bias, zero_B, seed)
    S = randn(*lead, rank, seed=seed + 100).to(dtype).requires_grad_()
    return x, W, b, S, B


# Ragged shapes (not multiples of the 64-wide interpreter tiles); r = 100 spans two rank tiles.
CASES = [
    # lead dims, in, out, rank, scale, bias, zero_B
    ((3, 50), 130, 70, 8, 0.25, True, False),
    ((2, 41), 96, 33, 100, 0.5, False, False),
    ((70,), 80, 90, 16, 2.0, True, True),
]


@pytest.mark.parametrize("lead,in_f,out_f,rank,scale,bias,zero_B", CASES)
def test_from_s_fp32_matches_reference(lead, in_f, out_f, rank, scale, bias, zero_B):
    x, W, b, S, B = make_s_inputs(lead, in_f, out_f, rank, bias=bias, zero_B=zero_B)
    dy = randn(*lead, out_f, seed=1)
    y, (dx, dS, dB) = run(fused_relora_linear_from_s, x, W, b, S, B, scale, dy)
    y_ref, (dx_ref, dS_ref, dB_ref) = run(reference_relora_linear_from_s, x, W, b, S, B, scale, dy)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dS, dS_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dB, dB_ref, rtol=1e-5, atol=1e-4)
    if zero_B:  # B = 0: y is the base linear, S gets a zero gradient, B's gradient is not zero
        torch.testing.assert_close(y, F.linear(x, W, b), rtol=1e-5, atol=1e-5)
        assert torch.equal(dS, torch.zeros_like(dS)) and dB.abs().max() > 0


def test_from_s_fp16_matches_fp64_math():
    x, W, b, S, B = make_s_inputs((2, 45), 100, 77, 24, dtype=torch.float16, seed=3)
    dy = randn(2, 45, 77, seed=4).half()
    y, grads = run(fused_relora_linear_from_s, x, W, b, S, B, 0.25, dy)
    assert y.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    exact = [t.detach().double().requires_grad_() for t in (x, S, B)]
    y64, grads64 = run(reference_relora_linear_from_s, exact[0], W.double(), b.double(), exact[1], exact[2],
                       0.25, dy.double())
    assert rel_err(y, y64) < 2e-3
    for g, g64 in zip(grads, grads64):
        assert rel_err(g, g64) < 2e-3


def test_from_s_gradcheck_float64():
    x, W, b, S, B = make_s_inputs((3,), 7, 6, 2, dtype=torch.float64, seed=5)
    assert torch.autograd.gradcheck(lambda x, S, B: fused_relora_linear_from_s(x, W, b, S, B, 0.7), (x, S, B),
                                    fast_mode=True)


def test_from_s_input_without_grad_and_empty_batch():
    x, W, b, S, B = make_s_inputs((20,), 40, 30, 8, seed=6)
    x = x.detach()
    y = fused_relora_linear_from_s(x, W, b, S, B, 0.5)
    y_ref = reference_relora_linear_from_s(x, W, b, S, B, 0.5)
    grads = torch.autograd.grad(y.square().sum(), (S, B))
    grads_ref = torch.autograd.grad(y_ref.square().sum(), (S, B))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)
    empty = fused_relora_linear_from_s(torch.empty(0, 3, 40, device=DEVICE), W, b,
                                       torch.empty(0, 3, 8, device=DEVICE), B, 0.5)
    assert empty.shape == (0, 3, 30)


def test_from_s_bad_inputs_raise_clear_errors():
    x, W, b, S, B = make_s_inputs((4, 3), 16, 12, 4, seed=9)
    with pytest.raises(ValueError, match="frozen"):
        fused_relora_linear_from_s(x, W.clone().requires_grad_(), b, S, B, 1.0)
    with pytest.raises(ValueError, match="shapes do not fit"):
        fused_relora_linear_from_s(x, W, b, S[:3], B, 1.0)  # S's leading dims differ from x's
    with pytest.raises(ValueError, match="shapes do not fit"):
        fused_relora_linear_from_s(x, W, b, S, B[:, :3], 1.0)
    with pytest.raises(ValueError, match="bias must have shape"):
        fused_relora_linear_from_s(x, W, b[:5], S, B, 1.0)
    with pytest.raises(ValueError, match="one dtype"):
        fused_relora_linear_from_s(x, W, b, S.double(), B, 1.0)


def test_from_s_torch_compile_fullgraph_matches_reference():
    x, W, b, S, B = make_s_inputs((2, 20), 48, 40, 8, seed=10)
    compiled = torch.compile(fused_relora_linear_from_s, backend="aot_eager", fullgraph=True)
    dy = randn(2, 20, 40, seed=11)
    y, grads = run(compiled, x, W, b, S, B, 0.25, dy)
    y_ref, grads_ref = run(reference_relora_linear_from_s, x, W, b, S, B, 0.25, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-4)


# --- ReLoRALinear with dropout: fused (from S) vs torch, same mask ---------------------------------

def forbid(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} should not run here")
    return fail


LAYER_CASES = [
    # lead dims, in, out, rank, bias, zero_B
    ((3, 30), 72, 50, 8, True, False),
    ((37,), 65, 129, 24, False, False),
    ((2, 21), 80, 70, 16, True, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,in_f,out_f,rank,bias,zero_B", LAYER_CASES)
def test_layer_with_dropout_matches_torch_path_with_the_same_mask(lead, in_f, out_f, rank, bias, zero_B, dtype,
                                                                   monkeypatch):
    torch_layer, triton_layer = make_layer_pair(in_f, out_f, rank, dropout=0.25, bias=bias, zero_B=zero_B,
                                                dtype=dtype)
    x = randn(*lead, in_f, seed=13).to(dtype)
    dy = randn(*lead, out_f, seed=14).to(dtype)
    assert triton_layer.train().use_triton(x) and not torch_layer.train().use_triton(x)
    monkeypatch.setattr(kernels, "fused_relora_linear", forbid("fused_relora_linear"))  # dropout: the from-S op
    want = forward_backward(torch_layer, x, dy, seed=7)
    got = forward_backward(triton_layer, x, dy, seed=7)
    y, grads = got
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    if dtype == torch.float32:
        torch.testing.assert_close(y, want[0], rtol=1e-5, atol=1e-5)
        for g, g_want in zip(grads, want[1]):
            torch.testing.assert_close(g, g_want, rtol=1e-5, atol=1e-4)
    else:  # fp16: the torch path rounds between its matmuls, the fused one once
        assert rel_err(y, want[0]) < 2e-3
        for g, g_want in zip(grads, want[1]):
            assert rel_err(g, g_want) < 2e-3
    # The mask matters: another seed gives another result (dB depends on the mask even when B = 0).
    other = forward_backward(triton_layer, x, dy, seed=8)
    assert not torch.allclose(other[1][2], grads[2])


def test_layer_with_dropout_in_eval_takes_the_whole_fused_op(monkeypatch):
    layer = ReLoRALinear(32, 24, rank=4, alpha=8, dropout=0.1, kernels="triton").to(DEVICE).eval()
    x = randn(5, 32, seed=16)
    monkeypatch.setattr(kernels, "fused_relora_linear_from_s", forbid("fused_relora_linear_from_s"))
    torch.testing.assert_close(layer(x), reference_relora_linear(x, layer.weight, None, layer.lora_A,
                                                                 layer.lora_B, layer.scale), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a training loop or a child process: `make test`, not the edit loop
def test_tiny_llama_training_with_dropout_matches_torch_path():
    """The paper's recipes (dropout 0.1) on the fused path: the same losses as the torch path."""
    from relora_ds.model.families import target_modules_of
    from relora_ds.relora.wrap import wrap
    from tests.helpers.tiny import lm_loss, tiny_model, token_batches

    losses = {}
    for kernels_choice in ("torch", "triton"):
        model = tiny_model(seed=0)
        wrap(model, target_modules=target_modules_of(model), rank=8, alpha=16, dropout=0.1, kernels=kernels_choice, seed=0)
        model.to(DEVICE).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        batches = token_batches(2, 16, seed=0)
        torch.manual_seed(0)
        losses[kernels_choice] = []
        for _ in range(3):
            loss = lm_loss(model, next(batches).to(DEVICE))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[kernels_choice].append(loss.item())
    assert losses["torch"][-1] < losses["torch"][0]
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-5 if DEVICE == "cpu" else 1e-4)
