"""The offline stage: tokenize + pack a source to disk, in shards, with a manifest the trainer checks.

A packed dataset directory holds
  tokens-00000.bin, tokens-00001.bin, ...
                  raw little-endian uint16 (vocab <= 65536) or uint32 token ids, each shard a whole number of
                  rows of seq_len tokens (at most --shard-size bytes); the dataset's rows are shard 0's rows,
                  then shard 1's, ...; read back as one numpy memmap per shard (loader.PackedDataset)
  manifest.json   format "relora-ds packed v2", tokenizer (name, vocab size, vocab hash, eos id), seq_len, dtype,
                  num_sequences, num_tokens, num_documents, shards [{file, num_sequences, bytes}, ...],
                  num_proc, source, seconds, created
manifest.json is written last, so a directory with a manifest is complete. The v1 layout (format
"relora-ds packed v1": one tokens.bin, no "shards") is still read: read_manifest describes it as one shard.

How it runs (write_packed): this process reads the documents in order and cuts them into jobs (~1 MiB of text);
`num_proc` tokenizer processes (spawned; with num_proc 1, this process) turn a job into one flat array of
token ids with an EOS after every document; the results are taken back in job order, concatenated and cut
into seq_len windows, which go straight to the current shard file. At most 2 x num_proc jobs are in flight,
so memory is bounded whatever the corpus size, and the output is the same token ids for every num_proc: the
EOS-separated concatenation of the documents in source order (packing.pack_documents), exactly what the
single-process path always wrote. Each worker tokenizes on one thread (TOKENIZERS_PARALLELISM=false); with
num_proc 1 the Rust tokenizer may use its own threads unless TOKENIZERS_PARALLELISM=false is set. Workers are
spawned, not forked (the caller may hold threads: torch, the tokenizer's pool): like any multiprocessing spawn
they import the program's main module, so a script calling this with num_proc > 1 needs the usual
`if __name__ == "__main__":` guard, and starts faster when its top level imports little.
"""

import contextlib
import json
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

import relora_ds.progress
from relora_ds.files import parse_byte_size
from relora_ds.data import DataError
from relora_ds.data.sources import resolve_source
from relora_ds.data.tokenize import Encoder, vocab_hash
from relora_ds.files import atomic_write
from relora_ds.progress import PLAIN_INTERVAL, si

FORMAT = "relora-ds packed v2"
FORMAT_V1 = "relora-ds packed v1"  # one tokens.bin; still read
TOKENS_FILE = "tokens.bin"  # the v1 layout's single file
MANIFEST_FILE = "manifest.json"
SHARD_PATTERN = "tokens-{:05d}.bin"
DEFAULT_SHARD_SIZE = "1GiB"
_JOB_CHARS = 1 << 18  # text per tokenizer job (256 KiB: ~40 jobs per 10 MB, enough to balance the workers)
_JOB_DOCS = 4096


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def parse_shard_size(text) -> int:
    """Bytes in "1GiB", "500MB", "64KiB" or a plain number of bytes; a one-line DataError otherwise."""
    size = parse_byte_size(text)
    if size < 1:
        raise DataError(f"--shard-size {text!r}: not a size; expected a positive number of bytes with an optional "
                        f"unit, such as 1GiB, 500MB or 64KiB")
    return size


def pretokenize(source: str, out_dir: str, *, tokenizer, seq_len: int, format: str = "auto",
                text_column: str = "text", split: str = "train", hub_config: str | None = None,
                streaming: bool = False, max_tokens: int | None = None, num_proc: int = 1,
                shard_size: int | str = DEFAULT_SHARD_SIZE, progress: bool = False,
                skip_bad_records: bool = False) -> dict:
    """Tokenize + pack `source` into `out_dir` (token shards + manifest.json); return the manifest.
    `progress`: draw a progress bar (tokens/s, ETA from the input read so far) on stderr. `skip_bad_records`:
    count and log bad records (sources.py) instead of stopping at the first."""
    check_num_proc(num_proc)
    shard_bytes = parse_shard_size(shard_size)
    src = resolve_source(source, format=format, split=split, text_column=text_column, hub_config=hub_config,
                         streaming=streaming, skip_bad_records=skip_bad_records)
    if src.kind == "pretokenized":
        raise DataError(f"data.source {source!r}: is already a pretokenized dataset (it holds manifest.json)")
    meter = InputMeter(src) if progress else None
    documents = meter.documents() if meter else src.documents()
    return write_packed(documents, out_dir, tokenizer=tokenizer, seq_len=seq_len, source=src.describe(),
                        max_tokens=max_tokens, num_proc=num_proc, shard_bytes=shard_bytes,
                        progress=Progress(meter, max_tokens) if meter else None)


