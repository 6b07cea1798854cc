"""The run's model, built: a family preset (model.family × model.preset, relora_ds/model/families.py), a
transformers config.json (model.hf_config) or a saved model (model.init_from); whole, partitioned under ZeRO-3, or
on the meta device (no memory) for checks and counts. With hf.py, the only code that knows transformers' model
classes.
"""

import contextlib
import copy
import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from relora_ds.fields import setting
from relora_ds.model import families, hf
from relora_ds.model.families import FAMILIES, MODEL_PRESETS

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")  # model.attn_implementation


@dataclass
class ModelConfig:
    preset: str = setting("tiny", "model size (paper Table 1 plus tiny/20m for tests and 7b)", MODEL_PRESETS)
    family: str = setting("llama", "architecture of the preset, shaped as that family shapes it (relora_ds/model/"
                                  "families.py): llama (paper), mistral and qwen2 (GQA; qwen2: q/k/v biases, tied "
                                  "embeddings up to 1b), gpt_neox (Pythia)", tuple(FAMILIES))
    vocab_size: int | None = setting(None, "vocabulary size; null: taken from the tokenizer")
    attn_implementation: str = setting(
        "auto", "attention kernel; auto: flash_attention_2 with CUDA and flash-attn, else sdpa",
        ATTN_IMPLEMENTATIONS)
    init_from: str | None = setting(None, "HF model dir (or exported model) to start from instead of random init")
    hf_config: str | None = setting(None, "a transformers config.json (or a dir holding one) to build, randomly "
                                         "initialised, instead of model.family/model.preset (both then ignored; "
                                         "its vocab_size must hold the tokenizer's)")


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


def preset_config(preset: str, vocab_size: int, family: str = "llama", max_position_embeddings: int | None = None,
                  attn_implementation: str = "auto"):
    """The transformers config (LlamaConfig, MistralConfig, ...) of `preset` in `family`, at `vocab_size`."""
    import transformers

    entry = families.family(family)
    fields = entry.config_fields(preset)
    if vocab_size < 1:
        raise ValueError(f"model.vocab_size must be >= 1, got {vocab_size}")
    if max_position_embeddings is not None:
        fields["max_position_embeddings"] = max_position_embeddings
    config = getattr(transformers, entry.config_class)(vocab_size=vocab_size, **fields)
    config._attn_implementation = resolve_attn_implementation(attn_implementation)
    return config


def run_model_config(model_cfg, vocab_size: int, attn_implementation: str = "auto"):
    """The transformers config of the run's model: model.init_from's, model.hf_config's (its vocab_size must hold
    `vocab_size` tokens), else the family preset's at `vocab_size`. One-line ValueErrors naming the field."""
    if model_cfg.init_from:
        return hf.pretrained_config(model_cfg.init_from)
    if model_cfg.hf_config:
        config = hf.load_hf_config(model_cfg.hf_config, min_vocab_size=vocab_size)
        config._attn_implementation = resolve_attn_implementation(attn_implementation)
        return config
    return preset_config(model_cfg.preset, vocab_size, model_cfg.family, attn_implementation=attn_implementation)


def describe(model_cfg) -> str:
    """Which model a run config builds, for messages: model.init_from X, model.hf_config X, or the preset."""
    if model_cfg.init_from:
        return f"model.init_from {model_cfg.init_from}"
    if model_cfg.hf_config:
        return f"model.hf_config {model_cfg.hf_config}"
    family = "" if model_cfg.family == "llama" else f" of model.family {model_cfg.family}"
    return f"model.preset {model_cfg.preset}{family}"


def model_from_config(model_cfg, vocab_size: int, *, seed: int | None = None,
                      attn_implementation: str | None = None, zero3_config: dict | None = None, per_module=None):
    """The run's model: loaded from `model.init_from` when set, else built from `model.hf_config` or the family
    preset, randomly initialised (seeded when `seed` is given). per_module: see `build_from_config`; a model.init_from
    in safetensors or zip-format *.bin is then loaded module by module (`load_module_by_module`), a legacy *.bin whole.

    zero3_config: the run's DeepSpeed config on ZeRO-3; the model is then built partitioned (no rank ever
    holds it whole) with the same seeded weights as the unsharded build, and a checkpoint is loaded partition
    by partition (see `zero3_construction`).
    """
    attn = attn_implementation or model_cfg.attn_implementation
    if model_cfg.init_from:
        files = hf.weights_index(model_cfg.init_from) if per_module is not None else {}
        if files:
            return load_module_by_module(model_cfg.init_from, per_module, attn_implementation=attn, files=files)
        model = load_pretrained(model_cfg.init_from, attn_implementation=attn, zero3_config=zero3_config)
        if per_module is not None:  # legacy (not zip) *.bin weights: loaded whole
            for name, module in list(model.named_modules()):
                per_module(model, name, module)
        return model
    config = run_model_config(model_cfg, vocab_size, attn)
    return build_from_config(config, seed=seed, zero3_config=zero3_config, per_module=per_module)


