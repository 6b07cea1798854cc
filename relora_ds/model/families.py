"""The model families: one entry each, the only table of model shapes (model.family × model.preset).

An entry names the transformers config class it fills, the config fields every preset shares (norms, biases,
rotary, tying), each preset's shape (hidden, MLP, heads, key/value heads, layers, positions) and the module name of
the input embedding (whose weight's rows are the vocabulary). The vocabulary is never in the table: it is the
tokenizer's (or model.vocab_size). Each entry also names the family's default relora.target_modules (the attention
and MLP projections, never embeddings, norms or the head): `target_modules_of(model)` gives them to whoever wraps
(relora/ takes explicit lists).

How the presets are shaped, family by family:
- llama: the paper's Table 1 (RMSNorm, SwiGLU, rotary, no biases, untied head, multi-head attention); tiny and 20m
  for tests and the CPU demo; 7b is LLaMA-7B.
- mistral: LLaMA's width, heads, depth and context at each preset, grouped-query attention with heads/4 key/value
  heads and Mistral's MLP of 3.5 × hidden; 7b is Mistral-7B (4096, 32 heads, 8 kv heads, MLP 14336, 32 layers).
  No sliding window (full causal attention at every length, as the FLOP count assumes).
- qwen2: LLaMA's width, MLP, heads, depth and context at each preset (Qwen2's own MLP ratio varies by size), heads/4
  key/value heads, q/k/v biases, rope theta 1e6, and tied embeddings up to 1b (Qwen2-0.5B and -1.5B tie, -7B does
  not); 7b is Qwen2-7B (3584, 28 heads, 4 kv heads, MLP 18944, 28 layers, untied).
- gpt_neox: the Pythia suite (fused query_key_value, dense, dense_h_to_4h, dense_4h_to_h, all with biases; LayerNorm,
  parallel residual, rotary on 25% of each head, GELU MLP of 4 × hidden, untied input embedding and head, 2048
  positions): 20m pythia-31m, 60m pythia-70m, 130m pythia-160m, 350m pythia-410m, 1b pythia-1b, 7b pythia-6.9b;
  250m has no Pythia and is 160m's width at 24 layers; tiny for tests.

Adding a family: one entry in FAMILIES (tests/unit/test_families.py checks that every family has every MODEL_PRESETS
name), and its hand-counted shapes in that test. No torch or transformers import here.
"""

import copy
import dataclasses

# The names of the model sizes (model.preset); every family has each.
MODEL_PRESETS = ("tiny", "20m", "60m", "130m", "250m", "350m", "1b", "7b")
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str          # model.family, and the Hugging Face model_type of the models it builds
    config_class: str  # the transformers config class, by name (transformers is imported when a model is built)
    common: dict       # config fields of every preset
    presets: dict      # preset name → the config fields that shape it
    embedding: str     # module name of the input embedding
    target_modules: tuple  # relora.target_modules: null wraps these (attention and MLP projections)

    def config_fields(self, preset: str) -> dict:
        """Every config field the preset sets (a fresh copy: transformers may edit the dicts it is given)."""
        if preset not in self.presets:
            raise ValueError(f"model.preset must be one of {', '.join(self.presets)}, got {preset!r}")
        return copy.deepcopy({**self.common, **self.presets[preset]})


def _shape(hidden: int, intermediate: int, heads: int, layers: int, positions: int, kv_heads: int | None = None,
           **extra) -> dict:
    shape = dict(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                 num_hidden_layers=layers, max_position_embeddings=positions)
    if kv_heads is not None:
        shape["num_key_value_heads"] = kv_heads
    return {**shape, **extra}


