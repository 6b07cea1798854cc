"""The run configuration: a dataclass tree loaded from YAML/JSON, dotted overrides, validation.

    cfg = load_config("relora_ds/configs/demo.yaml", ["relora.rank=64", "log.tags=[a,b]"])
    cfg.save("runs/x/config.yaml")            # resolved (derived defaults filled in)

Sections: model, relora, schedule, data, train, log, checkpoint. Batch sizes, precision, ZeRO stage
and the optimizer live in the DeepSpeed JSON (`train.deepspeed_config`), not here.
No torch import: this module is cheap to import everywhere.
"""

import copy
import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field

import yaml

# The names of the model sizes; their shapes, for every family, are in relora_ds/model/families.py (a unit test
# checks that each family has exactly these). No model import here.
MODEL_PRESETS = ("tiny", "20m", "60m", "130m", "250m", "350m", "1b", "7b")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
MODES = ("full", "lora", "relora")
OPTIMIZER_RESETS = ("magnitude", "random", "full", "none")
KERNELS = ("auto", "triton", "torch")
ZERO3_MERGES = ("shard", "gathered")
SCHEDULE_KINDS = ("jagged_cosine", "cosine", "constant")
AT_SWITCH = ("restart", "continue")
DATA_FORMATS = ("auto", "json", "text", "parquet", "hub", "pretokenized")
RESUME_CHOICES = (False, True, "auto")
# Each model family's default relora.target_modules (relora.target_modules: null), by its Hugging Face model_type,
# which is also its model.family name: the attention and MLP projections, never embeddings, norms or the head. The
# families' shapes are in relora_ds/model/families.py; the defaults are here because relora/ (which wraps) may not
# import model/. Models of another model_type (model.init_from, model.hf_config) name their targets.
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FAMILY_TARGET_MODULES = {
    "llama": LLAMA_TARGET_MODULES,
    "mistral": LLAMA_TARGET_MODULES,
    "qwen2": LLAMA_TARGET_MODULES,
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
}
MODEL_FAMILIES = tuple(FAMILY_TARGET_MODULES)


class ConfigError(ValueError):
    """A bad run configuration; the message holds one line per problem."""


def default_target_modules(model_type: str | None) -> tuple[str, ...]:
    """The linears relora.target_modules: null wraps in a model of this Hugging Face model_type (FAMILY_TARGET_MODULES);
    a one-line ValueError naming relora.target_modules for a model_type without defaults."""
    if model_type not in FAMILY_TARGET_MODULES:
        raise ValueError(f"relora.target_modules: null takes the model family's projections, but model_type "
                         f"{model_type!r} has no defaults (families: {', '.join(MODEL_FAMILIES)}); name the linears "
                         f"to wrap, e.g. relora.target_modules=[q_proj,v_proj]")
    return FAMILY_TARGET_MODULES[model_type]


