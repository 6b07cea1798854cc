"""Data pipeline: tokenizers, sources, packing, the pretokenize stage and the rank-sharded loader.

    tokenize.py     load_tokenizer / train_tokenizer (byte-level BPE), the tokenizer fingerprint
    sources.py      resolve a source ('sotu', local files/dirs/globs, hub names) into documents
    packing.py      documents -> fixed-length sequences (pure)
    pretokenize.py  tokenize + pack to disk (tokens-NNNNN.bin shards + manifest.json), --num-proc; check_manifest
    stream.py       sharded streams: the rule splitting a source across ranks/workers; one reader's packed batches
    workers.py      one rank's stream: its readers in turn, in-process or in DataLoader worker processes
    loader.py       PackedDataset, StreamingPackedDataset, DistributedBatches, eval_batches, iterate_tokens
    sample/         the shipped SOTU corpus (CC0) and its 8k byte-level BPE tokenizer
"""

import os

SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample")


class DataError(ValueError):
    """Bad data input; the message is one line naming the file/field and what is expected."""
