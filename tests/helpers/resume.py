"""The resume matrix: one uninterrupted tiny ReLoRA run, then a resumed run from the checkpoint at each event boundary.

    results = resume_matrix(directory, ds_config, "zero2_fp32", **fields)   # on every rank of a run alike
    assert_resumed_exactly(results, rel=0.0)

Schedule (RESUME_FIELDS): full rank for 4 steps, the warm-start switch at step 4, restarts every 4 steps (one at
step 8), 11 steps, a checkpoint after every step. A checkpoint taken at step k is the state *before* whatever
happens at the top of step k+1's iteration, so the resume from step 4 makes the switch, the one from step 8 runs
the restart on an engine that has taken no optimizer step yet, the one from step 9 continues one step after it,
the one from step 6 continues mid-cycle.
"""

import os
import shutil

from relora_ds import dist, trainer
from relora_ds.engine import checkpoint
from tests.helpers.runs import tiny_run_config

RESUME_POINTS = {"switch": 4, "mid_cycle": 6, "restart": 8, "after_restart": 9}
RESUME_FIELDS = {"relora.warm_start_steps": 4, "relora.reset_every": 4, "train.total_steps": 11,
                 "train.eval_every": 0, "checkpoint.every": 1, "checkpoint.keep_last": 0, "log.every": 1}
TIMINGS = ("seconds", "merge_seconds", "prune_seconds")


def _record(summary: dict) -> dict:
    """What a run did, comparable across runs: the loss and gradient norm of every step, the restarts."""
    return {"losses": summary["losses"], "grad_norms": summary["grad_norms"],
            "restarts": [{k: v for k, v in r.items() if k not in TIMINGS} for r in summary["restarts"]]}


def resume_matrix(directory: str, ds_config: str, name: str, train_file: str, val_file: str, points=None,
                  **fields) -> dict:
    """{"reference": the uninterrupted run, point: the run resumed from RESUME_POINTS[point]} (records of `_record`).
    Every rank calls it alike; rank 0 copies each checkpoint into its resumed run's directory."""
    reference = run_reference(directory, ds_config, name, train_file, val_file, **fields)
    return {"reference": reference, **run_resumed(directory, ds_config, name, train_file, val_file, points, **fields)}


def _config(directory, ds_config, train_file, val_file, output_dir, **fields):
    return tiny_run_config(directory, train_file, val_file, ds_config, **{
        **RESUME_FIELDS, **fields, "train.output_dir": output_dir})


def run_reference(directory: str, ds_config: str, name: str, train_file: str, val_file: str, **fields) -> dict:
    """The uninterrupted run in directory/name, a checkpoint after every step; its `_record`."""
    return _record(trainer.train(_config(directory, ds_config, train_file, val_file, os.path.join(directory, name),
                                         **fields)))


def run_resumed(directory: str, ds_config: str, name: str, train_file: str, val_file: str, points=None,
                suffix: str = "", **fields) -> dict:
    """{point: the run resumed from directory/name's checkpoint at RESUME_POINTS[point]}, each in
    directory/<name>_from_<point><suffix> under `ds_config` (its world size may differ from the reference's)."""
    results = {}
    for point in points or RESUME_POINTS:
        step = RESUME_POINTS[point]
        resumed = os.path.join(directory, f"{name}_from_{point}{suffix}")
        if dist.is_rank_zero():
            shutil.copytree(os.path.join(directory, name, "checkpoints", checkpoint.tag_for(step)),
                            os.path.join(resumed, "checkpoints", checkpoint.tag_for(step)))
        dist.barrier()
        results[point] = _record(trainer.train(_config(directory, ds_config, train_file, val_file, resumed,
                                                       **{**fields, "train.resume": True})))
    return results


def assert_resumed_exactly(results: dict, rel: float = 0.0, restarts=(8,)) -> None:
    """Every resumed run logged every step after its checkpoint, each loss and gradient norm equal to the
    uninterrupted run's (within `rel`; 0: bitwise), and made the same restarts with the same records."""
    import pytest

    reference = results["reference"]
    total = RESUME_FIELDS["train.total_steps"]
    assert sorted(reference["losses"]) == list(range(1, total + 1))
    assert [r["step"] for r in reference["restarts"]] == list(restarts)
    for point, run in results.items():
        if point == "reference":
            continue
        step = RESUME_POINTS[point]
        assert sorted(run["losses"]) == list(range(step + 1, total + 1)), point
        for key in ("losses", "grad_norms"):
            for s, value in run[key].items():
                expected = reference[key][s]
                assert value == (pytest.approx(expected, rel=rel, abs=0) if rel else expected), (point, key, s)
        later = [r for r in reference["restarts"] if r["step"] >= step]
        assert len(run["restarts"]) == len(later), point
        for got, expected in zip(run["restarts"], later):
            assert got["index"] == expected["index"] and got["step"] == expected["step"], point
            for key in ("merged_norm", "fraction_zeroed"):
                assert got[key] == (pytest.approx(expected[key], rel=rel, abs=0) if rel else expected[key]), \
                    (point, key)