def _field(default, help: str, choices: tuple[str, ...] | None = None):
    """A dataclass field with its help text (and allowed values) kept in the metadata."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    preset: str = _field("tiny", "model size (paper Table 1 plus tiny/20m for tests and 7b)", MODEL_PRESETS)
    family: str = _field("llama", "architecture of the preset, shaped as that family shapes it (relora_ds/model/"
                                  "families.py): llama (paper), mistral and qwen2 (GQA; qwen2: q/k/v biases, tied "
                                  "embeddings up to 1b), gpt_neox (Pythia)", MODEL_FAMILIES)
    vocab_size: int | None = _field(None, "vocabulary size; null: taken from the tokenizer")
    attn_implementation: str = _field(
        "auto", "attention kernel; auto: flash_attention_2 with CUDA and flash-attn, else sdpa",
        ATTN_IMPLEMENTATIONS)
    init_from: str | None = _field(None, "HF model dir (or exported model) to start from instead of random init")
    hf_config: str | None = _field(None, "a transformers config.json (or a dir holding one) to build, randomly "
                                         "initialised, instead of model.family/model.preset (both then ignored; "
                                         "its vocab_size must hold the tokenizer's)")


@dataclass
class ReLoRAConfig:
    mode: str = _field("relora", "full: plain training; lora: wrap once, never merge; relora: merge and restart",
                       MODES)
    rank: int = _field(128, "adapter rank r")
    alpha: float = _field(32.0, "adapter scale numerator: s = alpha / rank")
    dropout: float = _field(0.0, "dropout on the adapter input")
    trainable_scaling: bool = _field(False, "learn the scale: s = tanh(g)")
    target_modules: list[str] | None = _field(None, "names of the nn.Linear modules to wrap; null: the model "
                                                    "family's attention and MLP projections (by model_type)")
    warm_start_steps: int = _field(0, "full-rank steps before wrapping; 0: wrap at step 0")
    warm_start_checkpoint: str | None = _field(None, "full-rank checkpoint to start ReLoRA from")
    reset_every: int = _field(1000, "cycle length C: steps between optimizer reset + LR re-warm-up")
    merge_every: int | None = _field(None, "steps between merges; null: reset_every (smaller: online ReLoRA)")
    optimizer_reset: str = _field("magnitude", "how adapter Adam moments are reset at a restart",
                                  OPTIMIZER_RESETS)
    prune_ratio: float = _field(0.99, "fraction of adapter moments zeroed at a reset")
    pair_moments: bool = _field(True, "also zero exp_avg where the pruned exp_avg_sq is zero (avoids the "
                                      "post-restart loss spike; false: the paper's independent pruning)")
    kernels: str = _field("auto", "adapter forward/backward: fused triton kernels or plain torch", KERNELS)
    zero3_merge: str = _field("shard", "ZeRO-3 merge: into each rank's shard, or on the gathered weight",
                              ZERO3_MERGES)


@dataclass
class ScheduleConfig:
    lr: float = _field(1e-3, "peak learning rate")
    warmup_steps: int = _field(100, "first linear warm-up W0")
    restart_warmup_steps: int = _field(50, "linear re-warm-up Wr after each restart")
    min_lr_ratio: float = _field(0.1, "cosine floor m as a fraction of the peak")
    low_rank_lr_scale: float = _field(1.0, "peak LR while the adapters train (lora/relora after the switch) as a "
                                           "multiple of schedule.lr (no effect in full mode); the paper's "
                                           "Appendix A suggests 1.5-2")
    kind: str = _field("jagged_cosine", "LR schedule", SCHEDULE_KINDS)
    at_switch: str = _field(
        "restart", "the LR at the warm-start switch (lora/relora): restart: a new schedule for the low-rank phase "
                   "(warm-up, then the cosine from the peak over the remaining steps; ReLoRA's restarts on it), as "
                   "the reference code does; continue: the full-rank run's cosine goes on", AT_SWITCH)
    switch_warmup_steps: int | None = _field(
        None, "the warm-up at the switch with at_switch restart; null: schedule.warmup_steps")


@dataclass
class DataConfig:
    source: str = _field("sotu", "'sotu' (shipped corpus), local file/dir/glob, hub name or pretokenized dir")
    format: str = _field("auto", "how to read the source", DATA_FORMATS)
    text_column: str = _field("text", "column holding the text")
    hub_config: str | None = _field(None, "datasets hub config name (e.g. 'en')")
    split: str = _field("train", "split to train on")
    streaming: bool = _field(False, "read the source lazily as a stream sharded across ranks (hub: without "
                                    "downloading it) instead of packing it into a cached dataset first")
    validation_source: str | None = _field(None, "held-out source; null: the source's validation split if any")
    validation_split: str | None = _field(None, "held-out split name")
    tokenizer: str | None = _field(None, "HF tokenizer dir or hub name; null: the shipped SOTU tokenizer")
    seq_len: int = _field(256, "tokens per packed training sequence")
    num_workers: int = _field(0, "background processes that read, tokenize and pack a stream (data.streaming), "
                                 "each its own share; 0: in the training process")
    prefetch_batches: int = _field(16, "micro-batches the data workers prepare ahead of the step (data.num_workers > 0)")
    skip_bad_records: bool = _field(False, "count and log bad records instead of stopping")


@dataclass
class TrainConfig:
    total_steps: int = _field(1000, "optimizer steps N, warm start included")
    seed: int = _field(42, "seed for init, data order and adapter draws")
    eval_every: int = _field(200, "steps between held-out evaluations; 0: never")
    eval_batches: int = _field(20, "micro-batches per evaluation")
    deepspeed_config: str = _field("ds_configs/cpu.json", "DeepSpeed JSON: batch sizes, precision, ZeRO, optimizer")
    output_dir: str = _field("runs/default", "run directory")
    resume: bool | str = _field(
        False, "false: refuse an output_dir holding another run; true: continue from its newest complete checkpoint "
               "(error if none); auto: continue if there is one, else start fresh (for requeued jobs)", RESUME_CHOICES)
    max_grad_norm: float | None = _field(None, "gradient clipping; null: the DeepSpeed JSON's gradient_clipping")


@dataclass
class LogConfig:
    every: int = _field(10, "steps between log records")
    wandb: bool = _field(False, "log to Weights & Biases (offline without a key)")
    wandb_project: str = _field("relora-ds", "wandb project")
    wandb_entity: str | None = _field(None, "wandb entity")
    run_name: str | None = _field(None, "run name; null: the output dir's name")
    tags: list[str] = _field([], "wandb tags")
    tensorboard: bool = _field(False, "also write TensorBoard events")
    progress: bool = _field(True, "progress bar on rank 0 (one plain line per record when stderr is not a terminal)")
    peak_tflops: float | None = _field(
        None, "peak TFLOP/s per device for the logged MFU; null: the GPU's dense bf16/fp16 peak by name "
              "(relora_ds/hardware.py), no MFU on CPU, on fp32 runs or on an unlisted GPU")


@dataclass
class CheckpointConfig:
    every: int = _field(500, "steps between checkpoints; 0: only at the end")
    keep_last: int = _field(3, "periodic checkpoints kept on disk; 0: keep all")
    save_final: bool = _field(True, "save a checkpoint at the end of training")
    at_switch: bool = _field(True, "save a checkpoint at the warm-start switch (step relora.warm_start_steps, before "
                                   "wrapping; step 0 when wrapping at the start): the reference W of `relora-ds "
                                   "analyze RUN_DIR`, kept whatever keep_last says")
    reference_step: int | None = _field(
        None, "a step whose checkpoint is saved and kept as that reference instead; set it on full-rank runs "
              "compared with low-rank ones (relora-ds compare sets it); null: the switch, with at_switch")


SECTIONS = {
    "model": ModelConfig,
    "relora": ReLoRAConfig,
    "schedule": ScheduleConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "log": LogConfig,
    "checkpoint": CheckpointConfig,
}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    relora: ReLoRAConfig = field(default_factory=ReLoRAConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Build from a (partial) nested dict; missing keys keep their defaults.

        Raises ConfigError listing every unknown key and wrong type (not the range checks: see validate)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected a mapping of sections, got {_describe(d)}")
        errors = []
        sections = {}
        for name, value in d.items():
            if name not in SECTIONS:
                errors.append(_unknown_key_message(str(name), None))
                continue
            if value is None:  # an empty section in YAML ("relora:" with nothing below)
                value = {}
            if not isinstance(value, dict):
                errors.append(f"{name}: expected a mapping, got {_describe(value)}")
                continue
            kwargs = {}
            hints = typing.get_type_hints(SECTIONS[name])
            for key, raw in value.items():
                if key not in hints:
                    errors.append(_unknown_key_message(f"{name}.{key}", name))
                    continue
                converted, error = _convert(raw, hints[key], f"{name}.{key}")
                choices = _choices_of(SECTIONS[name], key)
                if error and choices is not None and not all(isinstance(c, str) for c in choices):
                    # a field mixing booleans and words (train.resume): name the choices, not the types
                    error = f"{name}.{key}: must be one of {_show_choices(choices)}, got {_describe(raw)}"
                if error:
                    errors.append(error)
                else:
                    kwargs[key] = converted
            sections[name] = SECTIONS[name](**kwargs)
        if errors:
            raise ConfigError("\n".join(errors))
        return cls(**sections)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def save(self, path: str) -> None:
        """Write as JSON when the path ends in .json, else YAML; creates the parent directory."""
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(path, "w") as f:
            if path.endswith(".json"):
                json.dump(self.to_dict(), f, indent=2)
                f.write("\n")
            else:
                f.write(self.to_yaml())

    def resolved(self) -> "RunConfig":
        """A copy with derived defaults filled in (relora.merge_every: null → reset_every)."""
        cfg = copy.deepcopy(self)
        if cfg.relora.merge_every is None:
            cfg.relora.merge_every = cfg.relora.reset_every
        return cfg


def load_config(path: str | None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Load a YAML/JSON file (None: defaults), apply `section.key=value` overrides, validate, resolve.

    Raises ConfigError with every problem found, one per line."""
    raw = _read_file(path) if path is not None else {}
    raw = apply_overrides(raw, overrides)
    cfg = RunConfig.from_dict(raw).resolved()
    errors = validate(cfg)
    if errors:
        raise ConfigError("\n".join(errors))
    return cfg


