"""One rank's stream of micro-batches: its readers (stream.py) taken in turn, in this process or in workers.

With data.num_workers W = 0 the rank has one reader and runs it here, in the training process (the debugging
path). With W >= 1 the rank has W readers, reader rank*W + j run by worker j, and a torch DataLoader over an
IterableDataset runs them in W background processes with data.prefetch_batches micro-batches prepared ahead.

Why a DataLoader rather than hand-made queues: it brings the worker lifecycle (start by fork, death detection,
clean shutdown when the iterator is closed or collected), and for an endless IterableDataset it hands out the
workers' batches in strict turn (batch i from worker i mod W). So the rank's order is a pure function of its
readers' own sequences, and the resumable state is just each reader's state after the last batch taken from it
plus whose turn is next — each batch travels with its reader's state, so nothing that the workers prepared
ahead but the trainer never took is ever counted. On resume worker j runs reader (j + turn) mod W, so the
rotation continues where it stopped. A batch travels as a numpy array through the DataLoader's pipe (for
micro-batches this is cheaper than torch's shared-memory file per tensor: it halved the trainer process's share
of the work in the measurement of the 2-worker pipeline).

A trainer killed outright (SIGKILL: a node failure, the OOM killer) does not take the DataLoader's workers with it:
the DataLoader's watchdog looks at the parent only between fetches, and a worker whose prepared batches fill
the pipe to the dead trainer blocks on exit (its queue's feeder thread waits on the full pipe, whose read end
the workers themselves hold) and stays forever, re-parented to init, holding its memory. So each worker asks
Linux at start to be killed when its parent dies (`_die_with_parent`: prctl PR_SET_PDEATHSIG with SIGKILL),
and exits at once if the parent died before it asked. Elsewhere (no prctl) the DataLoader's watchdog is all.

A worker never raises through the DataLoader (that would be a multi-line traceback): it sends a one-line
message instead, which the trainer's process raises as a DataError; a worker that dies (killed, out of memory)
is also one line.
"""

import ctypes
import functools
import os
import signal
import sys
import traceback
from collections.abc import Iterator

import numpy as np
import torch

from relora_ds.data import DataError
from relora_ds.data.mixture import MixedShareBatches, MixedSource, jsonable_share
from relora_ds.data.sources import _one_line
from relora_ds.data.stream import ShareBatches


class _Failure:
    """What a worker sends instead of raising: the one-line message."""

    def __init__(self, message: str):
        self.message = message


def _identity(item):
    return item


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int, worker_id: int) -> None:
    """A worker's first act (the DataLoader's worker_init_fn): be killed by Linux when `parent` dies.

    Linux sends the signal when the thread that forked this worker exits, not only the process: the workers are
    forked by `iter(loader)` in RankStream._start, called by the first __next__, i.e. in the thread that takes
    the batches (the trainer's main thread). A stream must not be started in a thread that ends before the
    process does."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died between the fork and prctl: no signal will come
        os._exit(1)


def reader_batches(src, **kwargs):
    """One reader's (micro-batch, state) iterator: stream.ShareBatches of a source, mixture.MixedShareBatches of a
    data.mixture's sources."""
    return MixedShareBatches(src, **kwargs) if isinstance(src, MixedSource) else ShareBatches(src, **kwargs)


class _Readers(torch.utils.data.IterableDataset):
    """The rank's readers for the DataLoader: worker j runs reader (j + turn) mod W from its saved state."""

    def __init__(self, src, *, tokenizer, seq_len, micro_batch_size, rank, readers, first, states, turn):
        self.src, self.tokenizer, self.seq_len, self.mb = src, tokenizer, seq_len, micro_batch_size
        self.rank, self.readers, self.first, self.states, self.turn = rank, readers, first, states, turn

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        local = (worker + self.turn) % len(self.states)
        reader = self.first + local
        try:
            if self.src.kind == "hub":
                import fsspec.asyn

                fsspec.asyn.reset_lock()  # a forked copy of the parent's event loop lock would hang
            for batch, state in reader_batches(self.src, tokenizer=self.tokenizer, seq_len=self.seq_len,
                                               micro_batch_size=self.mb, reader=reader, readers=self.readers,
                                               state=self.states[local]):
                # pickled through the pipe: cheaper than a shared-memory file per batch
                yield (tuple(t.numpy() for t in batch) if isinstance(batch, tuple) else batch.numpy()), state
        except DataError as e:
            yield _Failure(str(e))
        except Exception as e:  # noqa: BLE001 - anything else still reaches the trainer as one line
            frame = traceback.extract_tb(e.__traceback__)[-1]
            yield _Failure(f"data worker {worker} of rank {self.rank} (reader {reader} of {self.readers}) failed: "
                           f"{type(e).__name__}: {_one_line(e)} (at {os.path.basename(frame.filename)}:"
                           f"{frame.lineno})")


