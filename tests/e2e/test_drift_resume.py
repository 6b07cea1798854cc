"""relora.track_drift survives a resume: each wrapped layer's sum of rounding errors (`merge_residual`) is saved with
the module, so a run resumed between two merges reports at the second the drift the uninterrupted run reports
(bitwise: one rank, fp32 compute, int8 W, stochastic rounding). A tag saved without the residuals resumes with them
at zero, and the checkpoint exports (the residual is the run's state, not the model's)."""

import os
import shutil

import pytest
import torch

from relora_ds import trainer
from relora_ds.engine import checkpoint
from relora_ds.tools.export import export
from tests.helpers.runs import tiny_run_config, write_corpus, write_ds_config

pytestmark = pytest.mark.slow

FIELDS = {"relora.warm_start_steps": 4, "relora.reset_every": 4, "train.total_steps": 13, "train.eval_every": 0,
          "checkpoint.every": 1, "checkpoint.keep_last": 0, "log.every": 1, "relora.base_dtype": "int8",
          "relora.merge_rounding": "stochastic", "relora.track_drift": True}
MERGE_RECORD = ("drift", "merge_error", "merge_kept", "merged_norm")


def _restarts(summary) -> dict:
    return {r["step"]: {k: r[k] for k in MERGE_RECORD} for r in summary["restarts"]}


def test_a_resumed_run_reports_the_drift_of_the_uninterrupted_run(tmp_path):
    files = write_corpus(tmp_path)
    ds = write_ds_config(tmp_path, stage=2)

    def run(name, **more):
        return trainer.train(tiny_run_config(tmp_path, *files, ds, **{**FIELDS, "train.output_dir":
                                                                       os.path.join(tmp_path, name), **more}))

    reference = _restarts(run("reference"))
    assert sorted(reference) == [8, 12] and reference[12]["drift"] > reference[8]["drift"] > 0
    tag = checkpoint.tag_for(9)  # between the two merges
    shutil.copytree(os.path.join(tmp_path, "reference", "checkpoints", tag),
                    os.path.join(tmp_path, "resumed", "checkpoints", tag))
    assert _restarts(run("resumed", **{"train.resume": True})) == {12: reference[12]}

    export(os.path.join(tmp_path, "reference", "checkpoints", tag), os.path.join(tmp_path, "export"))
    assert os.path.isfile(os.path.join(tmp_path, "export", "config.json"))


def test_a_tag_saved_without_the_residuals_resumes_with_them_at_zero(tmp_path):
    files = write_corpus(tmp_path)
    ds = write_ds_config(tmp_path, stage=2)
    config = {**FIELDS, "train.total_steps": 9, "relora.track_drift": False}
    trainer.train(tiny_run_config(tmp_path, *files, ds, **{**config, "train.output_dir": str(tmp_path / "run")}))
    tag_dir = tmp_path / "run" / "checkpoints" / checkpoint.tag_for(9)
    module = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert not [k for k in module if k.endswith("merge_residual")]
    summary = trainer.train(tiny_run_config(tmp_path, *files, ds, **{
        **FIELDS, "train.output_dir": str(tmp_path / "run"), "train.resume": True}))
    assert [r["step"] for r in summary["restarts"]] == [12] and summary["restarts"][0]["drift"] > 0
