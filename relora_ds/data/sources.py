"""Where documents come from: the shipped corpus, local files, or a `datasets` hub name.

`resolve_source(...)` turns the data.source string into a `Source`; `Source.documents()` yields the
text of each document (empty and null texts are skipped). Every bad input is a one-line DataError naming the
file and the line (lines count from 1) or the item/row (count from 0).

Local formats (format "auto" picks by extension, .gz allowed on json/jsonl/txt):
  json     .jsonl: one JSON object per line; .json: the same, or one JSON array of objects
  text     .txt: the whole file is one document
  parquet  .parquet: one document per row of the text column
A directory means the supported files directly inside it; if some of their names start with the split
name (train.jsonl.gz, validation.jsonl.gz) only those are used. A directory holding manifest.json is a
pretokenized dataset. Anything else that is not a local path (no extension, not found) is a hub name.

Records: a file is read as a sequence of records (a line of a json-lines file, blank lines included; an item
of a .json array; a row of a parquet file; a whole .txt file), each giving one document or nothing (an empty or
null text). `file_records` reads one file from a `Cursor` (record index, byte offset) and can pass over records
owned by another reader without parsing them; the sharded stream (stream.py) builds on it.

Bad records (a line that is not UTF-8 or not JSON, a record without the text field or with a non-string one,
an empty or unreadable file, a parquet file without the column): a one-line DataError; with
data.skip_bad_records (`Source.skip_bad_records`) they are counted and skipped instead, the first one logged
when it happens and the count at the end of each pass over the data (`BadRecords`).
"""

import glob
import gzip
import hashlib
import json
import os
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from relora_ds.data import SAMPLE_DIR, DataError

FORMATS = ("auto", "json", "text", "parquet", "hub", "pretokenized")
SOTU_DIR = os.path.join(SAMPLE_DIR, "sotu")
SOTU_SPLITS = {"train": "train.jsonl.gz", "validation": "validation.jsonl.gz"}
_EXTENSIONS = {".jsonl": "json", ".json": "json", ".txt": "text", ".text": "text", ".parquet": "parquet"}


def file_format(path: str) -> str | None:
    """'json', 'text' or 'parquet' from the file name (a trailing .gz is looked through); None if unknown."""
    name = path[:-3] if path.endswith(".gz") else path
    return _EXTENSIONS.get(os.path.splitext(name)[1].lower())


def is_pretokenized_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "manifest.json"))


def _looks_local(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or os.path.exists(source) or glob.has_magic(source)
            or file_format(source) is not None)


class BadRecords:
    """The policy for bad records: raise their one-line DataError, or (skip=True) count and skip them.

    `bad(message)` raises unless skipping; when skipping it counts `n` records (only where `owned`: a file-level
    problem that several readers of a sharded stream all see is counted by one of them) and logs the first one.
    `end_pass(what)` logs the count of the pass once (nothing when there was none).
    """

    def __init__(self, skip: bool = False, count: int = 0):
        self.skip, self.count, self.first = skip, count, None
        self._pass_start = count

    def __call__(self, message: str, n: int = 1, owned: bool = True) -> None:
        if not self.skip:
            raise DataError(message)
        if not owned or n <= 0:
            return
        if self.first is None:
            self.first = message
            print(f"warning: data: skipping bad record: {message} (data.skip_bad_records: the count is logged "
                  f"at the end of the pass and kept in the checkpoint's data state)", file=sys.stderr, flush=True)
        self.count += n

    def end_pass(self, what: str) -> None:
        skipped = self.count - self._pass_start
        if skipped:
            print(f"warning: data: skipped {skipped} bad records in {what} (data.skip_bad_records); "
                  f"the first: {self.first}", file=sys.stderr, flush=True)
        self._pass_start = self.count


