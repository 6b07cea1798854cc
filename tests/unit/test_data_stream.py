"""stream.py + workers.py + DistributedBatches on a stream: the sharding rule, each rank packing only its own
share, exact O(1) resume (local files and a mocked hub stream; 1 and 2 ranks; 0 and 2 workers), the world-size
rule on resume, worker errors as one line, clean worker shutdown."""

import json
import os
import random
import subprocess
import sys

import psutil
import pytest
import torch

from relora_ds.data import DataError, loader, sources, stream
from relora_ds.data.packing import pack_documents
from relora_ds.data.sources import BadRecords
from relora_ds.data.tokenize import Encoder, encode_batch, load_tokenizer

WORDS = "the union state congress people nation peace war law year government public great".split()
SEQ, MB = 16, 2


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _spy_encoder(monkeypatch, hook):
    """Calls hook(texts) before every tokenizer call of the streams (the Encoder), then encodes as usual."""
    real = Encoder.__call__
    monkeypatch.setattr(Encoder, "__call__", lambda self, texts: hook(texts) or real(self, texts))


def _texts(n, seed=0):
    rng = random.Random(seed)
    return [f"doc{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 30))) for i in range(n)]


def _write_files(directory, texts, n_files, blank_every=0):
    """texts dealt into n_files jsonl files, in order (file f holds a contiguous run); returns the paths."""
    paths, per = [], -(-len(texts) // n_files)
    for f in range(n_files):
        path = os.path.join(str(directory), f"part-{f}.jsonl")
        with open(path, "w") as out:
            for i, t in enumerate(texts[f * per:(f + 1) * per]):
                out.write(json.dumps({"text": t}) + "\n")
                if blank_every and i % blank_every == 0:
                    out.write("\n")  # a blank line is a record without text
        paths.append(path)
    return paths


def _stream(source, tok, **kw):
    return loader.build_dataset(source, tokenizer=tok, seq_len=SEQ, streaming=True, **kw)


def _ranks(dataset, world, workers, mb=MB):
    return [loader.DistributedBatches(dataset, micro_batch_size=mb, rank=r, world_size=world, seed=0,
                                      num_workers=workers, prefetch_batches=3) for r in range(world)]


def _take(batches, n):
    return [next(batches)["input_ids"] for _ in range(n)]


def _global_state(ranks):
    state = loader.DistributedBatches.merge_states([b.local_state_dict() for b in ranks])
    return json.loads(json.dumps(state))  # it goes into relora_state.json


def _share_texts(src, reader, readers):
    return [t for texts, _ in stream.share_records(src, reader, readers, None, BadRecords()) for t in texts]


# --- the rule ---------------------------------------------------------------------------------------------

def test_sharding_rule_whole_files_or_records(tmp_path, tok):
    texts = _texts(24)
    _write_files(tmp_path, texts, 4, blank_every=5)
    src = sources.resolve_source(str(tmp_path), streaming=True)
    assert _share_texts(src, 0, 1) == texts
    # 4 files, 2 readers: whole files 0, 2 and 1, 3
    assert _share_texts(src, 0, 2) == texts[0:6] + texts[12:18]
    assert _share_texts(src, 1, 2) == texts[6:12] + texts[18:24]
    # 4 files, 3 readers: records k, k+3, ... of the global record order (blank lines are records)
    records = [json.loads(line)["text"] if line.strip() else None
               for p in src.files for line in open(p)]
    for k in range(3):
        assert _share_texts(src, k, 3) == [t for t in records[k::3] if t]
    assert sorted(t for k in range(3) for t in _share_texts(src, k, 3)) == sorted(texts)  # a partition
    assert stream.by_shards(4, 2) and not stream.by_shards(4, 3)


def test_each_rank_tokenizes_and_packs_only_its_own_share(tmp_path, tok, monkeypatch):
    texts = _texts(40)
    path = _write_files(tmp_path, texts, 1)[0]
    seen = []
    _spy_encoder(monkeypatch, lambda batch: seen.append(list(batch)))
    ds = _stream(path, tok)
    for rank in range(2):
        seen.clear()
        batches = loader.DistributedBatches(ds, micro_batch_size=MB, rank=rank, world_size=2, seed=0)
        got = [w for b in _take(batches, 3) for w in b.tolist()]
        share = texts[rank::2]  # one file, two readers: records rank, rank + 2, ...
        assert got == list(pack_documents(encode_batch(tok, share), SEQ, tok.eos_token_id))[:3 * MB]
        assert {t for batch in seen for t in batch} <= set(share)


# --- exact resume -------------------------------------------------------------------------------------------

def _check_resume(ds, world, workers, total, stops):
    """Every rank's batches of a run interrupted at each of `stops` and resumed equal the uninterrupted run's."""
    reference = [_take(b, total) for b in _ranks(ds, world, workers)]
    for stop in stops:
        first = _ranks(ds, world, workers)
        head = [_take(b, stop) for b in first]
        state = _global_state(first)
        for b in first:
            b.close()
        resumed = _ranks(ds, world, workers)
        try:
            for b in resumed:
                b.load_state_dict(state)
            tail = [_take(b, total - stop) for b in resumed]
        finally:
            for b in resumed:
                b.close()
        for r in range(world):
            assert torch.equal(torch.cat(head[r] + tail[r]), torch.cat(reference[r])), (world, workers, stop, r)
        assert resumed[0].state_dict()["micro_step"] == total if world == 1 else True
    return reference


@pytest.mark.parametrize("world, workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
@pytest.mark.parametrize("n_files", [3, 4])
def test_local_stream_resume_equals_the_uninterrupted_run(tmp_path, tok, world, workers, n_files):
    texts = _texts(48, seed=n_files)
    _write_files(tmp_path, texts, n_files, blank_every=7)
    ds = _stream(str(tmp_path / "*.jsonl"), tok)
    total_windows = len(list(pack_documents(encode_batch(tok, texts), SEQ, tok.eos_token_id)))
    readers = world * max(1, workers)
    total = total_windows // (readers * MB) + 3  # past the end of every share: into the next pass
    _check_resume(ds, world, workers, total, stops=(1, 3, total - 2))


@pytest.mark.parametrize("world, workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
@pytest.mark.parametrize("shards", [4, 1, "json"])
def test_hub_stream_resume_equals_the_uninterrupted_run(tmp_path, tok, monkeypatch, world, workers, shards):
    import datasets

    texts = _texts(60, seed=len(str(shards)))

    def fake_hub(name, config, split, streaming):
        assert streaming
        if shards == 1:  # one shard: split by examples
            return datasets.IterableDataset.from_generator(lambda: ({"text": t, "id": i} for i, t in enumerate(texts)))
        if shards == "json":  # a streamed file-backed builder, as for a hub dataset's data files (3 shards)
            files = _write_files(tmp_path, texts, 3)
            return datasets.load_dataset("json", data_files=files, split="train", streaming=True)
        return datasets.Dataset.from_dict({"text": texts}).to_iterable_dataset(num_shards=shards)

    monkeypatch.setattr(sources, "open_hub_dataset", fake_hub)
    ds = _stream("someone/corpus", tok)
    assert isinstance(ds, loader.StreamingPackedDataset)
    total_windows = len(list(pack_documents(encode_batch(tok, texts), SEQ, tok.eos_token_id)))
    readers = world * max(1, workers)
    total = total_windows // (readers * MB) + 2
    reference = _check_resume(ds, world, workers, total, stops=(1, total - 3))
    if world == 1 and workers == 0:  # one reader: the stream in order
        expected = list(pack_documents(encode_batch(tok, texts), SEQ, tok.eos_token_id))
        assert [w for b in reference[0][:total_windows // MB] for w in b.tolist()] == expected[:total_windows // MB * MB]


def test_resume_neither_rereads_nor_retokenizes(tmp_path, tok, monkeypatch):
    texts = _texts(200)
    _write_files(tmp_path, texts, 2)
    parsed, tokenized = [], []
    json_line = sources._json_line
    monkeypatch.setattr(sources, "_json_line", lambda line, n, path, *a: parsed.append((path, n)) or
                        json_line(line, n, path, *a))
    _spy_encoder(monkeypatch, tokenized.extend)
    ds = _stream(str(tmp_path), tok)
    for world in (1, 2):
        first = _ranks(ds, world, 0)
        for b in first:
            _take(b, 4)
        state = _global_state(first)
        before_parsed, before_tokenized = set(parsed), set(tokenized)
        parsed.clear()
        tokenized.clear()
        resumed = _ranks(ds, world, 0)
        for b in resumed:
            b.load_state_dict(state)
            _take(b, 40)  # past the buffer and the chunk read ahead, within the first pass
        assert parsed and not set(parsed) & before_parsed  # the lines before the position are not read again
        assert tokenized and not set(tokenized) & before_tokenized
        # the state is small: the partial buffer (< a micro-batch + one tokenizer call's 4096 characters), not the history
        for share in state["shares"].values():
            assert 0 < len(share["buffer"]) < MB * SEQ + 4096
        parsed.clear()
        tokenized.clear()


def test_hub_resume_skips_finished_shards_unopened(tok, monkeypatch):
    import datasets

    texts = _texts(400)
    opened = []

    def gen(shards):
        for s in shards:
            opened.append(s)
            yield from ({"text": t} for t in texts[s * 100:(s + 1) * 100])

    monkeypatch.setattr(sources, "open_hub_dataset", lambda *a: datasets.IterableDataset.from_generator(
        gen, gen_kwargs={"shards": [0, 1, 2, 3]}))
    ds = _stream("someone/corpus", tok)
    [first] = _ranks(ds, 1, 0)
    _take(first, 80)
    state = _global_state([first])
    assert opened == [0, 1]  # the position is in shard 1
    opened.clear()
    [resumed] = _ranks(ds, 1, 0)
    resumed.load_state_dict(state)
    while not opened:
        _take(resumed, 1)
    assert opened == [1]  # shard 0 is not opened (not downloaded) again


# --- world size on resume --------------------------------------------------------------------------------------

def test_stream_resume_needs_the_same_number_of_readers(tmp_path, tok):
    texts = _texts(60)
    _write_files(tmp_path, texts, 1)
    ds = _stream(str(tmp_path), tok)
    old = _ranks(ds, 2, 0)  # 2 readers
    reference = [_take(b, 12) for b in old]
    old = _ranks(ds, 2, 0)
    for b in old:
        _take(b, 5)
    state = _global_state(old)
    fewer = _ranks(ds, 1, 0)[0]  # 1 reader: refused
    with pytest.raises(DataError) as info:
        fewer.load_state_dict(state)
    message = str(info.value)
    assert "\n" not in message
    assert ("read by 2 readers (world size 2 x max(1, data.num_workers 0)) but this run has 1 (world size 1 x "
            "max(1, data.num_workers 0)); a stream resumes only onto the same number of readers") in message
    assert "data.num_workers 2 continues it exactly" in message
    # 1 rank x 2 workers = 2 readers: every reader continues its own share exactly, taken in turn by the one rank
    [requeued] = _ranks(ds, 1, 2)
    requeued.load_state_dict(state)
    got = _take(requeued, 6)
    requeued.close()
    assert all(torch.equal(got[i], reference[i % 2][5 + i // 2]) for i in range(6))
    with pytest.raises(DataError, match=r"stream position is for another data\.seq_len"):
        loader.DistributedBatches(loader.build_dataset(str(tmp_path), tokenizer=tok, seq_len=2 * SEQ, streaming=True),
                                  micro_batch_size=MB, rank=0, world_size=2, seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="older format"):
        fewer.load_state_dict({"kind": "stream", "micro_step": 3, "epoch": 0, "position": [4, 2], "tokens_seen": 9})
    with pytest.raises(DataError, match=r"no state for reader\(s\) 1 \(rank 1\)"):
        _ranks(ds, 2, 0)[1].load_state_dict(_global_state(old[:1]))
    with pytest.raises(ValueError, match="merge_states"):
        old[0].state_dict()  # two ranks without torch.distributed: nothing to gather with


def test_map_style_resume_on_another_world_size_neither_repeats_nor_skips(tmp_path, tok):
    path = _write_files(tmp_path, _texts(80), 1)[0]
    ds = loader.build_dataset(path, tokenizer=tok, seq_len=SEQ, cache_dir=str(tmp_path / "cache"))
    for old_world, new_world in ((2, 1), (1, 3), (3, 2)):
        reads = []
        original = ds.get_batch
        ds.get_batch = lambda idx: reads.extend(int(i) for i in idx) or original(idx)
        try:
            old = [loader.DistributedBatches(ds, micro_batch_size=MB, rank=r, world_size=old_world, seed=4)
                   for r in range(old_world)]
            for _ in range(3):
                for b in old:
                    next(b)
            state = json.loads(json.dumps(old[0].state_dict()))
            new = [loader.DistributedBatches(ds, micro_batch_size=MB, rank=r, world_size=new_world, seed=4)
                   for r in range(new_world)]
            for b in new:
                b.load_state_dict(state)
            while all(b.epoch == 0 for b in new):
                for b in new:
                    next(b)
        finally:
            del ds.get_batch
        epoch0 = reads[:len(reads) - new_world * MB]  # the last round belongs to epoch 1
        assert len(epoch0) == len(set(epoch0))  # nothing repeated
        perm = torch.from_numpy(__import__("numpy").random.default_rng([4, 0]).permutation(len(ds)))
        assert sorted(epoch0) == sorted(perm[:len(epoch0)].tolist())  # a prefix of the permutation: nothing skipped
        assert len(ds) - len(epoch0) < new_world * MB  # up to the tail that does not fill a global micro-batch


# --- workers: errors and shutdown -------------------------------------------------------------------------------

def _children(before=()):
    """This process's children not in `before`, zombies included (an exited but unreaped worker is listed)."""
    return [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in before]


def test_worker_errors_reach_the_trainer_as_one_line(tmp_path, tok, monkeypatch):
    texts = _texts(30)
    path = _write_files(tmp_path, texts, 1)[0]
    lines = open(path).read().splitlines()
    lines[20] = '{"text": "broken'
    open(path, "w").write("\n".join(lines) + "\n")
    ds = _stream(path, tok)
    before = _children()  # (workers of other tests that failed before closing theirs)
    for workers in (0, 2):
        [batches] = _ranks(ds, 1, workers)
        with pytest.raises(DataError) as info:
            _take(batches, 50)
        assert str(info.value) == f"{path} line 21: not valid JSON (Unterminated string starting at); expected " \
                                  f"one JSON object per line"
        batches.close()
        assert _children(before) == []
    os.makedirs(tmp_path / "good")
    good = _write_files(tmp_path / "good", texts, 1)[0]
    _spy_encoder(monkeypatch, lambda b: "doc7 " in " ".join(b) and 1 / 0)  # a bug in a worker, not a data error
    [batches] = _ranks(_stream(good, tok), 1, 2)
    with pytest.raises(DataError, match=r"^data worker \d of rank 0 \(reader \d of 2\) failed: ZeroDivisionError: "
                                        r"division by zero \(at test_data_stream\.py:\d+\)$"):
        _take(batches, 50)
    batches.close()
    assert _children(before) == []


@pytest.mark.slow  # a training loop or a child process: `make test`, not the edit loop
def test_workers_shut_down_cleanly_and_never_hang_the_exit(tmp_path, tok):
    path = _write_files(tmp_path, _texts(30), 1)[0]
    before = _children()
    [batches] = _ranks(_stream(path, tok), 1, 2)
    _take(batches, 2)
    assert len(_children(before)) == 2
    batches.close()
    batches.close()  # idempotent
    assert _children(before) == []
    script = ("import sys; from relora_ds.data import loader\n"
              f"b = loader.stream_batches({path!r}, seq_len=16, micro_batch_size=2, num_workers=2)\n"
              "next(b); next(b); print('took two', flush=True)\n"
              "sys.exit(0)  # no close(): the interpreter's exit must still end the workers\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode == 0 and "took two" in done.stdout, done.stderr
    assert "Traceback" not in done.stderr


def test_iterate_tokens_and_eval_batches_of_a_stream(tmp_path, tok):
    texts = _texts(40)
    path = _write_files(tmp_path, texts, 1)[0]
    expected = list(pack_documents(encode_batch(tok, texts), SEQ, tok.eos_token_id))
    before = _children()
    it = loader.iterate_tokens(path, tokenizer=tok, seq_len=SEQ, micro_batch_size=MB, num_workers=2)
    got = [next(it).tolist() for _ in range(4)]
    # 2 workers: 2 readers of the one file (records 0, 2, ... and 1, 3, ...), their batches taken in turn
    per_reader = [list(pack_documents(encode_batch(tok, texts[j::2]), SEQ, tok.eos_token_id)) for j in range(2)]
    assert got == [per_reader[i % 2][(i // 2) * MB:(i // 2 + 1) * MB] for i in range(4)]
    it.close()
    assert _children(before) == []
    ds = _stream(path, tok)
    shares = [loader.eval_batches(ds, micro_batch_size=2, max_batches=5, rank=r, world_size=2) for r in range(2)]
    assert [b["input_ids"].tolist() for b in shares[1]] == [expected[2:4], expected[6:8]]
    assert list(ds.windows(3)) == expected[:3]


def test_bad_records_and_empty_shares_in_a_stream(tmp_path, tok, capfd):
    texts = _texts(40)
    path = _write_files(tmp_path, texts, 1)[0]
    lines = open(path).read().splitlines()
    for i in (3, 10, 17):
        lines[i] = '{"text": "broken'
    open(path, "w").write("\n".join(lines) + "\n")
    ds = _stream(path, tok, skip_bad_records=True)
    [batches] = _ranks(ds, 1, 2)
    state = None
    for _ in range(60):  # beyond one pass of both readers
        next(batches)
        state = batches.state_dict()
    batches.close()
    assert sum(s["bad_records"] for s in state["shares"].values()) >= 3  # counted in the checkpoint's state
    err = capfd.readouterr().err  # the workers' stderr (their own processes)
    assert "warning: data: skipping bad record: " in err and " line 4: not valid JSON" in err
    assert "skipped 2 bad records in data.source" in err and "skipped 1 bad records in data.source" in err
    # an empty share is one line, from a worker too
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps({"text": texts[0]}) + "\n")
    for workers in (0, 2):
        [batches] = _ranks(_stream(str(tiny), tok), 1, workers)
        with pytest.raises(DataError) as info:
            next(batches)
        batches.close()
        expected = (f"data.source {str(tiny)!r}: " + ("the stream" if workers == 0 else
                    "reader [01] of 2's share \\(records [01], [23], ... of 1 files\\)") +
                    r" holds fewer than one micro-batch \(2 sequences of 16 tokens\); use more data, fewer readers "
                    r"\(world size x data.num_workers\) or a smaller micro-batch$")
        assert __import__("re").match(expected, str(info.value)), str(info.value)
