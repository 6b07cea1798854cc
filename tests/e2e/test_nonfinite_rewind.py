"""train.nonfinite_rewinds: a non-finite loss sends the run back to its newest checkpoint, passing over the data from
there to the failed step (a data.skip entry, which the run's config.yaml then records); a second failure on the data
that came next passes over more from the same checkpoint; without rewinds left the NonFiniteError stands."""

import itertools

import numpy as np
import pytest
import torch
import yaml

from relora_ds import trainer
from relora_ds.data import loader
from relora_ds.data.tokenize import load_tokenizer
from relora_ds.engine import train_module
from relora_ds.errors import NonFiniteError
from tests.helpers.runs import read_metrics, tiny_run_config, write_corpus, write_ds_config

pytestmark = pytest.mark.slow


def _poison(monkeypatch, batches: list[torch.Tensor]) -> list[int]:
    """The loss is not finite on a step whose micro-batch is one of `batches` (nothing is stepped, as in
    train_step); returns the list of steps where that happened."""
    failed = []
    step = train_module.TrainEngine.step

    def poisoned(self, micro_batches, **kwargs):
        batch = next(micro_batches)
        if any(torch.equal(batch["input_ids"], bad) for bad in batches):
            failed.append(kwargs["step"])
            raise NonFiniteError(f"training stopped at step {kwargs['step']}: the loss is not finite (test)",
                                 kwargs["step"])
        return step(self, itertools.chain([batch], micro_batches), **kwargs)

    monkeypatch.setattr(train_module.TrainEngine, "step", poisoned)
    return failed


def test_a_rewind_passes_over_the_data_that_failed(tmp_path, monkeypatch, capsys):
    files = write_corpus(tmp_path)
    ds = write_ds_config(tmp_path, stage=0)

    def config(name, rewinds):
        return tiny_run_config(tmp_path, *files, ds, **{
            "train.total_steps": 8, "train.eval_every": 0, "checkpoint.every": 2, "relora.warm_start_steps": 2,
            "relora.reset_every": 4, "train.nonfinite_rewinds": rewinds, "train.output_dir": str(tmp_path / name)})

    cfg = config("rewound", 2)
    order = loader.DistributedBatches(
        loader.dataset_from_config(cfg.data, load_tokenizer(None), cache_dir=str(tmp_path / "cache")),
        micro_batch_size=2, rank=0, world_size=1, seed=cfg.train.seed)
    first = [next(order)["input_ids"] for _ in range(8)]  # the micro-batch of each step in the run's own order
    failed = _poison(monkeypatch, [first[4], first[5]])  # steps 5 and 6 of the uninterrupted order

    summary = trainer.train_rewinding(cfg)
    assert failed == [5, 5]  # step 5 failed, and again on step 6's data after the first rewind
    assert summary["step"] == 8 and sorted(summary["losses"]) == list(range(5, 9))  # the last run: from step 4 on
    out = capsys.readouterr().out
    assert "rewind 1 of 2 (train.nonfinite_rewinds): back to the checkpoint of step 4, passing over the data of 1 " \
           "steps after it (data.skip 4:1)" in out
    assert "rewind 2 of 2 (train.nonfinite_rewinds): back to the checkpoint of step 4, passing over the data of 2 " \
           "steps after it (data.skip 4:2)" in out
    saved = yaml.safe_load(open(tmp_path / "rewound" / "config.yaml"))
    assert saved["data"]["skip"] == ["4:2"] and saved["train"]["resume"] is True
    records = read_metrics(str(tmp_path / "rewound"))
    assert [(r["step"], r["skipped_steps"]) for r in records if r.get("event") == "data" and "skipped_steps" in r] \
        == [(4, 2)]
    assert sorted(r["step"] for r in records if "loss" in r and "event" not in r) == list(range(1, 9))
    assert np.isfinite([summary["losses"][s] for s in range(5, 9)]).all()

    failed.clear()
    with pytest.raises(NonFiniteError, match="training stopped at step 5"):
        trainer.train_rewinding(config("stopped", 0))
    assert failed == [5]