def apply_overrides(raw: dict, overrides: typing.Sequence[str]) -> dict:
    """Return a copy of the nested dict `raw` with `section.key=value` strings applied.

    Values are parsed with yaml.safe_load ("64" → 64, "[a,b]" → ["a", "b"], "null" or "" → None);
    in string fields numbers and booleans keep the text as written ("2024" stays "2024")."""
    raw = copy.deepcopy(raw)
    errors = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or len(parts) != 2 or not all(parts):
            errors.append(f"override {item!r}: expected section.key=value (e.g. relora.rank=64)")
            continue
        section, name = parts
        hints = typing.get_type_hints(SECTIONS[section]) if section in SECTIONS else {}
        value = _parse_override_value(text, hints.get(name))  # from_dict reports unknown keys
        target = raw.setdefault(section, {})
        if target is None:
            target = raw[section] = {}
        if not isinstance(target, dict):
            errors.append(f"override {item!r}: {section} is not a mapping in the config file")
            continue
        target[name] = value
    if errors:
        raise ConfigError("\n".join(errors))
    return raw


def validate(cfg: RunConfig) -> list[str]:
    """Every problem with a (typed) config, one line each, naming the dotted field. Empty: valid."""
    errors = []
    m, r, s, d, t, lg, ck = cfg.model, cfg.relora, cfg.schedule, cfg.data, cfg.train, cfg.log, cfg.checkpoint

    for section_name, section_cls in SECTIONS.items():
        section = getattr(cfg, section_name)
        for f in dataclasses.fields(section_cls):
            choices = f.metadata.get("choices")
            value = getattr(section, f.name)
            if choices is not None and not any(value == c and type(value) is type(c) for c in choices):
                errors.append(f"{section_name}.{f.name}: must be one of {_show_choices(choices)}, got {value!r}")

    def at_least(name, value, low):
        if value is not None and value < low:
            errors.append(f"{name}: must be >= {low}, got {value}")

    def positive(name, value):
        if value is not None and not value > 0:
            errors.append(f"{name}: must be > 0, got {value}")

    def in_range(name, value, low, high, high_open):
        ok = low <= value < high if high_open else low <= value <= high
        if not ok:
            errors.append(f"{name}: must be in [{low}, {high}{')' if high_open else ']'}, got {value}")

    at_least("model.vocab_size", m.vocab_size, 1)
    at_least("relora.rank", r.rank, 1)
    positive("relora.alpha", r.alpha)
    in_range("relora.dropout", r.dropout, 0, 1, high_open=True)
    in_range("relora.prune_ratio", r.prune_ratio, 0, 1, high_open=True)
    if m.init_from is not None and m.hf_config is not None:
        errors.append("model.hf_config: must be null with model.init_from (the saved model has its own config)")
    if r.target_modules is not None and not r.target_modules:  # null: the family's defaults (relora.wrap)
        errors.append("relora.target_modules: must not be empty (name at least one linear, e.g. q_proj)")
    elif r.target_modules is not None and any(not name.strip() for name in r.target_modules):
        errors.append(f"relora.target_modules: names must not be empty, got {r.target_modules}")
    at_least("relora.warm_start_steps", r.warm_start_steps, 0)
    at_least("relora.reset_every", r.reset_every, 1)
    merge_every = r.reset_every if r.merge_every is None else r.merge_every
    at_least("relora.merge_every", r.merge_every, 1)
    positive("schedule.lr", s.lr)
    at_least("schedule.warmup_steps", s.warmup_steps, 0)
    at_least("schedule.restart_warmup_steps", s.restart_warmup_steps, 0)
    in_range("schedule.min_lr_ratio", s.min_lr_ratio, 0, 1, high_open=False)
    positive("schedule.low_rank_lr_scale", s.low_rank_lr_scale)
    at_least("schedule.switch_warmup_steps", s.switch_warmup_steps, 0)
    at_least("data.seq_len", d.seq_len, 8)
    at_least("data.num_workers", d.num_workers, 0)
    at_least("data.prefetch_batches", d.prefetch_batches, 1)
    at_least("train.total_steps", t.total_steps, 1)
    at_least("train.seed", t.seed, 0)
    at_least("train.eval_every", t.eval_every, 0)
    at_least("train.eval_batches", t.eval_batches, 1)
    positive("train.max_grad_norm", t.max_grad_norm)
    at_least("log.every", lg.every, 1)
    positive("log.peak_tflops", lg.peak_tflops)
    at_least("checkpoint.every", ck.every, 0)
    at_least("checkpoint.keep_last", ck.keep_last, 0)
    at_least("checkpoint.reference_step", ck.reference_step, 0)
    if ck.reference_step is not None and ck.reference_step >= t.total_steps:
        errors.append(f"checkpoint.reference_step ({ck.reference_step}) must be < train.total_steps ({t.total_steps})")

    # How the phases and the schedule fit together.
    if t.total_steps <= s.warmup_steps:
        errors.append(f"train.total_steps ({t.total_steps}) must be > schedule.warmup_steps ({s.warmup_steps})")
    if r.mode == "full":
        if r.warm_start_steps > 0:
            errors.append(f"relora.warm_start_steps: must be 0 with relora.mode full (nothing to switch to), "
                          f"got {r.warm_start_steps}")
        if r.warm_start_checkpoint is not None:
            errors.append("relora.warm_start_checkpoint: must be null with relora.mode full (nothing to switch to)")
    else:
        if r.warm_start_steps >= t.total_steps:
            errors.append(f"relora.warm_start_steps ({r.warm_start_steps}) must be < train.total_steps "
                          f"({t.total_steps})")
        if 0 < r.warm_start_steps < s.warmup_steps:
            errors.append(f"relora.warm_start_steps ({r.warm_start_steps}) must be 0 or >= schedule.warmup_steps "
                          f"({s.warmup_steps}): the first warm-up ends before the switch to adapters")
    # schedule.at_switch restart: the low-rank phase has its own schedule, of N - S steps with its own warm-up.
    restarts_at_switch = r.mode != "full" and s.at_switch == "restart"
    switch_warmup = s.warmup_steps if s.switch_warmup_steps is None else s.switch_warmup_steps
    first_warmup = ("schedule.switch_warmup_steps" if s.switch_warmup_steps is not None else "schedule.warmup_steps",
                    switch_warmup) if restarts_at_switch else ("schedule.warmup_steps", s.warmup_steps)
    if restarts_at_switch and (r.warm_start_steps > 0 or s.switch_warmup_steps is not None) and \
            0 <= r.warm_start_steps < t.total_steps <= r.warm_start_steps + switch_warmup:
        errors.append(f"train.total_steps - relora.warm_start_steps ({t.total_steps - r.warm_start_steps}) must be > "
                      f"{first_warmup[0]} ({switch_warmup}): with schedule.at_switch restart the low-rank steps "
                      f"start with that warm-up")
    if r.mode == "relora":
        if merge_every >= 1 and r.reset_every % merge_every != 0:
            errors.append(f"relora.reset_every ({r.reset_every}) must be a multiple of relora.merge_every "
                          f"({merge_every})")
        if s.kind == "jagged_cosine":
            if r.reset_every <= s.restart_warmup_steps:
                errors.append(f"relora.reset_every ({r.reset_every}) must be > schedule.restart_warmup_steps "
                              f"({s.restart_warmup_steps}): each cycle needs room for its LR re-warm-up")
            if first_warmup[1] > r.reset_every:
                errors.append(f"{first_warmup[0]} ({first_warmup[1]}) must be <= relora.reset_every "
                              f"({r.reset_every}): the first warm-up must end before the first restart")
    return errors


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_byte_size(text) -> int:
    """Bytes in "5GB", "500MB", "2GiB", "1.5GB" or a plain number of bytes (GB = 10^9, GiB = 2^30, as in Hugging
    Face's max_shard_size); 0 when `text` is not a size (the caller names its option in the error)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return max(text, 0)
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?\s*", str(text), flags=re.IGNORECASE)
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]) if match else 0


def reference_markdown() -> str:
    """A markdown table of every field: dotted name, default, meaning (for the README and --help)."""
    lines = ["| field | default | meaning |", "|---|---|---|"]
    for section_name, section_cls in SECTIONS.items():
        for f in dataclasses.fields(section_cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            meaning = f.metadata["help"]
            if "choices" in f.metadata:
                meaning += f" ({_show_choices(f.metadata['choices'])})"
            lines.append(f"| `{section_name}.{f.name}` | `{json.dumps(default)}` | {meaning} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# helpers


def _choices_of(section_cls, name: str):
    for f in dataclasses.fields(section_cls):
        if f.name == name:
            return f.metadata.get("choices")
    return None


def _show_choices(choices) -> str:
    """"full, lora, relora"; booleans as YAML writes them ("false, true, auto")."""
    return ", ".join(json.dumps(c) if isinstance(c, bool) else str(c) for c in choices)


def _read_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    with open(path) as f:
        text = f.read()
    try:
        raw = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config file {path!r} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                          f"{first_line}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path!r}: expected a mapping of sections, got {_describe(raw)}")
    return raw


def _parse_override_value(text: str, annotation):
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # e.g. "*.jsonl"; the type check reports it where a string is wrong
    allowed = _base_types(annotation) if annotation is not None else ()
    if str in allowed and isinstance(value, (bool, int, float)) and not (isinstance(value, bool) and bool in allowed):
        return text.strip()  # "2024", "yes", "1e3" stay text in a string field (true stays a bool in bool | str)
    return value


def _base_types(annotation) -> tuple:
    """(int,) for int, (str, NoneType) for str | None, (list,) for list[str]."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(a for arg in typing.get_args(annotation) for a in _base_types(arg))
    origin = typing.get_origin(annotation)
    return (origin,) if origin is not None else (annotation,)


