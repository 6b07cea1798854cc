"""Datasets of packed sequences and the rank-sharded, resumable batch stream the trainer consumes.

    build_dataset(source, ...)          -> PackedDataset (random access) or StreamingPackedDataset
    dataset_from_config(cfg.data, ...)  -> the same for the train / validation role (None: no validation)
    DistributedBatches(dataset, ...)    iterator of {"input_ids", "labels"} LongTensor[mb, seq_len] (a mixture:
                                        and "source", each row's source index, LongTensor[mb])
    eval_batches(dataset, ...)          fixed held-out batches, this rank's share
    stream_batches / iterate_tokens     a source as the trainer streams it, for benchmarks and tools

Raw sources are packed once into a cache directory (the same layout `relora-ds pretokenize` writes),
keyed by the source content, tokenizer vocabulary and seq_len; concurrent ranks take a file lock and
the first one builds it.

Order: epoch e visits the sequences in a permutation seeded by (seed, e). Micro-batch i of epoch e on
rank r holds positions [(i*world + r)*mb, +mb) of that permutation; the tail that does not fill a whole
global micro-batch (world*mb sequences) is skipped in that epoch. The position is two integers, so a
resume continues on unseen data in O(1), without reading the batches before it.

A mixture (data.mixture, mixture.py) blends packed datasets row by row by weight; its position is the global row
count and each source's, also O(1) on resume. A streamed mixture is a stream whose every reader blends its shares of
the sources (mixture.MixedSource, MixedShareBatches).

Streaming sources (data.streaming) have no random access. They are split across ranks (and data workers) by
the one rule of stream.py: N = world_size x max(1, data.num_workers) readers, reader k taking the shards (files,
hub shards) k, k+N, ... when their count is a multiple of N, else the records k, k+N, ...; each reader tokenizes
and packs only its own share, in stream order (no shuffling), in this process (data.num_workers 0) or in a
worker process with data.prefetch_batches micro-batches prepared ahead (workers.py). The rank takes its
readers' micro-batches in turn. The position is each reader's (stream position, partial packing buffer): a
resume opens every share where it stopped, without re-reading, re-downloading or re-tokenizing what came
before, and continues with exactly the windows the uninterrupted run would have seen.

Changing the world size on resume: map-style data continues the saved epoch's permutation at the saved global
position with the new number of ranks (nothing repeated, nothing skipped). A stream continues only onto the same
number of readers N (e.g. half the ranks with twice the data.num_workers: every reader continues its own share
exactly, only which rank runs it changes); any other change is refused with a one-line DataError naming the rule.
"""

import dataclasses
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator

import numpy as np
import torch

from relora_ds.data import DataError, epoch_permutation, mixture
from relora_ds.data.pretokenize import MANIFEST_FILE, check_manifest, read_manifest, write_packed
from relora_ds.data.sources import Source, file_format, resolve_source
from relora_ds.data.stream import ShareBatches
from relora_ds.data.tokenize import load_tokenizer, vocab_hash
from relora_ds.data.workers import RankStream
from relora_ds.dist import is_rank_zero


