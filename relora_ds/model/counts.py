"""Parameter and FLOP counts of a model, read from the model itself: its linears (k/v of grouped-query attention
are as small as they are built), its attention (query heads × head dim) and its vocabulary. A meta-device model
does (build.meta_model, build.preset_meta_model: no memory), and so does a transformers config (built on the meta
device here), so every family, model.hf_config and model.init_from are counted the same way.

    flops_per_token(preset_meta_model("1b", 32100), 512, relora_rank=128)
    param_count(meta_model(cfg.model, vocab_size), relora_rank=cfg.relora.rank, trainable_only=True)
"""

from torch import nn

from relora_ds.model.build import meta_from_config, preset_meta_model
from relora_ds.relora.layer import ReLoRALinear
from relora_ds.model.families import target_modules_of
from relora_ds.relora.wrap import _matches

# The paper's Table 1 parameter counts, at the paper's vocabulary (7b: LLaMA-7B with 32,000 tokens).
PAPER_PARAMS = {"60m": 58e6, "130m": 134e6, "250m": 248e6, "350m": 368e6, "1b": 1.34e9, "7b": 6.7e9}
PAPER_VOCAB = {"60m": 32100, "130m": 32100, "250m": 32100, "350m": 32100, "1b": 32100, "7b": 32000}
PAPER_VOCAB_SIZE = 32100  # T5's SentencePiece tokenizer, used for the paper's parameter counts


def _as_model(model) -> nn.Module:
    """A module as it is; a transformers config as its model on the meta device."""
    return model if isinstance(model, nn.Module) else meta_from_config(model)


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """Module name → (out_features, in_features) of every nn.Linear (or wrapped ReLoRALinear) of the model, in
    model order (lm_head included, tied or not: it is a matmul). Names are `named_modules()`'s, as `wrap` matches
    them. Read from the modules' sizes: a meta-device or ZeRO-3-partitioned model counts the same."""
    return {name: (m.out_features, m.in_features) for name, m in _as_model(model).named_modules()
            if isinstance(m, (nn.Linear, ReLoRALinear))}


def _wrapped(model: nn.Module, target_modules) -> dict[str, tuple[int, int]]:
    """The linears `wrap(model, target_modules=...)` would replace (same matching rule, same defaults)."""
    targets = target_modules_of(model, target_modules)
    return {name: shape for name, shape in linear_shapes(model).items() if _matches(name, targets)}


def _numel(param) -> int:
    return getattr(param, "ds_numel", param.numel())


def param_count(model, *, trainable_only: bool = False, relora_rank: int | None = None, target_modules=None,
                trainable_scaling: bool = False) -> int:
    """Exact parameter count of the (unwrapped) model, optionally as ReLoRA would wrap it.

    Full model: every parameter once (tied embeddings once). With `relora_rank` r, each wrapped Linear adds
    r·(in + out) (A and B; +1 for g with trainable scaling) and its W and bias become frozen. `trainable_only`: what
    the optimizer sees (full rank: everything; ReLoRA: all but the wrapped W and biases). target_modules None: the
    family's defaults (relora.wrap).
    """
    model = _as_model(model)
    total = sum(_numel(p) for p in model.parameters())
    if relora_rank is None:
        return total
    if relora_rank < 1:
        raise ValueError(f"relora.rank must be >= 1, got {relora_rank}")
    wrapped = _wrapped(model, target_modules)
    adapters = sum(relora_rank * (out + inp) + int(trainable_scaling) for out, inp in wrapped.values())
    frozen = 0
    for name in wrapped:
        linear = model.get_submodule(name)
        frozen += _numel(linear.weight) + (_numel(linear.bias) if linear.bias is not None else 0)
    return total + adapters - (frozen if trainable_only else 0)


def parameter_counts(module: nn.Module) -> dict:
    """Total and trainable (requires_grad) parameters of a built module: full sizes, also when ZeRO-3 has
    partitioned them (`ds_numel`); a frozen W stored in its own dtype (a ReLoRA layer's buffer, relora.base_dtype)
    counts as the parameter it stands for."""
    total = trainable = 0
    for param in module.parameters():
        numel = _numel(param)
        total += numel
        trainable += numel if param.requires_grad else 0
    total += sum(m.weight.numel() for m in module.modules() if getattr(m, "stored", False))
    return {"total_params": total, "trainable_params": trainable}


def attention_width(config) -> int:
    """Query heads × head dim of a transformers config (hidden_size without an explicit head_dim)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim


def flops_per_token(model, seq_len: int, *, relora_rank: int | None = None, target_modules=None) -> dict:
    """Training (forward + backward) FLOPs per token, PaLM appendix B style (1 multiply-add = 2 FLOPs), of a model
    (a module, or a transformers config: built on the meta device).

    N_lin = weights of all matmuls (every Linear as built: grouped-query k/v are kv_heads × head_dim wide; lm_head
    included; the embedding is a lookup, norms and biases elementwise, all left out). Attention scores and values:
    12·L·(H·d_head)·T (H query heads, T = seq_len, the full T×T matrices: no causal or sliding-window saving), the
    same in every mode.
      full   = 6·N_lin + 12·L·H·d_head·T                     (forward 2, dX 2, dW 2 per weight)
      relora = 6·N_lin − 2·N_wrapped + 6·r·Σ(in + out) + 12·L·H·d_head·T
               (a frozen W has no dW GEMM: 4·N_wrapped; A and B are trained: 6 per adapter weight)
    Returns {"full", "attention", "n_linear"} and, with `relora_rank`, {"relora", "n_wrapped", "n_adapter"}.
    target_modules None: the family's defaults (relora.wrap).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    model = _as_model(model)
    shapes = linear_shapes(model)
    if not shapes:
        raise ValueError(f"{type(model).__name__}: no nn.Linear to count")
    n_linear = sum(out * inp for out, inp in shapes.values())
    attention = 12 * model.config.num_hidden_layers * attention_width(model.config) * seq_len
    result = dict(full=6 * n_linear + attention, attention=attention, n_linear=n_linear)
    if relora_rank is None:
        return result
    if relora_rank < 1:
        raise ValueError(f"relora.rank must be >= 1, got {relora_rank}")
    wrapped = _wrapped(model, target_modules).values()
    n_wrapped = sum(out * inp for out, inp in wrapped)
    n_adapter = sum(relora_rank * (out + inp) for out, inp in wrapped)
    result.update(relora=6 * n_linear - 2 * n_wrapped + 6 * n_adapter + attention,
                  n_wrapped=n_wrapped, n_adapter=n_adapter)
    return result


def paper_param_table() -> list[dict]:
    """Each paper preset's exact count (LLaMA, at the paper's vocabulary) next to the paper's Table 1 figure."""
    rows = []
    for preset, paper in PAPER_PARAMS.items():
        ours = param_count(preset_meta_model(preset, PAPER_VOCAB[preset]))
        rows.append(dict(preset=preset, vocab_size=PAPER_VOCAB[preset], params=ours, paper_params=int(paper),
                         rel_diff=(ours - paper) / paper))
    return rows
