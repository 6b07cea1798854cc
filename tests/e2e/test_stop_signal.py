"""A stop signal (checkpoint.stop_signals, handled by the commands that train) ends a run with a checkpoint, exit code 75 and a one-line message: the ranks
learn of it in the next step's all-reduce, so a signal that comes after step k ends the run after step k + 1; the run resumed from that checkpoint continues exactly as if it had never stopped (one rank, fp32
compute). A fresh run stopped before its first step writes no checkpoint. The signal handlers are the command's only
while it trains; trainer.train from Python handles none unless given a StopSignals."""

import os
import signal

import pytest

from relora_ds import trainer
from relora_ds.engine import checkpoint
from relora_ds.stop import EXIT_STOPPED, StopSignals
from relora_ds.train import main
from tests.helpers.runs import read_metrics, tiny_run_config, write_corpus, write_ds_config

pytestmark = pytest.mark.slow

FIELDS = {"train.total_steps": 10, "train.eval_every": 0, "checkpoint.every": 4, "checkpoint.keep_last": 0,
          "log.every": 1}


def _signal_at(monkeypatch, hook: str, step: int, sig=signal.SIGUSR1) -> None:
    """Send `sig` to this process once a callback hook has run at `step` (a real signal, from the loop's thread)."""
    fire = trainer.Trainer.fire

    def fire_then_signal(self, name, *args):
        fire(self, name, *args)
        if name == hook and self.state.step == step:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(trainer.Trainer, "fire", fire_then_signal)


def test_a_signal_stops_at_a_checkpoint_and_the_resumed_run_matches_the_uninterrupted_one(
        tmp_path, monkeypatch, capsys):
    files = write_corpus(tmp_path)
    ds = write_ds_config(tmp_path, stage=2)

    def config(name, **more):
        return tiny_run_config(tmp_path, *files, ds, **{**FIELDS, "train.output_dir": str(tmp_path / name), **more})

    reference = trainer.train(config("reference"))
    assert reference["stopped"] is None and reference["step"] == 10

    path = str(tmp_path / "stopped.yaml")
    config("stopped").save(path)
    before = signal.getsignal(signal.SIGUSR1)
    record = tmp_path / "stop-record"
    with monkeypatch.context() as patch:
        _signal_at(patch, "post_step", 5)  # stops after step 6: between the restarts at 4 and 8, off the grid
        patch.setenv("RELORA_DS_STOP_RECORD", str(record))  # as launchers/slurm.sbatch sets it
        assert main(["--config", path]) == EXIT_STOPPED
    assert signal.getsignal(signal.SIGUSR1) is before
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("stopped by SIGUSR1 after step 6 of 10: checkpoint ") and "--resume" in message
    assert record.read_text() == f"SIGUSR1 {message}\n"

    run_dir = str(tmp_path / "stopped")
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "event" not in r] == list(range(1, 7))
    assert [(r["step"], r["signal"]) for r in records if r.get("event") == "stop"] == [(6, "SIGUSR1")]
    checkpoints = os.path.join(run_dir, "checkpoints")
    assert sorted(t for t in os.listdir(checkpoints) if t.startswith("step_")) == [checkpoint.tag_for(4),
                                                                                   checkpoint.tag_for(6)]
    checkpoint.verify(os.path.join(checkpoints, checkpoint.tag_for(6)), checksums=True)

    resumed = trainer.train(config("stopped", **{"train.resume": True}))
    assert resumed["stopped"] is None and resumed["step"] == 10
    assert resumed["losses"] == {s: v for s, v in reference["losses"].items() if s > 6}
    assert [r["step"] for r in resumed["restarts"]] == [8]


def test_a_fresh_run_stopped_before_its_first_step_saves_nothing(tmp_path, monkeypatch):
    files = write_corpus(tmp_path)
    cfg = tiny_run_config(tmp_path, *files, write_ds_config(tmp_path), **FIELDS)
    _signal_at(monkeypatch, "on_start", 0, signal.SIGTERM)
    with StopSignals(["SIGTERM"]) as stop:
        summary = trainer.train(cfg, stop=stop)
    assert summary["stopped"] == "SIGTERM" and summary["step"] == 0 and summary["checkpoint"] is None
    assert not os.path.isdir(os.path.join(cfg.train.output_dir, "checkpoints"))


