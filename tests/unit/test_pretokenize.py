"""pretokenize.py at scale: parallel tokenization (--num-proc), sharded output read back through PackedDataset's
per-shard memmaps, the v1 single-file layout, the manifest checks, bad arguments, progress reporting."""

import io
import json
import os
import pickle
import random
import sys

import numpy as np
import pytest

from relora_ds.data import DataError, loader, pretokenize as pt
from relora_ds.data.packing import pack_documents
from relora_ds.data.sources import resolve_source
from relora_ds.data.tokenize import encode_batch, load_tokenizer

WORDS = ("the union state congress people nation peace war law year government public great "
         "État naïve señor Ünïcödé 日本 — “quotes” 123 4.5% e-mail").split()
SEQ = 16


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def unigram():
    """A SentencePiece-style Unigram tokenizer (Metaspace, NFKC) built in-process, as T5's and LLaMA's are."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(200)]
    backend = Tokenizer(models.Unigram())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.train_from_iterator(texts, trainer=trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>", "<s>"], unk_token="<unk>", show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>")


@pytest.fixture()
def corpus(tmp_path):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 120))) for _ in range(150)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path), texts


def _old_path(tokenizer, texts, seq_len=SEQ):
    """What the single-process pretokenize always wrote: transformers' encode, 256 documents at a time, packed."""
    token_lists = (ids for i in range(0, len(texts), 256) for ids in encode_batch(tokenizer, texts[i:i + 256]))
    return np.array(list(pack_documents(token_lists, seq_len, tokenizer.eos_token_id)), dtype=np.int64)


def _all_rows(path, tokenizer=None, seq_len=None):
    ds = loader.PackedDataset(path, tokenizer=tokenizer, seq_len=seq_len)
    return ds.get_batch(np.arange(len(ds))).numpy()


@pytest.mark.parametrize("which", ["bpe", "unigram"])
def test_num_proc_1_and_2_write_the_single_process_paths_ids(tmp_path, corpus, tok, unigram, monkeypatch, which):
    tokenizer = tok if which == "bpe" else unigram
    path, texts = corpus
    expected = _old_path(tokenizer, texts)
    assert len(expected) > 40
    monkeypatch.setattr(pt, "_JOB_CHARS", 500)  # many small jobs: the order across workers is what is tested
    manifests = {}
    for n in (1, 2):
        manifests[n] = pt.pretokenize(path, str(tmp_path / f"p{n}"), tokenizer=tokenizer, seq_len=SEQ, num_proc=n,
                                      shard_size=7 * SEQ * 2)
        assert np.array_equal(_all_rows(str(tmp_path / f"p{n}"), tokenizer, SEQ), expected)
    for n in (1, 2):
        assert manifests[n]["num_sequences"] == len(expected) and manifests[n]["num_documents"] == len(texts)
        assert manifests[n]["num_proc"] == n and manifests[n]["format"] == pt.FORMAT
    for a, b in zip(sorted(os.listdir(tmp_path / "p1")), sorted(os.listdir(tmp_path / "p2"))):
        if a != "manifest.json":
            assert a == b and (tmp_path / "p1" / a).read_bytes() == (tmp_path / "p2" / b).read_bytes()


