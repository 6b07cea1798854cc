import dataclasses
import glob
import os
import subprocess
import sys

import pytest
import yaml

from relora_ds.config import (
    SECTIONS,
    ConfigError,
    RunConfig,
    load_config,
    reference_markdown,
    validate,
)
from relora_ds import methods
from relora_ds.model.families import MODEL_PRESETS

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "relora_ds", "configs")
SHIPPED = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))


def errors_of(*overrides, path=None):
    """The ConfigError lines load_config raises for these overrides."""
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value).splitlines()


def test_defaults_are_valid_and_resolved():
    cfg = load_config(None)
    assert validate(cfg) == []
    assert cfg.method == "relora" and cfg.relora.rank == 128 and cfg.relora.alpha == 32.0
    assert cfg.relora.merge_every == cfg.relora.reset_every == 1000  # derived default filled in
    assert RunConfig().relora.merge_every is None
    assert cfg.relora.target_modules is None  # the model family's projections (relora.wrap)
    assert cfg.model.family == "llama" and cfg.model.hf_config is None
    assert cfg.data.source == "sotu" and cfg.train.deepspeed_config == "ds_configs/cpu.json"
    RunConfig().log.tags.append("x")  # defaults are not shared between instances
    assert "x" not in RunConfig().log.tags


def test_round_trip_dict_yaml_json(tmp_path):
    cfg = load_config(None, ["relora.rank=64", "log.tags=[a, b]", "model.vocab_size=8192"])
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    for name in ("run/config.yaml", "run/config.json"):
        path = str(tmp_path / name)
        cfg.save(path)
        assert load_config(path) == cfg


def test_partial_dict_keeps_defaults_and_empty_section_is_allowed():
    cfg = RunConfig.from_dict({"relora": {"rank": 4}, "log": None})
    assert cfg.relora.rank == 4 and cfg.relora.alpha == 32.0 and cfg.log == RunConfig().log


def test_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("relora:\n  rank: 32\nschedule:\n  lr: 1e-3\n")  # PyYAML reads 1e-3 as a string
    cfg = load_config(str(path), [
        "relora.rank=64",
        "relora.target_modules=[q_proj, v_proj]",
        "log.tags=[a.jsonl,b.jsonl]",
        "schedule.min_lr_ratio=0",
        "log.run_name=2024",
        "model.vocab_size=null",
        "data.tokenizer=",
        "checkpoint.save_final=false",
        "train.max_grad_norm=1",
        "data.split=yes",
        "data.source=*.jsonl",
        "train.output_dir='runs/x'",
    ])
    assert cfg.relora.rank == 64
    assert cfg.schedule.lr == 1e-3 and isinstance(cfg.schedule.lr, float)
    assert cfg.relora.target_modules == ["q_proj", "v_proj"]
    assert cfg.log.tags == ["a.jsonl", "b.jsonl"]
    assert cfg.schedule.min_lr_ratio == 0.0 and isinstance(cfg.schedule.min_lr_ratio, float)
    assert cfg.log.run_name == "2024"  # string fields keep the text as written
    assert cfg.model.vocab_size is None and cfg.data.tokenizer is None
    assert cfg.checkpoint.save_final is False
    assert cfg.train.max_grad_norm == 1.0 and isinstance(cfg.train.max_grad_norm, float)
    assert (cfg.data.split, cfg.data.source, cfg.train.output_dir) == ("yes", "*.jsonl", "runs/x")
    assert load_config(str(path)).relora.rank == 32  # the file itself is untouched


def test_unknown_keys_suggest_the_closest_name():
    assert errors_of("relora.rnk=5") == ["unknown key 'relora.rnk' (did you mean 'relora.rank'?)"]
    assert errors_of("relroa.rank=5") == ["unknown key 'relroa' (did you mean 'relora'?)"]
    assert errors_of("relora.lr=5") == ["unknown key 'relora.lr' (did you mean 'schedule.lr'?)"]
    assert errors_of("log.wandb_projct=x") == ["unknown key 'log.wandb_projct' (did you mean 'log.wandb_project'?)"]
    assert errors_of("train.warmup_step=5") == [
        "unknown key 'train.warmup_step' (did you mean 'schedule.warmup_steps'?)"]
    [line] = errors_of("checkpoint.zzz=1")
    assert line == ("unknown key 'checkpoint.zzz' (valid: every, every_minutes, keep_last, save_final, at_switch, "
                    "reference_step, stop_signals)")


