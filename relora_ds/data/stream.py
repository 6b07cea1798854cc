"""Sharded streams: a source read lazily, split across readers, each tokenizing and packing its own share.

The sharding rule (the one rule, for hub and local sources alike; it is `datasets.distributed.
split_dataset_by_node`'s "auto" rule, applied to readers):

    There are N = world_size x max(1, data.num_workers) readers; reader k = rank x max(1, data.num_workers) +
    worker. If the source's shard count (its local files; a hub dataset's num_shards) is a multiple of N,
    reader k reads the whole shards k, k+N, k+2N, ...; otherwise it reads the records k, k+N, k+2N, ... of the
    source's global record order (all files in order; every reader then scans the files, but parses and
    tokenizes only its own records).

A record is a line of a json-lines file (blank lines count), an item of a .json array, a row of a parquet
file, a whole .txt file, an example of a hub dataset (sources.py). A reader tokenizes its records in order,
appends EOS to each, cuts seq_len-token windows from the concatenation, and hands out micro_batch_size
consecutive windows as a micro-batch (`ShareBatches`). At the end of its share it drops the partial buffer and
starts its share again (the next epoch of that reader; same order, no shuffling). So a rank's batches depend on
(source, seq_len, micro_batch_size, world_size, data.num_workers) and nothing else: deterministic for a given
seed and world size. No rank reads (parses) or tokenizes another rank's text.

The state of a reader, JSON, taken after each micro-batch it hands out:

    {"epoch": passes completed, "position": where its share continues (null: at the start),
     "buffer": token ids tokenized but not yet handed out, "bad_records": records skipped so far}
    (ShareBatches hands out the buffer as an int64 numpy array, cheap to send from a worker; JSON: a list)

    position, local files: {"file": index into the source's files, "record": records of that file read,
                            "offset": byte offset after them (json lines), "base": global index of the file's
                            first record (record mode)}
    position, hub stream:  {"hf": the split IterableDataset's state_dict(), "row": examples read}

Resuming = opening the share at `position` and starting with `buffer`: the windows continue exactly, and
nothing before the position is re-tokenized or re-parsed. What is re-read: for a .gz file the current file is
decompressed up to the offset (not parsed); a .json array file is parsed whole; parquet skips whole row
groups; for a hub stream `datasets` skips whole shards unopened and reads (not tokenizes) the current shard up
to the example. The buffer holds less than one micro-batch plus one tokenizer call's text (max(4096 characters,
4 characters per token of a micro-batch); a longer document, whole).
"""

from collections.abc import Iterator

import numpy as np
import torch

from relora_ds.data import DataError
from relora_ds.data.sources import BadRecords, Cursor, Source, file_records, hub_records
from relora_ds.data.tokenize import Encoder


def by_shards(num_shards: int, readers: int) -> bool:
    """The rule's choice: whole shards when their count is a multiple of the readers, else records."""
    return num_shards % readers == 0


def num_shards(src: Source) -> int:
    if src.kind == "hub":
        return getattr(src.hub_dataset(), "num_shards", 1) or 1
    return len(src.files)


def describe_share(src: Source, reader: int, readers: int) -> str:
    if readers == 1:
        return "the stream"
    n = num_shards(src)
    unit = ("files" if src.kind == "files" else "shards") if by_shards(n, readers) else "records"
    of = f" of {n} files" if src.kind == "files" else f" of hub dataset {src.name!r}"
    return f"reader {reader} of {readers}'s share ({unit} {reader}, {reader + readers}, ...{of})"


def share_records(src: Source, reader: int, readers: int, position: dict | None,
                  bad: BadRecords) -> Iterator[tuple[list[str], dict]]:
    """(texts, position after them) of reader `reader` of `readers` from `position` (None: the start), in order."""
    if src.kind == "hub":
        yield from _hub_share(src, reader, readers, position, bad)
        return
    whole_files = by_shards(len(src.files), readers)
    step = readers if whole_files else 1
    if position is None:
        index, cursor, base = (reader if whole_files else 0), Cursor(), 0
    else:
        index, base = position["file"], position["base"]
        cursor = Cursor(position["record"], position["offset"])
    while index < len(src.files):
        owned = None if whole_files else (lambda r, b=base: (b + r) % readers == reader)
        for text in file_records(src.files[index], src.format, src.text_column, bad, cursor, owned):
            yield ([text] if text else []), {"file": index, "record": cursor.record, "offset": cursor.offset,
                                             "base": base}
        base += cursor.record
        index, cursor = index + step, Cursor()