def test_sharded_output_reads_back_through_per_shard_memmaps(tmp_path, corpus, tok):
    path, texts = corpus
    expected = _old_path(tok, texts)
    out = tmp_path / "sharded"
    manifest = pt.pretokenize(path, str(out), tokenizer=tok, seq_len=SEQ, num_proc=2, shard_size=f"{5 * SEQ * 2}B")
    shards = manifest["shards"]
    assert [s["file"] for s in shards] == [f"tokens-{i:05d}.bin" for i in range(len(shards))]
    assert all(s["num_sequences"] == 5 for s in shards[:-1]) and 1 <= shards[-1]["num_sequences"] <= 5
    assert sum(s["num_sequences"] for s in shards) == manifest["num_sequences"] == len(expected)
    for s in shards:
        assert os.path.getsize(out / s["file"]) == s["bytes"] == s["num_sequences"] * SEQ * 2
    assert json.load(open(out / "manifest.json")) == manifest

    ds = loader.build_dataset(str(out), tokenizer=tok, seq_len=SEQ)  # found by its manifest, checked
    assert isinstance(ds, loader.PackedDataset) and len(ds) == len(expected) and len(ds.shards) == len(shards)
    assert all(m is None for m in ds._maps)  # nothing opened up front
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(ds), size=40)  # unsorted, repeated, across shard boundaries
    assert np.array_equal(ds.get_batch(picks).numpy(), expected[picks])
    assert np.array_equal(ds.get_batch([4, 5, -1]).numpy(), expected[[4, 5, -1]])
    assert ds[6].tolist() == expected[6].tolist() and ds.get_batch([]).shape == (0, SEQ)
    with pytest.raises(IndexError, match="out of range"):
        ds.get_batch([len(ds)])
    assert all(m is None or m.mode == "r" for m in ds._maps)  # read-only maps: no writes, no locks
    clone = pickle.loads(pickle.dumps(ds))  # as a worker process gets it: no maps carried, reopened on use
    assert all(m is None for m in clone._maps)
    assert np.array_equal(clone.get_batch(np.arange(len(ds))).numpy(), expected)

    batches = loader.DistributedBatches(ds, micro_batch_size=3, rank=0, world_size=1, seed=0)
    rows = {tuple(r) for r in expected.tolist()}
    assert all(tuple(r) in rows for _ in range(len(ds) // 3) for r in next(batches)["input_ids"].tolist())


def test_a_new_write_replaces_the_old_files_and_max_tokens_caps_it(tmp_path, corpus, tok):
    path, texts = corpus
    out = tmp_path / "out"
    pt.pretokenize(path, str(out), tokenizer=tok, seq_len=SEQ, shard_size=SEQ * 2 * 3)
    (out / pt.TOKENS_FILE).write_bytes(b"stale v1 file")
    capped = pt.pretokenize(path, str(out), tokenizer=tok, seq_len=SEQ, num_proc=2, shard_size=SEQ * 2 * 3,
                            max_tokens=7 * SEQ + 5)
    assert capped["num_sequences"] == 7 and [s["num_sequences"] for s in capped["shards"]] == [3, 3, 1]
    assert sorted(os.listdir(out)) == ["manifest.json", "tokens-00000.bin", "tokens-00001.bin", "tokens-00002.bin"]
    assert np.array_equal(_all_rows(str(out)), _old_path(tok, texts)[:7])


def test_the_v1_single_file_layout_still_loads(tmp_path, corpus, tok):
    path, texts = corpus
    expected = _old_path(tok, texts)
    old = tmp_path / "v1"
    old.mkdir()
    expected.astype(np.uint16).tofile(old / "tokens.bin")
    manifest = {"format": "relora-ds packed v1", "tokenizer": tok.name_or_path, "vocab_size": len(tok),
                "vocab_hash": pt.vocab_hash(tok), "eos_id": tok.eos_token_id, "seq_len": SEQ, "dtype": "uint16",
                "num_sequences": len(expected), "num_tokens": expected.size, "num_documents": len(texts),
                "source": {"source": path}, "seconds": 0.1, "created": "2026-11-01T00:00:00+0000"}
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert pt.read_manifest(str(old))["shards"] == [{"file": "tokens.bin", "num_sequences": len(expected),
                                                     "bytes": expected.size * 2}]
    ds = loader.build_dataset(str(old), tokenizer=tok, seq_len=SEQ)
    assert len(ds.shards) == 1 and np.array_equal(ds.get_batch(np.arange(len(ds))).numpy(), expected)
    with pytest.raises(DataError, match=rf"v1/manifest\.json: seq_len {SEQ} does not match data\.seq_len 8$"):
        loader.build_dataset(str(old), tokenizer=tok, seq_len=8)


def _one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_manifest_mismatches_and_broken_shards_are_refused_in_one_line(tmp_path, corpus, tok, unigram):
    path, _ = corpus
    out = tmp_path / "data"
    pt.pretokenize(path, str(out), tokenizer=tok, seq_len=SEQ, num_proc=2, shard_size=SEQ * 2 * 4)
    with pytest.raises(DataError, match=rf"data/manifest\.json: seq_len {SEQ} does not match data\.seq_len 32$"):
        loader.build_dataset(str(out), tokenizer=tok, seq_len=32)
    with pytest.raises(DataError, match=r"data/manifest\.json: tokenizer '.*sotu-bpe-8k' \(vocab 8192, hash \w+\) "
                                        r"does not match data\.tokenizer '' \(vocab \d+, hash \w+\)") as e:
        loader.PackedDataset(str(out), tokenizer=unigram, seq_len=SEQ)
    _one_line(e)
    manifest = json.loads((out / "manifest.json").read_text())

    def broken(**changes):
        (out / "manifest.json").write_text(json.dumps({**manifest, **changes}))
        with pytest.raises(DataError) as e:
            pt.read_manifest(str(out))
        return _one_line(e)

    assert "format 'relora-ds packed v9'" in broken(format="relora-ds packed v9")
    assert "shards hold" in broken(num_sequences=manifest["num_sequences"] + 1)
    assert '"shards" must list' in broken(shards=[{"file": "../elsewhere.bin", "num_sequences": 1}])
    assert '"shards" must list' in broken(shards=[])
    shards = [dict(s) for s in manifest["shards"]]
    shards[1]["file"] = "tokens-99999.bin"
    assert "tokens-99999.bin: missing, but" in broken(shards=shards)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with open(out / "tokens-00001.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match=r"data/tokens-00001\.bin: 10 bytes, but .*manifest\.json describes 4 x 16 "
                                        r"uint16 \(128 bytes\); rewrite it with `relora-ds pretokenize`$"):
        pt.read_manifest(str(out))


@pytest.mark.parametrize("value", [0, -2, True, 1.5, "2"])
def test_num_proc_below_one_or_not_an_integer_is_one_line(tmp_path, corpus, tok, value):
    with pytest.raises(DataError, match=rf"^--num-proc {value!r}: must be a whole number >= 1 ") as e:
        pt.pretokenize(corpus[0], str(tmp_path / "x"), tokenizer=tok, seq_len=SEQ, num_proc=value)
    _one_line(e)
    assert not (tmp_path / "x").exists()  # refused before anything is written


@pytest.mark.parametrize("value", ["0", "abc", "1XB", 0, ""])
def test_bad_shard_size_is_one_line(value):
    with pytest.raises(DataError, match=rf"^--shard-size {value!r}: not a size;") as e:
        pt.parse_shard_size(value)
    _one_line(e)


def test_shard_sizes_parse():
    assert pt.parse_shard_size("1GiB") == 2**30 and pt.parse_shard_size("500MB") == 5 * 10**8
    assert pt.parse_shard_size("64kib") == 65536 and pt.parse_shard_size(123) == 123
    assert pt.parse_shard_size("1.5 KB") == 1500


def test_progress_reports_input_read_tokens_per_s_and_eta(tmp_path, corpus, tok, monkeypatch):
    import gzip

    path, texts = corpus
    gz = tmp_path / "corpus.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(open(path).read() * 30)
    meter = pt.InputMeter(resolve_source(str(gz)))
    assert meter.unit == "B" and meter.total == os.path.getsize(gz)
    docs = meter.documents()
    for _ in range(len(texts) * 15):
        next(docs)
    assert 0 < meter.done() < meter.total  # the position of the open file, in compressed bytes
    list(docs)
    assert meter.done() <= meter.total and meter.documents_read == len(texts) * 30

    lines = io.StringIO()
    monkeypatch.setattr(sys, "stderr", lines)  # not a terminal: plain lines, here one per update
    progress = pt.Progress(pt.InputMeter(resolve_source(path)), interval=0.0)
    monkeypatch.setattr(pt, "_JOB_CHARS", 2000)
    monkeypatch.setattr(pt, "InputMeter", lambda src: progress.meter)
    monkeypatch.setattr(pt, "Progress", lambda meter, max_tokens: progress)
    pt.pretokenize(path, str(tmp_path / "p"), tokenizer=tok, seq_len=SEQ, progress=True)
    printed = lines.getvalue().splitlines()
    assert len(printed) > 3 and all(line.startswith("pretokenize: ") for line in printed)
    assert "tokens/s" in printed[-1] and "% of" in printed[-1] and "eta " in printed[-1]

    monkeypatch.undo()
    capped = pt.Progress(None, max_tokens=1000, interval=1e9)
    capped.update(250)
    assert capped.unit == "tok" and "25.0% of 1.0ktok" in capped.line()


@pytest.mark.parametrize("streaming", [False, True])
def test_a_hub_dataset_pretokenizes_in_parallel_with_its_rows_as_the_progress_total(tmp_path, corpus, tok,
                                                                                    monkeypatch, streaming):
    import datasets

    from relora_ds.data import sources

    _, texts = corpus
    table = datasets.Dataset.from_dict({"text": texts})
    monkeypatch.setattr(sources, "open_hub_dataset", lambda name, config, split, streaming_:
                        table.to_iterable_dataset(num_shards=3) if streaming_ else table)
    meter = pt.InputMeter(resolve_source("someone/corpus", streaming=streaming))
    assert meter.unit == "rows" and meter.total == (None if streaming else len(texts))
    manifest = pt.pretokenize("someone/corpus", str(tmp_path / "hub"), tokenizer=tok, seq_len=SEQ, num_proc=2,
                              streaming=streaming, progress=True)
    assert manifest["num_documents"] == len(texts)
    assert np.array_equal(_all_rows(str(tmp_path / "hub"), tok, SEQ), _old_path(tok, texts))
