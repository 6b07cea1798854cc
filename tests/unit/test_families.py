"""Model families (relora_ds/model/families.py): every preset builds on the meta device with its family's shape,
published sizes come out exact, grouped-query parameter and FLOP counts match a hand count, each family wraps its
own projections by default, and model.hf_config builds from a config.json (errors one line, naming the field)."""

import json
import os

import pytest
import torch
from torch import nn

from relora_ds import config
from relora_ds.model.families import LLAMA_TARGET_MODULES, MODEL_PRESETS
from relora_ds.config import ModelConfig, load_config
from relora_ds.model import hf
from relora_ds.model.build import (build_model, input_embedding_name, meta_model, model_from_config,
                                   preset_config, preset_meta_model)
from relora_ds.model.counts import flops_per_token, param_count
from relora_ds.model.families import FAMILIES
from relora_ds.model.families import target_modules_of
from relora_ds.relora.wrap import wrap, wrap_targets

FAMILY_NAMES = list(FAMILIES)

# family → (causal LM class, kv heads as a function of heads, MLP as a function of (hidden, LLaMA's MLP), tied ≤ 1b)
EXPECTED = {
    "llama": ("LlamaForCausalLM", lambda h: h, lambda d, inter: inter, False),
    "mistral": ("MistralForCausalLM", lambda h: h // 4, lambda d, inter: d * 7 // 2, False),
    "qwen2": ("Qwen2ForCausalLM", lambda h: h // 4, lambda d, inter: inter, True),
    "gpt_neox": ("GPTNeoXForCausalLM", lambda h: h, lambda d, inter: 4 * d, False),
}


def numel(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_preset_builds_on_meta_with_its_familys_shape(family):
    llama = FAMILIES["llama"].presets
    for preset in MODEL_PRESETS:
        model = preset_meta_model(preset, 1000, family)
        c = model.config
        cls, kv, mlp, tied_small = EXPECTED[family]
        assert type(model).__name__ == cls and c.model_type == family, preset
        heads, d = c.num_attention_heads, c.hidden_size
        head_dim = d // heads
        if family != "gpt_neox" and not (family == "qwen2" and preset == "7b"):  # LLaMA's width, heads, depth
            assert (d, heads, c.num_hidden_layers) == tuple(llama[preset][k] for k in (
                "hidden_size", "num_attention_heads", "num_hidden_layers")), preset
            assert c.intermediate_size == mlp(d, llama[preset]["intermediate_size"]), preset
        assert c.tie_word_embeddings == (tied_small and preset != "7b"), preset
        assert (model.lm_head.weight is model.get_input_embeddings().weight) == c.tie_word_embeddings
        assert model.get_submodule(FAMILIES[family].embedding) is model.get_input_embeddings()
        linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        layer = "gpt_neox.layers.0" if family == "gpt_neox" else "model.layers.0"
        if family == "gpt_neox":
            qkv = linears[f"{layer}.attention.query_key_value"]
            assert (qkv.out_features, qkv.in_features) == (3 * d, d) and qkv.bias is not None
            assert linears[f"{layer}.mlp.dense_h_to_4h"].out_features == 4 * d == c.intermediate_size
            assert isinstance(model.get_submodule(f"{layer}.input_layernorm"), nn.LayerNorm)
            assert c.use_parallel_residual and c.rope_parameters["partial_rotary_factor"] == 0.25
            assert c.max_position_embeddings == 2048
        else:
            kv_heads = 4 if (family, preset) == ("qwen2", "7b") else kv(heads)  # Qwen2-7B: 28 heads, 4 kv heads
            k = linears[f"{layer}.self_attn.k_proj"]
            assert (k.out_features, k.in_features) == (kv_heads * head_dim, d) and c.num_key_value_heads == kv_heads
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):  # Qwen2: q/k/v biases, o none; others none
                has_bias = linears[f"{layer}.self_attn.{proj}"].bias is not None
                assert has_bias == (family == "qwen2" and proj != "o_proj"), (preset, proj)
        assert not any(p.device.type != "meta" for p in model.parameters())


@pytest.mark.parametrize("family, preset, vocab, params", [
    ("mistral", "7b", 32000, 7_241_732_096),      # Mistral-7B
    ("qwen2", "7b", 152064, 7_615_616_512),       # Qwen2-7B
    ("gpt_neox", "60m", 50304, 70_426_624),       # pythia-70m
    ("gpt_neox", "130m", 50304, 162_322_944),     # pythia-160m
    ("gpt_neox", "350m", 50304, 405_334_016),     # pythia-410m
    ("gpt_neox", "1b", 50304, 1_011_781_632),     # pythia-1b
    ("gpt_neox", "7b", 50432, 6_857_302_016),     # pythia-6.9b (its vocabulary is padded further)
])
def test_presets_of_published_models_have_their_published_sizes(family, preset, vocab, params):
    assert param_count(preset_meta_model(preset, vocab, family)) == params


def test_grouped_query_counts_by_hand():
    # mistral tiny: d=64, 4 heads of 16, 1 kv head, MLP 224, 2 layers, vocab 256, T=32.
    # per layer: q 64·64 + k 16·64 + v 16·64 + o 64·64 = 10240; MLP 3·64·224 = 43008; 2 RMSNorms 128
    # N_lin = 2·(10240 + 43008) + head 256·64 = 122880; attention 12·2·(4·16)·32 = 49152 (query heads)
    # params = embed 16384 + 2·(53248 + 128) + final norm 64 + head 16384 = 139584
    # r=8 adapters per layer: 8·(64+64)·2 (q, o) + 8·(64+16)·2 (k, v) + 8·(64+224)·3 = 10240; 2 layers 20480
    # relora = 6·122880 − 2·106496 + 6·20480 + 49152 = 696320
    mistral = preset_meta_model("tiny", 256, "mistral")
    assert param_count(mistral) == 139584
    assert flops_per_token(mistral, 32, relora_rank=8) == dict(
        full=6 * 122880 + 49152, attention=49152, n_linear=122880, relora=696320, n_wrapped=106496, n_adapter=20480)
    # qwen2 tiny: LLaMA's MLP 176, q/k/v biases 64 + 16 + 16, tied head: per layer 10240 + 33792 + 96 + 128 = 44256
    # params = embed 16384 + 2·44256 + 64 = 104960 (the head is the embedding); N_lin = 2·44032 + 16384 (still a matmul)
    qwen2 = preset_meta_model("tiny", 256, "qwen2")
    assert param_count(qwen2) == 104960
    assert flops_per_token(qwen2, 32)["n_linear"] == 2 * 44032 + 16384
    # trainable after wrapping q,k,v,o,gate,up,down at r=8: everything but their W and the q/k/v biases, plus adapters
    adapters = 2 * (8 * (64 + 64) * 2 + 8 * (64 + 16) * 2 + 8 * (64 + 176) * 3)
    assert param_count(qwen2, relora_rank=8, trainable_only=True) == 104960 - 2 * (44032 + 96) + adapters
    # gpt_neox tiny: query_key_value 192·64 (+192), dense 64·64 (+64), 4h 256·64 (+256), back 64·256 (+64), 2 LayerNorms
    # 256: per layer 49152 + 576 + 256; params = embed_in 16384 + 2·49984 + final LayerNorm 128 + embed_out 16384
    neox = preset_meta_model("tiny", 256, "gpt_neox")
    assert param_count(neox) == 132864
    assert flops_per_token(neox, 32) == dict(full=6 * 114688 + 49152, attention=49152, n_linear=2 * 49152 + 16384)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_relora_counts_exact_per_family(family):
    plain = preset_meta_model("20m", 1000, family)
    with torch.device("meta"):
        wrapped = build_model("20m", 1000, family=family)
    wrap(wrapped, target_modules=target_modules_of(wrapped), rank=16, alpha=32, trainable_scaling=True)
    kwargs = dict(relora_rank=16, trainable_scaling=True)
    assert numel(wrapped) == param_count(plain, **kwargs)
    assert numel(wrapped, trainable_only=True) == param_count(plain, trainable_only=True, **kwargs)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_default_targets_are_the_familys_projections(family):
    model = preset_meta_model("tiny", 256, family)
    names = wrap_targets(model, target_modules_of(model), 4)  # relora.target_modules: null
    leaves = [name.rsplit(".", 1)[-1] for name in names]
    targets = FAMILIES[family].target_modules
    assert FAMILIES[family].target_modules == targets
    assert leaves == list(targets) * 2  # every projection of both layers, in model order, nothing else
    if family == "gpt_neox":
        assert targets == ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
    else:
        assert targets == LLAMA_TARGET_MODULES
    assert "lm_head" not in names and not any("embed" in n for n in names)


def test_a_model_type_without_defaults_needs_target_modules(tmp_path):
    path = _write_config(tmp_path, {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "vocab_size": 50,
                                    "n_positions": 64})
    model = meta_model(ModelConfig(hf_config=path), 50)
    with pytest.raises(ValueError, match=r"relora.target_modules: null .* model_type 'gpt2' has no defaults"):
        wrap_targets(model, target_modules_of(model), 4)


def _write_config(directory, fields: dict, name: str = "config.json") -> str:
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        json.dump(fields, f)
    return path


def test_hf_config_builds_a_seeded_random_model(tmp_path):
    path = str(tmp_path / "neox.json")
    preset_config("tiny", 300, "gpt_neox").to_json_file(path)  # any transformers config.json
    cfg = load_config(None, [f"model.hf_config={path}", "model.preset=7b", "model.family=llama"])  # both ignored
    assert meta_model(cfg.model, 256).config.vocab_size == 300  # its own vocabulary (holding the tokenizer's 256)
    model = model_from_config(cfg.model, 256, seed=3, attn_implementation="sdpa")
    assert type(model).__name__ == "GPTNeoXForCausalLM" and model.config.vocab_size == 300
    again = model_from_config(cfg.model, 256, seed=3, attn_implementation="sdpa")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert numel(model) == param_count(preset_meta_model("tiny", 300, "gpt_neox"))
    assert input_embedding_name(cfg.model) == "gpt_neox.embed_in.weight"
    assert flops_per_token(model, 32) == flops_per_token(preset_meta_model("tiny", 300, "gpt_neox"), 32)


def test_hf_config_accepts_a_directory_and_errors_are_one_line(tmp_path):
    preset_config("tiny", 300, "qwen2").save_pretrained(str(tmp_path / "dir"))
    assert meta_model(ModelConfig(hf_config=str(tmp_path / "dir")), 256).config.model_type == "qwen2"

    def error(path, vocab=256):
        with pytest.raises(ValueError) as e:
            meta_model(ModelConfig(hf_config=path), vocab)
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"model.hf_config {path}: "), message
        return message

    assert "no such file" in error(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    assert "not a JSON file" in error(str(tmp_path / "bad.json"))
    assert "\"model_type\"" in error(_write_config(tmp_path, [1, 2], "list.json"))
    assert "\"model_type\"" in error(_write_config(tmp_path, {"hidden_size": 8}, "untyped.json"))
    assert "transformers cannot read it" in error(_write_config(tmp_path, {"model_type": "no_such_model"}, "odd.json"))
    assert "vocab_size 300 is smaller than the 301 tokens" in error(str(tmp_path / "dir"), vocab=301)


def test_hf_config_and_init_from_are_exclusive():
    with pytest.raises(config.ConfigError, match="model.hf_config: must be null with model.init_from"):
        load_config(None, ["model.hf_config=a.json", "model.init_from=some/dir"])
    with pytest.raises(config.ConfigError, match="model.family: must be one of llama, mistral, qwen2, gpt_neox"):
        load_config(None, ["model.family=gpt2"])


def test_init_from_config_error_names_the_field(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=f"model.init_from {tmp_path}: unreadable config.json"):
        hf.pretrained_config(str(tmp_path))


def test_analyze_finds_gpt_neox_projections_of_exported_dirs(tmp_path):
    from relora_ds.tools import analyze

    model = build_model("tiny", 64, family="gpt_neox", seed=0)
    model.save_pretrained(str(tmp_path / "a"))
    with torch.no_grad():
        model.gpt_neox.layers[1].mlp.dense_4h_to_h.weight.add_(1.0)  # ΔW of rank one in one projection
    model.save_pretrained(str(tmp_path / "b"))
    result = analyze.analyze_pair(str(tmp_path / "a"), str(tmp_path / "b"), progress=False)
    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    assert result["targets"] == targets  # by the model_type in config.json
    assert [(e["layer"], e["projection"]) for e in result["entries"]] == [(layer, p) for layer in (0, 1) for p in targets]
    assert analyze.projections({"x": result}) == targets
    moved = {e["name"]: e["num_above_0_1"] for e in result["entries"]}
    assert moved.pop("gpt_neox.layers.1.mlp.dense_4h_to_h.weight") == 1 and set(moved.values()) == {0}
    assert list(analyze.summarize(result)["by_projection"]) == targets