class RankStream:
    """This rank's micro-batches of a stream (LongTensor[mb, seq_len]; of a mixture, with each row's source index:
    (rows, LongTensor[mb])); resumable through local_state()."""

    def __init__(self, src, *, tokenizer, seq_len: int, micro_batch_size: int, rank: int, world_size: int,
                 num_workers: int = 0, prefetch_batches: int = 16):
        if num_workers < 0 or prefetch_batches < 1:
            raise ValueError(f"num_workers {num_workers}, prefetch_batches {prefetch_batches}: need >= 0 and >= 1")
        self.src, self.tokenizer, self.seq_len, self.mb = src, tokenizer, seq_len, micro_batch_size
        self.rank, self.world, self.num_workers, self.prefetch = rank, world_size, num_workers, prefetch_batches
        self.per_rank = max(1, num_workers)
        self.readers = world_size * self.per_rank
        self.first = rank * self.per_rank  # this rank's readers: first, ..., first + per_rank - 1
        self.states: list[dict | None] = [None] * self.per_rank
        self.turn = 0  # the local reader that serves the next batch
        self._it: Iterator | None = None

    def __next__(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = self._start()
        try:
            item = next(self._it)
        except RuntimeError as e:  # the DataLoader's own: a worker died (killed, out of memory)
            if self.num_workers == 0:
                raise
            self.close()
            raise DataError(f"data.num_workers: a data worker of rank {self.rank} stopped: {_one_line(e)}; its "
                            f"messages are above (out of memory: fewer workers or data.prefetch_batches)") from None
        except StopIteration:
            self.close()
            raise DataError(f"data.source {self.src.name!r}: the data workers of rank {self.rank} stopped "
                            f"without an error message") from None
        if isinstance(item, _Failure):
            self.close()
            raise DataError(item.message)
        batch, state = item
        if isinstance(batch, tuple):  # a mixture's rows and their sources
            batch = tuple(torch.from_numpy(t) if isinstance(t, np.ndarray) else t for t in batch)
        elif isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch)
        self.states[self.turn] = state
        self.turn = (self.turn + 1) % self.per_rank
        return batch

    def _start(self) -> Iterator:
        if self.num_workers == 0:
            return iter(reader_batches(self.src, tokenizer=self.tokenizer, seq_len=self.seq_len,
                                       micro_batch_size=self.mb, reader=self.first, readers=self.readers,
                                       state=self.states[0]))
        readers = _Readers(self.src, tokenizer=self.tokenizer, seq_len=self.seq_len, micro_batch_size=self.mb,
                           rank=self.rank, readers=self.readers, first=self.first, states=list(self.states),
                           turn=self.turn)
        # The workers tokenize one document stream each; the Rust tokenizer's own threads would only compete.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        loader = torch.utils.data.DataLoader(
            readers, batch_size=None, collate_fn=_identity, num_workers=self.num_workers,
            prefetch_factor=-(-self.prefetch // self.num_workers),
            worker_init_fn=functools.partial(_die_with_parent, os.getpid()),
            multiprocessing_context="fork" if sys.platform.startswith("linux") else None)
        try:
            return iter(loader)
        except AssertionError as e:  # "daemonic processes are not allowed to have children"
            raise DataError(f"data.num_workers {self.num_workers}: cannot start worker processes here "
                            f"({_one_line(e)}); use data.num_workers: 0") from None

    def local_state(self) -> dict:
        """JSON: {"readers", "per_rank", "turn", "shares": {reader index: its state or None}}."""
        return {"readers": self.readers, "per_rank": self.per_rank, "turn": self.turn,
                "shares": {str(self.first + j): jsonable_share(s) for j, s in enumerate(self.states)}}

    def load_local_state(self, shares: dict, turn: int) -> None:
        """Continue every reader of this rank from `shares` (reader index -> state) with reader `turn` next."""
        self.close()
        self.states = [shares.get(str(self.first + j)) for j in range(self.per_rank)]
        self.turn = turn % self.per_rank

    def close(self) -> None:
        """Stop the worker processes (idempotent; also done when the object is collected)."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        elif it is not None and hasattr(it, "close"):
            it.close()