def _hub_share(src: Source, reader: int, readers: int, position: dict | None, bad: BadRecords):
    ds = src.hub_dataset()
    if not hasattr(ds, "state_dict"):
        raise DataError(f"data.source {src.name!r}: a downloaded (not streamed) hub dataset is read through the "
                        f"packed cache, not as a stream; set data.streaming: true to stream it")
    from datasets.distributed import split_dataset_by_node

    ds = split_dataset_by_node(ds, rank=reader, world_size=readers)  # also for 1 reader: its own iteration state
    if position is not None:
        ds.load_state_dict(position["hf"])
    where = f" (reader {reader} of {readers})" if readers > 1 else ""
    yield from hub_records(src, bad, ds, first_row=position["row"] if position else 0, where=where)


def _chunks(records: Iterator[tuple[list[str], dict]], budget: int) -> Iterator[tuple[list[str], dict]]:
    """Groups of records of about `budget` characters, with the position after the last one (tokenized at once)."""
    texts, size, position, pending = [], 0, None, False
    for group, position in records:
        texts.extend(group)
        size += sum(map(len, group))
        pending = True
        if size >= budget:
            yield texts, position
            texts, size, pending = [], 0, False
    if pending:
        yield texts, position


class ShareBatches:
    """One reader's micro-batches, each with the reader's state after it: endless (a new pass at the end of the
    share), or one pass with passes=1 (held-out data). See the module docstring for the state."""

    def __init__(self, src: Source, *, tokenizer, seq_len: int, micro_batch_size: int, reader: int = 0,
                 readers: int = 1, state: dict | None = None, passes: int | None = None):
        self.src, self.tokenizer, self.seq_len, self.mb = src, tokenizer, seq_len, micro_batch_size
        self.reader, self.readers, self.passes = reader, readers, passes
        self.state = state or {"epoch": 0, "position": None, "buffer": [], "bad_records": 0}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict]]:
        need = self.mb * self.seq_len
        encode = Encoder.of(self.tokenizer)  # the Rust tokenizer without offsets, packed with numpy
        epoch, position = self.state["epoch"], self.state["position"]
        buffer = np.asarray(self.state["buffer"], dtype=np.int64)  # tokens not handed out yet
        bad = BadRecords(self.src.skip_bad_records, self.state["bad_records"])
        share = describe_share(self.src, self.reader, self.readers)
        budget = max(4096, 4 * need)  # characters per tokenizer call: about one micro-batch of tokens
        passes = 0
        while True:
            from_start, made = position is None, 0
            chunks = _chunks(share_records(self.src, self.reader, self.readers, position, bad), budget)
            while True:
                while len(buffer) >= need:  # first what the buffer holds (after a resume too), then read on
                    batch = torch.from_numpy(buffer[:need].copy()).view(self.mb, self.seq_len)
                    buffer = buffer[need:]  # a view; never written in place, so a state may keep it
                    made += 1
                    yield batch, {"epoch": epoch, "position": position, "buffer": buffer, "bad_records": bad.count}
                chunk = next(chunks, None)
                if chunk is None:
                    break
                texts, position = chunk
                buffer = np.concatenate([buffer, encode(texts)])
            bad.end_pass(f"data.source {self.src.name!r}, {share}, pass {epoch}")
            passes += 1
            if self.passes is not None and passes >= self.passes:
                return
            if from_start and made == 0:
                raise DataError(f"data.source {self.src.name!r}: {share} holds fewer than one micro-batch "
                                f"({self.mb} sequences of {self.seq_len} tokens); use more data, fewer readers "
                                f"(world size x data.num_workers) or a smaller micro-batch")
            epoch, position, buffer = epoch + 1, None, buffer[:0]
