"""train.resume = false | true | auto: config parsing and validation, the CLI flag, and prepare_output_dir on
an empty dir, a dir holding a dead attempt (no checkpoint), one with only a torn checkpoint, and one with a
complete checkpoint. No training: checkpoints are faked by their files (a tag dir, with or without COMPLETE)."""

import argparse
import json
import os

import pytest

from relora_ds.config import ConfigError, RunConfig, load_config, reference_markdown, validate
from relora_ds.engine import checkpoint, run_dir
from relora_ds.errors import RunError
from relora_ds.train import add_train_arguments, config_from_args


# --- config ---------------------------------------------------------------------------------------------

def test_resume_accepts_false_true_auto_from_yaml_and_overrides(tmp_path):
    for text, value in (("false", False), ("true", True), ("auto", "auto"), ('"auto"', "auto")):
        path = tmp_path / "run.yaml"
        path.write_text(f"train:\n  resume: {text}\n")
        assert load_config(str(path)).train.resume == value, text
    for text, value in (("false", False), ("true", True), ("True", True), ("auto", "auto")):
        resume = load_config(None, [f"train.resume={text}"]).train.resume
        assert resume == value and type(resume) is type(value), text
    assert load_config(None).train.resume is False
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps({"train": {"resume": "auto"}}))
    assert load_config(str(json_path)).train.resume == "auto"
    cfg = load_config(None, ["train.resume=auto"])  # round trip through config.yaml
    cfg.save(str(tmp_path / "saved.yaml"))
    assert load_config(str(tmp_path / "saved.yaml")) == cfg
    # a bool stays a bool in string fields' neighbour: data.source=true is still the text "true"
    assert load_config(None, ["data.source=true"]).data.source == "true"


@pytest.mark.parametrize("override, got", [
    ("train.resume=maybe", "'maybe'"), ("train.resume=Auto", "'Auto'"), ("train.resume=1", "'1'"),
    ("train.resume=null", "null"), ("train.resume=[auto]", "list ['auto']"),
])
def test_bad_resume_value_is_one_line_naming_the_choices(override, got):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value).splitlines() == [f"train.resume: must be one of false, true, auto, got {got}"]


def test_resume_in_a_file_with_a_wrong_type_and_validate_on_a_built_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  resume: 1\n")
    with pytest.raises(ConfigError, match=r"^train.resume: must be one of false, true, auto, got int 1$"):
        load_config(str(path))
    cfg = RunConfig()
    cfg.train.resume = 1  # equal to True, but not a bool
    assert validate(cfg) == ["train.resume: must be one of false, true, auto, got 1"]
    cfg.train.resume = "auto"
    assert validate(cfg) == []


def test_reference_shows_the_resume_choices():
    [line] = [line for line in reference_markdown().splitlines() if "`train.resume`" in line]
    assert line.startswith("| `train.resume` | `false` |") and line.endswith("(false, true, auto) |")
    assert "auto:" in line


def test_cli_resume_flag():
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)

    def resume(*argv):
        return config_from_args(parser.parse_args(list(argv))).train.resume

    assert resume() is False
    assert resume("--resume") is True  # as before: the bare flag means true
    assert resume("--resume", "--set", "train.seed=1") is True
    assert resume("--resume", "auto") == "auto"
    assert resume("--resume=auto") == "auto"
    assert resume("--set", "train.resume=auto") == "auto"
    assert resume("--set", "train.resume=auto", "--resume", "false") is False  # the flag wins over --set
    with pytest.raises(SystemExit):
        parser.parse_args(["--resume", "maybe"])


# --- prepare_output_dir ------------------------------------------------------------------------------------

def cfg_for(out, resume):
    cfg = load_config(None, [f"train.output_dir={out}"])
    cfg.train.resume = resume
    return cfg


def fake_tag(out, step, complete):
    tag_dir = os.path.join(out, "checkpoints", checkpoint.tag_for(step))
    os.makedirs(tag_dir)
    open(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), "w").close()
    if complete:
        open(os.path.join(tag_dir, checkpoint.COMPLETE), "w").write(f"{step}\n")
    return tag_dir


def dead_attempt(out, marker="first"):
    """What a run killed before its first complete checkpoint leaves behind."""
    os.makedirs(os.path.join(out, "tensorboard"), exist_ok=True)
    os.makedirs(os.path.join(out, "cache", "packed-train-abc"), exist_ok=True)
    for name, text in (("config.yaml", f"# {marker}\n"), ("ds_config.json", "{}\n"), ("wandb_run_id", "dead0001\n"),
                       ("loss.png", ""), ("tensorboard/events.out", "")):
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for step in (1, 2, 3):
            f.write(json.dumps({"step": step, "loss": 5.0}) + "\n")


