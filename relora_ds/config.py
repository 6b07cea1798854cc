"""The run configuration: a dataclass tree loaded from YAML/JSON, dotted overrides, validation.

    cfg = load_config("relora_ds/configs/demo.yaml", ["relora.rank=64", "log.tags=[a,b]"])
    cfg.save("runs/x/config.yaml")            # resolved (derived defaults filled in)

`method` and the sections: model, each method's own (relora, ...), schedule, data, train, log, checkpoint.
Batch sizes, precision, ZeRO stage and the optimizer live in the DeepSpeed JSON (`train.deepspeed_config`), not here.
Each section's dataclass and each field's vocabulary is its owner's (imported below); the methods check their own
settings (Method.validate).
"""

import copy
import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import field

import yaml

from relora_ds.callbacks.checkpointing import CheckpointConfig
from relora_ds.data import DataConfig
from relora_ds.data.mixture import mixture_errors
from relora_ds.data.skip import skip_errors
from relora_ds.methods import METHODS
from relora_ds.metrics import LogConfig
from relora_ds.model.build import ModelConfig
from relora_ds.schedule import ScheduleConfig
from relora_ds.stop import check_names
from relora_ds.trainer import TrainConfig

# Each section's dataclass sits with its owner (imported above), each method's with the method (Method.section);
# config.py assembles the tree, loads and validates it.


class ConfigError(ValueError):
    """A bad run configuration; the message holds one line per problem."""


DEFAULT_METHOD = "relora"

# The sections, in the order a config is written: the model, each method's own (methods/: Method.section), the rest.
METHOD_SECTIONS = {}
for _method in sorted(METHODS.values(), key=lambda m: m.name != DEFAULT_METHOD):  # the default's section first
    if _method.section is not None:
        METHOD_SECTIONS.setdefault(_method.section, _method.Config)
SECTIONS = {
    "model": ModelConfig,
    **METHOD_SECTIONS,
    "schedule": ScheduleConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "log": LogConfig,
    "checkpoint": CheckpointConfig,
}


METHOD_HELP = ("the training method, one of relora_ds/methods/ (full: plain training; lora: wrap once, never merge; "
               "relora: merge and restart)")


class RunConfigMethods:
    """What a run config does (RunConfig below is the dataclass of the sections, made from SECTIONS)."""

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Build from a (partial) nested dict; missing keys keep their defaults.

        Raises ConfigError listing every unknown key and wrong type (not the range checks: see validate)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected a mapping of sections, got {_describe(d)}")
        errors = []
        sections = {}
        d = _method_from_relora_mode(d, errors)
        for name, value in d.items():
            if name == "method":
                if isinstance(value, str):
                    sections["method"] = value
                else:
                    errors.append(f"method: expected str, got {_describe(value)}")
                continue
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



RunConfig = dataclasses.make_dataclass(
    "RunConfig",
    [("method", str, field(default=DEFAULT_METHOD, metadata={"help": METHOD_HELP}))]
    + [(name, cls, field(default_factory=cls)) for name, cls in SECTIONS.items()],
    bases=(RunConfigMethods,))
RunConfig.__module__ = __name__
RunConfig.__doc__ = "The run configuration: `method` and one dataclass per section (SECTIONS)."

def _method_from_relora_mode(d: dict, errors: list) -> dict:
    """Configs written before `method:` named the method as relora.mode: it still loads, as `method`; naming both,
    differently, is an error."""
    relora = d.get("relora")
    if not isinstance(relora, dict) or "mode" not in relora:
        return d
    d = {**d, "relora": {k: v for k, v in relora.items() if k != "mode"}}
    if "method" in d and d["method"] != relora["mode"]:
        errors.append(f"relora.mode: is the old name of `method`; give only method (got method {d['method']!r} and "
                      f"relora.mode {relora['mode']!r})")
    return {"method": relora["mode"], **d}


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
        if sep and parts == ["method"]:
            raw["method"] = text.strip()
            continue
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
    errors += mixture_errors(d)
    errors += skip_errors(d.skip, t.total_steps)
    at_least("train.total_steps", t.total_steps, 1)
    at_least("train.seed", t.seed, 0)
    at_least("train.eval_every", t.eval_every, 0)
    at_least("train.eval_batches", t.eval_batches, 1)
    at_least("train.nonfinite_rewinds", t.nonfinite_rewinds, 0)
    positive("train.max_grad_norm", t.max_grad_norm)
    at_least("log.every", lg.every, 1)
    positive("log.peak_tflops", lg.peak_tflops)
    at_least("checkpoint.every", ck.every, 0)
    at_least("checkpoint.keep_last", ck.keep_last, 0)
    positive("checkpoint.every_minutes", ck.every_minutes)
    at_least("checkpoint.reference_step", ck.reference_step, 0)
    if error := check_names(ck.stop_signals):
        errors.append(error)
    if ck.reference_step is not None and ck.reference_step >= t.total_steps:
        errors.append(f"checkpoint.reference_step ({ck.reference_step}) must be < train.total_steps ({t.total_steps})")

    # How the phases and the schedule fit together.
    if t.total_steps <= s.warmup_steps:
        errors.append(f"train.total_steps ({t.total_steps}) must be > schedule.warmup_steps ({s.warmup_steps})")
    errors += _method_errors(cfg)
    return errors


def _method_errors(cfg: RunConfig) -> list[str]:
    """The run's method: one of the registry's (relora_ds/methods/), and its own checks (Method.validate)."""
    if cfg.method not in METHODS:
        return [f"method: must be one of {', '.join(METHODS)}, got {cfg.method!r}"]
    return METHODS[cfg.method].validate(cfg)


def reference_markdown() -> str:
    """A markdown table of every field: dotted name, default, meaning (for the README and --help)."""
    lines = ["| field | default | meaning |", "|---|---|---|",
             f"| `method` | `\"relora\"` | {METHOD_HELP} ({', '.join(METHODS)}; `relora.mode`, its old name, still loads) |"]
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


def _union_members(annotation) -> tuple:
    """(str, NoneType) for str | None; (annotation,) for anything that is not a union."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def _base_types(annotation) -> tuple:
    """(int,) for int, (str, NoneType) for str | None, (list,) for list[str]."""
    return tuple(typing.get_origin(a) or a for a in _union_members(annotation))


def _type_name(annotation) -> str:
    members = _union_members(annotation)
    if len(members) > 1:
        return " or ".join(_type_name(a) for a in members if a is not type(None)) + " or null"
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
    if list in allowed:  # list[str], or list[dict] whose entries their owner checks (data.mixture)
        item = next(typing.get_args(a)[0] for a in _union_members(annotation) if typing.get_origin(a) is list)
        if isinstance(value, list) and all(isinstance(v, item) for v in value):
            return copy.deepcopy(value), None
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
