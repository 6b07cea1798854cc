"""A ZeRO-2 run resumed on another number of ranks (a job requeued on fewer or more nodes), both ways: 2 ranks → 1
and 1 → 2, the global batch kept (micro-batch 2 × accumulation 2 on one rank, 2 × 1 on two). From the warm-start
switch (the full-rank optimizer state) and from a restart (the ReLoRA phase's state, pruned right after the load),
every logged loss and gradient norm and every restart record equals the uninterrupted run's within fp32 reduction
order. The tag's universal folder is gone after the resume, and a ZeRO-3 tag of another world size is refused in
one line."""

import json
import os

import pytest

from relora_ds.engine import universal
from relora_ds.engine.checkpoint import CheckpointError
from tests.helpers.resume import assert_resumed_exactly, run_reference, run_resumed
from tests.helpers.runs import ds_config, write_corpus
from tests.helpers.spawn import run_on_ranks

pytestmark = pytest.mark.slow

POINTS = ("switch", "restart")
REL = 1e-5  # two ranks average the gradients of two micro-batches, one rank accumulates them: another order


def _write_configs(directory) -> dict:
    paths = {}
    for world, accumulation in ((1, 2), (2, 1)):
        paths[world] = os.path.join(str(directory), f"ds_zero2_{world}rank.json")
        with open(paths[world], "w") as f:
            json.dump(ds_config(stage=2, micro_batch=2, gradient_accumulation_steps=accumulation), f)
    return paths


def _on_two_ranks(rank, world_size, directory, configs, files):
    reference = run_reference(directory, configs[2], "two", *files)
    resumed = run_resumed(directory, configs[2], "one", *files, points=POINTS, suffix="_on_two")
    return reference, resumed


def test_a_zero2_run_resumes_on_another_number_of_ranks(tmp_path):
    directory = str(tmp_path)
    files = write_corpus(tmp_path)
    configs = _write_configs(tmp_path)
    one = run_reference(directory, configs[1], "one", *files)
    (two, one_on_two), same = run_on_ranks(_on_two_ranks, world_size=2, args=(directory, configs, files),
                                           timeout=600)
    assert same == (two, one_on_two)
    two_on_one = run_resumed(directory, configs[1], "two", *files, points=POINTS, suffix="_on_one")
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-4)  # the same training, on 1 or 2 ranks
    assert_resumed_exactly({"reference": one, **one_on_two}, rel=REL)
    assert_resumed_exactly({"reference": two, **two_on_one}, rel=REL)
    for name in (f"{run}_from_{point}_on_{world}" for run, world in (("one", "two"), ("two", "one")) for point in POINTS):
        checkpoints = os.path.join(directory, name, "checkpoints")
        left = [entry for entry in os.listdir(checkpoints) if entry.startswith(".universal")]
        left += [tag for tag in os.listdir(checkpoints) if os.path.exists(os.path.join(checkpoints, tag, universal.FOLDER))]
        assert not left, (name, left)


def test_a_zero3_tag_of_another_world_size_is_refused_in_one_line(tmp_path):
    for rank in range(2):
        for kind in ("model", "optim"):
            (tmp_path / f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt").write_bytes(b"")
    assert universal.saved_ranks(str(tmp_path)) == 2
    with pytest.raises(CheckpointError, match=r"written by 2 ranks with ZeRO-3 and this run has 1; resume it on 2 "
                                              r"ranks \(DeepSpeed's universal checkpoint does not restore"):
        universal.prepare(str(tmp_path))


def test_a_failed_conversion_is_one_line_that_names_its_log(tmp_path):
    tag = tmp_path / "step_00000004"
    tag.mkdir()
    for rank in range(2):
        (tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"not a checkpoint")
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    log = tmp_path / ".universal-step_00000004" / "convert.log"
    with pytest.raises(CheckpointError, match=rf"^{tag}: DeepSpeed's universal conversion failed \(exit 1: .*\); its "
                                              rf"output is in {log}$") as caught:
        universal.prepare(str(tag))
    assert "\n" not in str(caught.value) and log.stat().st_size > 0
    assert not (tag / universal.FOLDER).exists()
