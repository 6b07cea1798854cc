"""LLaMA presets (the paper's Table 1 plus tiny/20m/7b) built as transformers' LlamaForCausalLM.

The only module that knows transformers' model classes. Parameter and FLOP counts live here too.
"""

import importlib.util

import torch

# hidden, intermediate, heads, layers, max positions. Paper Table 1 (LLaMA style: RMSNorm, SwiGLU,
# rotary, no biases, untied head); 7b is LLaMA-7B; tiny and 20m are for tests and the CPU demo.
PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_hidden_layers=2,
                 max_position_embeddings=1024),
    "20m": dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_hidden_layers=4,
                max_position_embeddings=1024),
    "60m": dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_hidden_layers=8,
                max_position_embeddings=1024),
    "130m": dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_hidden_layers=12,
                 max_position_embeddings=1024),
    "250m": dict(hidden_size=768, intermediate_size=2560, num_attention_heads=16, num_hidden_layers=24,
                 max_position_embeddings=1024),
    "350m": dict(hidden_size=1024, intermediate_size=2736, num_attention_heads=16, num_hidden_layers=24,
                 max_position_embeddings=1024),
    "1b": dict(hidden_size=2048, intermediate_size=5461, num_attention_heads=32, num_hidden_layers=24,
               max_position_embeddings=2048),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32,
               max_position_embeddings=4096),
}
PAPER_VOCAB_SIZE = 32100  # T5's SentencePiece tokenizer, used for the paper's parameter counts


def resolve_attn_implementation(choice: str = "auto") -> str:
    """auto → flash_attention_2 when flash-attn is installed and CUDA is present, else sdpa."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def llama_config(preset: str, vocab_size: int, max_position_embeddings: int | None = None,
                 attn_implementation: str = "auto"):
    from transformers import LlamaConfig

    if preset not in PRESETS:
        raise ValueError(f"model.preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if vocab_size < 1:
        raise ValueError(f"model.vocab_size must be >= 1, got {vocab_size}")
    shape = dict(PRESETS[preset])
    if max_position_embeddings is not None:
        shape["max_position_embeddings"] = max_position_embeddings
    config = LlamaConfig(vocab_size=vocab_size, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False, **shape)
    config._attn_implementation = resolve_attn_implementation(attn_implementation)
    return config


def build_model(preset: str, vocab_size: int, *, max_position_embeddings: int | None = None,
                attn_implementation: str = "auto", dtype: torch.dtype | None = None, seed: int | None = None):
    """A randomly initialised LlamaForCausalLM for `preset` (seeded when `seed` is given)."""
    from transformers import LlamaForCausalLM

    config = llama_config(preset, vocab_size, max_position_embeddings, attn_implementation)
    if seed is not None:
        torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    return model
