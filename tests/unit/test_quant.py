"""relora.base_dtype: the stored W (relora/quant.py), its rounding, the layer that holds it and its merge."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relora_ds.relora import functional, quant
from relora_ds.relora.layer import ReLoRALinear
from relora_ds.relora.wrap import merge_and_reinit, relora_modules, wrap

FORMATS = ["bf16", "int8", "fp8"]


def _w(out=48, inp=80, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_round_trip_error_is_within_half_a_step():
    w = _w()
    q, scale = quant.quantize(w, "int8")
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (48,)
    assert int(q.abs().max()) == 127  # each row's max maps to the top of the range
    assert ((quant.dequantize(q, scale) - w).abs() <= scale[:, None] / 2 + 1e-12).all()
    q, scale = quant.quantize(w, "fp8")
    assert q.dtype == torch.float8_e4m3fn
    rel = (quant.dequantize(q, scale) - w).abs() / w.abs().clamp_min(scale[:, None] * 2**-6)
    assert rel.max() <= 2**-4 + 1e-6  # 3 mantissa bits: half a gap is at most 1/16 of |w| (normal range)
    q, scale = quant.quantize(w, "bf16")
    assert scale is None and torch.equal(q, w.to(torch.bfloat16))


def test_all_zero_row_gets_a_usable_scale():
    w = _w()
    w[3] = 0
    q, scale = quant.quantize(w, "int8")
    assert scale[3] == 1 and (q[3] == 0).all() and torch.isfinite(quant.dequantize(q, scale)).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_stochastic_rounding_is_unbiased_lands_on_the_grid_and_repeats(fmt):
    w = _w()
    q0, scale = quant.quantize(w, fmt)
    x = q0.float().abs()  # points of the grid (scaled for int8/fp8), >= 0
    up = x + (1.0 if fmt == "int8" else quant._float_gap(x, fmt))  # the next point of the grid above each
    keep = (x > 0) & (up < quant.QMAX.get(fmt, float("inf")))
    x, up = x[keep], up[keep]
    target = x + (up - x) / 3
    draws = torch.stack([quant.round_to(target, fmt, "stochastic", torch.Generator().manual_seed(i)).float()
                         for i in range(400)])
    assert ((draws == x) | (draws == up)).all()  # always one of the two neighbours: exactly representable
    assert abs(float((draws == up).float().mean()) - 1 / 3) < 0.02  # up a third of the time: unbiased
    again = quant.round_to(target, fmt, "stochastic", torch.Generator().manual_seed(7))
    assert torch.equal(again.float(), draws[7])  # the draws are the generator's: identical on every rank
    assert torch.equal(quant.round_to(target, fmt, "nearest").float(), x)  # nearest: always down here


def test_many_small_merges_survive_stochastic_rounding_and_vanish_with_nearest():
    """An update of a tenth of a step per merge is lost every time by round-to-nearest; in expectation it is kept."""
    w = _w(64, 64)
    q, scale = quant.quantize(w, "int8")
    delta = 0.1 * scale[:, None] * torch.ones_like(w)
    results = {}
    for rounding in quant.MERGE_ROUNDINGS:
        cur_q, cur_s = q.clone(), scale.clone()
        for i in range(30):
            merged = quant.dequantize(cur_q, cur_s) + delta
            cur_q, cur_s = quant.quantize(merged, "int8", rounding=rounding, generator=torch.Generator().manual_seed(i))
        results[rounding] = (quant.dequantize(cur_q, cur_s) - quant.dequantize(q, scale)).mean() / delta.mean()
    assert abs(float(results["nearest"])) < 1  # most of the 30 updates lost (a few survive as the row scales move)
    assert abs(float(results["stochastic"]) - 30) < 3  # kept, on average


def test_unknown_settings_get_one_line():
    with pytest.raises(ValueError, match=r"^relora.base_dtype must be one of auto, fp32, bf16, int8, fp8, got 'int4'$"):
        quant.check_base_dtype("int4")
    with pytest.raises(ValueError, match="^relora.merge_rounding must be one of nearest, stochastic, got 'up'$"):
        quant.round_to(torch.zeros(2), "int8", "up")


def test_fp8_without_float8_in_torch_is_refused(monkeypatch):
    monkeypatch.delitem(quant.STORAGE, "fp8")
    with pytest.raises(ValueError, match=r"^relora.base_dtype fp8: this torch \(.*\) has no float8_e4m3fn; use int8"):
        quant.check_base_dtype("fp8")


@pytest.mark.parametrize("base_dtype", ["fp32", "bf16", "int8", "fp8"])
def test_stored_layer_forward_and_backward_equal_a_linear_on_the_dequantized_weight(base_dtype):
    linear = nn.Linear(80, 48, bias=True)
    torch.nn.init.normal_(linear.weight, std=0.02)
    layer = ReLoRALinear.from_linear(linear, rank=4, alpha=8, base_dtype=base_dtype,
                                     generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    assert linear.weight is None  # the Linear's W is released: only the stored one remains
    assert "weight" in dict(layer.named_buffers()) and "weight" not in dict(layer.named_parameters())
    x = torch.randn(3, 5, 80, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    A, B = layer.lora_A.detach().clone().requires_grad_(True), layer.lora_B.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, layer.dequantized_weight(), layer.bias) + layer.scale * F.linear(F.linear(x_ref, A), B)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.lora_A.grad, A.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, rtol=1e-5, atol=1e-7)
    assert layer.bias.grad is None


def test_fp32_storage_is_bitwise_the_parameter_path():
    linear = nn.Linear(40, 24)
    auto = ReLoRALinear.from_linear(linear_copy(linear), rank=4, alpha=8)
    stored = ReLoRALinear.from_linear(linear_copy(linear), rank=4, alpha=8, base_dtype="fp32")
    with torch.no_grad():
        for layer in (auto, stored):
            layer.lora_B.fill_(0.03)
    x = torch.randn(6, 40, requires_grad=True)
    assert torch.equal(auto(x), stored(x))
    assert torch.equal(torch.autograd.grad(auto(x).sum(), x)[0], torch.autograd.grad(stored(x).sum(), x)[0])


def linear_copy(linear: nn.Linear) -> nn.Linear:
    copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    copy.load_state_dict(linear.state_dict())
    return copy


def test_the_backward_keeps_no_dequantized_weight():
    """Only the stored int8 W and its scales are saved for the backward, never a float copy of W."""
    layer = ReLoRALinear.from_linear(nn.Linear(256, 512, bias=False), rank=4, alpha=8, base_dtype="int8")
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(torch.randn(2, 256, requires_grad=True)).sum()
    assert (torch.int8, (512, 256)) in saved
    assert not [s for s in saved if s[1] == (512, 256) and s[0] != torch.int8]


@pytest.mark.parametrize("base_dtype,rounding", [("int8", "nearest"), ("int8", "stochastic"), ("fp8", "stochastic"),
                                                 ("bf16", "stochastic"), ("auto", "nearest")])
def test_merge_requantizes_deq_w_plus_sba(base_dtype, rounding):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 64))
    if base_dtype == "auto":
        model = model.to(torch.bfloat16)
    wrap(model, rank=4, alpha=8, target_modules=["0", "1"], base_dtype=base_dtype)
    layers = relora_modules(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(std=0.05)
    expected = {}
    for name, layer in layers.items():
        merged = layer.dequantized_weight() + functional.lora_delta(layer.lora_A, layer.lora_B, layer.scale)
        fmt = base_dtype if layer.stored else "bf16"
        q, scale = quant.quantize(merged, fmt, rounding=rounding,
                                  generator=functional.rounding_generator(3, 1, name))
        expected[name] = quant.dequantize(q, scale)
    merge_and_reinit(model, seed=3, restart_index=1, rounding=rounding)
    for name, layer in layers.items():
        assert torch.equal(layer.dequantized_weight(), expected[name]), name
        assert not layer.lora_B.any()
        assert layer.weight.dtype == quant.STORAGE.get(base_dtype, torch.bfloat16)


def test_merged_linear_of_a_stored_layer_is_fp32():
    layer = ReLoRALinear.from_linear(nn.Linear(16, 8), rank=2, alpha=4, base_dtype="int8")
    with torch.no_grad():
        layer.lora_B.fill_(0.1)
    plain = layer.merged_linear()
    assert plain.weight.dtype == torch.float32
    x = torch.randn(3, 16)
    torch.testing.assert_close(plain(x), layer(x), rtol=1e-5, atol=1e-6)


def test_weight_bytes_count_the_stored_w_and_its_scales():
    out, inp = 32, 64
    sizes = {bd: ReLoRALinear.from_linear(nn.Linear(inp, out, bias=False), rank=2, alpha=4,
                                          base_dtype=bd).weight_bytes() for bd in ("auto", "bf16", "int8", "fp8")}
    assert sizes == {"auto": out * inp * 4, "bf16": out * inp * 2, "int8": out * inp + out * 4,
                     "fp8": out * inp + out * 4}


def test_a_stored_w_refuses_fp16_and_zero3_in_the_deepspeed_json():
    """(fp16 on a CPU is refused earlier by the DeepSpeed checks; on a GPU this is the line.)"""
    from relora_ds import methods
    from relora_ds.config import RunConfig
    from tests.helpers.runs import ds_config

    method = methods.from_config(RunConfig.from_dict({"relora": {"base_dtype": "fp8"}}))
    with pytest.raises(ValueError, match="^relora.base_dtype fp8: runs in fp32 or bf16; fp16 is enabled in the "
                                         "DeepSpeed JSON"):
        method.check_ds_config(ds_config(0, fp16={"enabled": True}))
    with pytest.raises(ValueError, match="^relora.base_dtype fp8: needs zero_optimization.stage 0, 1 or 2, got 3"):
        method.check_ds_config(ds_config(3))
    for stage in (0, 1, 2):
        method.check_ds_config(ds_config(stage, bf16=True))


def assert_stored_copy_of(model, plain: dict) -> dict:
    """Every wrapped layer of `model` holds the int8 W of `plain` (a plain model's state dict), every other tensor is
    bitwise plain's; returns the wrapped layers."""
    layers = relora_modules(model)
    for name, layer in layers.items():
        q, scale = quant.quantize(plain[f"{name}.weight"], "int8")
        assert torch.equal(layer.weight, q) and torch.equal(layer.weight_scale, scale), name
    for key, value in model.state_dict().items():
        if key.rsplit(".", 1)[0] not in layers:
            assert torch.equal(value, plain[key]), key
    return layers


def test_a_stored_w_is_wrapped_module_by_module_while_the_model_is_built():
    """The build with the method's per_module hook: every other tensor bitwise the plain build's, each stored W the
    plain build's W quantized (the same draws, in transformers' order); a no-op hook changes nothing."""
    from relora_ds import methods
    from relora_ds.config import RunConfig
    from relora_ds.model.build import build_from_config, preset_config

    config = preset_config("tiny", 512)
    plain = build_from_config(config, seed=3).state_dict()
    noop = build_from_config(config, seed=3, per_module=lambda model, name, module: None).state_dict()
    assert noop.keys() == plain.keys() and all(torch.equal(noop[k], plain[k]) for k in plain)
    method = methods.from_config(RunConfig.from_dict({"relora": {"base_dtype": "int8", "rank": 4}}))
    built = build_from_config(config, seed=3, per_module=method.wrap_while_building(torch.float32))
    assert len(assert_stored_copy_of(built, plain)) == 7 * config.num_hidden_layers
    auto = methods.from_config(RunConfig.from_dict({"relora": {"rank": 4}}))
    assert auto.wrap_while_building(torch.float32) is None  # auto in an fp32 run: wrapped after the build


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_auto_in_a_bf16_run_casts_each_wrapped_layer_as_it_is_built(dtype):
    """base_dtype auto in a bf16 (fp16) run: each target wrapped and its parameters cast as soon as it is initialised,
    bitwise what the plain build, wrapped after, gives once DeepSpeed has cast every parameter; every other module
    left in fp32 for DeepSpeed to cast."""
    from relora_ds import methods
    from relora_ds.config import RunConfig
    from relora_ds.model.build import build_from_config, preset_config
    from relora_ds.relora.wrap import relora_modules

    config = preset_config("tiny", 512)
    method = methods.from_config(RunConfig.from_dict({"relora": {"rank": 4}}))
    reference = build_from_config(config, seed=3)
    method.wrap(reference)
    for parameter in reference.parameters():  # what DeepSpeed's engine does to a bf16 run's module
        parameter.data = parameter.data.to(dtype)
    built = build_from_config(config, seed=3, per_module=method.wrap_while_building(dtype))
    assert len(relora_modules(built)) == 7 * config.num_hidden_layers
    expected, got = reference.state_dict(), built.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key].to(dtype), expected[key]), key
        wrapped = key.rsplit(".", 1)[0] in relora_modules(built)
        assert got[key].dtype == (dtype if wrapped else torch.float32), key


