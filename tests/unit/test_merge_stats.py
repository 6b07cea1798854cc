"""What a merge reports of its rounding: the error ReLoRALinear.merge_delta_ returns, and the restart record's
merge_error, merge_kept and (relora.track_drift) drift, against sums computed here by hand. One process, a plain
torch optimizer behind a stand-in engine (ZeRO-0's layout)."""

import math

import pytest
import torch
from torch import nn

from relora_ds.engine.restart import merge_sums, relora_restart, squared_norm
from relora_ds.relora import functional, quant
from relora_ds.relora.layer import ReLoRALinear
from relora_ds.relora.wrap import relora_modules, wrap
from tests.helpers.fakes import FakeEngine


@pytest.mark.parametrize("base_dtype", ["auto", "fp32", "bf16", "int8", "fp8"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_merge_delta_returns_what_the_stored_w_did_not_take(base_dtype, rounding):
    torch.manual_seed(0)
    layer = ReLoRALinear.from_linear(nn.Linear(64, 32, bias=False), rank=4, alpha=8, base_dtype=base_dtype)
    before = layer.dequantized_weight().clone()
    delta = torch.randn(32, 64) * 1e-3
    error = layer.merge_delta_(delta, rounding, torch.Generator().manual_seed(1))
    assert error.dtype == torch.float32 and error.shape == (32, 64)
    torch.testing.assert_close(error, layer.dequantized_weight() - (before + delta), rtol=0, atol=1e-7)
    if base_dtype in ("auto", "fp32"):  # fp32 storage takes the update whole (and W is not the error's buffer)
        assert error.abs().max() < 1e-8
        torch.testing.assert_close(layer.dequantized_weight(), before + delta, rtol=0, atol=1e-8)
    else:
        assert error.abs().max() > 0


def test_merge_sums_match_float64_sums_over_chunks():
    delta, error = torch.randn(3000, 700), torch.randn(3000, 700) * 1e-2  # > one 2^20 chunk
    d, e = delta.double(), error.double()
    expected = (float(d.square().sum()), float(e.square().sum()), float((e * d).sum()))
    assert merge_sums(delta, error) == pytest.approx(expected, rel=1e-12)
    assert squared_norm(delta) == pytest.approx(expected[0], rel=1e-12)


class _Engine(FakeEngine):
    """ZeRO-0 stand-in with a model and a step count: what relora_restart reads."""

    def __init__(self, module, optimizer):
        super().__init__(optimizer)
        self.module, self.global_steps = module, 1


def _trained(base_dtype: str, lr: float):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48, bias=False), nn.Linear(48, 64, bias=False))
    wrap(model, rank=4, alpha=8, target_modules=["0", "1"], base_dtype=base_dtype)
    adapters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(adapters, lr=lr)
    model(torch.randn(8, 64)).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        for layer in relora_modules(model).values():
            layer.lora_B.normal_(std=lr)
    return model, _Engine(model, optimizer)


@pytest.mark.parametrize("base_dtype,rounding", [("auto", "nearest"), ("int8", "nearest"), ("int8", "stochastic"),
                                                 ("bf16", "nearest")])
def test_the_record_reports_rounding_error_share_kept_and_drift(base_dtype, rounding):
    model, engine = _trained(base_dtype, lr=1e-3)
    layers = relora_modules(model)
    exact, sums = {}, torch.zeros(3, dtype=torch.float64)
    for index in (1, 2):  # two merges: the drift accumulates both roundings
        expected = {}
        for name, layer in layers.items():
            delta = functional.lora_delta(layer.lora_A, layer.lora_B, layer.scale).detach()
            exact[name] = exact.get(name, layer.dequantized_weight()) + delta
            merged = layer.dequantized_weight() + delta
            fmt = base_dtype if layer.stored else "fp32"
            q, scale = quant.quantize(merged, fmt, rounding=rounding,
                                      generator=functional.rounding_generator(5, index, name))
            expected[name] = (delta, quant.dequantize(q, scale) - merged)
        record = relora_restart(engine, restart_index=index, step=index, seed=5, reset_optimizer=False,
                                rounding=rounding, track_drift=True)
        sums = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
        for delta, error in expected.values():
            sums += torch.tensor(merge_sums(delta, error), dtype=torch.float64)
        with torch.no_grad():
            for layer in layers.values():
                layer.lora_B.normal_(std=1e-3)
        assert record.merge_error == pytest.approx(math.sqrt(sums[1] / sums[0]), rel=1e-6, abs=1e-9)
        assert record.merge_kept == pytest.approx(1 + float(sums[2] / sums[0]), rel=1e-6)
        drift = math.sqrt(sum(float((layer.dequantized_weight() - exact[name]).detach().double().square().sum())
                              for name, layer in layers.items())
                          / sum(float(w.double().square().sum()) for w in exact.values()))
        assert record.drift == pytest.approx(drift, rel=1e-4, abs=1e-9)
        if base_dtype == "auto":  # fp32 W takes every update
            assert record.merge_error < 1e-6 and record.drift < 1e-6
        else:
            assert record.merge_error > 1e-4 and record.drift > 1e-7
    assert "drift" not in relora_restart(engine, restart_index=3, step=3, seed=5, reset_optimizer=False).to_dict()


def test_int8_nearest_loses_small_updates_that_stochastic_keeps_in_expectation():
    """An update a fraction of int8's step onto a W that sits on its grid: nearest rounding keeps almost none of it
    (merge_kept near 0), stochastic rounding keeps it in expectation (merge_kept near 1, at a larger error)."""
    kept = {}
    for rounding in ("nearest", "stochastic"):
        model, engine = _trained("int8", lr=2e-4)
        kept[rounding] = relora_restart(engine, restart_index=1, step=1, seed=0, reset_optimizer=False,
                                        rounding=rounding).merge_kept
    assert kept["nearest"] < 0.1
    assert abs(kept["stochastic"] - 1) < 0.15


def test_drift_tracking_refuses_zero3_in_one_line():
    from relora_ds import methods
    from relora_ds.config import RunConfig
    from tests.helpers.runs import ds_config

    method = methods.from_config(RunConfig.from_dict({"relora": {"track_drift": True}}))
    method.check_ds_config(ds_config(2))
    with pytest.raises(ValueError, match=r"^relora.track_drift: needs zero_optimization.stage 0, 1 or 2, got 3 \("):
        method.check_ds_config(ds_config(3))


def test_merge_into_weight_takes_only_a_partitioned_w():
    from relora_ds.engine.restart import merge_into_weight

    with pytest.raises(ValueError, match=r"^merge_into_weight: q.weight is not ZeRO-3-partitioned; a whole W merges "
                                         r"through ReLoRALinear.merge_delta_$"):
        merge_into_weight(torch.zeros(4, 3), torch.zeros(2, 3), torch.zeros(4, 2), 1.0, name="q.weight")
