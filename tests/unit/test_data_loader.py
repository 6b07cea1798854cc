"""pretokenize.py + loader.py: the packed dataset on disk, the manifest check, the in-process cache,
rank sharding, O(1) resume, epochs, streaming, eval batches, config roles."""

import dataclasses
import json
import os
import random
import types

import pytest
import torch

from relora_ds.data import DataConfig, DataError, loader, pretokenize as pt, sources
from relora_ds.data.packing import pack_documents
from relora_ds.data.tokenize import encode_batch, load_tokenizer, train_tokenizer

WORDS = "the union state congress people nation peace war law year government public great".split()
SEQ = 16


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture()
def corpus(tmp_path):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 40))) for _ in range(60)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path), texts


def _expected_windows(tok, texts, seq_len=SEQ):
    return list(pack_documents(encode_batch(tok, texts), seq_len, tok.eos_token_id))


def _cfg(**kw):
    return dataclasses.replace(DataConfig(), seq_len=SEQ, **kw)


def test_pretokenize_writes_the_packed_tokens_and_a_manifest(tmp_path, corpus, tok):
    path, texts = corpus
    manifest = pt.pretokenize(path, str(tmp_path / "packed"), tokenizer=tok, seq_len=SEQ)
    expected = _expected_windows(tok, texts)
    assert manifest["num_sequences"] == len(expected) > 20
    assert manifest["num_tokens"] == len(expected) * SEQ
    assert manifest["num_documents"] == len(texts) and manifest["dtype"] == "uint16"
    assert manifest["vocab_size"] == 8192 and manifest["seq_len"] == SEQ
    assert json.load(open(tmp_path / "packed" / "manifest.json")) == manifest
    ds = loader.build_dataset(str(tmp_path / "packed"), tokenizer=tok, seq_len=SEQ)  # detected by manifest.json
    assert isinstance(ds, loader.PackedDataset) and len(ds) == len(expected)
    assert ds.get_batch([0, 3]).tolist() == [expected[0], expected[3]]
    assert ds[5].dtype == torch.long and ds[5].tolist() == expected[5]
    capped = pt.pretokenize(path, str(tmp_path / "capped"), tokenizer=tok, seq_len=SEQ, max_tokens=5 * SEQ + 3)
    assert capped["num_sequences"] == 5
    assert pt.token_dtype(8192) == "uint16" and pt.token_dtype(2**16 + 1) == "uint32"