@dataclass
class Source:
    """A resolved data source: kind is 'files', 'hub' or 'pretokenized'."""

    kind: str
    name: str
    files: list[str] = field(default_factory=list)
    format: str = "auto"
    text_column: str = "text"
    split: str = "train"
    hub_config: str | None = None
    streaming: bool = False
    skip_bad_records: bool = False
    _hub_dataset: object = field(default=None, repr=False)

    def documents(self) -> Iterator[str]:
        """Every non-empty document, in order (one pass; the map-style cache and `pretokenize` read this)."""
        bad = BadRecords(self.skip_bad_records)
        if self.kind == "files":
            for path in self.files:
                for text in file_records(path, self.format, self.text_column, bad, Cursor()):
                    if text:
                        yield text
        elif self.kind == "hub":
            for texts, _ in hub_records(self, bad):
                yield from texts
        else:
            raise DataError(f"data.source {self.name!r}: a pretokenized dataset has no raw documents")
        bad.end_pass(f"data.source {self.name!r}")

    def describe(self) -> dict:
        """What a manifest records about where its tokens came from."""
        return {"source": self.name, "format": self.format, "split": self.split, "text_column": self.text_column,
                "hub_config": self.hub_config, "files": [os.path.abspath(f) for f in self.files]}

    def fingerprint(self) -> str:
        """Changes when the content (or how it is read) changes; keys the in-process packing cache."""
        parts = [self.kind, self.format, self.text_column, self.split, str(self.hub_config)]
        if self.kind == "files":
            for path in self.files:
                st = os.stat(path)
                parts += [os.path.abspath(path), str(st.st_size), str(st.st_mtime_ns)]
        elif self.kind == "hub":
            parts += [self.name, str(getattr(self.hub_dataset(), "_fingerprint", ""))]
        if self.skip_bad_records:  # what is kept differs; the default keeps the keys it always had
            parts.append("skip_bad_records")
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]

    def identity(self) -> str:
        """What a stream position is a position in (the files, or the hub name/config/split); not their content."""
        parts = [self.kind, self.name, self.format, self.text_column, self.split, str(self.hub_config)]
        parts += [os.path.abspath(f) for f in self.files]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]

    def hub_dataset(self):
        if self._hub_dataset is None:
            self._hub_dataset = open_hub_dataset(self.name, self.hub_config, self.split, self.streaming)
        return self._hub_dataset


_MISSING = object()


def resolve_source(source: str, *, format: str = "auto", split: str = "train", text_column: str = "text",
                   hub_config: str | None = None, streaming: bool = False, skip_bad_records: bool = False) -> Source:
    """Turn data.source (+ format/split) into a Source; raises DataError for anything unusable."""
    if format not in FORMATS:
        raise DataError(f"data.format {format!r}: unknown format; expected one of {', '.join(FORMATS)}")
    if not isinstance(source, str) or not source:
        raise DataError("data.source: empty; expected 'sotu', a local file/dir/glob, a pretokenized dir or a hub name")
    common = dict(text_column=text_column, split=split, hub_config=hub_config, streaming=streaming,
                  skip_bad_records=skip_bad_records)
    if source == "sotu" and format in ("auto", "json"):
        if split not in SOTU_SPLITS:
            raise DataError(f"data.split {split!r}: the shipped 'sotu' corpus has splits {', '.join(SOTU_SPLITS)}")
        return Source("files", source, [os.path.join(SOTU_DIR, SOTU_SPLITS[split])], format="json", **common)
    if format == "hub" or (format == "auto" and not _looks_local(source)):
        return Source("hub", source, format="hub", **common)
    path = os.path.expanduser(source)
    if format == "pretokenized" or (format == "auto" and is_pretokenized_dir(path)):
        if not is_pretokenized_dir(path):
            raise DataError(f"data.source {source!r}: not a pretokenized dataset (expected a directory holding "
                            f"manifest.json, written by `relora-ds pretokenize`)")
        return Source("pretokenized", path, format="pretokenized", **common)
    files = _local_files(path, split, source)
    for f in files:
        if (format if format != "auto" else file_format(f)) is None:
            raise DataError(f"{f}: unknown file type; expected .jsonl/.json/.txt/.parquet (optionally .gz) "
                            f"or set data.format to json, text or parquet")
    return Source("files", source, files, format=format, **common)


def _local_files(path: str, split: str, source: str) -> list[str]:
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"data.source {source!r}: the pattern matches no files")
        return files
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if os.path.isfile(os.path.join(path, f)) and file_format(f) is not None)
        if not files:
            raise DataError(f"{path}: directory holds no .jsonl/.json/.txt/.parquet files (optionally .gz)")
        of_split = [f for f in files if os.path.basename(f).startswith(split)]
        return of_split or files
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found (data.source); expected 'sotu', a local file/dir/glob, "
                        f"a pretokenized dir or a hub name")
    return [path]


# --- local files ------------------------------------------------------------------------------------------

@dataclass
class Cursor:
    """Where reading one file stands: records read so far (= the next record's index) and, for json lines, the
    byte offset after them (in the decompressed stream of a .gz file)."""

    record: int = 0
    offset: int = 0