def test_compare_stops_with_the_variant_and_the_same_command_continues_it(tmp_path, monkeypatch, capsys):
    """A stop signal during a compare variant ends the whole command (75) without a result for that variant (a
    result would mark it finished); the same command again continues the variant from its checkpoint."""
    from relora_ds import cli
    from relora_ds.tools import compare

    files = write_corpus(tmp_path)
    base = str(tmp_path / "base.yaml")
    tiny_run_config(tmp_path, *files, write_ds_config(tmp_path), **{**FIELDS, "checkpoint.every": 0,
                                                                       "train.eval_every": 5}).save(base)
    out = str(tmp_path / "cmp")
    command = ["compare", "--config", base, "--variants", "lora,relora", "--out", out]
    with monkeypatch.context() as patch:
        _signal_at(patch, "post_step", 4)
        assert cli.main(command) == EXIT_STOPPED
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("stopped by SIGUSR1 after step 5 of 10: checkpoint ") and "variant lora" in message
    assert not os.path.exists(os.path.join(out, "lora", compare.RESULT_FILE))
    assert not os.path.exists(os.path.join(out, "relora"))

    assert cli.main(command) == 0
    result = compare.read_result(os.path.join(out, "lora"))
    assert result["status"] == "finished" and result["steps"] == 10
    records = read_metrics(os.path.join(out, "lora"))
    assert [r["step"] for r in records if r.get("event") == "resume"] == [5]


def test_trainer_train_from_python_leaves_the_signals_alone(tmp_path, monkeypatch):
    """Without a StopSignals, trainer.train sets no handler: the process's own stay while it trains."""
    files = write_corpus(tmp_path)
    cfg = tiny_run_config(tmp_path, *files, write_ds_config(tmp_path), **{**FIELDS, "train.total_steps": 7})
    seen, fire = [], trainer.Trainer.fire

    def fire_and_look(self, name, *args):
        fire(self, name, *args)
        if name == "post_step":
            seen.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)))

    monkeypatch.setattr(trainer.Trainer, "fire", fire_and_look)
    own = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1))
    assert trainer.train(cfg)["stopped"] is None
    assert seen == [own] * 7


def test_a_signal_during_an_evaluation_abandons_it_and_the_resumed_run_owes_it(tmp_path, monkeypatch):
    """A signal that comes while the held-out set is evaluated ends the evaluation at the next batch (every rank
    agrees on it there) instead of after the whole set, the run stops before the next step with its checkpoint, and
    the resumed run makes the abandoned evaluation before its first step: the same loss as the uninterrupted run's,
    and the same steps after it."""
    from relora_ds.engine.train_module import TrainEngine

    files = write_corpus(tmp_path)
    ds = write_ds_config(tmp_path, stage=2)
    fields = {**FIELDS, "train.eval_every": 3, "train.eval_batches": 4}

    def config(name, **more):
        return tiny_run_config(tmp_path, *files, ds, **{**fields, "train.output_dir": str(tmp_path / name), **more})

    reference = trainer.train(config("reference"))
    evaluate, calls, read = TrainEngine.evaluate, [], []

    def evaluate_and_signal(self, batches, stop_signal=None):
        calls.append(len(calls))

        def reading():  # the signal comes once the third evaluation (step 6) has read its first batch
            for i, batch in enumerate(batches):
                read.append(i)
                yield batch
                if i == 0 and len(calls) == 3:
                    os.kill(os.getpid(), signal.SIGUSR1)
        return evaluate(self, reading(), stop_signal)

    monkeypatch.setattr(TrainEngine, "evaluate", evaluate_and_signal)
    with StopSignals(["SIGUSR1"]) as stop:
        stopped = trainer.train(config("stopped"), stop=stop)
    assert stopped["stopped"] == "SIGUSR1" and stopped["step"] == 6
    assert read[-2:] == [0, 1]  # abandoned before its second batch was evaluated, not after all four
    records = read_metrics(str(tmp_path / "stopped"))
    assert [(r["step"], r.get("abandoned")) for r in records if r.get("event") == "eval"] == [
        (0, None), (3, None), (6, "SIGUSR1")]
    assert [r["step"] for r in records if r.get("event") == "stop"] == [6]
    assert [e["step"] for e in stopped["evals"]] == [0, 3]  # the abandoned one is no result

    monkeypatch.setattr(TrainEngine, "evaluate", evaluate)
    resumed = trainer.train(config("stopped", **{"train.resume": True}))
    assert resumed["stopped"] is None and resumed["step"] == 10
    assert resumed["evals"] == [e for e in reference["evals"] if e["step"] >= 6]  # step 6's owed, then 9 and 10
    assert resumed["losses"] == {s: v for s, v in reference["losses"].items() if s > 6}
