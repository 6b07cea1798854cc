"""data.skip: after step STEP the data of STEPS steps is passed over, once: the batches that follow are the ones the
uninterrupted order gives STEPS steps later, for map-style data, a mixture and a stream; the steps where it was done
travel with the data position, so a resume does not do it again; bad entries are one line each."""

import json
import types

import pytest

from relora_ds.callbacks.data_skip import DataSkip
from relora_ds.config import ConfigError, load_config, validate
from relora_ds.data import loader, mixture, skip
from relora_ds.data.tokenize import load_tokenizer
from tests.helpers.fakes import Rows



def _ids(batches, n) -> list:
    return [next(batches)["input_ids"].tolist() for _ in range(n)]


def _sources(tmp_path):
    lines = [json.dumps({"text": f"document {i} " + "word " * (i % 7 + 3)}) for i in range(80)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("kind", ["indexed", "mixture", "stream"])
def test_skip_passes_over_the_next_micro_batches_and_is_recorded(tmp_path, kind):
    def make():
        if kind == "indexed":
            dataset = Rows(0, 37)
        elif kind == "mixture":
            dataset = mixture.MixedDataset([Rows(0, 20), Rows(1, 9)], [2, 1], ["a", "b"], ["/a", "/b"])
        else:
            dataset = loader.build_dataset(_sources(tmp_path), tokenizer=load_tokenizer(None), seq_len=8,
                                           streaming=True)
        return loader.DistributedBatches(dataset, micro_batch_size=2, rank=1, world_size=2, seed=3)

    reference = _ids(make(), 16)
    batches = make()
    head = _ids(batches, 3)
    tokens_before = batches.tokens_seen
    batches.skip(5, at_step=3)
    assert head + _ids(batches, 6) == reference[:3] + reference[8:14]
    assert batches.skipped == [3] and batches.micro_step == 9  # what was trained, not what was passed over
    assert batches.tokens_seen == tokens_before + 6 * 2 * 2 * batches.dataset.seq_len
    state = batches.local_state_dict()  # a stream's: this rank's readers, all that this rank's resume reads
    assert state["skipped"] == [3]
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert resumed.skipped == [3] and _ids(resumed, 2) == reference[14:16]


def test_the_callback_skips_once_at_its_step_and_not_again_after_a_resume():
    logged = []
    batches = loader.DistributedBatches(Rows(0, 40), micro_batch_size=2, rank=0, world_size=1, seed=0)
    trainer = types.SimpleNamespace(state=types.SimpleNamespace(step=0), batches=batches,
                                    metrics=types.SimpleNamespace(log_event=lambda *a, **k: logged.append((a, k))))
    callback = DataSkip({2: 3}, micro_batches_per_step=2, tokens_per_step=16)
    for step in range(4):
        trainer.state.step = step
        callback.pre_step(trainer)
        callback.pre_step(trainer)  # a second pre_step at the same step (a resume from a checkpoint written then)
    assert batches.skipped == [2] and batches.position == 12  # 3 steps x 2 micro-batches x 2 rows
    assert logged == [(("data", 2), {"skipped_steps": 3, "skipped_tokens": 48})]


def test_bad_skips_are_one_line_each():
    def problems(*entries, total=1000):
        try:
            return validate(load_config(None, [f"data.skip=[{','.join(entries)}]", f"train.total_steps={total}"]))
        except ConfigError as e:
            return str(e).splitlines()

    assert problems("'10:5'", "'50:1'") == []
    assert skip.parse(["10:5", "50:1"]) == {10: 5, 50: 1}
    assert problems("'10-15'") == ["data.skip: '10-15' is not STEP:STEPS (after step STEP, pass over the data of "
                                   "STEPS steps), e.g. '1200:200'"]
    assert problems("'10:0'") == ["data.skip: '10:0' passes over no steps; STEPS must be >= 1"]
    assert problems("'1000:5'") == ["data.skip: '1000:5' is at or after train.total_steps (1000)"]
    assert problems("'10:5'", "'10:2'") == ["data.skip: step 10 is named twice; give it one entry with the steps "
                                            "added up"]