def iter_file_documents(path: str, format: str = "auto", text_column: str = "text",
                        skip_bad_records: bool = False) -> Iterator[str]:
    """Yield the non-empty documents of one local file; DataError names the file (and line) on bad input."""
    bad = BadRecords(skip_bad_records)
    for text in file_records(path, format, text_column, bad, Cursor()):
        if text:
            yield text
    bad.end_pass(path)


def file_records(path: str, format: str, text_column: str, bad: BadRecords, cursor: Cursor,
                 owned: Callable[[int], bool] | None = None) -> Iterator[str | None]:
    """The text (None: empty, null or skipped as bad) of each record of one file from `cursor`, which it advances.

    `owned(record index)`: records it rejects are passed over without being parsed or yielded (a reader of a
    sharded stream reads only its own). When the cursor stops, it holds the file's record count. With every
    record owned and reading from the start, a file without any text is an error ("holds no text").
    """
    fmt = format if format != "auto" else file_format(path)
    if fmt not in _EXPECTED:
        raise DataError(f"data.format {fmt!r}: unknown format for {path}; expected json, text or parquet")
    mine = owned or _everything
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        bad(f"{path}: file is empty; expected {_EXPECTED[fmt]}", owned=mine(0))
        return
    from_start, skipped = cursor.record == 0, bad.count
    texts = 0
    for text in _READERS[fmt](path, text_column, bad, cursor, mine):
        texts += bool(text)
        yield text
    if owned is None and from_start and texts == 0 and bad.count == skipped:  # (bad records: counted already)
        bad(f"{path}: holds no text; expected {_EXPECTED[fmt]}")


def _everything(_record: int) -> bool:
    return True


_EXPECTED = {"json": "one JSON object per line with a text field", "text": "UTF-8 text",
             "parquet": "a parquet table with a text column"}


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _unreadable(path: str, fmt: str, cursor: Cursor, e: BaseException) -> str:
    where = f" after line {cursor.record}" if fmt == "json" and cursor.record else ""
    return (f"{path}: cannot be read as {'gzip-compressed ' if path.endswith('.gz') else ''}{fmt}{where} "
            f"({_one_line(e)})")


def _json_records(path: str, text_column: str, bad: BadRecords, cursor: Cursor, mine) -> Iterator[str | None]:
    try:
        with _open_binary(path) as f:
            if not path.removesuffix(".gz").endswith(".jsonl") and _starts_with_bracket(f):  # a JSON array: whole
                yield from _json_array(f, path, text_column, bad, cursor, mine)
                return
            f.seek(cursor.offset)
            for line in f:
                cursor.record += 1
                cursor.offset += len(line)
                if mine(cursor.record - 1):
                    yield _json_line(line, cursor.record, path, text_column, bad)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        bad(_unreadable(path, "json", cursor, e), owned=mine(cursor.record))


def _starts_with_bracket(f) -> bool:
    while True:
        b = f.read(1)
        if not b or not b.isspace():
            f.seek(0)
            return b == b"["


def _json_line(line: bytes, lineno: int, path: str, text_column: str, bad: BadRecords) -> str | None:
    if not line.strip():
        return None
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return bad(f"{path} line {lineno}: not UTF-8 text ({_one_line(e)}); expected UTF-8 JSON lines")
    try:
        record = json.loads(decoded.rstrip("\r\n"))  # a string cut by the line end: "unterminated", not "control"
    except json.JSONDecodeError as e:
        return bad(f"{path} line {lineno}: not valid JSON ({e.msg}); expected one JSON object per line")
    return _text_of(record, text_column, f"{path} line {lineno}", bad)


def _json_array(f, path: str, text_column: str, bad: BadRecords, cursor: Cursor, mine) -> Iterator[str | None]:
    data = f.read()
    try:
        records = json.loads(_decode(data, path))
    except json.JSONDecodeError as e:
        return bad(f"{path}: not valid JSON ({e.msg} at line {e.lineno})", owned=mine(0))
    except DataError as e:
        return bad(str(e), owned=mine(0))
    start, cursor.record = cursor.record, len(records)
    for i in range(start, len(records)):
        if mine(i):
            cursor.record = i + 1
            yield _text_of(records[i], text_column, f"{path} item {i}", bad)
    cursor.record = len(records)


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path} line {line}: not UTF-8 text ({_one_line(e)}); expected UTF-8") from None