def _as_bin_shards(path) -> None:
    """Rewrite a saved model's model.safetensors as two *.bin shards (torch.save's zip format) and their index, as
    older checkpoints ship."""
    import json

    from safetensors.torch import load_file

    state = load_file(path / "model.safetensors")
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, keys in shards.items():
        torch.save({key: state[key] for key in keys}, path / file)
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {key: file for file, keys in shards.items() for key in keys}}))
    (path / "model.safetensors").unlink()


def test_only_a_zip_format_bin_is_read_module_by_module(tmp_path):
    """torch.save's legacy format cannot be memory-mapped: such a *.bin is left to the whole load ({})."""
    from relora_ds.model import hf

    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert hf.weights_index(str(tmp_path)) == {}
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    assert hf.weights_index(str(tmp_path)) == {"w": str(tmp_path / "pytorch_model.bin")}


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2's tiny preset ties its embeddings
def test_a_saved_model_is_loaded_module_by_module_into_a_stored_w(tmp_path, family, weights):
    """model.init_from with a stored W: each module's tensors read from the safetensors (or zip-format *.bin shards,
    memory-mapped) on their own and each target stored as it is filled; the same tensors as transformers' own load,
    each W quantized, tied weights tied."""
    from relora_ds import methods
    from relora_ds.config import RunConfig
    from relora_ds.model import hf
    from relora_ds.model.build import build_from_config, load_module_by_module, load_pretrained, preset_config

    build_from_config(preset_config("tiny", 512, family), seed=1).save_pretrained(tmp_path)
    if weights == "bin":
        _as_bin_shards(tmp_path)
    assert {os.path.basename(f).split(".")[-1] for f in hf.weights_index(str(tmp_path)).values()} == {weights}
    plain = load_pretrained(str(tmp_path)).state_dict()
    method = methods.from_config(RunConfig.from_dict({"relora": {"base_dtype": "int8", "rank": 4},
                                                      "model": {"family": family}}))
    loaded = load_module_by_module(str(tmp_path), method.wrap_while_building(torch.float32))
    assert len(assert_stored_copy_of(loaded, plain)) == 14
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == (family == "qwen2")
