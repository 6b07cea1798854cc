"""LLaMA presets (the paper's Table 1 plus tiny/20m/7b) built as transformers' LlamaForCausalLM.

The only module that knows transformers' model classes. Parameter and FLOP counts live here too.
"""

import contextlib
import importlib.util

import torch

from relora_ds.config import ATTN_IMPLEMENTATIONS, DEFAULT_TARGET_MODULES
from relora_ds.relora.wrap import _matches

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
    if choice not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"model.attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
                         f"got {choice!r}")
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


def model_from_config(model_cfg, vocab_size: int, *, seed: int | None = None,
                      attn_implementation: str | None = None, zero3_config: dict | None = None):
    """The run's model: loaded from `model.init_from` when set, else the preset, randomly initialised.

    zero3_config: the run's DeepSpeed config on ZeRO-3; the model is then built partitioned (no rank ever
    holds it whole) with the same seeded weights as the unsharded build, and a checkpoint is loaded partition
    by partition (see `zero3_construction`).
    """
    attn = attn_implementation or model_cfg.attn_implementation
    if model_cfg.init_from:
        from relora_ds.model.hf import load_pretrained

        return load_pretrained(model_cfg.init_from, attn_implementation=attn, zero3_config=zero3_config)
    return build_model(model_cfg.preset, vocab_size, attn_implementation=attn, seed=seed, zero3_config=zero3_config)


def meta_model(model_cfg, vocab_size: int):
    """The run's model on the meta device (no memory, no init), for checking settings against its layers before
    any rank builds it. A one-line ValueError for a model.init_from that is not a model directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_cfg.init_from:
        from relora_ds.model.hf import check_model_dir

        check_model_dir(model_cfg.init_from)
        try:
            config = AutoConfig.from_pretrained(model_cfg.init_from)
        except (OSError, ValueError) as e:
            raise ValueError(f"model.init_from {model_cfg.init_from}: unreadable config.json "
                             f"({' '.join(str(e).split())[:200]})") from None
    else:
        config = llama_config(model_cfg.preset, vocab_size, attn_implementation="sdpa")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


@contextlib.contextmanager
def zero3_construction(zero3_config: dict | None):
    """Within it, transformers builds and loads models under ZeRO-3 (a no-op for None).

    transformers' DeepSpeed integration (HfDeepSpeedConfig) makes `_from_config` build each module under
    `deepspeed.zero.Init` with this config (partitioned as soon as it is built) and then initialise the weights
    module by module on the gathered parameters (rank 0 draws), and makes `from_pretrained` copy a checkpoint
    into the partitions parameter by parameter. The setting is global in transformers, so it is removed on exit.
    """
    if zero3_config is None:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(zero3_config)  # transformers holds only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep_alive


def build_model(preset: str, vocab_size: int, *, max_position_embeddings: int | None = None,
                attn_implementation: str = "auto", dtype: torch.dtype | None = None, seed: int | None = None,
                zero3_config: dict | None = None):
    """A randomly initialised LlamaForCausalLM for `preset` (seeded when `seed` is given).

    The weights are transformers' own init (normal(0, initializer_range) for linears and embeddings, ones for
    norms), drawn once on full tensors: the construction-time draws of nn.Linear are skipped, which is what
    transformers does under ZeRO-3, so the partitioned build (zero3_config) gives the same weights for a seed.
    """
    from transformers import LlamaForCausalLM
    from transformers.initialization import no_init_weights

    config = llama_config(preset, vocab_size, max_position_embeddings, attn_implementation)
    if seed is not None:
        torch.manual_seed(seed)
    if zero3_config is not None:
        with zero3_construction(zero3_config):
            model = LlamaForCausalLM._from_config(config)
    else:
        with no_init_weights():
            model = LlamaForCausalLM(config)
        model.initialize_weights()
    if dtype is not None:
        model = model.to(dtype)
    return model


# --- parameter and FLOP counts (analytic; tests compare them with real and meta-device models) -------

# The paper's Table 1 parameter counts, at the paper's vocabulary (7b: LLaMA-7B with 32,000 tokens).
PAPER_PARAMS = {"60m": 58e6, "130m": 134e6, "250m": 248e6, "350m": 368e6, "1b": 1.34e9, "7b": 6.7e9}
PAPER_VOCAB = {"60m": 32100, "130m": 32100, "250m": 32100, "350m": 32100, "1b": 32100, "7b": 32000}


def _shape(preset: str) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"model.preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    return PRESETS[preset]


def linear_shapes(preset: str, vocab_size: int) -> dict[str, tuple[int, int]]:
    """Module name → (out_features, in_features) of every nn.Linear LlamaForCausalLM builds, in order.

    Names are those of `model.named_modules()`, so ReLoRA's target patterns match them as in `wrap`.
    No GQA in the presets: k and v have as many heads as q. No biases anywhere.
    """
    s = _shape(preset)
    d, inter = s["hidden_size"], s["intermediate_size"]
    shapes = {}
    for i in range(s["num_hidden_layers"]):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{attn}.{proj}"] = (d, d)
        shapes[f"{mlp}.gate_proj"] = (inter, d)
        shapes[f"{mlp}.up_proj"] = (inter, d)
        shapes[f"{mlp}.down_proj"] = (d, inter)
    shapes["lm_head"] = (vocab_size, d)
    return shapes


def _wrapped_shapes(preset: str, vocab_size: int, target_modules) -> dict[str, tuple[int, int]]:
    """The Linears `wrap(model, target_modules=...)` would replace (same matching rule)."""
    return {name: shape for name, shape in linear_shapes(preset, vocab_size).items()
            if _matches(name, target_modules)}


def param_count(preset: str, vocab_size: int, *, trainable_only: bool = False, relora_rank: int | None = None,
                target_modules=DEFAULT_TARGET_MODULES, trainable_scaling: bool = False) -> int:
    """Exact parameter count of `build_model(preset, vocab_size)`, optionally wrapped with ReLoRA.

    Full model: embedding V·d + per layer (4·d² attention + 3·d·I SwiGLU MLP + 2·d RMSNorm weights)
    + final norm d + untied head V·d. With `relora_rank` r, each wrapped Linear adds r·(in + out)
    (A and B; +1 for g with trainable scaling) and its W becomes frozen. `trainable_only`: what the
    optimizer sees (full rank: everything; ReLoRA: all but the wrapped W).
    """
    if vocab_size < 1:
        raise ValueError(f"model.vocab_size must be >= 1, got {vocab_size}")
    s = _shape(preset)
    d, layers = s["hidden_size"], s["num_hidden_layers"]
    linear = sum(out * inp for out, inp in linear_shapes(preset, vocab_size).values())
    total = vocab_size * d + linear + layers * 2 * d + d
    if relora_rank is None:
        return total
    if relora_rank < 1:
        raise ValueError(f"relora.rank must be >= 1, got {relora_rank}")
    wrapped = _wrapped_shapes(preset, vocab_size, target_modules)
    adapters = sum(relora_rank * (out + inp) + int(trainable_scaling) for out, inp in wrapped.values())
    frozen = sum(out * inp for out, inp in wrapped.values())
    return total + adapters - (frozen if trainable_only else 0)


def parameter_counts(module: torch.nn.Module) -> dict:
    """Total and trainable (requires_grad) parameters of a built module: full sizes, also when ZeRO-3 has
    partitioned them (`ds_numel`)."""
    total = trainable = 0
    for param in module.parameters():
        numel = getattr(param, "ds_numel", param.numel())
        total += numel
        trainable += numel if param.requires_grad else 0
    return {"total_params": total, "trainable_params": trainable}


def paper_param_table() -> list[dict]:
    """Each paper preset's exact count (at the paper's vocabulary) next to the paper's Table 1 figure."""
    rows = []
    for preset, paper in PAPER_PARAMS.items():
        ours = param_count(preset, PAPER_VOCAB[preset])
        rows.append(dict(preset=preset, vocab_size=PAPER_VOCAB[preset], params=ours, paper_params=int(paper),
                         rel_diff=(ours - paper) / paper))
    return rows