def _type_name(annotation) -> str:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        names = [_type_name(a) for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(names) + " or null"
    if typing.get_origin(annotation) is list:
        return f"list[{typing.get_args(annotation)[0].__name__}]"
    return annotation.__name__


def _describe(value) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _convert(value, annotation, name: str):
    """(converted value, None) or (None, error message). Ints are floats; bools are not ints."""
    expected = f"{name}: expected {_type_name(annotation)}, got {_describe(value)}"
    allowed = _base_types(annotation)
    if value is None:
        return (None, None) if type(None) in allowed else (None, expected)
    if bool in allowed:
        if isinstance(value, bool):
            return value, None
        if str not in allowed:  # bool | str (train.resume): a word is checked against the choices by validate
            return None, expected
    if isinstance(value, bool):
        return None, expected
    if int in allowed:
        return (value, None) if isinstance(value, int) else (None, expected)
    if float in allowed:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                return None, expected
        if not isinstance(value, (int, float)):
            return None, expected
        if not math.isfinite(value):
            return None, f"{name}: expected a finite number, got {value}"
        return float(value), None
    if str in allowed:
        return (value, None) if isinstance(value, str) else (None, expected)
    if list in allowed:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value), None
        return None, expected
    raise TypeError(f"{name}: unsupported annotation {annotation!r}")  # a bug in this file, not user input


def _unknown_key_message(dotted: str, section: str | None) -> str:
    """`unknown key 'relora.rnk' (did you mean 'relora.rank'?)`: the same key in another section
    first (relora.lr → schedule.lr), then a close name in the section, then a close name anywhere."""
    if section is None:
        match = difflib.get_close_matches(dotted, list(SECTIONS), n=1, cutoff=0.6)
        valid = list(SECTIONS)
    else:
        leaf = dotted.split(".", 1)[1]
        valid = [f.name for f in dataclasses.fields(SECTIONS[section])]
        everywhere = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
        match = [name for name in everywhere if name.split(".", 1)[1] == leaf][:1]
        if not match:
            match = [f"{section}.{m}" for m in difflib.get_close_matches(leaf, valid, n=1, cutoff=0.6)]
        if not match:
            leaves = {name.split(".", 1)[1]: name for name in reversed(everywhere)}
            match = [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.8)]
    if match:
        return f"unknown key {dotted!r} (did you mean {match[0]!r}?)"
    return f"unknown key {dotted!r} (valid: {', '.join(valid)})"