CHECKPOINTING = ("none", "full", "selective")  # train.activation_checkpointing


def enable_activation_checkpointing(model, mode: str) -> None:
    """Recompute activations in the backward pass instead of keeping them. "full": each decoder layer's (transformers'
    own per-layer checkpointing); "selective": each decoder layer's MLP only, the larger half of a layer's activations
    (gate, up, their product: 4 x intermediate per token against about 6 x hidden for attention), while attention
    keeps its own (benchmarks/README.md, "Activation checkpointing", measures both); "none": keep them. Non-reentrant
    torch.utils.checkpoint either way (it works under ZeRO-3's parameter hooks and with frozen inputs, and restores
    the RNG for dropout), so the losses and gradients are those of the plain model. A one-line ValueError for a model
    that cannot be checkpointed (works on a meta-device model)."""
    if mode not in CHECKPOINTING:
        raise ValueError(f"train.activation_checkpointing must be one of {', '.join(CHECKPOINTING)}, got {mode!r}")
    if mode == "none":
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.activation_checkpointing {mode}: {type(model).__name__} does not support "
                         f"activation checkpointing (transformers' supports_gradient_checkpointing); set it to none")
    if mode == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    mlps = [getattr(layer, "mlp", None) for layer in model.modules() if isinstance(layer, GradientCheckpointingLayer)]
    if not mlps or any(mlp is None for mlp in mlps):
        raise ValueError(f"train.activation_checkpointing selective: {type(model).__name__}'s decoder layers have no "
                         f"`mlp` module to recompute; use full or none")
    for mlp in mlps:
        mlp.forward = functools.partial(torch.utils.checkpoint.checkpoint, mlp.forward, use_reentrant=False)


def load_pretrained(path: str, attn_implementation: str = "auto", zero3_config: dict | None = None):
    """AutoModelForCausalLM.from_pretrained(path) in fp32 with the chosen attention kernel; on ZeRO-3
    (zero3_config) built partitioned and filled parameter by parameter (model.build.zero3_construction)."""
    from transformers import AutoModelForCausalLM

    hf.check_model_dir(path)
    with zero3_construction(zero3_config):
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation=resolve_attn_implementation(attn_implementation))


def _read_tensors(file: str, keys: list[str]) -> dict:
    """{key: tensor} of `keys` from one weights file (safetensors, or a zip-format *.bin memory-mapped), through a
    mapping of the file that is closed once the tensors are dropped."""
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(file, framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in keys}
    state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    return {key: state[key] for key in keys}


def load_module_by_module(path: str, per_module, attn_implementation: str = "auto", files: dict | None = None):
    """A saved model (safetensors, or *.bin in torch's zip format) filled module by module, children first, each
    module's own tensors read from its file on their own and the module then handed to
    `per_module(model, name, module)` (which may replace it: a ReLoRA layer storing W as int8), so the whole model never
    exists in full precision. fp32, as load_pretrained loads. A tensor the files do not hold (a tied lm_head) is tied
    afterwards; any other missing one is a one-line ValueError. `files`: `hf.weights_index(path)`, if read already."""
    from transformers.initialization import no_init_weights

    config = hf.pretrained_config(path)
    config._attn_implementation = resolve_attn_implementation(attn_implementation)
    files = files or hf.weights_index(path)
    with no_init_weights():
        model = causal_lm_class(config)(config)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()

    def fill(_owner, name: str, module) -> None:
        own = [*module.named_parameters(recurse=False),
               *((n, b) for n, b in module.named_buffers(recurse=False)
                 if n not in module._non_persistent_buffers_set)]
        by_file = {}
        for tensor_name, tensor in own:
            key = f"{name}.{tensor_name}" if name else tensor_name
            if key not in files:
                if key in tied:
                    continue
                raise ValueError(f"model.init_from {path}: no tensor {key} in its weights files")
            by_file.setdefault(files[key], []).append((key, tensor))
        # A mapping of the file per module: the pages a mapping has read stay resident until it is closed, so one
        # mapping held over the whole load kept every page of the checkpoint beside the model.
        for file, tensors in by_file.items():
            read = _read_tensors(file, [key for key, _ in tensors])
            with torch.no_grad():
                for key, tensor in tensors:
                    tensor.copy_(read[key])
            del read
        per_module(model, name, module)

    _children_first(model, fill)
    model.tie_weights()
    return model