def test_manifest_mismatches_are_refused_with_one_line(tmp_path, corpus, tok):
    path, _ = corpus
    out = str(tmp_path / "data")
    pt.pretokenize(path, out, tokenizer=tok, seq_len=SEQ)
    with pytest.raises(DataError, match=rf"data/manifest\.json: seq_len {SEQ} does not match data\.seq_len 32$"):
        loader.build_dataset(out, tokenizer=tok, seq_len=32)
    other = load_tokenizer(train_tokenizer([path], str(tmp_path / "tok"), vocab_size=300))
    with pytest.raises(DataError, match=r"data/manifest\.json: tokenizer '.*sotu-bpe-8k' \(vocab 8192, hash \w+\) "
                                        r"does not match data\.tokenizer '.*tok' \(vocab \d+, hash \w+\)"):
        pt.check_manifest(out, other, SEQ)
    with open(os.path.join(out, "tokens-00000.bin"), "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match=r"tokens-00000\.bin: 10 bytes, but .*manifest\.json describes"):
        pt.read_manifest(out)
    with pytest.raises(DataError, match=r"manifest\.json: not found"):
        pt.read_manifest(str(tmp_path))
    with pytest.raises(DataError, match="already a pretokenized dataset"):
        pt.pretokenize(out, str(tmp_path / "again"), tokenizer=tok, seq_len=SEQ)
    (tmp_path / "tiny.jsonl").write_text('{"text": "too short"}\n')
    with pytest.raises(DataError, match=r"1 documents give fewer tokens than one sequence of data\.seq_len 16"):
        pt.pretokenize(str(tmp_path / "tiny.jsonl"), str(tmp_path / "t"), tokenizer=tok, seq_len=SEQ)


def test_in_process_build_is_cached_and_keyed(tmp_path, corpus, tok, monkeypatch):
    path, texts = corpus
    cache = str(tmp_path / "cache")
    ds = loader.build_dataset(path, tokenizer=tok, seq_len=SEQ, cache_dir=cache)
    assert ds.get_batch(range(len(ds))).tolist() == _expected_windows(tok, texts)
    monkeypatch.setattr(loader, "write_packed", lambda *a, **k: pytest.fail("rebuilt a cached dataset"))
    again = loader.build_dataset(path, tokenizer=tok, seq_len=SEQ, cache_dir=cache)
    assert again.path == ds.path
    monkeypatch.undo()
    longer = loader.build_dataset(path, tokenizer=tok, seq_len=2 * SEQ, cache_dir=cache)  # new key: new build
    assert longer.path != ds.path and longer.seq_len == 2 * SEQ


def _take(batches, n):
    return [next(batches)["input_ids"] for _ in range(n)]


def test_ranks_are_disjoint_and_cover_each_epoch(tmp_path, corpus, tok):
    ds = loader.build_dataset(corpus[0], tokenizer=tok, seq_len=SEQ, cache_dir=str(tmp_path))
    mb, world = 2, 3
    per_epoch = len(ds) // (mb * world)
    ranks = [loader.DistributedBatches(ds, micro_batch_size=mb, rank=r, world_size=world, seed=5)
             for r in range(world)]
    rows = {r: [tuple(x) for b in _take(ranks[r], per_epoch) for x in b.tolist()] for r in range(world)}
    all_rows = [row for r in rows for row in rows[r]]
    every = [tuple(x) for x in ds.get_batch(range(len(ds))).tolist()]
    assert len(set(all_rows)) == len(all_rows) == per_epoch * mb * world  # disjoint, no repeats within an epoch
    assert set(all_rows) <= set(every)
    first = next(loader.DistributedBatches(ds, micro_batch_size=mb, rank=0, world_size=world, seed=5))
    assert torch.equal(first["labels"], first["input_ids"]) and first["input_ids"].shape == (mb, SEQ)
    assert ranks[0].state_dict()["tokens_seen"] == per_epoch * mb * world * SEQ
    next_epoch = [tuple(x) for x in next(ranks[0])["input_ids"].tolist()]
    assert ranks[0].epoch == 1 and ranks[0].state_dict()["position"] == mb * world
    other_seed = loader.DistributedBatches(ds, micro_batch_size=mb, rank=0, world_size=world, seed=6)
    assert not torch.equal(next(other_seed)["input_ids"], torch.tensor(rows[0][:mb]))
    assert next_epoch != rows[0][:mb]  # a new permutation per epoch


def test_resume_continues_the_uninterrupted_stream_without_rereading(tmp_path, corpus, tok):
    ds = loader.build_dataset(corpus[0], tokenizer=tok, seq_len=SEQ, cache_dir=str(tmp_path))
    kw = dict(micro_batch_size=2, rank=1, world_size=2, seed=3)
    per_epoch = len(ds) // 4
    full = _take(loader.DistributedBatches(ds, **kw), 2 * per_epoch + 3)  # crosses two epoch boundaries
    for stop in (1, per_epoch - 1, per_epoch, per_epoch + 2):
        first = loader.DistributedBatches(ds, **kw)
        _take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
        reads = []
        resumed = loader.DistributedBatches(ds, **kw)
        resumed.load_state_dict(state)
        original = ds.get_batch
        ds.get_batch = lambda idx: reads.append(len(idx)) or original(idx)
        try:
            tail = _take(resumed, len(full) - stop)
        finally:
            del ds.get_batch
        assert all(torch.equal(a, b) for a, b in zip(tail, full[stop:])), stop
        assert reads == [2] * (len(full) - stop)  # only the batches it returns are read
        assert resumed.state_dict()["micro_step"] == len(full)
    by_start = loader.DistributedBatches(ds, start_step=per_epoch + 1, **kw)
    assert torch.equal(next(by_start)["input_ids"], full[per_epoch + 1])
    changed = loader.build_dataset(corpus[0], tokenizer=tok, seq_len=2 * SEQ, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"checkpoint's data position is for \d+ packed sequences but the dataset now"):
        loader.DistributedBatches(changed, **kw).load_state_dict(state)


def test_too_little_data_for_one_global_batch(tmp_path, corpus, tok):
    ds = loader.build_dataset(corpus[0], tokenizer=tok, seq_len=SEQ, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=rf"data: {len(ds)} packed sequences of 16 tokens are fewer than one global "
                                        rf"micro-batch \(micro_batch_size {len(ds)} x world_size 2\)"):
        loader.DistributedBatches(ds, micro_batch_size=len(ds), rank=0, world_size=2, seed=0)


def test_streaming_hub_source_with_a_local_generator(monkeypatch, tok):
    import datasets

    texts = [" ".join(WORDS[i % 7:]) for i in range(40)]
    opened = []

    def fake_hub(name, config, split, streaming):
        opened.append((name, config, split, streaming))
        return datasets.IterableDataset.from_generator(lambda: ({"content": t, "id": i} for i, t in enumerate(texts)))

    monkeypatch.setattr(sources, "open_hub_dataset", fake_hub)
    ds = loader.build_dataset("someone/corpus", tokenizer=tok, seq_len=SEQ, text_column="content",
                              hub_config="en", split="train", streaming=True)
    assert isinstance(ds, loader.StreamingPackedDataset)
    assert opened == [("someone/corpus", "en", "train", True)]
    assert list(ds.windows()) == _expected_windows(tok, texts)
    wrong = loader.build_dataset("someone/corpus", tokenizer=tok, seq_len=SEQ, text_column="body", streaming=True)
    with pytest.raises(DataError, match=r"hub dataset 'someone/corpus' row 0: no 'body' field \(fields: content, id\)"):
        next(wrong.windows())
    # streams (sharding, resume, workers) are tested in test_data_stream.py


def test_eval_batches_are_fixed_split_across_ranks_and_equal_in_count(tmp_path, corpus, tok):
    ds = loader.build_dataset(corpus[0], tokenizer=tok, seq_len=SEQ, cache_dir=str(tmp_path))
    expected = ds.get_batch(range(len(ds))).tolist()
    shares = [loader.eval_batches(ds, micro_batch_size=2, max_batches=5, rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in shares] == [2, 2]  # 5 rounded down to a multiple of the world size
    assert [b["input_ids"].tolist() for b in shares[1]] == [expected[2:4], expected[6:8]]
    assert all(torch.equal(b["labels"], b["input_ids"]) for s in shares for b in s)
    again = loader.eval_batches(ds, micro_batch_size=2, max_batches=5, rank=1, world_size=2)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again, shares[1]))
    capped = loader.eval_batches(ds, micro_batch_size=4, max_batches=1000, rank=0, world_size=1)
    assert len(capped) == len(ds) // 4
    with pytest.raises(DataError, match=rf"validation data: {len(ds)} packed sequences are fewer than one micro-batch "
                                        r"per rank"):
        loader.eval_batches(ds, micro_batch_size=len(ds), max_batches=2, rank=0, world_size=2)
    streamed = loader.eval_batches(loader.build_dataset(corpus[0], tokenizer=tok, seq_len=SEQ, streaming=True),
                                   micro_batch_size=2, max_batches=5, rank=1, world_size=2)
    assert [b["input_ids"].tolist() for b in streamed] == [expected[2:4], expected[6:8]]