# hidden, intermediate, heads, layers, positions: the paper's Table 1 plus tiny/20m (tests, demo) and LLaMA-7B.
_LLAMA = {
    "tiny": (64, 176, 4, 2, 1024),
    "20m": (256, 688, 4, 4, 1024),
    "60m": (512, 1376, 8, 8, 1024),
    "130m": (768, 2048, 12, 12, 1024),
    "250m": (768, 2560, 16, 24, 1024),
    "350m": (1024, 2736, 16, 24, 1024),
    "1b": (2048, 5461, 32, 24, 2048),
    "7b": (4096, 11008, 32, 32, 4096),
}
# Pythia: hidden, intermediate (4 × hidden), heads, layers, positions.
_PYTHIA = {
    "tiny": (64, 256, 4, 2, 2048),
    "20m": (256, 1024, 8, 6, 2048),       # pythia-31m
    "60m": (512, 2048, 8, 6, 2048),       # pythia-70m
    "130m": (768, 3072, 12, 12, 2048),    # pythia-160m
    "250m": (768, 3072, 12, 24, 2048),    # no Pythia of this size: 160m's width at 24 layers
    "350m": (1024, 4096, 16, 24, 2048),   # pythia-410m
    "1b": (2048, 8192, 8, 16, 2048),      # pythia-1b
    "7b": (4096, 16384, 32, 32, 2048),    # pythia-6.9b
}

FAMILIES = {
    "llama": Family(
        name="llama", config_class="LlamaConfig", embedding="model.embed_tokens", target_modules=LLAMA_TARGET_MODULES,
        common=dict(rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False),
        presets={name: _shape(*row) for name, row in _LLAMA.items()}),
    "mistral": Family(
        name="mistral", config_class="MistralConfig", embedding="model.embed_tokens",
        target_modules=LLAMA_TARGET_MODULES,
        common=dict(rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None),
        presets={name: _shape(d, d * 7 // 2, heads, layers, positions, kv_heads=heads // 4)
                 for name, (d, _, heads, layers, positions) in _LLAMA.items()}),
    "qwen2": Family(
        name="qwen2", config_class="Qwen2Config", embedding="model.embed_tokens", target_modules=LLAMA_TARGET_MODULES,
        common=dict(rms_norm_eps=1e-6, use_sliding_window=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        presets={**{name: _shape(*row, kv_heads=row[2] // 4, tie_word_embeddings=True)
                    for name, row in _LLAMA.items() if name != "7b"},
                 "7b": _shape(3584, 18944, 28, 28, 4096, kv_heads=4, tie_word_embeddings=False)}),
    "gpt_neox": Family(
        name="gpt_neox", config_class="GPTNeoXConfig", embedding="gpt_neox.embed_in",
        target_modules=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
        common=dict(hidden_act="gelu", layer_norm_eps=1e-5, use_parallel_residual=True, attention_bias=True,
                    tie_word_embeddings=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
        presets={name: _shape(*row) for name, row in _PYTHIA.items()}),
}


def family(name: str) -> Family:
    """The entry of model.family `name`; a one-line ValueError for another name."""
    if name not in FAMILIES:
        raise ValueError(f"model.family must be one of {', '.join(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


def preset_shape(name: str, preset: str) -> dict:
    """The config fields of `preset` in family `name` (common fields included)."""
    return family(name).config_fields(preset)


def default_target_modules(model_type: str | None) -> tuple[str, ...]:
    """The linears relora.target_modules: null wraps in a model of this Hugging Face model_type (its family's
    projections); a one-line ValueError naming relora.target_modules for a model_type without defaults."""
    if model_type not in FAMILIES:
        raise ValueError(f"relora.target_modules: null takes the model family's projections, but model_type "
                         f"{model_type!r} has no defaults (families: {', '.join(FAMILIES)}); name the linears "
                         f"to wrap, e.g. relora.target_modules=[q_proj,v_proj]")
    return FAMILIES[model_type].target_modules


def target_modules_of(model, target_modules=None) -> tuple[str, ...]:
    """`target_modules`, or for None the defaults of the model's family by its config's model_type."""
    if target_modules is not None:
        return tuple(target_modules)
    return default_target_modules(getattr(getattr(model, "config", None), "model_type", None))
