"""Datasets of packed sequences and the rank-sharded, resumable batch stream the trainer consumes.

    build_dataset(source, ...)          -> PackedDataset (random access) or StreamingPackedDataset
    dataset_from_config(cfg.data, ...)  -> the same for the train / validation role (None: no validation)
    DistributedBatches(dataset, ...)    iterator of {"input_ids", "labels"} LongTensor[mb, seq_len]
    eval_batches(dataset, ...)          fixed held-out batches, this rank's share

Raw sources are packed once into a cache directory (the same layout `relora-ds pretokenize` writes),
keyed by the source content, tokenizer vocabulary and seq_len; concurrent ranks take a file lock and
the first one builds it.

Order: epoch e visits the sequences in a permutation seeded by (seed, e). Micro-batch i of epoch e on
rank r holds positions [(i*world + r)*mb, +mb) of that permutation; the tail that does not fill a whole
global micro-batch (world*mb sequences) is skipped in that epoch. The position is two integers, so a
resume continues on unseen data in O(1), without reading the batches before it.

Streaming sources (data.streaming) have no random access: they are tokenized and packed on the fly, in
stream order (no shuffling), every rank reads the whole stream and keeps its own micro-batches, and a
resume skips the already-used documents by reading past them (not tokenizing them). That read is
O(documents consumed), the price of streaming.
"""

import fcntl
import hashlib
import itertools
import os
import shutil
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from relora_ds.data import DataError
from relora_ds.data.packing import pack_with_positions
from relora_ds.data.pretokenize import MANIFEST_FILE, TOKENS_FILE, check_manifest, read_manifest, write_packed
from relora_ds.data.sources import Source, file_format, resolve_source
from relora_ds.data.tokenize import encode_documents, vocab_hash


class PackedDataset:
    """Random-access packed sequences from a packed dataset directory (tokens.bin memmap + manifest.json)."""

    def __init__(self, path: str, *, tokenizer=None, seq_len: int | None = None):
        if tokenizer is not None and seq_len is not None:
            self.manifest = check_manifest(path, tokenizer, seq_len)
        else:
            self.manifest = read_manifest(path)
        self.path = path
        self.seq_len = self.manifest["seq_len"]
        self.tokens = np.memmap(os.path.join(path, TOKENS_FILE), dtype=self.manifest["dtype"], mode="r",
                                shape=(self.manifest["num_sequences"], self.seq_len))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_tokens(self) -> int:
        return len(self) * self.seq_len

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.tokens[index].astype(np.int64))

    def get_batch(self, indices) -> torch.Tensor:
        """LongTensor[len(indices), seq_len] of the given sequences."""
        return torch.from_numpy(self.tokens[np.asarray(indices, dtype=np.int64)].astype(np.int64))

    def __repr__(self) -> str:
        return f"PackedDataset({self.path!r}, {len(self)} x {self.seq_len} tokens)"


class StreamingPackedDataset:
    """Packed sequences of a document stream, tokenized on the fly; sequential access only."""

    def __init__(self, documents: Callable[[], Iterable[str]], *, tokenizer, seq_len: int, name: str = "stream"):
        self.documents, self.tokenizer, self.seq_len, self.name = documents, tokenizer, seq_len, name

    def windows(self, start: tuple[int, int] = (0, 0)) -> Iterator[tuple[list[int], tuple[int, int]]]:
        """(window, position of the next window) from `start` = (document index, token offset)."""
        docs = itertools.islice(iter(self.documents()), start[0], None)  # skipped documents are read, not tokenized
        yield from pack_with_positions(encode_documents(self.tokenizer, docs), self.seq_len,
                                       self.tokenizer.eos_token_id, start)

    def __repr__(self) -> str:
        return f"StreamingPackedDataset({self.name!r}, seq_len={self.seq_len})"


# --- building ------------------------------------------------------------------------------------------------

def build_dataset(source: str, *, tokenizer, seq_len: int, format: str = "auto", text_column: str = "text",
                  split: str = "train", hub_config: str | None = None, streaming: bool = False,
                  cache_dir: str | None = None):
    """Resolve `source` ('sotu', files/dirs/globs, a pretokenized dir, a hub name) into a packed dataset."""
    src = resolve_source(source, format=format, split=split, text_column=text_column, hub_config=hub_config,
                         streaming=streaming)
    return dataset_from_source(src, tokenizer=tokenizer, seq_len=seq_len, cache_dir=cache_dir)