def preset_of(model_config) -> str | None:
    """The preset whose shape a transformers LlamaConfig has (vocabulary and context length aside; no GQA),
    or None: how a model loaded with model.init_from gets its FLOP count."""
    if getattr(model_config, "model_type", None) != "llama":
        return None
    heads = getattr(model_config, "num_attention_heads", None)
    if getattr(model_config, "num_key_value_heads", heads) != heads:
        return None
    for name, shape in PRESETS.items():
        if all(getattr(model_config, k, None) == v for k, v in shape.items() if k != "max_position_embeddings"):
            return name
    return None


def flops_per_token(preset: str, vocab_size: int, seq_len: int, *, relora_rank: int | None = None,
                    target_modules=DEFAULT_TARGET_MODULES) -> dict:
    """Training (forward + backward) FLOPs per token, PaLM appendix B style (1 multiply-add = 2 FLOPs).

    N_lin = weights of all matmuls (every Linear, lm_head included; the embedding is a lookup and the
    norms are elementwise, both left out). Attention scores and values: 12·L·d·T (T = seq_len, the
    full T×T matrices, no causal saving), the same in every mode.
      full   = 6·N_lin + 12·L·d·T                        (forward 2, dX 2, dW 2 per weight)
      relora = 6·N_lin − 2·N_wrapped + 6·r·Σ(in + out) + 12·L·d·T
               (a frozen W has no dW GEMM: 4·N_wrapped; A and B are trained: 6 per adapter weight)
    Returns {"full", "attention", "n_linear"} and, with `relora_rank`, {"relora", "n_wrapped", "n_adapter"}.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    s = _shape(preset)
    n_linear = sum(out * inp for out, inp in linear_shapes(preset, vocab_size).values())
    attention = 12 * s["num_hidden_layers"] * s["hidden_size"] * seq_len
    result = dict(full=6 * n_linear + attention, attention=attention, n_linear=n_linear)
    if relora_rank is None:
        return result
    if relora_rank < 1:
        raise ValueError(f"relora.rank must be >= 1, got {relora_rank}")
    wrapped = _wrapped_shapes(preset, vocab_size, target_modules).values()
    n_wrapped = sum(out * inp for out, inp in wrapped)
    n_adapter = sum(relora_rank * (out + inp) for out, inp in wrapped)
    result.update(relora=6 * n_linear - 2 * n_wrapped + 6 * n_adapter + attention,
                  n_wrapped=n_wrapped, n_adapter=n_adapter)
    return result
