"""A run on data.mixture trains on both sources, evaluates each source's held-out set and their weighted mean, logs the
mixture, and the run resumed from a checkpoint matches the uninterrupted one exactly; resumed with new weights it
logs the new phase."""

import json
import os
import shutil

import pytest

from relora_ds import trainer
from relora_ds.engine import checkpoint
from tests.helpers.runs import read_metrics, tiny_run_config, write_corpus, write_ds_config

pytestmark = pytest.mark.slow


def _sources(tmp_path) -> list[str]:
    """Two folders of train/validation jsonl: SOTU's first speeches, and the same text in upper case."""
    train, val = write_corpus(tmp_path)
    folders = []
    for name, change in (("plain", str), ("upper", str.upper)):
        folder = tmp_path / name
        folder.mkdir()
        for path in (train, val):
            lines = [json.dumps({"text": change(json.loads(line)["text"])}) for line in open(path)]
            (folder / os.path.basename(path)).write_text("\n".join(lines) + "\n")
        folders.append(str(folder))
    return folders


def test_a_mixture_trains_evaluates_and_resumes_exactly(tmp_path, capsys):
    plain, upper = _sources(tmp_path)
    ds = write_ds_config(tmp_path, stage=1)

    def config(name, weights=(3, 1), **more):
        mix = f"[{{source: {plain}, weight: {weights[0]}}}, {{source: {upper}, weight: {weights[1]}}}]"
        return tiny_run_config(tmp_path, "unused", "unused", ds, **{
            "data.source": "sotu", "data.validation_source": "null", "data.mixture": mix, "train.total_steps": 8,
            "train.eval_every": 4, "checkpoint.every": 4, "log.every": 1,
            "train.output_dir": str(tmp_path / name), **more})

    reference = trainer.train(config("reference"))
    records = read_metrics(str(tmp_path / "reference"))
    data = [r for r in records if r.get("event") == "data"]
    assert [(d["name"], d["source"], d["weight"]) for d in data[0]["mixture"]] == [
        ("plain", plain, 0.75), ("upper", upper, 0.25)]
    assert all(d["num_tokens"] > 0 for d in data[0]["mixture"])
    steps = [r for r in records if "event" not in r]
    for r in steps:  # each source's training loss per token: one micro-batch of 2 rows a step, 3 : 1
        present = [r[key] for key in ("loss_plain", "loss_upper") if key in r]
        assert present and min(present) - 1e-4 <= r["loss"] <= max(present) + 1e-4
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [0, 4, 8]
    for r in evals:  # each source's held-out loss, and their mean by the mixture's weights
        assert r["loss"] == pytest.approx(0.75 * r["loss_plain"] + 0.25 * r["loss_upper"], rel=1e-12)
        assert r["loss_plain"] != r["loss_upper"]
    state = checkpoint.read_state(os.path.join(str(tmp_path / "reference"), "checkpoints", checkpoint.tag_for(8)))
    rows = [c["rows"] for c in state["data"]["components"]]
    assert rows == [12, 4]  # 8 steps x 2 rows, 3 : 1

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "reference" / "checkpoints" / checkpoint.tag_for(4),
                    resumed_dir / "checkpoints" / checkpoint.tag_for(4))
    resumed = trainer.train(config("resumed", **{"train.resume": True}))
    assert {s: resumed["losses"][s] for s in range(5, 9)} == {s: reference["losses"][s] for s in range(5, 9)}

    shutil.copytree(tmp_path / "reference" / "checkpoints" / checkpoint.tag_for(4),
                    tmp_path / "annealed" / "checkpoints" / checkpoint.tag_for(4))
    capsys.readouterr()
    trainer.train(config("annealed", weights=(1, 1), **{"train.resume": True}))
    assert "data.mixture: the weights change from [0.75, 0.25] to [0.5, 0.5] at row 8" in capsys.readouterr().out
    state = checkpoint.read_state(os.path.join(str(tmp_path / "annealed"), "checkpoints", checkpoint.tag_for(8)))
    assert [c["rows"] for c in state["data"]["components"]] == [10, 6]  # 6 and 2 before, then 4 of each


def test_a_streamed_mixture_with_data_workers_resumes_exactly(tmp_path):
    plain, upper = _sources(tmp_path)
    ds = write_ds_config(tmp_path, stage=2)

    def config(name, **more):
        mix = f"[{{source: {plain}, weight: 3}}, {{source: {upper}, weight: 1}}]"
        return tiny_run_config(tmp_path, "unused", "unused", ds, **{
            "data.source": "sotu", "data.validation_source": "null", "data.mixture": mix, "data.streaming": True,
            "data.num_workers": 2, "train.total_steps": 6, "train.eval_every": 0, "checkpoint.every": 3,
            "relora.warm_start_steps": 2, "relora.reset_every": 2,
            "log.every": 1, "train.output_dir": str(tmp_path / name), **more})

    reference = trainer.train(config("reference"))
    run_dir = str(tmp_path / "reference")
    data = [r for r in read_metrics(run_dir) if r.get("event") == "data"]
    assert [(d["name"], d["weight"]) for d in data[0]["mixture"]] == [("plain", 0.75), ("upper", 0.25)]
    state = checkpoint.read_state(os.path.join(run_dir, "checkpoints", checkpoint.tag_for(6)))["data"]
    assert state["kind"] == "stream" and sorted(state["shares"]) == ["0", "1"]
    assert [state["shares"][k]["rows"] for k in ("0", "1")] == [[5, 1], [5, 1]]  # 3 batches of 2 rows per reader
    shutil.copytree(os.path.join(run_dir, "checkpoints", checkpoint.tag_for(3)),
                    tmp_path / "resumed" / "checkpoints" / checkpoint.tag_for(3))
    resumed = trainer.train(config("resumed", **{"train.resume": True}))
    assert resumed["losses"] == {s: reference["losses"][s] for s in range(4, 7)}
