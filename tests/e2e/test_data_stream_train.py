"""The sharded stream wired into the trainer: a streamed run with data workers, interrupted and resumed, gives the
uninterrupted run's losses; the data state in the checkpoint is every rank's readers (gathered over 2 gloo ranks);
bad data under workers ends `relora-ds train` with one line."""

import json
import os
import shutil

import pytest
import torch

from relora_ds import trainer
from relora_ds.engine import checkpoint
from tests.helpers.runs import tiny_run_config, write_corpus, write_ds_config
from tests.helpers.spawn import run_on_ranks


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    return write_corpus(directory)


def _run(cfg):
    return trainer.train(cfg)


def test_streamed_run_with_workers_resumes_exactly(corpus, tmp_path):
    train_file, val_file = corpus
    ds = write_ds_config(tmp_path)
    fields = {"data.streaming": True, "data.num_workers": 2, "data.prefetch_batches": 2, "method": "full",
              "relora.warm_start_steps": 0, "train.total_steps": 6, "train.eval_every": 0, "checkpoint.every": 3}
    cfg = tiny_run_config(tmp_path, train_file, val_file, ds, **fields)
    reference = _run(cfg)["losses"]
    tag = os.path.join(cfg.train.output_dir, "checkpoints", checkpoint.tag_for(3))
    data = checkpoint.read_state(tag)["data"]
    assert data["kind"] == "stream" and data["readers"] == 2 and sorted(data["shares"]) == ["0", "1"]
    assert data["micro_step"] == 3 and data["turn"] == 1
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tag, resumed_dir / "checkpoints" / checkpoint.tag_for(3))
    resumed = _run(tiny_run_config(tmp_path, train_file, val_file, ds, **{
        **fields, "train.output_dir": str(resumed_dir), "train.resume": True}))["losses"]
    assert sorted(resumed) == [4, 5, 6]
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], rel=1e-6, abs=0), step


def _two_ranks(rank, world, source, state, steps):
    from relora_ds.data import loader

    batches = loader.stream_batches(source, seq_len=32, micro_batch_size=2, rank=rank, world_size=world)
    if state:
        batches.load_state_dict(state)
    got = [next(batches)["input_ids"].tolist() for _ in range(steps)]
    return got, batches.state_dict()  # a collective: every rank's readers


def test_state_dict_gathers_every_ranks_readers(corpus):
    from relora_ds.data import loader

    train_file, _ = corpus
    reference = []  # the same two ranks simulated in this process (batches need no torch.distributed)
    for rank in range(2):
        with loader.stream_batches(train_file, seq_len=32, micro_batch_size=2, rank=rank, world_size=2) as b:
            reference.append([next(b)["input_ids"].tolist() for _ in range(6)])
    first = run_on_ranks(_two_ranks, 2, args=(train_file, None, 2))
    state = json.loads(json.dumps(first[0][1]))
    assert first[0][1] == first[1][1] and sorted(state["shares"]) == ["0", "1"]  # identical on every rank
    rest = run_on_ranks(_two_ranks, 2, args=(train_file, state, 4))
    for rank in range(2):
        assert torch.equal(torch.tensor(first[rank][0] + rest[rank][0]), torch.tensor(reference[rank]))


def test_bad_data_in_a_worker_ends_train_with_one_line(corpus, tmp_path, capsys):
    from relora_ds.cli import main

    train_file, val_file = corpus
    bad = tmp_path / "bad.jsonl"
    lines = open(train_file).read().splitlines()
    bad.write_text("\n".join(lines[:1] + ['{"text": "cut here'] + lines[1:]) + "\n")  # reader 1's first record
    cfg = tiny_run_config(tmp_path, str(bad), val_file, write_ds_config(tmp_path), **{
        "data.streaming": True, "data.num_workers": 2, "method": "full", "relora.warm_start_steps": 0,
        "train.total_steps": 10, "train.eval_every": 0, "checkpoint.save_final": False})
    config_path = tmp_path / "run.yaml"
    cfg.save(str(config_path))
    code = main(["train", "--config", str(config_path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2
    assert err == [f"error: {bad} line 2: not valid JSON (Unterminated string starting at); expected one JSON "
                   f"object per line"]
