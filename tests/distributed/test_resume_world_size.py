"""A ZeRO-2 (int8 W) and a ZeRO-3 Qwen2 run resumed on another number of ranks (a job requeued on fewer or more nodes), both ways:
2 ranks → 1 and 1 → 2, the global batch kept (micro-batch 2 × accumulation 2 on one rank, 2 × 1 on two). From the
warm-start switch (the full-rank optimizer state) and from a restart (the ReLoRA phase's state and, on ZeRO-3, the
partitioned frozen W; the moments are pruned right after the load), every logged loss and gradient norm and every
restart record equals the uninterrupted run's within fp32 reduction order. The resume event says so, and
the tag's universal folder is gone after the resume. One spawn for both stages."""

import json
import os

import pytest
import torch

from relora_ds.engine import universal
from relora_ds.engine.checkpoint import CheckpointError
from tests.helpers.resume import assert_resumed_exactly, run_reference, run_resumed
from tests.helpers.runs import ds_config, read_metrics, write_corpus
from tests.helpers.spawn import run_on_ranks

pytestmark = pytest.mark.slow

STAGES = (2, 3)
# Qwen2: frozen q/k/v biases beside W. ZeRO-2 also stores W as int8 with per-row scales and tracks the drift's
# residual (buffers, which DeepSpeed's universal load leaves out; a run that lost its scales trained on).
FIELDS = {2: {"model.family": "qwen2", "relora.base_dtype": "int8", "relora.merge_rounding": "stochastic",
              "relora.track_drift": True},
          3: {"model.family": "qwen2"}}
POINTS = ("switch", "restart")
REL = 1e-5  # two ranks average the gradients of two micro-batches, one rank accumulates them: another order


def _write_configs(directory) -> dict:
    paths = {}
    for stage in STAGES:
        for world, accumulation in ((1, 2), (2, 1)):
            paths[stage, world] = os.path.join(str(directory), f"ds_zero{stage}_{world}rank.json")
            with open(paths[stage, world], "w") as f:
                json.dump(ds_config(stage=stage, micro_batch=2, gradient_accumulation_steps=accumulation), f)
    return paths


def _on_two_ranks(rank, world_size, directory, configs, files):
    return {stage: (run_reference(directory, configs[stage, 2], f"zero{stage}_two", *files, **FIELDS[stage]),
                    run_resumed(directory, configs[stage, 2], f"zero{stage}_one", *files, points=POINTS,
                                suffix="_on_two", **FIELDS[stage]))
            for stage in STAGES}


def test_a_run_resumes_on_another_number_of_ranks(tmp_path):
    directory = str(tmp_path)
    files = write_corpus(tmp_path)
    configs = _write_configs(tmp_path)
    one = {stage: run_reference(directory, configs[stage, 1], f"zero{stage}_one", *files, **FIELDS[stage])
           for stage in STAGES}
    on_two, same = run_on_ranks(_on_two_ranks, world_size=2, args=(directory, configs, files), timeout=600)
    assert same == on_two
    for stage in STAGES:
        two, one_on_two = on_two[stage]
        two_on_one = run_resumed(directory, configs[stage, 1], f"zero{stage}_two", *files, points=POINTS,
                                 suffix="_on_one", **FIELDS[stage])
        assert one[stage]["losses"] == pytest.approx(two["losses"], rel=1e-4)  # the same training on 1 or 2 ranks
        assert_resumed_exactly({"reference": one[stage], **one_on_two}, rel=REL)
        assert_resumed_exactly({"reference": two, **two_on_one}, rel=REL)
        for name in (f"zero{stage}_{run}_from_{point}_on_{world}"
                     for run, world in (("one", "two"), ("two", "one")) for point in POINTS):
            checkpoints = os.path.join(directory, name, "checkpoints")
            left = [entry for entry in os.listdir(checkpoints) if entry.startswith(".universal")]
            left += [tag for tag in os.listdir(checkpoints)
                     if os.path.exists(os.path.join(checkpoints, tag, universal.FOLDER))]
            assert not left, (name, left)
            resumes = [r for r in read_metrics(os.path.join(directory, name)) if r.get("event") == "resume"]
            assert [r.get("universal") for r in resumes] == [True], name


def _bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def _eight_steps(rank, world_size, directory, path, files):
    run_reference(directory, path, "run", *files, **{"train.total_steps": 8})