def test_dataset_from_config_roles(tmp_path, corpus, tok):
    cache = str(tmp_path / "cache")
    val = loader.dataset_from_config(_cfg(), tok, split="validation", cache_dir=cache)
    assert "packed-validation-" in val.path and 1000 < len(val) * SEQ < 400_000
    data_dir = tmp_path / "local"
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_text(open(corpus[0]).read())
    assert loader.dataset_from_config(_cfg(source=str(data_dir)), tok, split="validation", cache_dir=cache) is None
    (data_dir / "validation.jsonl").write_text("".join(open(corpus[0]).readlines()[:20]))
    train = loader.dataset_from_config(_cfg(source=str(data_dir)), tok, split="train", cache_dir=cache)
    held_out = loader.dataset_from_config(_cfg(source=str(data_dir)), tok, split="validation", cache_dir=cache)
    assert len(held_out) < len(train)
    assert held_out.manifest["source"]["files"] == [str(data_dir / "validation.jsonl")]
    explicit = loader.dataset_from_config(_cfg(source=str(data_dir), validation_source=corpus[0]), tok,
                                          split="validation", cache_dir=cache)
    assert len(explicit) == len(train)


def test_epoch_permutation_is_numpys_order_in_half_the_memory():
    """Saved map-style positions index this order: it must stay numpy's permutation(n), whatever the dtype."""
    import numpy as np

    from relora_ds.data import epoch_permutation

    for seed, n in (([42, 0], 1), ([42, 3], 97), ([7, 1, 2], 65_537), ([0, 5], 1_000_003)):
        perm = epoch_permutation(seed, n)
        assert perm.dtype == np.uint32 and np.array_equal(perm, np.random.default_rng(seed).permutation(n))
