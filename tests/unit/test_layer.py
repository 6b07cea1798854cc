"""ReLoRALinear and the restart math: output at wrap time, exact merges, gradients, scaling, errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from relora_ds.relora import functional
from relora_ds.relora.layer import ReLoRALinear
from relora_ds.model.families import target_modules_of
from relora_ds.relora.wrap import adapter_parameter_names, merge_and_reinit, relora_modules, wrap
from tests.helpers import ROOT
from tests.helpers.tiny import fixed_batch, lm_loss, logits, tiny_model, token_batches


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def train_steps(model, steps: int, lr: float = 1e-2, seed: int = 0) -> torch.optim.Optimizer:
    """A few AdamW steps on tiny batches over the trainable parameters; returns the optimizer."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batches = token_batches(4, 32, seed=seed)
    for _ in range(steps):
        lm_loss(model, next(batches)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def test_output_equals_linear_at_wrap_time():
    model = tiny_model(seed=1)
    ids = fixed_batch()
    before = logits(model, ids)
    wrap(model, target_modules=target_modules_of(model), rank=8, alpha=16, seed=0)
    assert torch.equal(logits(model, ids), before)  # B = 0: the low-rank path adds exactly zero


def test_merge_keeps_output_after_training():
    model = tiny_model(seed=2)
    wrap(model, target_modules=target_modules_of(model), rank=8, alpha=16, seed=0)
    train_steps(model, 5)
    modules = relora_modules(model)
    A_before = {name: m.lora_A.detach().clone() for name, m in modules.items()}
    assert all(m.lora_B.abs().sum() > 0 for m in modules.values())  # the steps did move B
    ids = fixed_batch()
    before = logits(model, ids)
    norm = merge_and_reinit(model, seed=0, restart_index=1)
    after = logits(model, ids)
    assert rel_err(after, before) < 1e-6
    assert norm > 0
    for name, m in modules.items():
        assert torch.count_nonzero(m.lora_B) == 0
        assert not torch.equal(m.lora_A, A_before[name])
        assert not m.weight.requires_grad


def test_merge_adds_scaled_delta_in_fp32():
    generator = torch.Generator().manual_seed(0)
    layer = ReLoRALinear(12, 10, rank=4, alpha=8, dtype=torch.float32)
    with torch.no_grad():
        layer.weight.normal_(generator=generator)
        layer.lora_B.normal_(generator=generator)
    W, A, B = (t.detach().clone() for t in (layer.weight, layer.lora_A, layer.lora_B))
    norm = layer.merge_and_reinit(functional.restart_generator(0, 1, "x"))
    expected = W + 2.0 * B @ A  # s = alpha / r = 2
    assert torch.allclose(layer.weight, expected, rtol=0, atol=1e-6)
    assert norm == pytest.approx(float((2.0 * B @ A).norm()), rel=1e-6)
    assert torch.equal(layer.lora_A, functional.kaiming_uniform_A(4, 12, functional.restart_generator(0, 1, "x")))


def test_bf16_merge_rounds_once():
    """A frozen bf16 W has no fp32 master: each merge rounds W + s·B·A once to bf16 (≤ half an ulp)."""
    generator = torch.Generator().manual_seed(0)
    layer = ReLoRALinear(64, 48, rank=8, alpha=16, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 64, generator=generator))
        layer.lora_B.copy_(torch.randn(48, 8, generator=generator) * 0.1)
    exact = layer.weight.float() + functional.lora_delta(layer.lora_A, layer.lora_B, layer.scale)
    layer.merge_and_reinit(functional.restart_generator(0, 1, "w"))
    assert layer.weight.dtype == torch.bfloat16
    rounding = ((layer.weight.float() - exact).abs() / exact.abs().clamp_min(1e-30)).max()
    assert 0 < rounding <= 2.0 ** -8


def test_only_adapters_embeddings_norms_head_trainable():
    model = tiny_model(seed=3)
    names = wrap(model, target_modules=target_modules_of(model), rank=8, alpha=16)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = set(adapter_parameter_names(model))
    assert adapters and adapters <= trainable
    others = trainable - adapters
    assert others == {n for n in others if "embed_tokens" in n or "norm" in n or n.startswith("lm_head")}
    assert "lm_head.weight" in others and "model.embed_tokens.weight" in others
    for name in names:
        assert f"{name}.weight" not in trainable


