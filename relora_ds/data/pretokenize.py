"""The offline stage: tokenize + pack a source to disk, with a manifest the trainer checks.

A packed dataset directory holds
  tokens.bin      raw little-endian uint16 (vocab <= 65536) or uint32 token ids, shape (num_sequences, seq_len),
                  read back as a numpy memmap (random access, nothing loaded up front)
  manifest.json   format, tokenizer (name, vocab size, vocab hash, eos id), seq_len, dtype, num_sequences,
                  num_tokens, num_documents, source, created
manifest.json is written last, so a directory with a manifest is complete.
"""

import json
import os
import time
from collections.abc import Iterable

import numpy as np

from relora_ds.data import DataError
from relora_ds.data.packing import pack_documents
from relora_ds.data.sources import resolve_source
from relora_ds.data.tokenize import encode_documents, vocab_hash

FORMAT = "relora-ds packed v1"
TOKENS_FILE = "tokens.bin"
MANIFEST_FILE = "manifest.json"
_CHUNK_SEQUENCES = 1024  # windows written per numpy write


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def pretokenize(source: str, out_dir: str, *, tokenizer, seq_len: int, format: str = "auto",
                text_column: str = "text", split: str = "train", hub_config: str | None = None,
                streaming: bool = False, max_tokens: int | None = None) -> dict:
    """Tokenize + pack `source` into `out_dir` (tokens.bin + manifest.json); return the manifest."""
    src = resolve_source(source, format=format, split=split, text_column=text_column, hub_config=hub_config,
                         streaming=streaming)
    if src.kind == "pretokenized":
        raise DataError(f"data.source {source!r}: is already a pretokenized dataset (it holds manifest.json)")
    return write_packed(src.documents(), out_dir, tokenizer=tokenizer, seq_len=seq_len, source=src.describe(),
                        max_tokens=max_tokens)


def write_packed(documents: Iterable[str], out_dir: str, *, tokenizer, seq_len: int, source: dict,
                 max_tokens: int | None = None) -> dict:
    """Tokenize, pack and write `documents`; the manifest goes last. Returns the manifest."""
    if seq_len < 2:
        raise DataError(f"data.seq_len {seq_len}: must be at least 2")
    if max_tokens is not None and max_tokens < seq_len:
        raise DataError(f"max_tokens {max_tokens}: must be at least one sequence (data.seq_len {seq_len})")
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    max_sequences = None if max_tokens is None else max_tokens // seq_len
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST_FILE)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the directory is incomplete until the new manifest is written

    counts = {"documents": 0}

    def counted(docs):
        for doc in docs:
            counts["documents"] += 1
            yield doc

    started = time.perf_counter()
    num_sequences, chunk = 0, []
    with open(os.path.join(out_dir, TOKENS_FILE), "wb") as f:
        windows = pack_documents(encode_documents(tokenizer, counted(documents)), seq_len, tokenizer.eos_token_id)
        for window in windows:
            chunk.append(window)
            num_sequences += 1
            if len(chunk) == _CHUNK_SEQUENCES:
                np.asarray(chunk, dtype=dtype).tofile(f)
                chunk = []
            if max_sequences is not None and num_sequences >= max_sequences:
                break
        if chunk:
            np.asarray(chunk, dtype=dtype).tofile(f)
    if num_sequences == 0:
        raise DataError(f"data.source {source.get('source')!r}: {counts['documents']} documents give fewer tokens "
                        f"than one sequence of data.seq_len {seq_len}")
    manifest = {
        "format": FORMAT,
        "tokenizer": tokenizer.name_or_path,
        "vocab_size": vocab_size,
        "vocab_hash": vocab_hash(tokenizer),
        "eos_id": tokenizer.eos_token_id,
        "seq_len": seq_len,
        "dtype": dtype,
        "num_sequences": num_sequences,
        "num_tokens": num_sequences * seq_len,
        "num_documents": counts["documents"],
        "source": source,
        "seconds": round(time.perf_counter() - started, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(manifest_path + ".tmp", manifest_path)
    return manifest


_REQUIRED = ("format", "tokenizer", "vocab_size", "vocab_hash", "seq_len", "dtype", "num_sequences", "num_tokens")


def read_manifest(path: str) -> dict:
    """The manifest of a packed dataset dir, checked for completeness against tokens.bin."""
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
    if manifest["format"] != FORMAT:
        raise DataError(f"{manifest_path}: format {manifest['format']!r} is not {FORMAT!r}")
    tokens_path = os.path.join(path, TOKENS_FILE)
    expected = manifest["num_sequences"] * manifest["seq_len"] * np.dtype(manifest["dtype"]).itemsize
    actual = os.path.getsize(tokens_path) if os.path.isfile(tokens_path) else None
    if actual != expected:
        raise DataError(f"{tokens_path}: {'missing' if actual is None else f'{actual} bytes'}, but {manifest_path} "
                        f"describes {manifest['num_sequences']} x {manifest['seq_len']} {manifest['dtype']} "
                        f"({expected} bytes); rewrite it with `relora-ds pretokenize`")
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