def test_the_universal_form_holds_the_optimizer_state_not_the_frozen_w(tmp_path):
    """After the switch every fp32 W is a view into the full-rank engine's flat buffer; the converter, given the
    module's tensors, wrote that whole buffer once per W (a 350m filled 62 GB before its disk ran out)."""
    files = write_corpus(tmp_path)
    path = os.path.join(str(tmp_path), "ds.json")
    with open(path, "w") as f:
        json.dump(ds_config(stage=2, micro_batch=2), f)
    run_on_ranks(_eight_steps, world_size=2, args=(str(tmp_path), path, files), timeout=300)
    tag = os.path.join(str(tmp_path), "run", "checkpoints", "step_00000008")
    optimizer = sum(os.path.getsize(os.path.join(tag, name)) for name in os.listdir(tag)
                    if universal.OPTIMIZER_FILE.fullmatch(name))
    universal.convert(tag, saved=2, world=1)
    assert _bytes(os.path.join(tag, universal.FOLDER)) < 1.5 * optimizer
    assert not os.path.exists(os.path.join(str(tmp_path), "run", "checkpoints", ".universal-step_00000008"))


def test_a_failed_conversion_is_one_line_that_names_its_log(tmp_path):
    tag = tmp_path / "step_00000004"
    tag.mkdir()
    for rank in range(2):
        (tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"not a checkpoint")
    torch.save({"module": {}, "param_shapes": []}, tag / "mp_rank_00_model_states.pt")
    log = tmp_path / ".universal-step_00000004" / "convert.log"
    with pytest.raises(CheckpointError, match=rf"^{tag}: DeepSpeed's universal conversion failed \(exit 1: .*\); its "
                                              rf"output is in {log}$") as caught:
        universal.prepare(str(tag), 2)
    assert "\n" not in str(caught.value) and log.stat().st_size > 0
    assert not (tag / universal.FOLDER).exists()


def _slow_rank_zero(rank, world_size, wait_s):
    import datetime
    import time

    import torch.distributed.distributed_c10d as c10d

    from relora_ds.engine.checkpoint import on_rank_zero

    c10d._set_pg_timeout(datetime.timedelta(seconds=2), None)  # the default group's collectives give up after 2 s
    return on_rank_zero(lambda: time.sleep(5) or "converted", wait_s=wait_s)


def test_the_other_ranks_wait_for_a_conversion_longer_than_the_collective_timeout():
    """A full-rank 7b's optimizer state takes longer to convert than DeepSpeed's 10-minute collective timeout."""
    assert run_on_ranks(_slow_rank_zero, world_size=2, args=(60,), timeout=120) == ["converted", "converted"]


@pytest.mark.parametrize("saved,stage,allowed", [(2, 3, "1 or 2"), (3, 2, "3"), (0, 1, "0"), (1, 0, "1 or 2")])
def test_a_zero_stage_that_cannot_load_the_tag_is_refused_in_one_line(tmp_path, saved, stage, allowed):
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if saved == 3 else "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "ds_config": {"zero_optimization": {"stage": saved}}}, tmp_path / name)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}: written with ZeRO stage {saved} and this run has "
                                              rf"zero_optimization.stage {stage}; resume it with stage {allowed}$"):
        universal.prepare(str(tmp_path), stage)



def test_the_ranks_that_wrote_a_tag_are_counted_from_their_optimizer_files(tmp_path):
    names = ["mp_rank_00_model_states.pt", "rank_00000_rng.pt", "rank_00001_rng.pt", "rank_00002_rng.pt",
             "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert universal.saved_ranks(str(tmp_path)) == 2 and not universal.is_zero3(str(tmp_path))
    for name in names[-2:]:
        (tmp_path / name).unlink()
    assert universal.saved_ranks(str(tmp_path)) == 0  # ZeRO-0 with torch's optimizer: any world size loads it


def _reference_on_ranks(rank, world_size, directory, config, files, name):
    return run_reference(directory, config, name, *files, **FIELDS[3])


def _resumed_on_ranks(rank, world_size, directory, config, files, name):
    return run_resumed(directory, config, name, *files, points=("restart",), suffix="_on_two", **FIELDS[3])


def test_zero3_resumes_from_three_ranks_on_two(tmp_path):
    """Three ranks pad every partition (a 64 x 64 W is 4096 elements); the frozen W and biases are cut anew."""
    directory = str(tmp_path)
    files = write_corpus(tmp_path)
    configs = {}
    for world, accumulation in ((3, 2), (2, 3)):  # a global batch of 12 sequences either way
        configs[world] = os.path.join(directory, f"ds_zero3_{world}rank.json")
        with open(configs[world], "w") as f:
            json.dump(ds_config(stage=3, micro_batch=2, gradient_accumulation_steps=accumulation), f)
    three = run_on_ranks(_reference_on_ranks, world_size=3, args=(directory, configs[3], files, "three"),
                         timeout=600)[0]
    on_two = run_on_ranks(_resumed_on_ranks, world_size=2, args=(directory, configs[2], files, "three"),
                          timeout=600)[0]
    assert_resumed_exactly({"reference": three, **on_two}, rel=REL)
