"""Data pipeline: tokenizers, sources, packing, the pretokenize stage and the rank-sharded loader.

    tokenize.py     load_tokenizer / train_tokenizer (byte-level BPE), the tokenizer fingerprint
    sources.py      resolve a source ('sotu', local files/dirs/globs, hub names) into documents
    packing.py      documents -> fixed-length sequences (pure)
    pretokenize.py  tokenize + pack to disk (tokens-NNNNN.bin shards + manifest.json), --num-proc; check_manifest
    stream.py       sharded streams: the rule splitting a source across ranks/workers; one reader's packed batches
    workers.py      one rank's stream: its readers in turn, in-process or in DataLoader worker processes
    mixture.py      data.mixture: weighted blends of sources, row by row, resumable (packed, or each stream reader's)
    skip.py         data.skip: the steps whose data is passed over
    loader.py       PackedDataset, StreamingPackedDataset, DistributedBatches, eval_batches, iterate_tokens
    sample/         the shipped SOTU corpus (CC0) and its 8k byte-level BPE tokenizer
"""

import os
from dataclasses import dataclass

import numpy as np

from relora_ds.fields import setting

DATA_FORMATS = ("auto", "json", "text", "parquet", "hub", "pretokenized")  # data.format
SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample")


class DataError(ValueError):
    """Bad data input; the message is one line naming the file/field and what is expected."""


def epoch_permutation(seed: list[int], n: int) -> np.ndarray:
    """numpy.random.default_rng(seed).permutation(n), held as uint32 below 2**32 rows: the same order (the shuffle's
    draws depend on n, not on the dtype) in half the memory of int64 (0.37 GiB at 100 M rows)."""
    return np.random.default_rng(seed).permutation(np.arange(n, dtype=np.uint32 if n < 2**32 else np.int64))


@dataclass
class DataConfig:
    source: str = setting("sotu", "'sotu' (shipped corpus), local file/dir/glob, hub name or pretokenized dir")
    mixture: list[dict] = setting([], "several sources blended by weight, instead of data.source: a list of "
                                      "{source, weight} (each may also set name, format, text_column, split, "
                                      "hub_config, validation_source, validation_split; weights are normalized; "
                                      "docs/data.md)")
    format: str = setting("auto", "how to read the source", DATA_FORMATS)
    text_column: str = setting("text", "column holding the text")
    hub_config: str | None = setting(None, "datasets hub config name (e.g. 'en')")
    split: str = setting("train", "split to train on")
    streaming: bool = setting(False, "read the source lazily as a stream sharded across ranks (hub: without "
                                    "downloading it) instead of packing it into a cached dataset first")
    validation_source: str | None = setting(None, "held-out source; null: the source's validation split if any")
    validation_split: str | None = setting(None, "held-out split name")
    tokenizer: str | None = setting(None, "HF tokenizer dir or hub name; null: the shipped SOTU tokenizer")
    seq_len: int = setting(256, "tokens per packed training sequence")
    num_workers: int = setting(0, "background processes that read, tokenize and pack a stream (data.streaming), "
                                 "each its own share; 0: in the training process")
    prefetch_batches: int = setting(16, "micro-batches the data workers prepare ahead of the step (data.num_workers > 0)")
    skip_bad_records: bool = setting(False, "count and log bad records instead of stopping")
    skip: list[str] = setting([], "STEP:STEPS entries: after step STEP, pass over the data of the next STEPS steps "
                                  "without training on it (a loss spike's batches; relora_ds/data/skip.py)")