def dataset_from_source(src: Source, *, tokenizer, seq_len: int, cache_dir: str | None = None):
    if src.kind == "pretokenized":
        return PackedDataset(src.name, tokenizer=tokenizer, seq_len=seq_len)
    if src.streaming:
        if src.kind == "hub":
            src.hub_dataset()  # fail now (offline, unknown name), not at the first batch
        return StreamingPackedDataset(src.documents, tokenizer=tokenizer, seq_len=seq_len, name=src.name)
    return _cached_packed(src, tokenizer=tokenizer, seq_len=seq_len, cache_dir=cache_dir)


def _cached_packed(src: Source, *, tokenizer, seq_len: int, cache_dir: str | None) -> PackedDataset:
    if cache_dir is None:
        import datasets

        cache_dir = os.path.join(datasets.config.HF_DATASETS_CACHE, "relora_ds")
    key = hashlib.sha256(f"{src.fingerprint()}|{vocab_hash(tokenizer)}|{seq_len}".encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"packed-{src.split}-{key}")
    os.makedirs(cache_dir, exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one rank builds, the others wait and then read its result
        if not os.path.isfile(os.path.join(path, MANIFEST_FILE)):
            tmp = f"{path}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                write_packed(src.documents(), tmp, tokenizer=tokenizer, seq_len=seq_len, source=src.describe())
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
    return PackedDataset(path, tokenizer=tokenizer, seq_len=seq_len)


def dataset_from_config(data_cfg, tokenizer, *, split: str = "train", cache_dir: str | None = None):
    """The train ('train') or held-out ('validation') dataset of a `cfg.data`; None when there is no held-out set.

    validation: data.validation_source if set (read with data.validation_split or 'validation'); else the
    'sotu' validation split; else, for a hub source with data.validation_split, that split; else, for a
    local directory, its files named validation*; else None.
    """
    common = dict(tokenizer=tokenizer, seq_len=data_cfg.seq_len, text_column=data_cfg.text_column,
                  hub_config=data_cfg.hub_config, streaming=data_cfg.streaming, cache_dir=cache_dir)
    if split == "train":
        return build_dataset(data_cfg.source, format=data_cfg.format, split=data_cfg.split, **common)
    if split != "validation":
        raise ValueError(f"split {split!r}: expected 'train' or 'validation'")
    val_split = data_cfg.validation_split or "validation"
    if data_cfg.validation_source:
        return build_dataset(data_cfg.validation_source, format=data_cfg.format, split=val_split, **common)
    src = resolve_source(data_cfg.source, format=data_cfg.format, split=data_cfg.split,
                         text_column=data_cfg.text_column, hub_config=data_cfg.hub_config)
    if data_cfg.source == "sotu" and src.kind == "files":
        return build_dataset("sotu", split="validation", **common)
    if src.kind == "hub" and data_cfg.validation_split:
        return build_dataset(data_cfg.source, format="hub", split=val_split, **common)
    path = os.path.expanduser(data_cfg.source)
    if src.kind == "files" and os.path.isdir(path):
        held_out = [f for f in os.listdir(path) if f.startswith(val_split) and file_format(f) is not None]
        if held_out:
            return build_dataset(path, format=data_cfg.format, split=val_split, **common)
    return None


# --- batches -------------------------------------------------------------------------------------------------

class DistributedBatches:
    """This rank's micro-batches of a seeded per-epoch permutation; endless (wraps into new epochs); resumable.

    state_dict() -> {"kind", "micro_step", "epoch", "position", "tokens_seen", "seed", "num_sequences"}:
    `position` is where the next global micro-batch starts (a sequence index into the epoch's permutation,
    or [document, token offset] for a stream); `tokens_seen` counts all ranks' tokens.
    """

    def __init__(self, dataset, *, micro_batch_size: int, rank: int, world_size: int, seed: int,
                 start_step: int = 0):
        if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"micro_batch_size {micro_batch_size}, rank {rank}, world_size {world_size}: "
                             f"need micro_batch_size >= 1 and 0 <= rank < world_size")
        self.dataset, self.mb, self.rank, self.world, self.seed = dataset, micro_batch_size, rank, world_size, seed
        self.streaming = isinstance(dataset, StreamingPackedDataset)
        self.global_batch = micro_batch_size * world_size
        self.epoch, self.micro_step, self.tokens_seen = 0, 0, 0
        self.position = (0, 0) if self.streaming else 0
        self._perm_epoch, self._perm = None, None
        self._stream = None
        if not self.streaming:
            if len(dataset) < self.global_batch:
                raise DataError(f"data: {len(dataset)} packed sequences of {dataset.seq_len} tokens are fewer than "
                                f"one global micro-batch (micro_batch_size {micro_batch_size} x world_size "
                                f"{world_size}); use more data or a smaller batch")
            if start_step:
                per_epoch = len(dataset) // self.global_batch
                self.epoch, self.position = divmod(start_step, per_epoch)
                self.position *= self.global_batch
                self.micro_step = start_step
                self.tokens_seen = start_step * self.global_batch * dataset.seq_len
        elif start_step:
            raise ValueError("start_step is not supported for a streaming dataset; use load_state_dict")

    def __iter__(self) -> "DistributedBatches":
        return self

    def __next__(self) -> dict:
        ids = self._next_stream() if self.streaming else self._next_indexed()
        self.micro_step += 1
        self.tokens_seen += self.global_batch * self.dataset.seq_len
        return {"input_ids": ids, "labels": ids.clone()}

    def _next_indexed(self) -> torch.Tensor:
        if self.position + self.global_batch > len(self.dataset):
            self.epoch, self.position = self.epoch + 1, 0
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.dataset))
            self._perm_epoch = self.epoch
        mine = self.position + self.rank * self.mb
        indices = np.sort(self._perm[mine:mine + self.mb])  # sorted reads; the order inside a batch is irrelevant
        self.position += self.global_batch
        return self.dataset.get_batch(indices)

    def _next_stream(self) -> torch.Tensor:
        round_ = self._read_round()
        if round_ is None:  # the stream ended inside this round: next epoch, from the start
            self.epoch, self.position, self._stream = self.epoch + 1, (0, 0), None
            round_ = self._read_round()
            if round_ is None:
                raise DataError(f"data.source {self.dataset.name!r}: the stream holds fewer than one global "
                                f"micro-batch ({self.global_batch} sequences of {self.dataset.seq_len} tokens)")
        windows, self.position = round_
        return torch.tensor(windows[self.rank * self.mb:(self.rank + 1) * self.mb], dtype=torch.long)

    def _read_round(self):
        if self._stream is None:
            self._stream = self.dataset.windows(tuple(self.position))
        windows, position = [], None
        for window, position in itertools.islice(self._stream, self.global_batch):
            windows.append(window)
        if len(windows) < self.global_batch:
            return None
        return windows, position

    def state_dict(self) -> dict:
        return {"kind": "stream" if self.streaming else "indexed", "micro_step": self.micro_step,
                "epoch": self.epoch, "position": list(self.position) if self.streaming else self.position,
                "tokens_seen": self.tokens_seen, "seed": self.seed,
                "num_sequences": None if self.streaming else len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off (O(1) for indexed data). An empty dict is a no-op (fresh start)."""
        if not state:
            return
        kind = "stream" if self.streaming else "indexed"
        if state.get("kind", kind) != kind:
            raise DataError(f"data.streaming: the checkpoint's data position is of kind {state['kind']!r} but "
                            f"this run's dataset is {kind!r}")
        if not self.streaming and state["num_sequences"] != len(self.dataset):
            raise DataError(f"data: the checkpoint's data position is for {state['num_sequences']} packed "
                            f"sequences but the dataset now has {len(self.dataset)} "
                            f"(data.source, data.seq_len or data.tokenizer changed)")
        self.micro_step, self.epoch, self.tokens_seen = state["micro_step"], state["epoch"], state["tokens_seen"]
        self.seed = state.get("seed", self.seed)
        self.position = tuple(state["position"]) if self.streaming else int(state["position"])
        self._perm_epoch, self._stream = None, None


def eval_batches(dataset, *, micro_batch_size: int, max_batches: int, rank: int, world_size: int) -> list[dict]:
    """Fixed held-out micro-batches, in file order: `max_batches` in all (rounded down to a multiple of the
    world size, at least one per rank), batch k of rank r being global batch k*world + r.
    Every rank gets the same count (forward passes may hold collectives)."""
    if max_batches < 1:
        return []
    per_rank = max(1, max_batches // world_size)
    needed = per_rank * world_size * micro_batch_size
    if isinstance(dataset, StreamingPackedDataset):
        rows = [w for w, _ in itertools.islice(dataset.windows(), needed)]
        tokens = torch.tensor(rows, dtype=torch.long) if rows else torch.empty(0, dataset.seq_len, dtype=torch.long)
    else:
        have = (len(dataset) // (world_size * micro_batch_size)) * world_size * micro_batch_size
        tokens = dataset.get_batch(np.arange(min(needed, have)))
    available = tokens.shape[0] // (world_size * micro_batch_size)
    if available == 0:
        raise DataError(f"validation data: {tokens.shape[0]} packed sequences are fewer than one micro-batch per "
                        f"rank (micro_batch_size {micro_batch_size} x world_size {world_size})")
    batches = []
    for k in range(min(per_rank, available)):
        start = ((k * world_size) + rank) * micro_batch_size
        ids = tokens[start:start + micro_batch_size]
        batches.append({"input_ids": ids, "labels": ids.clone()})
    return batches