@pytest.mark.parametrize("exists", [False, True])
def test_fresh_dir(tmp_path, exists):
    out = tmp_path / "run"
    if exists:
        out.mkdir()
    assert run_dir.prepare_output_dir(cfg_for(out, False)) is None
    assert run_dir.prepare_output_dir(cfg_for(out, "auto")) is None
    assert os.listdir(out) == [] if exists else not out.exists()  # auto created nothing
    with pytest.raises(checkpoint.CheckpointError) as info:
        run_dir.prepare_output_dir(cfg_for(out, True))
    message = str(info.value)
    assert "no complete relora-ds checkpoint found" in message and "train.resume=auto" in message
    assert "\n" not in message


def test_dead_attempt_without_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "run")
    dead_attempt(out)
    with pytest.raises(RunError, match="holds another run"):
        run_dir.prepare_output_dir(cfg_for(out, False))
    with pytest.raises(checkpoint.CheckpointError, match="train.resume=auto"):
        run_dir.prepare_output_dir(cfg_for(out, True))
    assert os.path.isfile(os.path.join(out, "metrics.jsonl"))  # false / true touched nothing

    assert run_dir.prepare_output_dir(cfg_for(out, "auto")) is None
    first = os.path.join(out, "previous_attempts", "001")
    assert "previous_attempts/001" in capsys.readouterr().out
    assert sorted(os.listdir(first)) == sorted(run_dir.RUN_RECORDS)
    assert sorted(os.listdir(out)) == ["cache", "previous_attempts"]  # the data cache stays
    assert os.listdir(os.path.join(out, "cache")) == ["packed-train-abc"]
    assert len(open(os.path.join(first, "metrics.jsonl")).readlines()) == 3  # moved, not lost
    assert open(os.path.join(first, "wandb_run_id")).read() == "dead0001\n"
    # The fresh run may now start in the directory (a plain run would be refused no more either).
    assert run_dir.prepare_output_dir(cfg_for(out, False)) is None

    # A second attempt that died early too goes to 002; 001 is kept.
    dead_attempt(out, marker="second")
    assert run_dir.prepare_output_dir(cfg_for(out, "auto")) is None
    second = os.path.join(out, "previous_attempts", "002")
    assert open(os.path.join(second, "config.yaml")).read() == "# second\n"
    assert open(os.path.join(first, "config.yaml")).read() == "# first\n"
    # Nothing left to move: nothing moves, nothing printed.
    capsys.readouterr()
    assert run_dir.prepare_output_dir(cfg_for(out, "auto")) is None
    assert sorted(os.listdir(os.path.join(out, "previous_attempts"))) == ["001", "002"]
    assert capsys.readouterr().out == ""


def test_torn_checkpoint_only(tmp_path):
    out = str(tmp_path / "run")
    dead_attempt(out)
    torn = fake_tag(out, 3, complete=False)
    with pytest.raises(RunError, match="holds another run"):
        run_dir.prepare_output_dir(cfg_for(out, False))
    with pytest.raises(checkpoint.CheckpointError, match="no complete relora-ds checkpoint"):
        run_dir.prepare_output_dir(cfg_for(out, True))
    assert run_dir.prepare_output_dir(cfg_for(out, "auto")) is None  # a torn checkpoint is never resumed
    assert os.path.isdir(os.path.join(out, "previous_attempts", "001"))
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))
    assert os.path.isdir(torn)  # left to a later save, which removes it


def test_complete_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    dead_attempt(out)
    complete = fake_tag(out, 3, complete=True)
    fake_tag(out, 6, complete=False)  # killed while saving the next one
    with pytest.raises(RunError, match="holds another run"):
        run_dir.prepare_output_dir(cfg_for(out, False))
    assert run_dir.prepare_output_dir(cfg_for(out, True)) == complete
    assert run_dir.prepare_output_dir(cfg_for(out, "auto")) == complete
    assert not os.path.exists(os.path.join(out, "previous_attempts"))  # a resume keeps the run's records
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 3
    # A checkpoint without any run records (copied in by hand) is resumed too.
    bare = str(tmp_path / "bare")
    tag = fake_tag(bare, 5, complete=True)
    assert run_dir.prepare_output_dir(cfg_for(bare, "auto")) == tag


# --- a resume with other model settings -------------------------------------------------------------------

def test_a_resume_with_other_model_settings_is_refused_in_one_line():
    saved = load_config(None, ["relora.rank=8", "model.preset=tiny"]).resolved().to_dict()
    same = load_config(None, ["relora.rank=8", "model.preset=tiny", "schedule.lr=1e-2", "train.total_steps=9999"])
    run_dir.check_same_model(same.resolved(), saved, "TAG")  # schedule and length may change
    other = load_config(None, ["relora.rank=16", "model.preset=60m", "relora.base_dtype=int8"]).resolved()
    with pytest.raises(RunError, match=r"^TAG: written with other model settings \(model.preset 'tiny' -> '60m'; "
                                       r"relora.rank 8 -> 16; relora.base_dtype 'auto' -> 'int8'\); resume with "
                                       r"the checkpoint's values, or start a new run in another "
                                       r"train.output_dir$"):
        run_dir.check_same_model(other, saved, "TAG")
    older = {k: v for k, v in saved.items() if k not in ("model", "relora")}  # fields a record lacks: not compared
    run_dir.check_same_model(other, older, "TAG")
