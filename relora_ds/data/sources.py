"""Where documents come from: the shipped corpus, local files, or a `datasets` hub name.

`resolve_source(...)` turns the data.source string into a `Source`; `Source.documents()` yields the
text of each document (empty and null texts are skipped). Every bad input is a one-line DataError.

Local formats (format "auto" picks by extension, .gz allowed on json/jsonl/txt):
  json     .jsonl: one JSON object per line; .json: the same, or one JSON array of objects
  text     .txt: the whole file is one document
  parquet  .parquet: one document per row of the text column
A directory means the supported files directly inside it; if some of their names start with the split
name (train.jsonl.gz, validation.jsonl.gz) only those are used. A directory holding manifest.json is a
pretokenized dataset. Anything else that is not a local path (no extension, not found) is a hub name.
"""

import glob
import gzip
import hashlib
import io
import json
import os
import zlib
from collections.abc import Iterator
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
    _hub_dataset: object = field(default=None, repr=False)

    def documents(self) -> Iterator[str]:
        if self.kind == "files":
            for path in self.files:
                yield from iter_file_documents(path, self.format, self.text_column)
        elif self.kind == "hub":
            yield from self._hub_documents()
        else:
            raise DataError(f"data.source {self.name!r}: a pretokenized dataset has no raw documents")

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
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]

    def hub_dataset(self):
        if self._hub_dataset is None:
            self._hub_dataset = open_hub_dataset(self.name, self.hub_config, self.split, self.streaming)
        return self._hub_dataset

    def _hub_documents(self) -> Iterator[str]:
        ds = self.hub_dataset()
        columns = getattr(ds, "column_names", None)
        if columns is not None and self.text_column not in columns:
            raise DataError(f"data.text_column {self.text_column!r}: not a column of hub dataset {self.name!r} "
                            f"(columns: {', '.join(columns)})")
        if self.streaming:
            rows = iter(ds)
        else:
            rows = ({self.text_column: t} for batch in ds.iter(batch_size=1000) for t in batch[self.text_column])
        for i, row in enumerate(rows):
            text = _text_of(row, self.text_column, f"hub dataset {self.name!r} row {i}")
            if text:
                yield text


_MISSING = object()


def resolve_source(source: str, *, format: str = "auto", split: str = "train", text_column: str = "text",
                   hub_config: str | None = None, streaming: bool = False) -> Source:
    """Turn data.source (+ format/split) into a Source; raises DataError for anything unusable."""
    if format not in FORMATS:
        raise DataError(f"data.format {format!r}: unknown format; expected one of {', '.join(FORMATS)}")
    if not isinstance(source, str) or not source:
        raise DataError("data.source: empty; expected 'sotu', a local file/dir/glob, a pretokenized dir or a hub name")
    common = dict(text_column=text_column, split=split, hub_config=hub_config, streaming=streaming)
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

def iter_file_documents(path: str, format: str = "auto", text_column: str = "text") -> Iterator[str]:
    """Yield the non-empty documents of one local file; DataError names the file (and line) on bad input."""
    fmt = format if format != "auto" else file_format(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty; expected {_EXPECTED[fmt]}")
    if fmt == "parquet":
        yield from _parquet_documents(path, text_column)
        return
    count = 0
    try:
        with _open_text(path) as f:
            if fmt == "text":
                text = f.read()
                if text.strip():
                    count += 1
                    yield text
            elif fmt == "json":
                for text in _json_documents(f, path, text_column):
                    count += 1
                    yield text
            else:
                raise DataError(f"data.format {fmt!r}: unknown format for {path}; expected json, text or parquet")
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot be read as {'gzip-compressed ' if path.endswith('.gz') else ''}"
                        f"{fmt} ({_one_line(e)})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({_one_line(e)})") from None
    if count == 0:
        raise DataError(f"{path}: holds no text; expected {_EXPECTED[fmt]}")


_EXPECTED = {"json": "one JSON object per line with a text field", "text": "UTF-8 text",
             "parquet": "a parquet table with a text column"}


def _open_text(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _json_documents(f, path: str, text_column: str) -> Iterator[str]:
    first = f.read(1)
    while first and first.isspace():
        first = f.read(1)
    if first == "[":  # one JSON array of objects
        try:
            records = json.loads(first + f.read())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        for i, record in enumerate(records):
            text = _text_of(record, text_column, f"{path} item {i}")
            if text:
                yield text
        return
    for lineno, line in enumerate(_prepend(first, f), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {lineno}: not valid JSON ({e.msg}); expected one JSON object per line") \
                from None
        text = _text_of(record, text_column, f"{path} line {lineno}")
        if text:
            yield text


def _prepend(first: str, f) -> Iterator[str]:
    line = first + f.readline()
    while line:
        yield line
        line = f.readline()


def _text_of(record, text_column: str, where: str) -> str | None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a {text_column!r} field, got {type(record).__name__}")
    text = record.get(text_column, _MISSING)
    if text is _MISSING:
        fields = ", ".join(map(str, record)) or "none"
        raise DataError(f"{where}: no {text_column!r} field (fields: {fields}); set data.text_column")
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: field {text_column!r} is {type(text).__name__}, expected a string")
    return text


def _parquet_documents(path: str, text_column: str) -> Iterator[str]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a valid parquet file ({_one_line(e)})") from None
    names = pf.schema_arrow.names
    if text_column not in names:
        raise DataError(f"{path}: no column {text_column!r} (columns: {', '.join(names)}); set data.text_column")
    count = 0
    try:
        for batch in pf.iter_batches(columns=[text_column], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text is not None and not isinstance(text, str):
                    raise DataError(f"{path}: column {text_column!r} holds {type(text).__name__}, expected strings")
                if text:
                    count += 1
                    yield text
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a valid parquet file ({_one_line(e)})") from None
    if count == 0:
        raise DataError(f"{path}: holds no text; expected {_EXPECTED['parquet']}")


# --- hub ----------------------------------------------------------------------------------------------------

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