def _text_records(path: str, text_column: str, bad: BadRecords, cursor: Cursor, mine) -> Iterator[str | None]:
    if cursor.record > 0:
        return
    cursor.record = 1
    if not mine(0):
        return
    try:
        with _open_binary(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        return bad(_unreadable(path, "text", cursor, e))
    try:
        text = _decode(data, path)
    except DataError as e:
        return bad(str(e))
    yield text if text.strip() else None


def _text_of(record, text_column: str, where: str, bad: BadRecords) -> str | None:
    if not isinstance(record, dict):
        return bad(f"{where}: expected a JSON object with a {text_column!r} field, got {type(record).__name__}")
    text = record.get(text_column, _MISSING)
    if text is _MISSING:
        fields = ", ".join(map(str, record)) or "none"
        return bad(f"{where}: no {text_column!r} field (fields: {fields}); set data.text_column")
    if text is not None and not isinstance(text, str):
        return bad(f"{where}: field {text_column!r} is {type(text).__name__}, expected a string")
    return text


def _parquet_records(path: str, text_column: str, bad: BadRecords, cursor: Cursor, mine) -> Iterator[str | None]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        return bad(f"{path}: not a valid parquet file ({_one_line(e)})", owned=mine(0))
    meta = pf.metadata
    names = pf.schema_arrow.names
    if text_column not in names:
        start, cursor.record = cursor.record, meta.num_rows
        return bad(f"{path}: no column {text_column!r} (columns: {', '.join(names)}); set data.text_column",
                   n=sum(mine(r) for r in range(start, meta.num_rows)))
    first_row, g = 0, 0
    while g < meta.num_row_groups and first_row + meta.row_group(g).num_rows <= cursor.record:
        first_row += meta.row_group(g).num_rows  # whole row groups before the cursor are not read
        g += 1
    groups = list(range(g, meta.num_row_groups))
    if not groups:
        return
    row = first_row
    try:
        for batch in pf.iter_batches(columns=[text_column], batch_size=1024, row_groups=groups):
            for text in batch.column(0).to_pylist():
                row += 1
                if row <= cursor.record:
                    continue
                cursor.record = row
                if not mine(row - 1):
                    continue
                if text is not None and not isinstance(text, str):
                    yield bad(f"{path} row {row - 1}: column {text_column!r} holds {type(text).__name__}, "
                              f"expected a string")
                else:
                    yield text
    except (pyarrow.ArrowException, OSError) as e:
        bad(f"{path}: not a valid parquet file ({_one_line(e)})", owned=mine(cursor.record))
        cursor.record = meta.num_rows


_READERS = {"json": _json_records, "text": _text_records, "parquet": _parquet_records}


# --- hub ----------------------------------------------------------------------------------------------------

HUB_BATCH = 64  # examples per read from a hub dataset; a stream position is taken after each


def hub_records(src: Source, bad: BadRecords, dataset=None, *, first_row: int = 0,
                where: str = "") -> Iterator[tuple[list[str], dict]]:
    """(texts, position after them) per batch of `dataset` (default: the source's own hub dataset).

    The position is {"hf": dataset.state_dict(), "row": rows read} — a streamed dataset's state (load it
    with load_state_dict to continue after the batch); rows count from `first_row` and name bad rows.
    """
    ds = src.hub_dataset() if dataset is None else dataset
    name, column = src.name, src.text_column
    columns = getattr(ds, "column_names", None)
    if columns is not None and column not in columns:
        raise DataError(f"data.text_column {column!r}: not a column of hub dataset {name!r} "
                        f"(columns: {', '.join(columns)})")
    streamed = hasattr(ds, "state_dict")
    row = first_row
    for batch in ds.iter(batch_size=HUB_BATCH):
        state = ds.state_dict() if streamed else None
        values = batch.get(column)
        n = len(next(iter(batch.values()))) if batch else 0
        texts = []
        for i in range(n):
            here = f"hub dataset {name!r} row {row + i}{where}"
            if values is None:
                bad(f"{here}: no {column!r} field (fields: {', '.join(batch)}); set data.text_column")
                continue
            text = values[i]
            if text is not None and not isinstance(text, str):
                bad(f"{here}: field {column!r} is {type(text).__name__}, expected a string")
            elif text:
                texts.append(text)
        row += n
        yield texts, {"hf": state, "row": row}


def open_hub_dataset(name: str, config: str | None, split: str, streaming: bool):
    """datasets.load_dataset(name, config, split=split); any failure → one-line DataError."""
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # offline, unknown name, unknown config/split: the library's types vary by version
        offline = datasets.config.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = " (offline mode is on: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)" if offline else ""
        raise DataError(f"data.source {name!r}: not a local file or directory, and the datasets hub could not "
                        f"provide it{hint}: {type(e).__name__}: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("…" if len(text) > 300 else "")