class PackedDataset:
    """Random-access packed sequences of a packed dataset directory (manifest.json + token shards), read in place.

    One read-only numpy memmap per shard file (tokens-00000.bin, ...; the v1 layout's single tokens.bin is one
    shard), opened on first use; global row i lives in the last shard whose first row is <= i. Nothing is
    written, locked or loaded up front, so any number of ranks and nodes can read the same directory on a
    shared filesystem; a pickled copy (a worker process) carries no open maps and reopens them itself.
    """

    def __init__(self, path: str, *, tokenizer=None, seq_len: int | None = None):
        if tokenizer is not None and seq_len is not None:
            self.manifest = check_manifest(path, tokenizer, seq_len)
        else:
            self.manifest = read_manifest(path)
        self.path = path
        self.seq_len = self.manifest["seq_len"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self.shards = [(s["file"], s["num_sequences"]) for s in self.manifest["shards"]]
        self._starts = np.cumsum([0] + [n for _, n in self.shards], dtype=np.int64)  # first row of each shard
        self._maps: list[np.memmap | None] = [None] * len(self.shards)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_tokens(self) -> int:
        return len(self) * self.seq_len

    def _shard(self, s: int) -> np.memmap:
        if self._maps[s] is None:
            name, rows = self.shards[s]
            self._maps[s] = np.memmap(os.path.join(self.path, name), dtype=self.dtype, mode="r",
                                      shape=(rows, self.seq_len))
        return self._maps[s]

    def _rows(self, indices) -> np.ndarray:
        """int64 [len(indices), seq_len] of the given global rows (negative ones count from the end)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        idx = np.where(idx < 0, idx + n, idx)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"{self.path}: sequence index out of range for {n} sequences")
        out = np.empty((len(idx), self.seq_len), dtype=np.int64)
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        for s in np.unique(shard_of):
            mine = shard_of == s
            out[mine] = self._shard(int(s))[idx[mine] - self._starts[s]]
        return out

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self._rows([index])[0])

    def get_batch(self, indices) -> torch.Tensor:
        """LongTensor[len(indices), seq_len] of the given sequences."""
        return torch.from_numpy(self._rows(indices))

    def head(self, count: int) -> torch.Tensor:
        """The first `count` sequences in file order (fewer if there are fewer)."""
        return self.get_batch(np.arange(min(count, len(self))))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": [None] * len(self.shards)}

    def __repr__(self) -> str:
        return f"PackedDataset({self.path!r}, {len(self)} x {self.seq_len} tokens, {len(self.shards)} shards)"


class StreamingPackedDataset:
    """A source read as a sharded stream (stream.py), tokenized and packed on the fly; sequential access only."""

    def __init__(self, source: Source, *, tokenizer, seq_len: int):
        self.source, self.tokenizer, self.seq_len, self.name = source, tokenizer, seq_len, source.name

    def windows(self, limit: int | None = None) -> Iterator[list[int]]:
        """The windows of the whole stream (one reader, one pass), in order; at most `limit`."""
        count = 0
        for batch, _ in ShareBatches(self.source, tokenizer=self.tokenizer, seq_len=self.seq_len,
                                     micro_batch_size=1, passes=1):
            if limit is not None and count >= limit:
                return
            count += 1
            yield batch[0].tolist()

    def head(self, count: int) -> torch.Tensor:
        """The first `count` windows of the stream (fewer if there are fewer)."""
        rows = list(self.windows(count))
        return torch.tensor(rows, dtype=torch.long) if rows else torch.empty(0, self.seq_len, dtype=torch.long)

    def __repr__(self) -> str:
        return f"StreamingPackedDataset({self.name!r}, seq_len={self.seq_len})"


# --- building ------------------------------------------------------------------------------------------------

def build_dataset(source: str, *, tokenizer, seq_len: int, format: str = "auto", text_column: str = "text",
                  split: str = "train", hub_config: str | None = None, streaming: bool = False,
                  cache_dir: str | None = None, skip_bad_records: bool = False):
    """Resolve `source` ('sotu', files/dirs/globs, a pretokenized dir, a hub name) into a packed dataset."""
    src = resolve_source(source, format=format, split=split, text_column=text_column, hub_config=hub_config,
                         streaming=streaming, skip_bad_records=skip_bad_records)
    return dataset_from_source(src, tokenizer=tokenizer, seq_len=seq_len, cache_dir=cache_dir)


def dataset_from_source(src: Source, *, tokenizer, seq_len: int, cache_dir: str | None = None):
    if src.kind == "pretokenized":
        return PackedDataset(src.name, tokenizer=tokenizer, seq_len=seq_len)
    if src.streaming:
        if src.kind == "hub":
            src.hub_dataset()  # fail now (offline, unknown name), not at the first batch
        return StreamingPackedDataset(src, tokenizer=tokenizer, seq_len=seq_len)
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

    data.mixture: a MixedDataset of its entries' datasets by the same rules; its held-out set is
    data.validation_source if set, else a MixedDataset of the entries' held-out sets when every entry has one.
    """
    if data_cfg.mixture:
        return _mixture_from_config(data_cfg, tokenizer, split=split, cache_dir=cache_dir)
    common = dict(tokenizer=tokenizer, seq_len=data_cfg.seq_len, text_column=data_cfg.text_column,
                  hub_config=data_cfg.hub_config, streaming=data_cfg.streaming, cache_dir=cache_dir,
                  skip_bad_records=getattr(data_cfg, "skip_bad_records", False))
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


def _mixture_from_config(data_cfg, tokenizer, *, split: str, cache_dir: str | None):
    if split == "validation" and data_cfg.validation_source:  # one held-out source for the whole blend
        return dataset_from_config(dataclasses.replace(data_cfg, mixture=[]), tokenizer, split=split,
                                   cache_dir=cache_dir)
    entries = mixture.component_configs(data_cfg)
    datasets = [dataset_from_config(entry, tokenizer, split=split, cache_dir=cache_dir) for entry, _, _ in entries]
    names = [name for _, _, name in entries]
    packed = [name for name, ds in zip(names, datasets) if isinstance(ds, PackedDataset)]
    if data_cfg.streaming and packed:
        raise DataError(f"data.mixture: with data.streaming every entry is read as a stream, and "
                        f"{', '.join(packed)} is a pretokenized dataset; stream its raw files, or set data.streaming "
                        f"false to read every entry map-style")
    if split == "train" and data_cfg.streaming:  # every rank's readers blend their shares of the sources
        source = mixture.MixedSource([ds.source for ds in datasets], [weight for _, weight, _ in entries], names)
        return StreamingPackedDataset(source, tokenizer=tokenizer, seq_len=data_cfg.seq_len)
    missing = [entry.source for (entry, _, _), ds in zip(entries, datasets) if ds is None]
    if missing:  # validation only: the training sets exist or raised
        if is_rank_zero():
            print(f"warning: data.mixture: no held-out set for {', '.join(missing)} (set data.validation_source, "
                  f"or the entry's validation_source); no evaluation", flush=True)
        return None
    return mixture.MixedDataset(datasets, [weight for _, weight, _ in entries], names,
                                [entry.source for entry, _, _ in entries])


# --- batches -------------------------------------------------------------------------------------------------

class DistributedBatches:
    """This rank's micro-batches; endless (wraps into new epochs / passes); resumable in O(1).

    Map-style data (PackedDataset): a seeded per-epoch permutation, read in place (the module docstring).
    A mixture (MixedDataset): each global row from the component the blend picks (mixture.py).
    A stream (StreamingPackedDataset): this rank's readers, in this process or in `num_workers` worker processes
    with `prefetch_batches` prepared ahead (stream.py, workers.py). Call close() to stop the workers (also done
    when the object is collected and when the process exits).

    state_dict(), JSON, identical on every rank (for a stream on several ranks it is a collective: it gathers
    every rank's readers):
      map-style: {"kind": "indexed", "micro_step", "epoch", "position", "tokens_seen", "seed", "num_sequences"}:
        `position` is where the next global micro-batch starts (a sequence index into the epoch's permutation)
      stream: {"kind": "stream", "micro_step", "tokens_seen", "seed", "world_size", "num_workers", "readers",
        "per_rank", "turn", "source", "tokenizer", "seq_len", "shares": {reader index: reader state or null}}:
        `turn` is which of a rank's readers serves its next batch; a reader state is stream.py's
        {"epoch", "position", "buffer", "bad_records"}
      mixture (a MixedDataset, mixture.py): {"kind": "mixture", "micro_step", "tokens_seen", "seed", "position",
        "weights", "phase": {"position", "rows"}, "components": [{"source", "num_sequences", "rows"}]}: `position`
        counts the global rows taken, `rows` each component's
    `tokens_seen` counts all ranks' tokens; every kind also holds "skipped", the steps after which data.skip passed
    over data (skip()).
    """

    def __init__(self, dataset, *, micro_batch_size: int, rank: int, world_size: int, seed: int,
                 start_step: int = 0, num_workers: int = 0, prefetch_batches: int = 16):
        if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"micro_batch_size {micro_batch_size}, rank {rank}, world_size {world_size}: "
                             f"need micro_batch_size >= 1 and 0 <= rank < world_size")
        self.dataset, self.mb, self.rank, self.world, self.seed = dataset, micro_batch_size, rank, world_size, seed
        self.streaming = isinstance(dataset, StreamingPackedDataset)
        self.global_batch = micro_batch_size * world_size
        self.epoch, self.micro_step, self.tokens_seen = 0, 0, 0
        self.position = 0
        self._perm_epoch, self._perm = None, None
        self._stream = None
        self._mixture = None
        self.skipped: list[int] = []  # the steps after which data.skip passed over data
        if isinstance(dataset, mixture.MixedDataset):
            if start_step:
                raise ValueError("start_step is not supported for a mixture; use load_state_dict")
            self._mixture = mixture.MixtureOrder(dataset, seed=seed, micro_batch_size=micro_batch_size, rank=rank,
                                                 world_size=world_size)
            return
        if self.streaming:
            if start_step:
                raise ValueError("start_step is not supported for a streaming dataset; use load_state_dict")
            self._stream = RankStream(dataset.source, tokenizer=dataset.tokenizer, seq_len=dataset.seq_len,
                                      micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
                                      num_workers=num_workers, prefetch_batches=prefetch_batches)
            self.num_workers = num_workers
            return
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

    def __iter__(self) -> "DistributedBatches":
        return self

    def __next__(self) -> dict:
        if self._mixture is not None:
            ids = self._mixture.next_batch()
        else:
            ids = next(self._stream) if self.streaming else self.dataset.get_batch(self._next_indices())
        sources = None
        if isinstance(ids, tuple):  # a mixture's: each row's source index
            ids, sources = ids
        self.micro_step += 1
        self.tokens_seen += self.global_batch * self.dataset.seq_len
        batch = {"input_ids": ids, "labels": ids.clone()}
        return batch if sources is None else {**batch, "source": sources}

    def _next_indices(self) -> np.ndarray:
        if self.position + self.global_batch > len(self.dataset):
            self.epoch, self.position = self.epoch + 1, 0
        if self._perm_epoch != self.epoch:
            self._perm = epoch_permutation([self.seed, self.epoch], len(self.dataset))
            self._perm_epoch = self.epoch
        mine = self.position + self.rank * self.mb
        self.position += self.global_batch
        return np.sort(self._perm[mine:mine + self.mb])  # sorted reads; the order inside a batch is irrelevant

    def skip(self, micro_batches: int, at_step: int) -> None:
        """Pass over this rank's next `micro_batches` (every rank alike) without handing them out: map-style data
        and mixtures move their position without reading, a stream reads and drops them. `micro_step` and
        `tokens_seen` do not count them; `at_step` goes into `skipped`, part of the state (data.skip)."""
        for _ in range(micro_batches):
            if self._mixture is not None:
                self._mixture.skip()
            elif self.streaming:
                next(self._stream)
            else:
                self._next_indices()
        self.skipped.append(at_step)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()

    def __enter__(self) -> "DistributedBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- state ---------------------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return "stream" if self.streaming else "mixture" if self._mixture is not None else "indexed"

    def state_dict(self) -> dict:
        if self._mixture is not None:
            return {"kind": "mixture", "micro_step": self.micro_step, "tokens_seen": self.tokens_seen,
                    "seed": self.seed, "skipped": self.skipped, **self._mixture.state_dict()}
        if not self.streaming:
            return {"kind": "indexed", "micro_step": self.micro_step, "epoch": self.epoch,
                    "position": self.position, "tokens_seen": self.tokens_seen, "seed": self.seed,
                    "num_sequences": len(self.dataset), "skipped": self.skipped}
        return self.merge_states(_gather(self.local_state_dict(), self.world))

    def local_state_dict(self) -> dict:
        """A stream's state with this rank's readers only; state_dict() merges all ranks' (merge_states)."""
        if not self.streaming:
            return self.state_dict()
        ds = self.dataset
        return {"kind": "stream", "micro_step": self.micro_step, "tokens_seen": self.tokens_seen, "seed": self.seed,
                "skipped": self.skipped, "world_size": self.world, "num_workers": self.num_workers,
                "source": ds.source.identity(), "tokenizer": vocab_hash(ds.tokenizer), "seq_len": ds.seq_len,
                **self._stream.local_state()}

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        """One state of a stream from every rank's local_state_dict() (in any order)."""
        merged = dict(states[0])
        merged["shares"] = {k: v for state in states for k, v in state["shares"].items()}
        return merged

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off, in O(1). An empty dict is a no-op (fresh start)."""
        if not state:
            return
        kind = self.kind
        if state.get("kind", kind) != kind:
            raise DataError(f"data: the checkpoint's data position is of kind {state['kind']!r} but this run's "
                            f"dataset is {kind!r} (data.streaming and data.mixture must stay as they were)")
        if self._mixture is not None:
            self._mixture.load_state_dict(state)
        elif self.streaming:
            self._load_stream_state(state)
        else:
            if state["num_sequences"] != len(self.dataset):
                raise DataError(f"data: the checkpoint's data position is for {state['num_sequences']} packed "
                                f"sequences but the dataset now has {len(self.dataset)} "
                                f"(data.source, data.seq_len or data.tokenizer changed)")
            self.epoch, self.position = state["epoch"], int(state["position"])
            self._perm_epoch = None
        self.micro_step, self.tokens_seen = state["micro_step"], state["tokens_seen"]
        self.seed = state.get("seed", self.seed)
        self.skipped = list(state.get("skipped", []))

    def _load_stream_state(self, state: dict) -> None:
        ds, stream = self.dataset, self._stream
        if "shares" not in state:
            raise DataError("data: the checkpoint's stream position is of the older format (one position in the "
                            "whole stream, read by every rank); the sharded stream cannot continue it exactly: "
                            "resume with the relora-ds version that wrote it, or start the stream afresh")
        if state["readers"] != stream.readers:
            raise DataError(_readers_changed(state, self.world, self.num_workers, stream.readers))
        changed = [name for name, saved, now in (("data.source", state["source"], ds.source.identity()),
                                                 ("data.tokenizer", state["tokenizer"], vocab_hash(ds.tokenizer)),
                                                 ("data.seq_len", state["seq_len"], ds.seq_len)) if saved != now]
        if changed:
            raise DataError(f"data: the checkpoint's stream position is for another {' and '.join(changed)} "
                            f"(a stream continues only on the same files or hub split, tokenizer and seq_len)")
        missing = [str(k) for k in range(stream.first, stream.first + stream.per_rank) if str(k) not in state["shares"]]
        if missing:
            raise DataError(f"data: the checkpoint's stream position has no state for reader(s) {', '.join(missing)} "
                            f"(rank {self.rank}); save it with state_dict() on every rank, not local_state_dict()")
        same_split = state["per_rank"] == stream.per_rank
        stream.load_local_state(state["shares"], state["turn"] if same_split else 0)
        saved = next((share["weights"] for share in state["shares"].values() if share and "weights" in share), None)
        if saved is not None and not mixture.same_weights(saved, ds.source.weights) and self.rank == 0:
            print(f"data.mixture: the weights change from {mixture.show(saved)} to {mixture.show(ds.source.weights)} "
                  f"from here on, in every reader's own rows", flush=True)


def _gather(local: dict, world: int) -> list[dict]:
    if world == 1:
        return [local]
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() == world):
        raise ValueError(f"state_dict() of a stream on {world} ranks gathers every rank's readers and needs "
                         f"torch.distributed on those ranks; without it take local_state_dict() on each rank and "
                         f"merge_states()")
    states = [None] * world
    dist.all_gather_object(states, local)
    return states


def _readers_changed(state: dict, world: int, num_workers: int, readers: int) -> str:
    saved = state["readers"]
    hint = ""
    if saved % world == 0:
        hint = f"; with world size {world}, data.num_workers {saved // world} continues it exactly"
    return (f"data: the checkpoint's stream was read by {saved} readers (world size {state['world_size']} x "
            f"max(1, data.num_workers {state['num_workers']})) but this run has {readers} (world size {world} x "
            f"max(1, data.num_workers {num_workers})); a stream resumes only onto the same number of readers, "
            f"each continuing its own share (README, Data){hint}")


def held_out_sets(dataset, **kwargs) -> list[tuple[str | None, float, list[dict]]]:
    """(name, weight, eval_batches(...)) of each held-out set: one (None, 1.0, ...) for a single dataset, one per
    source for a mixture's held-out sets (`max_batches` each); [] without a dataset. kwargs: eval_batches'."""
    if dataset is None:
        return []
    if not isinstance(dataset, mixture.MixedDataset):
        return [(None, 1.0, eval_batches(dataset, **kwargs))]
    sets = []
    for name, weight, part in zip(dataset.names, dataset.weights, dataset.components):
        try:
            sets.append((name, weight, eval_batches(part, **kwargs)))
        except DataError as e:
            raise DataError(f"data.mixture {name!r}: {e}") from None
    return sets


def eval_batches(dataset, *, micro_batch_size: int, max_batches: int, rank: int, world_size: int) -> list[dict]:
    """Fixed held-out micro-batches, in file order: `max_batches` in all (rounded down to a multiple of the
    world size, at least one per rank), batch k of rank r being global batch k*world + r.
    Every rank gets the same count (forward passes may hold collectives)."""
    if max_batches < 1:
        return []
    per_rank = max(1, max_batches // world_size)
    tokens = dataset.head(per_rank * world_size * micro_batch_size)
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


# --- a source as the trainer streams it (benchmarks, tools) ---------------------------------------------------

def stream_batches(source: str = "sotu", *, tokenizer=None, seq_len: int = 256, micro_batch_size: int = 8,
                   num_workers: int = 0, prefetch_batches: int = 16, rank: int = 0, world_size: int = 1,
                   format: str = "auto", text_column: str = "text", split: str = "train",
                   hub_config: str | None = None, skip_bad_records: bool = False) -> DistributedBatches:
    """The DistributedBatches the trainer builds for `source` with data.streaming: true, as rank `rank` of
    `world_size` (no torch.distributed needed for one rank). `tokenizer`: a loaded tokenizer, a name/dir, or
    None for the shipped one. Close it (or use `with`) to stop its workers."""
    tok = load_tokenizer(tokenizer) if tokenizer is None or isinstance(tokenizer, str) else tokenizer
    dataset = build_dataset(source, tokenizer=tok, seq_len=seq_len, format=format, text_column=text_column,
                            split=split, hub_config=hub_config, streaming=True, skip_bad_records=skip_bad_records)
    return DistributedBatches(dataset, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size, seed=0,
                              num_workers=num_workers, prefetch_batches=prefetch_batches)


def iterate_tokens(source: str = "sotu", *, state: dict | None = None, **kwargs) -> Iterator[torch.Tensor]:
    """Endless: this rank's micro-batches (LongTensor[micro_batch_size, seq_len]) of `source`, read, tokenized,
    packed (and prefetched by `num_workers` processes) exactly as the trainer streams them. Keyword arguments:
    stream_batches'. `state`: a state_dict() to resume from. Workers stop when the iterator is closed.

        for ids in itertools.islice(iterate_tokens("sotu", seq_len=512, num_workers=2), 100):
            tokens += ids.numel()
    """
    batches = stream_batches(source, **kwargs)
    try:
        if state:
            batches.load_state_dict(state)
        for batch in batches:
            yield batch["input_ids"]
    finally:
        batches.close()
