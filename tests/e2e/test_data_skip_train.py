"""data.skip in a run: after step 3 (the warm-start switch, whose reference checkpoint is the step's one, written
before the skip) the data of 2 steps is passed over (logged, the data position 2 steps further on), and the runs
resumed from the checkpoints before and after it log the same losses as the uninterrupted one: the first passes over
the same data at the same step, the second does not pass over it again."""

import os
import shutil

import pytest

from relora_ds import trainer
from relora_ds.engine import checkpoint
from tests.helpers.runs import read_metrics, tiny_run_config, write_corpus, write_ds_config

pytestmark = pytest.mark.slow


def test_a_skip_moves_the_data_on_once_across_resumes(tmp_path):
    files = write_corpus(tmp_path)
    ds = write_ds_config(tmp_path, stage=2)

    def config(name, **more):
        return tiny_run_config(tmp_path, *files, ds, **{
            "data.skip": "['3:2']", "train.total_steps": 8, "train.eval_every": 0, "checkpoint.every": 1,
            "relora.warm_start_steps": 3, "relora.reset_every": 3, "train.output_dir": str(tmp_path / name), **more})

    reference = trainer.train(config("reference"))
    run_dir = str(tmp_path / "reference")
    skips = [r for r in read_metrics(run_dir) if r.get("event") == "data" and "skipped_steps" in r]
    assert [(r["step"], r["skipped_steps"], r["skipped_tokens"]) for r in skips] == [(3, 2, 2 * 2 * 32)]
    states = {step: checkpoint.read_state(os.path.join(run_dir, "checkpoints", checkpoint.tag_for(step)))["data"]
              for step in (3, 4, 8)}
    assert [(s["position"], s["skipped"]) for s in states.values()] == [(6, []), (12, [3]), (20, [3])]  # 2 rows a step
    assert checkpoint.reference_checkpoint(run_dir).endswith(checkpoint.tag_for(3))  # saved once, before the skip

    for step in (3, 4):
        name = f"from_{step}"
        shutil.copytree(os.path.join(run_dir, "checkpoints", checkpoint.tag_for(step)),
                        tmp_path / name / "checkpoints" / checkpoint.tag_for(step))
        resumed = trainer.train(config(name, **{"train.resume": True}))
        assert resumed["losses"] == {s: reference["losses"][s] for s in range(step + 1, 9)}, step
