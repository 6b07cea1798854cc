"""Optimizer reset: magnitude / random / full pruning of the adapters' Adam moments, in place."""

import pytest
import torch

from relora_ds.relora.reset import magnitude_threshold, prune_, reset_optimizer_state, zero_unpaired_
from relora_ds.model.families import target_modules_of
from relora_ds.relora.wrap import adapter_parameter_names, wrap
from tests.helpers.tiny import lm_loss, tiny_model, token_batches

RANK = 16  # every adapter tensor of the tiny model then has >= 1024 entries: 1% is resolvable to 0.1%


def trained(optimizer_cls=torch.optim.AdamW, steps: int = 3):
    """A wrapped tiny model after a few optimizer steps: (model, optimizer, adapters name→param)."""
    model = tiny_model(seed=0)
    wrap(model, target_modules=target_modules_of(model), rank=RANK, alpha=32)
    optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches = token_batches(4, 32, seed=0)
    for _ in range(steps):
        lm_loss(model, next(batches)).backward()
        optimizer.step()
        optimizer.zero_grad()
    params = dict(model.named_parameters())
    adapters = {name: params[name] for name in adapter_parameter_names(model)}
    return model, optimizer, adapters


def snapshot(optimizer, params):
    return {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in params}


def test_magnitude_threshold_definition():
    values = torch.arange(10.0)[torch.randperm(10, generator=torch.Generator().manual_seed(0))]
    assert float(magnitude_threshold(values, 0.5)) == 4.0  # k = 5: the 5th smallest
    assert float(magnitude_threshold(values, 0.99)) == 8.0  # k = int(9.9) = 9
    assert magnitude_threshold(values, 0.09) is None  # k = 0: prune nothing
    assert magnitude_threshold(values.to(torch.bfloat16), 0.5).dtype == torch.float32
    for bad in (1.5, 1.0, -0.1):  # the config's range, [0, 1): zeroing everything is optimizer_reset full
        with pytest.raises(ValueError, match=r"relora.prune_ratio must be in \[0, 1\)"):
            magnitude_threshold(values, bad)


def test_prune_magnitude_zeroes_the_smallest_in_place():
    t = torch.randn(100, 100, generator=torch.Generator().manual_seed(0))
    original = t.clone()
    pointer = t.data_ptr()
    assert prune_(t, "magnitude", 0.99) == 9900
    assert t.data_ptr() == pointer
    kept = t != 0
    assert int(kept.sum()) == 100
    assert torch.equal(t[kept], original[kept])
    assert original[kept].abs().min() > original[~kept].abs().max()  # exactly the largest 1% survive


def test_prune_with_a_global_threshold_on_fragments_equals_whole_tensor():
    """The sharded DeepSpeed path prunes each rank's fragment with the whole tensor's threshold."""
    whole = torch.randn(1001, generator=torch.Generator().manual_seed(1))
    fragments = [whole[:400].clone(), whole[400:].clone()]
    threshold = magnitude_threshold(whole.abs(), 0.9)
    zeroed = sum(prune_(f, "magnitude", 0.9, threshold=threshold) for f in fragments)
    assert prune_(whole, "magnitude", 0.9) == zeroed == 900
    assert torch.equal(torch.cat(fragments), whole)


def test_prune_random_full_none_and_bf16():
    generator = torch.Generator().manual_seed(0)
    t = torch.randn(20000, generator=generator) + 10.0  # no zeros to start with
    assert prune_(t.clone(), "none", 0.5) == 0
    full = t.clone()
    assert prune_(full, "full", 0.0) == 20000 and torch.count_nonzero(full) == 0
    first, second = t.clone(), t.clone()
    n = prune_(first, "random", 0.3, generator=torch.Generator().manual_seed(5))
    prune_(second, "random", 0.3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, second)  # reproducible from the generator
    assert n == 20000 - int(torch.count_nonzero(first))
    assert abs(n / 20000 - 0.3) < 0.02
    half = torch.arange(1.0, 257.0).to(torch.bfloat16)  # distinct values: ties would all be zeroed
    assert prune_(half, "magnitude", 0.5) == 128 and half.dtype == torch.bfloat16
    assert float(half[127]) == 0 and float(half[128]) == 129


@pytest.mark.parametrize("optimizer_cls", [torch.optim.AdamW, torch.optim.Adam])
def test_magnitude_reset_keeps_one_percent_of_each_adapter_moment(optimizer_cls):
    model, optimizer, adapters = trained(optimizer_cls)
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in {id(a) for a in adapters.values()}]
    assert others  # embeddings, norms, lm_head
    before_others = snapshot(optimizer, others)
    before_adapters = snapshot(optimizer, adapters.values())
    pointers = {id(p): optimizer.state[p]["exp_avg"].data_ptr() for p in adapters.values()}

    fraction = reset_optimizer_state(optimizer, adapters, method="magnitude", ratio=0.99, pair_moments=False)

    assert 0.985 <= fraction <= 0.99
    for name, p in adapters.items():
        state = optimizer.state[p]
        assert state["exp_avg"].data_ptr() == pointers[id(p)]  # in place
        assert torch.equal(state["step"], before_adapters[id(p)]["step"])  # bias correction unchanged
        for key in ("exp_avg", "exp_avg_sq"):
            assert p.numel() >= 1024
            kept = torch.count_nonzero(state[key]) / state[key].numel()
            assert abs(kept - 0.01) <= 0.001, (name, key, float(kept))
            mask = state[key] != 0
            assert torch.equal(state[key][mask], before_adapters[id(p)][key][mask])
    for p in others:  # bitwise untouched
        for key, value in before_others[id(p)].items():
            assert torch.equal(optimizer.state[p][key], value)

    lm_loss(model, next(token_batches(4, 32, seed=9))).backward()  # training goes on after a reset
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in adapters.values())