def test_wrong_types():
    assert errors_of("relora.rank=abc") == ["relora.rank: expected int, got str 'abc'"]
    assert errors_of("relora.rank=true") == ["relora.rank: expected int, got bool True"]
    assert errors_of("relora.rank=2.5") == ["relora.rank: expected int, got float 2.5"]
    assert errors_of("relora.alpha=[1]") == ["relora.alpha: expected float, got list [1]"]
    assert errors_of("schedule.lr=fast") == ["schedule.lr: expected float, got str 'fast'"]
    assert errors_of("schedule.lr=.inf") == ["schedule.lr: expected a finite number, got inf"]
    assert errors_of("data.streaming=1") == ["data.streaming: expected bool, got int 1"]
    assert errors_of("relora.target_modules=q_proj") == [
        "relora.target_modules: expected list[str] or null, got str 'q_proj'"]
    assert errors_of("model.vocab_size=big") == ["model.vocab_size: expected int or null, got str 'big'"]
    assert errors_of("train.total_steps=null") == ["train.total_steps: expected int, got null"]
    assert errors_of("data.source=[a.jsonl, b.jsonl]") == [
        "data.source: expected str, got list ['a.jsonl', 'b.jsonl']"]
    assert errors_of("relora=5") == ["override 'relora=5': expected section.key=value (e.g. relora.rank=64)"]


