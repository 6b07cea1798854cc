"""wrap / unwrap by name pattern on a real LlamaForCausalLM: which layers, determinism, round trips."""

import math

import pytest
import torch
from torch import nn

from relora_ds.relora import functional
from relora_ds.relora.layer import ReLoRALinear
from relora_ds.model.families import LLAMA_TARGET_MODULES
from relora_ds.model.families import target_modules_of
from relora_ds.relora.wrap import (adapter_parameter_names, merge_and_reinit, relora_modules,
                                   unwrap, wrap)
from tests.helpers.tiny import fixed_batch, lm_loss, logits, tiny_model, token_batches


def test_wrap_default_targets_every_projection_in_model_order():
    model = tiny_model(seed=0)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = wrap(model, target_modules=target_modules_of(model), rank=4, alpha=8)
    assert names == [n for n in linear_names if n != "lm_head"]
    assert len(names) == 2 * len(LLAMA_TARGET_MODULES)  # target_modules None: the family's
    assert list(relora_modules(model)) == names
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, ReLoRALinear)
    assert adapter_parameter_names(model) == [f"{n}.{p}" for n in names for p in ("lora_A", "lora_B")]
    params = dict(model.named_parameters())
    for name in adapter_parameter_names(model):
        assert params[name].requires_grad


@pytest.mark.parametrize("targets, expected", [
    (("q_proj", "v_proj"), 4),
    (("model.layers.0.*",), 7),
    (("*.mlp.*",), 6),
    (("lm_head",), 1),
])
def test_wrap_target_patterns(targets, expected):
    model = tiny_model(seed=0)
    names = wrap(model, rank=4, alpha=8, target_modules=targets)
    assert len(names) == expected
    assert all(isinstance(model.get_submodule(n), ReLoRALinear) for n in names)


def test_wrap_errors():
    model = tiny_model(seed=0)
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        wrap(model, rank=4, alpha=8, target_modules=("qkv",))
    wrap(model, target_modules=target_modules_of(model), rank=4, alpha=8)
    with pytest.raises(ValueError, match="matched no nn.Linear"):  # already wrapped: nothing left to match
        wrap(model, target_modules=target_modules_of(model), rank=4, alpha=8)


def test_wrap_draws_A_from_the_seeded_generator():
    first, second, other_seed = tiny_model(seed=0), tiny_model(seed=0), tiny_model(seed=0)
    wrap(first, target_modules=target_modules_of(first), rank=4, alpha=8, seed=11)
    wrap(second, target_modules=target_modules_of(second), rank=4, alpha=8, seed=11)
    wrap(other_seed, target_modules=target_modules_of(other_seed), rank=4, alpha=8, seed=12)
    for name, m in relora_modules(first).items():
        expected = functional.kaiming_uniform_A(4, m.in_features, functional.restart_generator(11, 0, name))
        assert torch.equal(m.lora_A, expected)
        assert torch.equal(relora_modules(second)[name].lora_A, expected)
        assert not torch.equal(relora_modules(other_seed)[name].lora_A, expected)


def test_merge_and_reinit_uses_restart_index_and_reports_total_norm():
    model = tiny_model(seed=1)
    wrap(model, target_modules=target_modules_of(model), rank=4, alpha=8, seed=3)
    modules = relora_modules(model)
    with torch.no_grad():
        for m in modules.values():
            m.lora_B.normal_(std=0.01)
        expected_norm = math.sqrt(sum(float(functional.lora_delta(m.lora_A, m.lora_B, m.scale).norm()) ** 2
                                      for m in modules.values()))
    total = merge_and_reinit(model, seed=3, restart_index=2)
    assert total == pytest.approx(expected_norm, rel=1e-5)
    for name, m in modules.items():
        expected = functional.kaiming_uniform_A(4, m.in_features, functional.restart_generator(3, 2, name))
        assert torch.equal(m.lora_A, expected)
        assert torch.count_nonzero(m.lora_B) == 0


def test_unwrap_round_trips_to_a_plain_llama():
    fresh = tiny_model(seed=2)
    model = tiny_model(seed=2)
    names = wrap(model, target_modules=target_modules_of(model), rank=4, alpha=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = token_batches(4, 32, seed=2)
    for _ in range(3):  # B moves away from zero, so unwrap really has something to merge
        lm_loss(model, next(batches)).backward()
        optimizer.step()
        optimizer.zero_grad()
    ids = fixed_batch()
    before = logits(model, ids)
    assert sorted(unwrap(model)) == sorted(names)
    after = logits(model, ids)
    assert float((after - before).norm() / before.norm()) < 1e-6
    assert not relora_modules(model)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)
    assert list(model.state_dict()) == list(fresh.state_dict())
    assert {n: t.shape for n, t in model.state_dict().items()} == {n: t.shape for n, t in fresh.state_dict().items()}
    assert all(p.requires_grad for p in model.parameters())  # plain nn.Linear weights train again
    wrapped_layer = model.get_submodule(names[0])
    assert not torch.equal(wrapped_layer.weight, fresh.get_submodule(names[0]).weight)  # W now holds the merged ΔW
