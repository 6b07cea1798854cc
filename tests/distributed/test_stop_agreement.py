"""What one rank sees, every rank acts on (2 gloo ranks, ZeRO-2). A stop signal that reaches one rank stops every rank
after the same step: both save the one checkpoint, return the same step and the same signal, and the run resumed from
it finishes with the losses of the uninterrupted run; one that reaches one rank during an evaluation ends it on both
at the same batch. checkpoint.every_minutes goes by rank 0's clock alone. Without
the agreement the other rank would take the next step, or a save, alone and hang in its collectives."""

import os
import signal

import pytest

from tests.helpers.runs import tiny_run_config, write_corpus, write_ds_config
from tests.helpers.spawn import run_on_ranks

pytestmark = pytest.mark.slow

FIELDS = {"train.total_steps": 9, "train.eval_every": 0, "checkpoint.every": 0, "log.every": 1}


def _scenario(rank, world_size, directory, files, ds):
    from relora_ds import trainer
    from relora_ds.engine import checkpoint
    from relora_ds.stop import StopSignals

    def run(name, **more):
        with StopSignals(["SIGTERM"]) as stop:  # as the commands that train do
            return trainer.train(tiny_run_config(directory, *files, ds, **{
                **FIELDS, "train.output_dir": os.path.join(directory, name), **more}), stop=stop)

    reference = run("reference")
    fire = trainer.Trainer.fire

    def fire_then_signal(self, name, *args):  # rank 1 alone is signalled after step 4: both stop after step 5
        fire(self, name, *args)
        if rank == 1 and name == "post_step" and self.state.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.Trainer.fire = fire_then_signal
    try:
        stopped = run("stopped")
    finally:
        trainer.Trainer.fire = fire
    tag_dir = os.path.join(directory, "stopped", "checkpoints", checkpoint.tag_for(5))
    checkpoint.verify(tag_dir, checksums=False)
    resumed = run("stopped", **{"train.resume": True})

    from relora_ds.engine.train_module import TrainEngine

    evaluate, calls = TrainEngine.evaluate, []

    def evaluate_and_signal(self, batches, stop_signal=None):  # rank 1 alone, during the evaluation at step 3
        calls.append(len(calls))

        def reading():
            for i, batch in enumerate(batches):
                yield batch
                if rank == 1 and i == 0 and len(calls) == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self, reading(), stop_signal)

    TrainEngine.evaluate = evaluate_and_signal
    try:
        abandoned = run("abandoned", **{"train.eval_every": 3, "train.eval_batches": 8})
    finally:
        TrainEngine.evaluate = evaluate
    return {"stopped": (stopped["step"], stopped["stopped"], stopped["checkpoint"]),
            "reference": reference["losses"], "resumed": resumed["losses"], "resumed_step": resumed["step"],
            "abandoned": (abandoned["step"], abandoned["stopped"], [e["step"] for e in abandoned["evals"]])}


def test_a_signal_on_one_rank_stops_both_at_the_same_checkpoint(tmp_path):
    files = write_corpus(tmp_path)
    ds = write_ds_config(tmp_path, stage=2)
    results = run_on_ranks(_scenario, world_size=2, args=(str(tmp_path), files, ds), timeout=300)
    tag_dir = str(tmp_path / "stopped" / "checkpoints" / "step_00000005")
    assert [r["stopped"] for r in results] == [(5, "SIGTERM", tag_dir)] * 2
    for r in results:
        assert r["resumed_step"] == 9
        assert r["resumed"] == pytest.approx({s: v for s, v in r["reference"].items() if s > 5}, rel=1e-6)
    # signalled during an evaluation: both ranks abandon it at the same batch and stop before step 4
    assert [r["abandoned"] for r in results] == [(3, "SIGTERM", [0])] * 2


def _timed(rank, world_size, directory, files, ds):
    from relora_ds import trainer
    from relora_ds.callbacks import checkpointing

    if rank == 1:  # rank 1's clock runs an hour a reading, rank 0's at its own pace: no timed save
        clock = iter(range(0, 10**7, 3600))
        checkpointing.time.monotonic = lambda: next(clock)
    summary = trainer.train(tiny_run_config(directory, *files, ds, **{
        **FIELDS, "train.output_dir": os.path.join(directory, "timed"), "checkpoint.every_minutes": 30,
        "checkpoint.at_switch": False}))
    names = os.listdir(os.path.join(directory, "timed", "checkpoints"))
    return sorted(n for n in names if n.startswith("step_")), summary["step"]


def test_timed_checkpoints_go_by_rank_zeros_clock(tmp_path):
    files = write_corpus(tmp_path)
    ds = write_ds_config(tmp_path, stage=2)
    results = run_on_ranks(_timed, world_size=2, args=(str(tmp_path), files, ds), timeout=300)
    assert results == [(["step_00000009"], 9)] * 2  # the final one only