def test_file_errors(tmp_path):
    assert errors_of(path=str(tmp_path / "nope.yaml")) == [f"config file '{tmp_path / 'nope.yaml'}' not found"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("relora: [unclosed\n")
    [line] = errors_of(path=str(bad))
    assert line.startswith(f"config file '{bad}' is not valid YAML: ")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert errors_of(path=str(listing)) == [
        f"config file '{listing}': expected a mapping of sections, got list ['a', 'b']"]
    section = tmp_path / "section.yaml"
    section.write_text("relora: 5\n")
    assert errors_of(path=str(section)) == ["relora: expected a mapping, got int 5"]


def test_ranges_and_choices():
    assert errors_of("relora.prune_ratio=1.5") == ["relora.prune_ratio: must be in [0, 1), got 1.5"]
    assert errors_of("method=foo") == [f"method: must be one of {', '.join(methods.METHODS)}, got 'foo'"]
    assert errors_of("model.preset=3b") == [
        "model.preset: must be one of tiny, 20m, 60m, 130m, 250m, 350m, 1b, 7b, got '3b'"]
    assert errors_of("relora.rank=0") == ["relora.rank: must be >= 1, got 0"]
    assert errors_of("relora.alpha=0") == ["relora.alpha: must be > 0, got 0.0"]
    assert errors_of("relora.dropout=1") == ["relora.dropout: must be in [0, 1), got 1.0"]
    assert errors_of("data.seq_len=4") == ["data.seq_len: must be >= 8, got 4"]
    assert errors_of("schedule.lr=0") == ["schedule.lr: must be > 0, got 0.0"]
    assert errors_of("schedule.min_lr_ratio=-0.1") == ["schedule.min_lr_ratio: must be in [0, 1], got -0.1"]
    assert errors_of("schedule.warmup_steps=-1") == ["schedule.warmup_steps: must be >= 0, got -1"]
    assert errors_of("relora.target_modules=[]") == [
        "relora.target_modules: must not be empty (name at least one linear, e.g. q_proj)"]
    assert errors_of("relora.optimizer_reset=half") == [
        "relora.optimizer_reset: must be one of magnitude, random, full, none, got 'half'"]


def test_total_steps_must_be_positive_and_exceed_warmup():
    assert errors_of("train.total_steps=0", "schedule.warmup_steps=0", "method=full") == [
        "train.total_steps: must be >= 1, got 0",
        "train.total_steps (0) must be > schedule.warmup_steps (0)",
    ]


def test_schedule_constraints():
    assert errors_of("relora.reset_every=50", "schedule.warmup_steps=10") == [
        "relora.reset_every (50) must be > schedule.restart_warmup_steps (50): "
        "each cycle needs room for its LR re-warm-up"]
    assert errors_of("relora.reset_every=80") == [
        "schedule.warmup_steps (100) must be <= relora.reset_every (80): "
        "the first warm-up must end before the first restart"]
    assert errors_of("train.total_steps=100") == ["train.total_steps (100) must be > schedule.warmup_steps (100)"]
    assert errors_of("relora.merge_every=300") == [
        "relora.reset_every (1000) must be a multiple of relora.merge_every (300)"]
    assert errors_of("relora.merge_every=0") == ["relora.merge_every: must be >= 1, got 0"]
    assert errors_of("relora.warm_start_steps=1000") == [
        "relora.warm_start_steps (1000) must be < train.total_steps (1000)"]
    assert errors_of("relora.warm_start_steps=50") == [
        "relora.warm_start_steps (50) must be 0 or >= schedule.warmup_steps (100): "
        "the first warm-up ends before the switch to adapters"]
    assert errors_of("method=full", "relora.warm_start_steps=200") == [
        "relora.warm_start_steps: must be 0 with method full (nothing to switch to), got 200"]
    # the cycle constraints belong to the jagged schedule in relora mode only
    load_config(None, ["relora.reset_every=50", "schedule.warmup_steps=10", "schedule.kind=cosine"])
    load_config(None, ["relora.reset_every=50", "schedule.warmup_steps=10", "method=lora"])
    assert load_config(None, ["relora.merge_every=250"]).relora.merge_every == 250  # online ReLoRA


def test_schedule_constraints_of_the_low_rank_phase_restarting_at_the_switch():
    """schedule.at_switch restart: the low-rank steps (N - S) need room for their own warm-up, and ReLoRA's first
    cycle after the switch for that warm-up; the full-rank warm-up is then free of the cycle length."""
    assert errors_of("schedule.at_switch=sometimes") == [
        "schedule.at_switch: must be one of restart, continue, got 'sometimes'"]
    assert errors_of("schedule.switch_warmup_steps=-1") == ["schedule.switch_warmup_steps: must be >= 0, got -1"]
    assert errors_of("relora.warm_start_steps=950") == [
        "train.total_steps - relora.warm_start_steps (50) must be > schedule.warmup_steps (100): with "
        "schedule.at_switch restart the low-rank steps start with that warm-up"]
    load_config(None, ["relora.warm_start_steps=950", "schedule.at_switch=continue"])
    assert errors_of("relora.reset_every=80", "schedule.switch_warmup_steps=90", "schedule.restart_warmup_steps=10") \
        == ["schedule.switch_warmup_steps (90) must be <= relora.reset_every (80): "
            "the first warm-up must end before the first restart"]
    load_config(None, ["relora.reset_every=80", "schedule.switch_warmup_steps=40", "schedule.restart_warmup_steps=10"])


def test_all_errors_are_reported_together():
    lines = errors_of("relora.rnk=1", "relora.rank=abc", "schedule.lr=x")
    assert lines == ["unknown key 'relora.rnk' (did you mean 'relora.rank'?)",
                     "relora.rank: expected int, got str 'abc'",
                     "schedule.lr: expected float, got str 'x'"]
    lines = errors_of("relora.rank=0", "relora.prune_ratio=1", "data.seq_len=1")
    assert len(lines) == 3


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_configs_load_and_validate(path):
    cfg = load_config(path)
    assert validate(cfg) == []
    fn = methods.from_config(cfg).lr_lambda
    assert fn(cfg.train.total_steps) == pytest.approx(cfg.schedule.min_lr_ratio)
    assert max(fn(t) for t in range(cfg.train.total_steps)) == pytest.approx(1.0)
    with open(path) as f:
        raw = yaml.safe_load(f)
    assert RunConfig.from_dict(raw).resolved() == cfg


def test_shipped_configs_are_there_and_the_demo_restarts_at_least_three_times():
    assert {os.path.basename(p) for p in SHIPPED} >= {"tiny.yaml", "demo.yaml", "60m.yaml", "1b.yaml"}
    demo = load_config(os.path.join(CONFIG_DIR, "demo.yaml"))
    assert demo.model.preset == "tiny" and demo.data.source == "sotu" and demo.method == "relora"
    assert 600 <= demo.train.total_steps <= 2000  # 1600 steps measured at 166 s on 2 cores and demo.relora.warm_start_steps > 0
    fn = methods.from_config(demo).lr_lambda
    points = [t for t in range(1, demo.train.total_steps) if fn(t) == 0.0]  # where the LR re-warms from 0
    assert points[0] == demo.relora.warm_start_steps and len(points[1:]) >= 3
    tiny = load_config(os.path.join(CONFIG_DIR, "tiny.yaml"))
    assert tiny.train.total_steps <= 100 and tiny.data.seq_len <= 64


def test_model_presets_and_families_match_the_model_module():
    from relora_ds.config import ModelConfig
    from relora_ds.model.families import FAMILIES

    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(ModelConfig)}
    assert choices["family"] == tuple(FAMILIES) and choices["preset"] == MODEL_PRESETS
    assert all(family.target_modules for family in FAMILIES.values())
    assert all(tuple(family.presets) == MODEL_PRESETS for family in FAMILIES.values())


def test_reference_lists_every_field():
    text = reference_markdown()
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"`{name}.{f.name}`" in text
    assert "| `relora.rank` | `128` |" in text


def test_schedule_does_not_import_torch():
    """The LR schedule is pure python (plots, the CLI's schedule command); the config assembles its owners' sections,
    torch-importing ones included."""
    code = "import sys, relora_ds.schedule; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_relora_mode_is_the_old_name_of_method(tmp_path):
    """A config written with relora.mode (before `method:`) loads as that method; naming both, differently, is one
    line naming the new key."""
    old = tmp_path / "old.yaml"
    old.write_text("relora:\n  mode: lora\n  rank: 8\n")
    cfg = load_config(str(old))
    assert cfg.method == "lora" and cfg.relora.rank == 8 and "mode" not in cfg.to_dict()["relora"]
    assert load_config(None, ["relora.mode=full"]).method == "full"
    assert errors_of("relora.mode=full", "method=lora") == [
        "relora.mode: is the old name of `method`; give only method (got method 'lora' and relora.mode 'full')"]
