"""checkpoint.every_minutes: a checkpoint on the first step that logs once that many minutes have passed since the
newest checkpoint (by the clock in relora_ds/callbacks/checkpointing.py, faked here to advance 10 minutes a reading)."""

import os

import pytest

from relora_ds import trainer
from relora_ds.callbacks import checkpointing
from relora_ds.config import ConfigError, load_config
from relora_ds.engine import checkpoint
from tests.helpers.runs import tiny_run_config, write_corpus, write_ds_config

pytestmark = pytest.mark.slow

FIELDS = {"train.total_steps": 9, "train.eval_every": 0, "checkpoint.every": 0, "checkpoint.keep_last": 0,
          "log.every": 2, "checkpoint.save_final": False}


def _tags(cfg) -> list[int]:
    directory = os.path.join(cfg.train.output_dir, "checkpoints")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(int(n.split("_")[1]) for n in names if n.startswith("step_"))


@pytest.mark.parametrize("minutes, saved", [(15, [4, 8]), (5, [2, 4, 6, 8, 9]), (None, [])])
def test_timed_checkpoints_on_the_steps_that_log(tmp_path, monkeypatch, minutes, saved):
    files = write_corpus(tmp_path)
    cfg = tiny_run_config(tmp_path, *files, write_ds_config(tmp_path), **{
        **FIELDS, "checkpoint.every_minutes": "null" if minutes is None else minutes,
        "checkpoint.at_switch": False})
    clock = iter(range(0, 10**6, 600))  # seconds: every reading is 10 minutes after the one before
    monkeypatch.setattr(checkpointing.time, "monotonic", lambda: next(clock))
    trainer.train(cfg)
    assert _tags(cfg) == saved
    for step in saved:
        checkpoint.verify(os.path.join(cfg.train.output_dir, "checkpoints", checkpoint.tag_for(step)), checksums=False)


def test_every_minutes_must_be_positive():
    with pytest.raises(ConfigError, match=r"checkpoint.every_minutes: must be > 0, got 0"):
        load_config(None, ["checkpoint.every_minutes=0"])