def check_num_proc(num_proc) -> None:
    if not isinstance(num_proc, int) or isinstance(num_proc, bool) or num_proc < 1:
        raise DataError(f"--num-proc {num_proc!r}: must be a whole number >= 1 (tokenizer processes; 1 tokenizes "
                        f"in this process)")


def write_packed(documents: Iterable[str], out_dir: str, *, tokenizer, seq_len: int, source: dict,
                 max_tokens: int | None = None, num_proc: int = 1, shard_bytes: int | None = None,
                 progress: "Progress | None" = None) -> dict:
    """Tokenize, pack and write `documents` as shards; the manifest goes last. Returns the manifest."""
    check_num_proc(num_proc)
    if seq_len < 2:
        raise DataError(f"data.seq_len {seq_len}: must be at least 2")
    if max_tokens is not None and max_tokens < seq_len:
        raise DataError(f"max_tokens {max_tokens}: must be at least one sequence (data.seq_len {seq_len})")
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    row_bytes = seq_len * np.dtype(dtype).itemsize
    shard_bytes = parse_shard_size(DEFAULT_SHARD_SIZE if shard_bytes is None else shard_bytes)
    max_sequences = None if max_tokens is None else max_tokens // seq_len
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST_FILE)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the directory is incomplete until the new manifest is written
    for name in os.listdir(out_dir):  # a previous write's token files
        if name == TOKENS_FILE or re.fullmatch(r"tokens-\d{5,}\.bin", name):
            os.remove(os.path.join(out_dir, name))

    started = time.perf_counter()
    jobs = _Jobs(documents)
    encoder_args = (tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id, dtype)
    writer = ShardWriter(out_dir, seq_len, dtype, rows_per_shard=max(1, shard_bytes // row_bytes),
                         max_rows=max_sequences)
    try:
        with contextlib.closing(encoded_jobs(jobs, encoder_args, num_proc)) as encoded:  # closing stops the pool
            for tokens in encoded:
                writer.write(tokens)
                if progress is not None:
                    progress.update(writer.num_rows * seq_len)
                if writer.full:
                    break
    finally:
        writer.close()
        if progress is not None:
            progress.close()
    if writer.num_rows == 0:
        raise DataError(f"data.source {source.get('source')!r}: {jobs.documents} documents give fewer tokens "
                        f"than one sequence of data.seq_len {seq_len}")
    manifest = {
        "format": FORMAT,
        "tokenizer": tokenizer.name_or_path,
        "vocab_size": vocab_size,
        "vocab_hash": vocab_hash(tokenizer),
        "eos_id": tokenizer.eos_token_id,
        "seq_len": seq_len,
        "dtype": dtype,
        "num_sequences": writer.num_rows,
        "num_tokens": writer.num_rows * seq_len,
        "num_documents": jobs.documents,
        "shards": writer.shards,
        "num_proc": num_proc,
        "source": source,
        "seconds": round(time.perf_counter() - started, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write(manifest_path, json.dumps(manifest, indent=2))
    return manifest


# --- tokenizing, in this process or in a pool --------------------------------------------------------------

class _Jobs:
    """Documents cut into jobs of about _JOB_CHARS characters, in order; counts the documents."""

    def __init__(self, documents: Iterable[str]):
        self._documents, self.documents = documents, 0

    def __iter__(self) -> Iterator[list[str]]:
        job, chars = [], 0
        for text in self._documents:
            job.append(text)
            chars += len(text)
            self.documents += 1
            if chars >= _JOB_CHARS or len(job) >= _JOB_DOCS:
                yield job
                job, chars = [], 0
        if job:
            yield job


_WORKER_ENCODER: Encoder | None = None


def _init_worker(*encoder_args) -> None:
    import signal

    global _WORKER_ENCODER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: num_proc processes = num_proc cores
    _WORKER_ENCODER = Encoder(*encoder_args)


def _encode_job(texts: list[str]) -> np.ndarray:
    return _WORKER_ENCODER(texts)


def encoded_jobs(jobs: Iterable[list[str]], encoder_args: tuple, num_proc: int) -> Iterator[np.ndarray]:
    """Encoder(*encoder_args)(job) for each job, in job order; in `num_proc` spawned processes when > 1,
    with at most 2 x num_proc jobs in flight."""
    if num_proc == 1:
        encoder = Encoder(*encoder_args)
        for job in jobs:
            yield encoder(job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=encoder_args)
    pending = deque()
    try:
        for job in jobs:
            pending.append(pool.submit(_encode_job, job))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise DataError(f"pretokenize --num-proc {num_proc}: a tokenizer process died (out of memory or killed); "
                        f"rerun, with a smaller --num-proc if memory is short") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- writing -------------------------------------------------------------------------------------------------

class ShardWriter:
    """Cuts a stream of token arrays into seq_len rows and appends them to tokens-00000.bin, tokens-00001.bin, ...
    (rows_per_shard rows each, the last one shorter); the tail that does not fill a row is dropped at close."""

    def __init__(self, out_dir: str, seq_len: int, dtype: str, rows_per_shard: int, max_rows: int | None = None):
        self.out_dir, self.seq_len, self.dtype = out_dir, seq_len, np.dtype(dtype)
        self.rows_per_shard, self.max_rows = rows_per_shard, max_rows
        self.shards: list[dict] = []
        self.num_rows = 0
        self._carry = np.empty(0, dtype=self.dtype)
        self._file = None

    @property
    def full(self) -> bool:
        return self.max_rows is not None and self.num_rows >= self.max_rows

    def write(self, tokens: np.ndarray) -> None:
        stream = np.concatenate([self._carry, tokens]) if len(self._carry) else tokens
        rows = len(stream) // self.seq_len
        if self.max_rows is not None:
            rows = min(rows, self.max_rows - self.num_rows)
        self._carry = stream[rows * self.seq_len:].copy()
        block = stream[:rows * self.seq_len].reshape(rows, self.seq_len)
        while len(block):
            if self._file is None:
                name = SHARD_PATTERN.format(len(self.shards))
                self._file = open(os.path.join(self.out_dir, name), "wb")
                self.shards.append({"file": name, "num_sequences": 0, "bytes": 0})
            shard = self.shards[-1]
            take = min(len(block), self.rows_per_shard - shard["num_sequences"])
            block[:take].tofile(self._file)
            shard["num_sequences"] += take
            shard["bytes"] += take * self.seq_len * self.dtype.itemsize
            self.num_rows += take
            block = block[take:]
            if shard["num_sequences"] == self.rows_per_shard:
                self._file.close()
                self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# --- progress ------------------------------------------------------------------------------------------------

class InputMeter:
    """How much of a source has been read, for the ETA: bytes of local files (json/text: the OS file position of
    the file being read, gzip files in compressed bytes; parquet: whole files), rows of a hub dataset. `total` is
    None when the size is unknown (a hub stream without split sizes)."""

    def __init__(self, src):
        self.src, self.documents_read = src, 0
        self._done_files, self._last = 0, 0.0
        if src.kind == "files":
            self.unit = "B"
            self.sizes = [os.path.getsize(f) for f in src.files]
            self.total = sum(self.sizes)
            self._index = {os.path.realpath(f): i for i, f in enumerate(src.files)}
        else:
            self.unit = "rows"
            self.total = _hub_rows(src)

    def documents(self) -> Iterator[str]:
        for text in self.src.documents():
            self.documents_read += 1
            yield text

    def done(self) -> float:
        """Units read so far (monotone)."""
        if self.src.kind != "files":
            value = float(self.documents_read)
        else:
            value = self._file_position()
        self._last = max(self._last, value if self.total is None else min(value, self.total))
        return self._last

    def _file_position(self) -> float:
        fd_dir = "/proc/self/fd"
        best = None
        try:
            for fd in os.listdir(fd_dir):
                try:
                    index = self._index.get(os.readlink(os.path.join(fd_dir, fd)))
                    if index is None or (best is not None and index < best[0]):
                        continue
                    position = 0
                    if self.src.format != "parquet" and not self.src.files[index].endswith(".parquet"):
                        with open(f"/proc/self/fdinfo/{fd}") as f:
                            position = int(f.readline().split()[1])  # "pos:\t<bytes>"
                    best = (index, position)
                except (OSError, ValueError, IndexError):
                    continue
        except OSError:  # no /proc (not Linux): no position, the bar shows tokens/s only
            return self._last
        if best is None:
            return self._last
        return sum(self.sizes[:best[0]]) + min(best[1], self.sizes[best[0]])


def _hub_rows(src) -> int | None:
    try:
        ds = src.hub_dataset()
        rows = getattr(ds, "num_rows", None)
        if rows is None:
            split = ds.info.splits.get(src.split) if ds.info.splits else None
            rows = getattr(split, "num_examples", None)
        return int(rows) if rows else None
    except Exception:  # an estimate only; the source reports its own errors when read
        return None


class Progress:
    """Pretokenize's progress (relora_ds/progress.py: a bar on a terminal, else one plain line every 30 s): the
    input read (the ETA comes from it), tokens written and tokens/s. With max_tokens, tokens up to it instead."""

    def __init__(self, meter: InputMeter | None, max_tokens: int | None = None, interval: float = PLAIN_INTERVAL):
        self.meter, self.max_tokens = meter, max_tokens
        self.tokens = 0
        if max_tokens is not None or meter is None:
            self.unit, self.total = "tok", max_tokens
        else:
            self.unit, self.total = meter.unit, meter.total
        self.report = relora_ds.progress.Progress(self.total, "pretokenize", self.unit, interval=interval,
                                                  unit_scale=True)

    def _done(self) -> float:
        return float(self.tokens) if self.unit == "tok" else self.meter.done()

    def update(self, tokens: int) -> None:
        """`tokens` written so far."""
        self.tokens = tokens
        rate = tokens / max(time.perf_counter() - self.report.started, 1e-9)
        self.report.update(self._done() - self.report.n, postfix=f"{si(tokens)} tokens, {si(rate)} tokens/s")

    def line(self) -> str:
        return self.report.line()

    def close(self) -> None:
        self.report.finish(postfix=f"{si(self.tokens)} tokens")


# --- reading -------------------------------------------------------------------------------------------------

_REQUIRED = ("format", "tokenizer", "vocab_size", "vocab_hash", "seq_len", "dtype", "num_sequences", "num_tokens")


def read_manifest(path: str) -> dict:
    """The manifest of a packed dataset dir, checked for completeness against its token files. Its "shards"
    list is always there: a v1 manifest (one tokens.bin) is returned with that file as its one shard."""
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        raise DataError(f"{manifest_path}: not found; expected a packed dataset written by `relora-ds pretokenize`")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{manifest_path}: not valid JSON ({e})") from None
    missing = [k for k in _REQUIRED if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise DataError(f"{manifest_path}: missing fields {', '.join(missing)}; rewrite it with `relora-ds pretokenize`")
    if manifest["format"] not in (FORMAT, FORMAT_V1):
        raise DataError(f"{manifest_path}: format {manifest['format']!r} is not {FORMAT!r} (or {FORMAT_V1!r})")
    if manifest["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{manifest_path}: dtype {manifest['dtype']!r}; expected uint16 or uint32")
    row_bytes = manifest["seq_len"] * np.dtype(manifest["dtype"]).itemsize
    if manifest["format"] == FORMAT_V1:
        manifest["shards"] = [{"file": TOKENS_FILE, "num_sequences": manifest["num_sequences"],
                               "bytes": manifest["num_sequences"] * row_bytes}]
    shards = manifest.get("shards")
    if (not isinstance(shards, list) or not shards
            or not all(isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("num_sequences"), int)
                       and s["file"] == os.path.basename(s["file"]) and s["file"] not in ("", ".", "..")
                       for s in shards)):
        raise DataError(f"{manifest_path}: \"shards\" must list {{file, num_sequences}} for token files in the same "
                        f"directory; rewrite it with `relora-ds pretokenize`")
    if sum(s["num_sequences"] for s in shards) != manifest["num_sequences"]:
        raise DataError(f"{manifest_path}: its shards hold {sum(s['num_sequences'] for s in shards)} sequences but "
                        f"num_sequences is {manifest['num_sequences']}; rewrite it with `relora-ds pretokenize`")
    for shard in shards:
        shard_path = os.path.join(path, shard["file"])
        expected = shard["num_sequences"] * row_bytes
        actual = os.path.getsize(shard_path) if os.path.isfile(shard_path) else None
        if actual != expected:
            raise DataError(f"{shard_path}: {'missing' if actual is None else f'{actual} bytes'}, but "
                            f"{manifest_path} describes {shard['num_sequences']} x {manifest['seq_len']} "
                            f"{manifest['dtype']} ({expected} bytes); rewrite it with `relora-ds pretokenize`")
    return manifest


def check_manifest(path: str, tokenizer, seq_len: int) -> dict:
    """Refuse a packed dataset whose tokenizer or seq_len disagrees with the run; return its manifest."""
    manifest = read_manifest(path)
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if manifest["seq_len"] != seq_len:
        raise DataError(f"{manifest_path}: seq_len {manifest['seq_len']} does not match data.seq_len {seq_len}")
    run_hash = vocab_hash(tokenizer)
    if manifest["vocab_hash"] != run_hash or manifest["vocab_size"] != len(tokenizer):
        raise DataError(f"{manifest_path}: tokenizer {manifest['tokenizer']!r} (vocab {manifest['vocab_size']}, "
                        f"hash {manifest['vocab_hash']}) does not match data.tokenizer {tokenizer.name_or_path!r} "
                        f"(vocab {len(tokenizer)}, hash {run_hash})")
    return manifest
