"""sources.py: every local format reads the same documents; every bad input is a one-line DataError."""

import gzip
import json
import os

import pytest

from relora_ds.data import DataError
from relora_ds.data.sources import SOTU_DIR, resolve_source

DOCS = ["First document.\nTwo lines.", "Second: ünïcode ok", "third"]


def _write_jsonl(path, records, compress=False):
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)
    return str(path)


def _docs(source, **kw):
    return list(resolve_source(source, **kw).documents())


def _one_line_error(match, fn, *args, **kw):
    with pytest.raises(DataError, match=match) as info:
        fn(*args, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_local_formats_read_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"id": i, "text": t} for i, t in enumerate(DOCS)] + [{"id": 9, "text": ""}, {"id": 10, "text": None}]
    jsonl = _write_jsonl(tmp_path / "a.jsonl", records)
    jsonl_gz = _write_jsonl(tmp_path / "a.jsonl.gz", records, compress=True)
    (tmp_path / "arr.json").write_text(json.dumps(records))
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "a.parquet")
    assert _docs(jsonl) == DOCS  # empty and null texts are skipped
    assert _docs(jsonl_gz) == DOCS
    assert _docs(str(tmp_path / "arr.json")) == DOCS
    assert _docs(str(tmp_path / "a.parquet"), text_column="body") == DOCS
    (tmp_path / "t.txt").write_text(DOCS[0])
    assert _docs(str(tmp_path / "t.txt")) == [DOCS[0]]  # a text file is one document
    (tmp_path / "data.weird").write_text(DOCS[1])
    assert _docs(str(tmp_path / "data.weird"), format="text") == [DOCS[1]]


def test_directories_globs_and_split_prefixes(tmp_path):
    _write_jsonl(tmp_path / "train-0.jsonl", [{"text": "a"}])
    _write_jsonl(tmp_path / "train-1.jsonl", [{"text": "b"}])
    _write_jsonl(tmp_path / "validation.jsonl", [{"text": "v"}])
    (tmp_path / "notes.md").write_text("ignored: unknown extension")
    assert _docs(str(tmp_path)) == ["a", "b"]
    assert _docs(str(tmp_path), split="validation") == ["v"]
    assert _docs(str(tmp_path / "*.jsonl")) == ["a", "b", "v"]


def test_sotu_and_hub_and_pretokenized_resolution(tmp_path):
    src = resolve_source("sotu", split="validation")
    assert src.kind == "files" and src.files == [os.path.join(SOTU_DIR, "validation.jsonl.gz")]
    first = next(src.documents())
    assert len(first) > 1000
    assert resolve_source("someone/some-dataset").kind == "hub"
    assert resolve_source("wikitext", format="hub", hub_config="wikitext-2-raw-v1").hub_config == "wikitext-2-raw-v1"
    (tmp_path / "manifest.json").write_text("{}")
    assert resolve_source(str(tmp_path)).kind == "pretokenized"


def test_missing_empty_and_unknown_inputs(tmp_path):
    _one_line_error(r"nope\.jsonl: file not found", _docs, str(tmp_path / "nope.jsonl"))
    _one_line_error("pattern matches no files", _docs, str(tmp_path / "*.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    _one_line_error(r"empty\.jsonl: file is empty; expected one JSON object per line", _docs,
                    str(tmp_path / "empty.jsonl"))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    _one_line_error(r"blank\.jsonl: holds no text", _docs, str(tmp_path / "blank.jsonl"))
    _one_line_error(r"data\.format 'csv': unknown format; expected one of auto, json, text, parquet, hub, "
                    r"pretokenized", resolve_source, "sotu", format="csv")
    (tmp_path / "x.csv").write_text("a,b")
    _one_line_error(r"x\.csv: unknown file type", resolve_source, str(tmp_path / "x.csv"))
    _one_line_error(r"the shipped 'sotu' corpus has splits train, validation", resolve_source, "sotu", split="test")
    (tmp_path / "d").mkdir()
    _one_line_error("directory holds no .jsonl", resolve_source, str(tmp_path / "d"))
    _one_line_error("not a pretokenized dataset", resolve_source, str(tmp_path / "d"), format="pretokenized")


def test_corrupt_files_and_missing_text_column(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken\n')
    _one_line_error(r"bad\.jsonl line 2: not valid JSON", _docs, str(bad))
    fake_gz = tmp_path / "fake.jsonl.gz"
    fake_gz.write_bytes(b"this is not gzip data at all")
    _one_line_error(r"fake\.jsonl\.gz: cannot be read as gzip-compressed json", _docs, str(fake_gz))
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:60])
    _one_line_error(r"cut\.jsonl\.gz: cannot be read as gzip-compressed json", _docs, str(truncated))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 garbage")
    _one_line_error(r"bad\.parquet: not a valid parquet file", _docs, str(tmp_path / "bad.parquet"))
    cols = _write_jsonl(tmp_path / "cols.jsonl", [{"id": 1, "body": "x"}])
    msg = _one_line_error(r"cols\.jsonl line 1: no 'text' field \(fields: id, body\); set data\.text_column",
                          _docs, cols)
    assert "cols.jsonl" in msg
    _one_line_error(r"field 'id' is int, expected a string", _docs, cols, text_column="id")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    _one_line_error(r"c\.parquet: no column 'text' \(columns: body\)", _docs, str(tmp_path / "c.parquet"))