def test_first_steps_give_both_adapters_gradients():
    """B gets a gradient at once (A is Kaiming, not zero); A's gradient is s·Bᵀ·…, exactly zero while
    B = 0, and non-zero from the second step on. With A and B both zero (the authors' bug) neither
    ever gets one."""
    model = tiny_model(seed=4)
    wrap(model, target_modules=target_modules_of(model), rank=8, alpha=16)
    modules = relora_modules(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = token_batches(4, 32, seed=4)
    lm_loss(model, next(batches)).backward()
    for m in modules.values():
        assert m.lora_B.grad.abs().sum() > 0
        assert torch.count_nonzero(m.lora_A.grad) == 0
    optimizer.step()
    optimizer.zero_grad()
    lm_loss(model, next(batches)).backward()
    for m in modules.values():
        assert m.lora_A.grad.abs().sum() > 0 and m.lora_B.grad.abs().sum() > 0

    both_zero = tiny_model(seed=4)
    wrap(both_zero, target_modules=target_modules_of(both_zero), rank=8, alpha=16)
    for m in relora_modules(both_zero).values():
        with torch.no_grad():
            m.lora_A.zero_()
    train_steps(both_zero, 2)
    lm_loss(both_zero, next(batches)).backward()
    for m in relora_modules(both_zero).values():
        assert torch.count_nonzero(m.lora_A.grad) == 0 and torch.count_nonzero(m.lora_B.grad) == 0


def test_trainable_scaling_survives_merge_and_keeps_learning():
    model = tiny_model(seed=5)
    wrap(model, target_modules=target_modules_of(model), rank=8, alpha=4, trainable_scaling=True)
    modules = relora_modules(model)
    g0 = {name: m.lora_scaling.item() for name, m in modules.items()}
    assert all(v == pytest.approx(torch.atanh(torch.tensor(0.5)).item()) for v in g0.values())  # s = tanh(g) = 4/8
    optimizer = train_steps(model, 3)
    g_trained = {name: m.lora_scaling.item() for name, m in modules.items()}
    assert all(g_trained[n] != g0[n] for n in modules)
    ids = fixed_batch()
    before = logits(model, ids)
    merge_and_reinit(model, seed=0, restart_index=1)
    assert rel_err(logits(model, ids), before) < 1e-6
    for name, m in modules.items():
        assert m.lora_scaling.item() == g_trained[name]  # not reset (the authors set g = 0: no gradient ever)
        assert m.lora_scaling.requires_grad
    batches = token_batches(4, 32, seed=6)
    for _ in range(2):  # right after a merge B = 0, so g's gradient returns one step later, as A's does
        optimizer.zero_grad()
        lm_loss(model, next(batches)).backward()
        optimizer.step()
    assert all(m.lora_scaling.grad.abs().sum() > 0 for m in modules.values())


def test_dropout_applies_in_training_only():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16, bias=True)
    layer = ReLoRALinear.from_linear(linear, rank=4, alpha=8, dropout=0.5, kernels="torch")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(8, 32)
    exact = linear(x) + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    layer.eval()
    assert torch.allclose(layer(x), exact, atol=1e-5)
    layer.train()
    first, second = layer(x), layer(x)
    assert not torch.allclose(first, second)
    first.sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
    assert layer.weight.grad is None and layer.bias.grad is None


def test_from_linear_shares_weight_and_bias():
    linear = nn.Linear(8, 6, bias=True)
    layer = ReLoRALinear.from_linear(linear, rank=2, alpha=2)
    assert layer.weight.data_ptr() == linear.weight.data_ptr()
    assert layer.bias.data_ptr() == linear.bias.data_ptr()
    assert not layer.weight.requires_grad and not layer.bias.requires_grad


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "relora.rank"),
    (dict(rank=-3), "relora.rank"),
    (dict(dropout=1.0), "relora.dropout"),
    (dict(dropout=-0.1), "relora.dropout"),
    (dict(kernels="cuda"), "relora.kernels"),
])
def test_bad_layer_arguments_raise(kwargs, message):
    args = dict(in_features=8, out_features=8, rank=2, alpha=2.0) | kwargs
    with pytest.raises(ValueError, match=message):
        ReLoRALinear(**args)


def test_wrap_rank_larger_than_both_dims_raises():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(8, 6))
    with pytest.raises(ValueError, match="relora.rank 9 is larger than both dims of q_proj"):
        wrap(model, rank=9, alpha=1, target_modules=("q_proj",))


def test_kaiming_A_bounds_and_delta_rows():
    generator = functional.restart_generator(3, 2, "model.layers.0.mlp.up_proj")
    A = functional.kaiming_uniform_A(16, 100, generator)
    assert A.shape == (16, 100) and A.dtype == torch.float32
    assert A.abs().max() <= 0.1 and A.abs().max() > 0.09  # bound 1/sqrt(100)
    B = torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
    full = functional.lora_delta(A, B, 0.25)
    assert torch.allclose(full, 0.25 * B @ A, atol=1e-6)
    for start, end in [(0, 40), (0, 7), (13, 29), (39, 40)]:
        assert torch.allclose(functional.lora_delta_rows(A, B, 0.25, start, end), full[start:end], rtol=0, atol=1e-6)


def test_restart_generator_same_across_processes_and_distinct_per_name_and_index():
    def draw(seed, index, name):
        return functional.kaiming_uniform_A(4, 8, functional.restart_generator(seed, index, name))

    code = ("from relora_ds.relora import functional as f; "
            "print(f.kaiming_uniform_A(4, 8, f.restart_generator(7, 3, 'model.layers.1.self_attn.q_proj'))"
            ".flatten().tolist())")
    env = dict(os.environ, PYTHONHASHSEED="12345")  # Python's hash salt differs; the draw must not
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    other_process = torch.tensor(json.loads(out))
    here = draw(7, 3, "model.layers.1.self_attn.q_proj")
    assert torch.equal(other_process, here.flatten())
    assert torch.equal(here, draw(7, 3, "model.layers.1.self_attn.q_proj"))
    assert not torch.equal(here, draw(7, 3, "model.layers.1.self_attn.k_proj"))
    assert not torch.equal(here, draw(7, 4, "model.layers.1.self_attn.q_proj"))
    assert not torch.equal(here, draw(8, 3, "model.layers.1.self_attn.q_proj"))


def test_a_directly_built_layer_has_a_finite_seeded_base_and_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    layers = [ReLoRALinear(40, 24, rank=4, alpha=8) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), before)
    weight = layers[0].weight
    assert torch.isfinite(weight).all() and weight.abs().max() <= 1 / 40 ** 0.5 + 1e-6  # nn.Linear's bound
    assert weight.std() > 0 and torch.equal(weight, layers[1].weight)
    linear = torch.nn.Linear(40, 24)
    assert ReLoRALinear.from_linear(linear, rank=4, alpha=8).weight.data_ptr() == linear.weight.data_ptr()