def test_zero_unpaired_drops_first_moments_without_a_second():
    exp_avg = torch.tensor([0.5, -0.2, 0.0, 0.3, 0.1])
    exp_avg_sq = torch.tensor([0.0, 0.4, 0.0, 0.0, 0.2])
    assert zero_unpaired_(exp_avg, exp_avg_sq) == 2
    assert exp_avg.tolist() == pytest.approx([0.0, -0.2, 0.0, 0.0, 0.1])
    assert exp_avg_sq.tolist() == pytest.approx([0.0, 0.4, 0.0, 0.0, 0.2])


def test_pair_moments_leaves_no_first_moment_without_a_second():
    """Independent pruning (the paper's) leaves entries with exp_avg != 0 and exp_avg_sq == 0: Adam steps
    them by ~lr·m/eps while the gradient is zero (A's, right after a restart). pair_moments removes them."""
    _, optimizer, adapters = trained()
    independent = reset_optimizer_state(optimizer, adapters, method="magnitude", ratio=0.99, pair_moments=False)
    unpaired = sum(int(((optimizer.state[p]["exp_avg"] != 0) & (optimizer.state[p]["exp_avg_sq"] == 0)).sum())
                   for p in adapters.values())
    assert unpaired > 0  # the trap is real on a real model

    _, optimizer, adapters = trained()
    paired = reset_optimizer_state(optimizer, adapters, method="magnitude", ratio=0.99, pair_moments=True)
    total = 2 * sum(p.numel() for p in adapters.values())
    assert paired == pytest.approx(independent + unpaired / total)  # same seed: the same moments as above
    for p in adapters.values():
        state = optimizer.state[p]
        assert not ((state["exp_avg"] != 0) & (state["exp_avg_sq"] == 0)).any()
        assert abs(torch.count_nonzero(state["exp_avg_sq"]) / p.numel() - 0.01) <= 0.001  # v pruned as before
        assert torch.count_nonzero(state["exp_avg"]) <= torch.count_nonzero(state["exp_avg_sq"])


def test_random_and_full_reset_fractions():
    _, optimizer, adapters = trained()
    fraction = reset_optimizer_state(optimizer, adapters, method="random", ratio=0.5,
                                     generator=torch.Generator().manual_seed(0), pair_moments=False)
    assert abs(fraction - 0.5) < 0.01
    for p in adapters.values():
        kept = torch.count_nonzero(optimizer.state[p]["exp_avg"]) / p.numel()
        assert 0.4 < kept < 0.6
    assert reset_optimizer_state(optimizer, list(adapters.values()), method="full", ratio=0.0) == 1.0
    for p in adapters.values():
        assert torch.count_nonzero(optimizer.state[p]["exp_avg"]) == 0
        assert torch.count_nonzero(optimizer.state[p]["exp_avg_sq"]) == 0
        assert float(optimizer.state[p]["step"]) == 3


def test_reset_none_changes_nothing():
    _, optimizer, adapters = trained(steps=1)
    before = snapshot(optimizer, adapters.values())
    assert reset_optimizer_state(optimizer, adapters, method="none", ratio=0.99) == 0.0
    for p in adapters.values():
        assert all(torch.equal(optimizer.state[p][k], v) for k, v in before[id(p)].items())


def test_reset_before_first_step_raises():
    model = tiny_model(seed=0)
    wrap(model, target_modules=target_modules_of(model), rank=RANK, alpha=32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    params = dict(model.named_parameters())
    adapters = {n: params[n] for n in adapter_parameter_names(model)}
    with pytest.raises(ValueError, match="no optimizer state for model.layers.0.self_attn.q_proj.lora_A"):
        reset_optimizer_state(optimizer, adapters)


def test_reset_of_params_outside_the_optimizer_raises():
    _, optimizer, adapters = trained(steps=1)
    stranger = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="not in the optimizer"):
        reset_optimizer_state(optimizer, {"stranger": stranger})
    with pytest.raises(ValueError, match="no parameters"):
        reset_optimizer_state(optimizer, {})


def test_reset_bad_arguments_raise():
    _, optimizer, adapters = trained(steps=1)
    with pytest.raises(ValueError, match="relora.optimizer_reset"):
        reset_optimizer_state(optimizer, adapters, method="l1")
    with pytest.raises(ValueError, match="relora.prune_ratio"):
        reset_optimizer_state(optimizer, adapters, ratio=-0.1)
    p = torch.nn.Parameter(torch.ones(4))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(4)
    sgd.step()
    with pytest.raises(ValueError, match="exp_avg"):
        reset_optimizer_state(sgd, [p])
