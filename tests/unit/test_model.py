"""LLaMA presets: they build, the parameter and FLOP counts (read from the model) are exact, the paper's table
holds. The other families: tests/unit/test_families.py."""

import dataclasses
import importlib.util

import pytest
import torch

from relora_ds import config
from relora_ds.model.families import LLAMA_TARGET_MODULES, MODEL_PRESETS, target_modules_of
from relora_ds.model import build
from relora_ds.model.build import build_model, preset_meta_model, resolve_attn_implementation
from relora_ds.model.counts import flops_per_token, paper_param_table, param_count
from relora_ds.model.families import FAMILIES
from relora_ds.relora.wrap import wrap
from tests.helpers.tiny import fixed_batch, logits, tiny_model


def numel(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


PRESETS = FAMILIES["llama"].presets


def test_presets_match_config_choices():
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(config.ModelConfig)}
    assert tuple(PRESETS) == MODEL_PRESETS == choices["preset"]
    assert build.ATTN_IMPLEMENTATIONS == choices["attn_implementation"]


@pytest.mark.parametrize("preset", ["tiny", "20m", "60m", "130m"])
def test_small_presets_build_with_exact_counts(preset):
    vocab = 1000  # the count is exact at any vocabulary; a small one keeps the real build fast
    model = build_model(preset, vocab, seed=0)
    shape = PRESETS[preset]
    assert model.config.hidden_size == shape["hidden_size"]
    assert model.config.num_hidden_layers == shape["num_hidden_layers"]
    assert not model.config.tie_word_embeddings
    assert numel(model) == param_count(model) == param_count(preset_meta_model(preset, vocab))
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_counts_exact_on_meta_device(preset):
    with torch.device("meta"):
        model = build_model(preset, 32100)
    assert numel(model) == param_count(preset_meta_model(preset, 32100))


@pytest.mark.parametrize("preset, targets, trainable_scaling", [
    ("tiny", None, False),
    ("tiny", ("q_proj", "v_proj"), True),
    ("1b", LLAMA_TARGET_MODULES, False),
    ("60m", ("*.mlp.*", "lm_head"), False),
])
def test_relora_counts_exact(preset, targets, trainable_scaling):
    with torch.device("meta"):
        model = build_model(preset, 32100)
        wrap(model, rank=32, alpha=32, target_modules=target_modules_of(model, targets),
             trainable_scaling=trainable_scaling)
    kwargs = dict(relora_rank=32, target_modules=targets, trainable_scaling=trainable_scaling)
    plain = preset_meta_model(preset, 32100)
    assert numel(model) == param_count(plain, **kwargs)
    assert numel(model, trainable_only=True) == param_count(plain, trainable_only=True, **kwargs)
    assert param_count(plain, trainable_only=True) == param_count(plain)  # full rank: all train


def test_paper_table_within_two_percent():
    rows = {row["preset"]: row for row in paper_param_table()}
    assert list(rows) == ["60m", "130m", "250m", "350m", "1b", "7b"]
    assert rows["7b"]["vocab_size"] == 32000 and rows["60m"]["vocab_size"] == 32100
    assert rows["7b"]["params"] == 6_738_415_616  # LLaMA-7B's well-known exact size
    for row in rows.values():
        assert abs(row["params"] - row["paper_params"]) / row["paper_params"] < 0.02, row
        assert row["rel_diff"] == pytest.approx((row["params"] - row["paper_params"]) / row["paper_params"])


def test_flops_per_token_hand_computed():
    # tiny: d=64, I=176, L=2, vocab 256, T=32.
    # per layer: q,k,v,o 4·64·64 = 16384; gate, up, down 3·64·176 = 33792 → 50176; 2 layers 100352
    # lm_head 256·64 = 16384 → N_lin = 116736; attention 12·2·64·32 = 49152
    # full = 6·116736 + 49152 = 749568
    # r=8 adapters per layer: 4·8·(64+64) + 3·8·(64+176) = 4096 + 5760 = 9856; 2 layers 19712
    # relora = 6·116736 − 2·100352 + 6·19712 + 49152 = 667136
    tiny = preset_meta_model("tiny", 256)
    flops = flops_per_token(tiny, 32, relora_rank=8)
    assert flops == dict(full=749568, attention=49152, n_linear=116736, relora=667136,
                         n_wrapped=100352, n_adapter=19712)
    assert flops_per_token(tiny, 32) == dict(full=749568, attention=49152, n_linear=116736)
    assert flops_per_token(tiny.config, 32) == flops_per_token(tiny, 32)  # a transformers config counts as its model
    big = flops_per_token(preset_meta_model("1b", 32100), 512, relora_rank=128)
    assert big["relora"] < 0.8 * big["full"]  # no dW GEMM for the frozen W: the source of ReLoRA's speed-up
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(tiny, 0)
    with pytest.raises(ValueError, match="relora.rank"):
        flops_per_token(tiny, 32, relora_rank=0)


def test_attn_implementation_resolution(monkeypatch):
    assert resolve_attn_implementation("eager") == "eager"
    assert resolve_attn_implementation("sdpa") == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_attn_implementation("auto") == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "flash_attn" else real_find_spec(name))
    assert resolve_attn_implementation("auto") == "sdpa"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else real_find_spec(name))
    assert resolve_attn_implementation("auto") == "flash_attention_2"
    with pytest.raises(ValueError, match="model.attn_implementation must be one of"):
        resolve_attn_implementation("flash")


def test_built_model_uses_the_resolved_attention():
    assert build_model("tiny", 64, attn_implementation="eager").config._attn_implementation == "eager"
    if not torch.cuda.is_available():
        assert build_model("tiny", 64).config._attn_implementation == "sdpa"


def test_bad_preset_and_vocab_raise():
    with pytest.raises(ValueError, match="model.preset must be one of tiny, 20m, .*got '3b'"):
        build_model("3b", 100)
    with pytest.raises(ValueError, match="model.preset"):
        preset_meta_model("3b", 100)
    with pytest.raises(ValueError, match="model.vocab_size"):
        build_model("tiny", 0)
    with pytest.raises(ValueError, match="model.vocab_size"):
        preset_meta_model("tiny", 0)
    with pytest.raises(ValueError, match="model.family must be one of llama, mistral, qwen2, gpt_neox, got 'gpt2'"):
        build_model("tiny", 100, family="gpt2")
    with pytest.raises(ValueError, match="relora.rank"):
        param_count(preset_meta_model("tiny", 100), relora_rank=0)


def test_seeded_builds_are_identical():
    model = tiny_model(seed=7)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), tiny_model(seed=7).parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), tiny_model(seed=8).parameters()))
    ids = fixed_batch()
    assert torch.equal(logits(model, ids), logits(tiny_model(seed=7), ids))
