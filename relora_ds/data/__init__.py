"""Data pipeline: tokenizers, sources, packing, the pretokenize stage and the rank-sharded loader.

    tokenize.py     load_tokenizer / train_tokenizer (byte-level BPE), the tokenizer fingerprint
    sources.py      resolve a source ('sotu', local files/dirs/globs, hub names) into documents
    packing.py      documents -> fixed-length sequences (pure)
    pretokenize.py  tokenize + pack to disk (tokens.bin + manifest.json); check_manifest
    loader.py       PackedDataset, StreamingPackedDataset, DistributedBatches, eval_batches
    sample/         the shipped SOTU corpus (CC0) and its 8k byte-level BPE tokenizer
"""

import os

SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample")


class DataError(ValueError):
    """Bad data input; the message is one line naming the file/field and what is expected."""
