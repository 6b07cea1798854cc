"""Fail fast: the restart's layout checks (coverage of fragments, unsupported settings) and the model settings
checked on the meta-device model before any rank starts work."""

import pytest

from relora_ds.config import load_config
from relora_ds.engine import zero
from relora_ds import methods
from relora_ds.errors import RunError
from relora_ds.trainer import check_model_settings
from tests.helpers.fakes import FakeEngine


@pytest.mark.parametrize("intervals, numel, replicated, problem", [
    ([(0, 5), (5, 5)], 10, False, None),
    ([(5, 5), (0, 5)], 10, False, None),                       # any rank order
    ([(0, 10), (0, 0)], 10, False, None),                      # a rank may own nothing
    ([(0, 4), (5, 5)], 10, False, "elements [4, 5) are held by no rank"),    # a hole
    ([(0, 6), (5, 5)], 10, False, "elements from 5 are held by two ranks"),  # an overlap
    ([(0, 5), (0, 0)], 10, False, "elements [5, 10) are held by no rank"),   # a missing tail
    ([(0, 0), (0, 0)], 10, False, "elements [0, 10) are held by no rank"),   # no fragment anywhere: the silent no-op
    ([(0, 10), (0, 10)], 10, True, None),
    ([(0, 10), (0, 0)], 10, True, "ranks [1] do not hold the whole tensor"),
])
def test_coverage_errors(intervals, numel, replicated, problem):
    assert zero.coverage_errors(intervals, numel, replicated) == problem


class Offload:
    device = "nvme"


@pytest.mark.parametrize("engine, setting", [
    (FakeEngine(stage=2, fp16=True), "fp16.enabled"),
    (FakeEngine(stage=3, hpz=2), "zero_optimization.zero_hpz_partition_size 2"),
    (FakeEngine(stage=3, quantized=True), "zero_optimization.zero_quantized_weights"),
    (FakeEngine(stage=3, offload=Offload()), "zero_optimization.offload_param.device nvme"),
])
def test_unsupported_settings_are_one_line_errors(engine, setting):
    with pytest.raises(zero.LayoutError) as e:
        zero.check_engine_settings(engine)
    assert str(e.value).startswith(setting) and "\n" not in str(e.value)


def test_a_zero3_partition_in_memory_passes_and_one_on_nvme_is_refused():
    """DeepSpeed marks the partitions of offload_param cpu 'not-nvme': once taken for NVMe by a suffix match."""
    import types

    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    def param(location):
        return types.SimpleNamespace(ds_tensor=types.SimpleNamespace(final_location=location))

    for location in (None, "not-nvme", OffloadDeviceEnum.cpu):
        zero.check_zero3_weight(param(location), "w")
    with pytest.raises(ValueError, match="relora restart: w is offloaded to NVMe"):
        zero.check_zero3_weight(param(OffloadDeviceEnum.nvme), "w")


def test_supported_settings_pass():
    zero.check_engine_settings(FakeEngine(stage=3))
    zero.check_engine_settings(FakeEngine(stage=1))


@pytest.mark.parametrize("overrides, message", [
    (["relora.rank=512"], "relora.rank 512 is larger than both dims of model.layers.0.self_attn.q_proj (64, 64)"),
    (["relora.target_modules=[qkv]"], "relora.target_modules ['qkv'] matched no nn.Linear in the model"),
    (["model.init_from=/nonexistent"], "/nonexistent: not a Hugging Face model directory"),
    (["data.seq_len=4096"], "data.seq_len 4096 is longer than"),
])
def test_model_settings_checked_before_any_work(overrides, message):
    cfg = load_config(None, ["model.preset=tiny", "schedule.warmup_steps=1", *overrides])
    with pytest.raises(RunError) as e:
        check_model_settings(cfg, methods.from_config(cfg), 256)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_init_from_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    cfg = load_config(None, ["schedule.warmup_steps=1", f"model.init_from={tmp_path}"])
    with pytest.raises(RunError, match="no weights"):
        check_model_settings(cfg, methods.from_config(cfg), 256)


def test_good_settings_pass():
    cfg = load_config(None, ["model.preset=7b", "schedule.warmup_steps=1"])
    check_model_settings(cfg, methods.from_config(cfg), 32000)  # meta: no memory
