"""Tokenizers: load any Hugging Face fast tokenizer, train a byte-level BPE one, fingerprint a vocabulary.

Documents are encoded without the tokenizer's own special tokens (no automatic BOS); the packer appends
the EOS token after every document, so every tokenizer packs the same way.
"""

import hashlib
import json
import os
from collections.abc import Iterable, Iterator

import numpy as np

from relora_ds.data import SAMPLE_DIR, DataError

SHIPPED_TOKENIZER = os.path.join(SAMPLE_DIR, "sotu-bpe-8k")
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def load_tokenizer(name_or_path: str | None):
    """A `transformers.PreTrainedTokenizerFast`: None → the shipped SOTU tokenizer; a local dir; else a hub name."""
    from transformers import AutoTokenizer

    path = SHIPPED_TOKENIZER if name_or_path is None else os.path.expanduser(name_or_path)
    local = os.path.isdir(path)
    if not local and (os.path.exists(path) or path.startswith((".", "/", "~"))):
        raise DataError(f"data.tokenizer {name_or_path!r}: not a directory; expected a Hugging Face tokenizer "
                        f"directory (tokenizer.json + tokenizer_config.json) or a hub name")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True, local_files_only=local)
    except Exception as e:  # OSError offline / unknown repo; ValueError for broken files
        detail = " ".join(str(e).split())[:300]
        if local:
            raise DataError(f"data.tokenizer {path}: not a loadable Hugging Face tokenizer directory "
                            f"(expected tokenizer.json + tokenizer_config.json): {detail}") from None
        raise DataError(f"data.tokenizer {name_or_path!r}: could not be found locally and the Hugging Face hub "
                        f"is unreachable or has no such tokenizer (offline?): {detail}") from None
    if not tokenizer.is_fast:
        raise DataError(f"data.tokenizer {name_or_path!r}: only fast (Rust) tokenizers are supported; "
                        f"this one is {type(tokenizer).__name__}")
    if tokenizer.eos_token_id is None:
        raise DataError(f"data.tokenizer {name_or_path!r}: has no EOS token; packing needs one to separate documents")
    return tokenizer


def vocab_hash(tokenizer) -> str:
    """sha256 (16 hex digits) of the tokenizer's token → id map, added tokens included."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (the packer appends EOS)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


class Encoder:
    """Texts -> one flat array of token ids, an EOS after every text (the packer's stream for those documents).

    The fast path of tokenization: used by pretokenize's workers and by the training streams (stream.py).
    Built from the tokenizer's serialized Rust tokenizer (tokenizer.json), so a worker process needs neither
    transformers nor the tokenizer files; encodes without special tokens, padding or truncation, as
    tokenize.encode_batch does through transformers (the same ids, tested)."""

    def __init__(self, tokenizer_json: str, eos_id: int, dtype: str = "int64"):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self._encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)  # no offsets
        self.eos_id, self.dtype = eos_id, np.dtype(dtype)

    @classmethod
    def of(cls, tokenizer, dtype: str = "int64") -> "Encoder":
        """The Encoder of a transformers fast tokenizer (a copy of its Rust tokenizer: the original is not changed)."""
        return cls(tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id, dtype)

    def __call__(self, texts: list[str]) -> np.ndarray:
        ids = [e.ids for e in self._encode(texts, add_special_tokens=False)]
        out = np.empty(sum(map(len, ids)) + len(ids), dtype=self.dtype)
        at = 0
        for doc in ids:
            out[at:at + len(doc)] = doc
            at += len(doc)
            out[at] = self.eos_id
            at += 1
        return out


def encode_documents(tokenizer, documents: Iterable[str], batch_size: int = 256) -> Iterator[list[int]]:
    """Lazily tokenize a stream of documents, `batch_size` at a time (the Rust tokenizer batches in parallel)."""
    batch = []
    for text in documents:
        batch.append(text)
        if len(batch) == batch_size:
            yield from encode_batch(tokenizer, batch)
            batch = []
    yield from encode_batch(tokenizer, batch)


def train_tokenizer(files: list[str], out_dir: str, vocab_size: int = 8192, text_column: str = "text") -> str:
    """Train a byte-level BPE tokenizer on local json/jsonl(.gz)/txt/parquet files; save an HF dir; return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from relora_ds.data.sources import iter_file_documents

    if not files:
        raise DataError("tokenizer train --files: no files given; expected local json/jsonl(.gz)/txt/parquet files")
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise DataError(f"tokenizer vocab_size {vocab_size}: must be at least {minimum} "
                        f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
    for path in files:  # fail before training on a missing file, not halfway through
        if not os.path.isfile(path):
            raise DataError(f"{path}: file not found (tokenizer train --files)")

    def documents():
        for path in files:
            yield from iter_file_documents(path, "auto", text_column)

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents(), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    _portable_files(hf, out_dir)
    return out_dir


def _portable_files(hf, out_dir: str) -> None:
    """Make the dir loadable by transformers 4.x and 5.x alike, and keep tokenizer.json compact."""
    hf.backend_tokenizer.save(os.path.join(out_dir, "tokenizer.json"), pretty=False)
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.pop("backend", None)
    config.update(SPECIAL_TOKENS, tokenizer_class="PreTrainedTokenizerFast")
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(SPECIAL_TOKENS, f, indent=2)