def test_hub_name_offline_fails_with_one_clear_line(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # never touch the network in tests
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _one_line_error(r"data\.source 'someone/no-such-dataset': not a local file or directory, and the datasets hub "
                    r"could not provide it \(offline mode is on", _docs, "someone/no-such-dataset")


def test_not_utf8_names_the_file_and_line(tmp_path):
    good = json.dumps({"text": "fine"}).encode()
    (tmp_path / "l.jsonl").write_bytes(good + b"\n" + good + b"\n" + b'{"text": "caf\xe9"}\n')
    _one_line_error(r"l\.jsonl line 3: not UTF-8 text \(.*invalid continuation byte.*\); expected UTF-8 JSON lines$",
                    _docs, str(tmp_path / "l.jsonl"))
    with gzip.open(tmp_path / "l.jsonl.gz", "wb") as f:
        f.write(good + b"\n\xff\xfe\n")
    _one_line_error(r"l\.jsonl\.gz line 2: not UTF-8 text", _docs, str(tmp_path / "l.jsonl.gz"))
    (tmp_path / "t.txt").write_bytes(b"first line\nsecond \xff line\n")
    _one_line_error(r"t\.txt line 2: not UTF-8 text \(.*\); expected UTF-8$", _docs, str(tmp_path / "t.txt"))
    (tmp_path / "a.json").write_bytes(b'[{"text": "a"},\n {"text": "\xe9"}]')
    _one_line_error(r"a\.json line 2: not UTF-8 text", _docs, str(tmp_path / "a.json"))


def test_bad_records_of_every_kind_and_empty_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    _one_line_error(r"ints\.parquet row 0: column 'text' holds int, expected a string$", _docs,
                    str(tmp_path / "ints.parquet"))
    _write_jsonl(tmp_path / "list.jsonl", [["not", "an", "object"]])
    _one_line_error(r"list\.jsonl line 1: expected a JSON object with a 'text' field, got list$", _docs,
                    str(tmp_path / "list.jsonl"))
    (tmp_path / "empty.json").write_text("[]")
    _one_line_error(r"empty\.json: holds no text; expected one JSON object per line with a text field$", _docs,
                    str(tmp_path / "empty.json"))
    (tmp_path / "broken.json").write_text('[{"text": "a"},')
    _one_line_error(r"broken\.json: not valid JSON \(Expecting value at line 1\)$", _docs,
                    str(tmp_path / "broken.json"))
    (tmp_path / "blank.txt").write_text("   \n")
    _one_line_error(r"blank\.txt: holds no text; expected UTF-8 text$", _docs, str(tmp_path / "blank.txt"))


def _mixed_bad_source(tmp_path):
    """A directory of 5 good documents and 8 bad records (5 lines, an empty file, a parquet file of 2 rows
    without the column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "mixed"
    d.mkdir()
    lines = [json.dumps({"text": "good one"}).encode(), b'{"text": "broken', b'{"text": "caf\xe9"}',
             json.dumps({"body": "no text field"}).encode(), json.dumps({"text": 7}).encode(),
             json.dumps({"text": "good two"}).encode(), b"[1, 2]", json.dumps({"text": "good three"}).encode()]
    (d / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (d / "b.jsonl").write_text("")
    pq.write_table(pa.table({"body": ["x", "y"]}), d / "c.parquet")
    _write_jsonl(d / "d.jsonl", [{"text": "good four"}, {"text": "good five"}])
    return str(d)


def test_skip_bad_records_counts_them_and_logs_once(tmp_path, capsys):
    source = _mixed_bad_source(tmp_path)
    _one_line_error(r"a\.jsonl line 2: not valid JSON \(Unterminated string starting at\); expected one JSON "
                    r"object per line$", _docs, source)
    assert _docs(source, skip_bad_records=True) == ["good one", "good two", "good three", "good four", "good five"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].startswith("warning: data: skipping bad record: ") and "a.jsonl line 2: not valid JSON" in err[0]
    assert err[1].startswith(f"warning: data: skipped 8 bad records in data.source {source!r} "
                             f"(data.skip_bad_records); the first: ")
    src = resolve_source(source, skip_bad_records=True)
    assert src.fingerprint() != resolve_source(source).fingerprint()  # another packed cache


def test_skip_bad_records_in_a_sharded_stream_counts_each_record_once(tmp_path, capsys):
    from relora_ds.data import stream
    from relora_ds.data.sources import BadRecords

    src = resolve_source(_mixed_bad_source(tmp_path), streaming=True, skip_bad_records=True)
    counts, texts = [], []
    for k in range(3):  # 4 files, 3 readers: split by records; every reader sees the file-level problems
        bad = BadRecords(True)
        texts += [t for group, _ in stream.share_records(src, k, 3, None, bad) for t in group]
        counts.append(bad.count)
    assert sorted(texts) == ["good five", "good four", "good one", "good three", "good two"]
    assert sum(counts) == 8
    capsys.readouterr()