def meta_model(model_cfg, vocab_size: int):
    """The run's model on the meta device (no memory, no init), for checking settings against its layers before
    any rank builds it. One-line ValueErrors for a model.init_from that is not a model directory and a
    model.hf_config that is not a usable config.json."""
    return meta_from_config(run_model_config(model_cfg, vocab_size, attn_implementation="sdpa"))


def meta_from_config(config):
    """The causal LM a transformers config describes, on the meta device (a copy of the config: transformers
    writes into the one it builds from). A one-line ValueError for a config with no causal LM in transformers."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"model_type {getattr(config, 'model_type', None)!r}: no causal LM model of transformers "
                         f"builds from this config ({' '.join(str(e).split())[:160]})") from None


def input_embedding_name(model_cfg) -> str:
    """The parameter name of the run's model's input embedding (its rows are the vocabulary): the family's
    (families.Family.embedding) for a preset, the built model's get_input_embeddings() for model.hf_config and
    model.init_from."""
    if not (model_cfg.init_from or model_cfg.hf_config):
        return families.family(model_cfg.family).embedding + ".weight"
    model = meta_model(model_cfg, 1)
    weight = model.get_input_embeddings().weight
    return next(name for name, param in model.named_parameters() if param is weight)


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


def causal_lm_class(config):
    """The transformers causal LM class of a config (LlamaForCausalLM for a LlamaConfig, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ValueError(f"model_type {getattr(config, 'model_type', None)!r}: transformers has no causal LM model "
                         f"for {type(config).__name__}") from None


def build_from_config(config, *, dtype: torch.dtype | None = None, seed: int | None = None,
                      zero3_config: dict | None = None, per_module=None):
    """A randomly initialised causal LM of a transformers config (seeded when `seed` is given).

    The weights are transformers' own init (normal(0, initializer_range) for linears and embeddings, ones for
    norms), drawn once on full tensors: the construction-time draws of nn.Linear are skipped, which is what
    transformers does under ZeRO-3, so the partitioned build (zero3_config) gives the same weights for a seed.

    per_module(model, name, module), unpartitioned builds only: called on each module as soon as it is initialised,
    in transformers' own init order (children first), so it may replace the module (a ReLoRA layer storing W as
    int8); the modules' tensors are allocated but untouched until initialised, so a module replaced there never
    takes memory in full precision: the whole model never exists at once. The weights are those of the plain build.
    """
    from transformers.initialization import no_init_weights

    model_class = causal_lm_class(config)
    if seed is not None:
        torch.manual_seed(seed)
    if zero3_config is not None:
        with zero3_construction(zero3_config):
            model = model_class._from_config(config)
    else:
        with no_init_weights():
            model = model_class(config)
        if per_module is None:
            model.initialize_weights()
        else:
            _initialize_module_by_module(model, per_module)
        model.tie_weights()  # tied embeddings (qwen2 up to 1b): the head is the embedding, as _from_config ties it
    if dtype is not None:
        model = model.to(dtype)
    return model


def _children_first(model, fn) -> None:
    """fn(owner, name, module) on every module of `model`, children before their parent (transformers' own init
    order), `owner` the nearest PreTrainedModel at or above the module; fn may replace the module in its parent."""
    from transformers import PreTrainedModel

    def visit(owner, name: str, module) -> None:
        for child_name, child in list(module.named_children()):
            visit(child if isinstance(child, PreTrainedModel) else owner, f"{name}.{child_name}" if name else child_name,
                  child)
        fn(owner, name, module)

    visit(model, "", model)


def _initialize_module_by_module(model, per_module) -> None:
    """transformers' `initialize_weights` (each module initialised by its own PreTrainedModel's `_initialize_weights`,
    children before parents: the same draws in the same order), calling `per_module` on each module once it is."""
    is_custom_code = model.is_custom_code()

    def initialize(owner, name: str, module) -> None:
        owner._initialize_weights(module, is_custom_code)
        per_module(model, name, module)

    _children_first(model, initialize)


def build_model(preset: str, vocab_size: int, *, family: str = "llama", max_position_embeddings: int | None = None,
                attn_implementation: str = "auto", dtype: torch.dtype | None = None, seed: int | None = None,
                zero3_config: dict | None = None):
    """A randomly initialised model of `preset` in `family` (LlamaForCausalLM for llama, ...); see
    `build_from_config`."""
    config = preset_config(preset, vocab_size, family, max_position_embeddings, attn_implementation)
    return build_from_config(config, dtype=dtype, seed=seed, zero3_config=zero3_config)


def preset_meta_model(preset: str, vocab_size: int, family: str = "llama"):
    """`build_model(preset, vocab_size, family=family)` on the meta device (for counts: no memory, no init)."""
    return meta_from_config(preset_config(preset, vocab_size, family, attn_implementation="sdpa"))
