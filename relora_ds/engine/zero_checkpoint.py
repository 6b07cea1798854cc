"""A DeepSpeed checkpoint tag read lazily: every tensor of the module, whole and in fp32, one at a time.

    tensors = lazy_fp32_state_dict(tag_dir)       # {name: LazyTensor}, nothing read yet
    for name, lazy in tensors.items():
        w = lazy.load()                            # this tensor only, full shape, fp32 (a fresh copy)

Why not DeepSpeed's own `zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`: it loads every
`*model_states.pt` whole (no mmap), concatenates every frozen parameter up front (in a ReLoRA checkpoint the
frozen W are ~95% of the model) and, on ZeRO-1/2, the whole fp32 flat group of every rank; only ZeRO-3's
trainable parameters are lazy. Here every file is opened with `torch.load(mmap=True)` (a page not read costs no
memory), each LazyTensor knows which ranges of which ranks' tensors make it, and `load()` copies those ranges
into one new tensor and then drops the pages it read from this process (Linux: madvise, only on ranges that
/proc/self/maps shows mapped from the checkpoint file), so reading a whole checkpoint tensor by tensor holds one
tensor at a time. The values are bitwise those of DeepSpeed's consolidated dict cast to fp32
(tests/e2e/test_export_stream.py), for the layouts DeepSpeed 0.19.8 writes:

- ZeRO-0 (no `*optim_states.pt`): `mp_rank_00_model_states.pt`["module"] holds every tensor whole, in the
  training dtype (bf16/fp16 runs: the 16-bit module weights, cast to fp32, not the optimizer's fp32 masters).
- ZeRO-1/2: trainable parameters from the ranks' `single_partition_of_fp32_groups` (the fp32 masters: per
  group the ranks' partitions concatenated, the parameters one after another in `param_shapes` order, each
  followed by its `param_alignment_paddings` entry, the group padded to 2 x world size); frozen parameters from
  rank 0's `frozen_param_fragments` (whole), on ZeRO-1 (which saves no fragments) from the module, which holds
  them whole; buffers from the module.
- ZeRO-3: trainable parameters from the ranks' `fp32_flat_groups` (each parameter ceil(numel / world) elements
  per rank, at the same offset on every rank; the concatenation over ranks narrowed to numel); frozen
  parameters = the ranks' `frozen_param_fragments[name]` concatenated and narrowed to numel; buffers from rank
  0's module (whole: ZeRO-3 does not partition buffers).
- shared parameters (`shared_params`, e.g. tied embeddings): the alias gets the same LazyTensor.
Layouts this does not know (no `zero_stage` in the optimizer states, a rank's file missing) are a one-line
CheckpointError naming the file.

The files may come from someone else (`export`, `eval` and `analyze` read shared checkpoints), so they are read
with `torch.load(weights_only=True)`: tensors, plain containers and the three DeepSpeed types its checkpoints
hold (`_deepspeed_globals`), allowed for that read only. A pickle naming anything else (a function it would call,
any other class) is refused unrun, as a one-line CheckpointError naming the file and the type.
"""

import ctypes
import math
import os
import pickle
import sys
from collections import OrderedDict

import torch

from relora_ds.engine.checkpoint import UNREADABLE, CheckpointError


class LazyTensor:
    """A tensor of the checkpoint not read yet: `.shape`, `.dtype` (of what `load` returns), `.numel()`, and
    `.load()`, the full tensor as a new CPU tensor (fp32 for floating-point data).

    `pieces`: (path, source tensor, start, length) — `length` elements from flat element `start` of a tensor
    loaded from the file `path`; the result is their concatenation, viewed as `shape`. `droppable`: per piece,
    whether its source is memory-mapped from `path` (set by `lazy_fp32_state_dict`; only those pages are dropped).
    """

    __slots__ = ("shape", "dtype", "pieces", "droppable")

    def __init__(self, shape, pieces: list, dtype: torch.dtype):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.pieces = pieces
        self.droppable = [False] * len(pieces)

    def numel(self) -> int:
        return math.prod(self.shape)

    @torch.no_grad()  # the saved fp32 masters are Parameters: no autograd record of the copy
    def load(self) -> torch.Tensor:
        out = torch.empty(self.numel(), dtype=self.dtype)
        position = 0
        for (_, source, start, length), droppable in zip(self.pieces, self.droppable):
            out[position:position + length].copy_(source.detach().reshape(-1)[start:start + length])
            position += length
            if droppable:
                _drop_pages(source, start, length)
        if position != out.numel():
            raise CheckpointError(f"{self.pieces[0][0] if self.pieces else '?'}: {position} elements found for a "
                                  f"tensor of shape {tuple(self.shape)}")
        return out.view(self.shape)

    def __repr__(self) -> str:
        return f"LazyTensor(shape={tuple(self.shape)}, dtype={self.dtype}, pieces={len(self.pieces)})"


def _whole(path: str, tensor: torch.Tensor) -> LazyTensor:
    dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
    return LazyTensor(tensor.shape, [(path, tensor, 0, tensor.numel())], dtype)


# --- reading the files -------------------------------------------------------------------------------------

def _deepspeed_globals() -> list:
    """The only objects other than tensors and plain containers that DeepSpeed 0.19.8 pickles into the
    `*model_states.pt` and `*optim_states.pt` files of the layouts relora-ds trains (ZeRO 0-3, fp32 and bf16,
    BF16_Optimizer; found with torch.serialization.get_unsafe_globals_in_checkpoint over real checkpoints).
    The model states hold none."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [
        ZeroStageEnum,  # ZeRO-1/2/3 optimizer states: "zero_stage"
        LossScaler,  # ZeRO-1/2/3 optimizer states: "loss_scaler" (the static scaler of fp32 and bf16 runs)
        fragment_address,  # ZeRO-1/2 and BF16_Optimizer optimizer states: "param_slice_mappings"
    ]


def load_file(path: str) -> dict:
    """torch.load with mmap (storages stay on disk until read) and weights_only: tensors, plain containers and
    `_deepspeed_globals()`, nothing that runs code. A file holding anything else, or that cannot be read, is one
    line."""
    allowed = _deepspeed_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except UNREADABLE as e:
        unknown = _unknown_globals(path, allowed) if isinstance(e, pickle.UnpicklingError) else []
        if unknown:
            message = (f"holds a pickled object of type {', '.join(unknown)}, which is not a tensor or a known "
                       f"DeepSpeed type, so it is not loaded (untrusted checkpoint)")
        else:
            detail = " ".join(str(e).split())
            message = f"cannot be read, truncated or corrupt? ({type(e).__name__}: {detail[:200]})"
        raise CheckpointError(f"{path}: {message}") from None


def _unknown_globals(path: str, allowed: list) -> list[str]:
    """The globals the file's pickle names (read, not run) that weights_only refuses and `allowed` leaves out."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except UNREADABLE:
        return []
    known = {f"{cls.__module__}.{cls.__qualname__}" for cls in allowed}
    return [name for name in found if name not in known]


def _files(finder, tag_dir: str) -> list[str]:
    """DeepSpeed's own file globbing (natural rank order), [] instead of its FileNotFoundError."""
    try:
        return finder(tag_dir)
    except FileNotFoundError:
        return []


def _get(state: dict, key: str, path: str):
    try:
        return state[key]
    except (KeyError, TypeError):
        raise CheckpointError(f"{path}: no '{key}' entry (not a DeepSpeed checkpoint file of a layout relora-ds "
                              f"reads)") from None


def lazy_fp32_state_dict(tag_dir: str) -> "OrderedDict[str, LazyTensor]":
    """Every tensor of the checkpoint's module (parameters, persistent buffers, shared aliases) as a LazyTensor,
    for ZeRO stages 0-3, fp32 or 16-bit. Reads only the files' metadata; see the module docstring."""
    tensors = _lazy_tensors(tag_dir)
    _mark_droppable(tensors.values())
    return tensors


def _lazy_tensors(tag_dir: str) -> "OrderedDict[str, LazyTensor]":
    from relora_ds.engine.runtime import prepare_deepspeed

    prepare_deepspeed()  # a DeepSpeed version whose layouts are verified; the CPU accelerator without CUDA
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARTITION_COUNT, ZERO_STAGE
    from deepspeed.utils.zero_to_fp32 import get_model_state_files, get_optim_files

    if not os.path.isdir(tag_dir):
        raise CheckpointError(f"{tag_dir}: not a directory")
    model_files = _files(get_model_state_files, tag_dir)
    if not model_files:
        raise CheckpointError(f"{tag_dir}: no DeepSpeed model states file (*model_states.pt) found")
    optim_files = _files(get_optim_files, tag_dir)
    if not optim_files:  # ZeRO-0: the module is whole
        path = model_files[0]
        module = _get(load_file(path), "module", path)
        return OrderedDict((name, _whole(path, tensor)) for name, tensor in module.items())

    optim_states = [_get(load_file(path), OPTIMIZER_STATE_DICT, path) for path in optim_files]
    first = optim_files[0]
    stage = _get(optim_states[0], ZERO_STAGE, first)
    world_size = _get(optim_states[0], PARTITION_COUNT, first)
    if isinstance(world_size, (list, tuple)):
        world_size = max(world_size)
    if world_size != len(optim_files):
        raise CheckpointError(f"{tag_dir}: {len(optim_files)} *_optim_states.pt files for a world of {world_size} "
                              f"ranks (a rank's file is missing, or files of another save are mixed in)")
    if int(stage) in (1, 2):
        return _zero12(model_files[0], optim_files, optim_states, world_size)
    if int(stage) == 3:
        if len(model_files) != world_size:
            raise CheckpointError(f"{tag_dir}: {len(model_files)} *_model_states.pt files for a ZeRO-3 world of "
                                  f"{world_size} ranks")
        return _zero3(model_files, optim_files, optim_states, world_size)
    raise CheckpointError(f"{first}: ZeRO stage {stage!r}, relora-ds reads stages 0-3")


def _buffers(path: str, model_state: dict) -> "OrderedDict[str, LazyTensor]":
    from deepspeed.checkpoint.constants import BUFFER_NAMES

    module = _get(model_state, "module", path)
    names = set(_get(model_state, BUFFER_NAMES, path))
    return OrderedDict((k, _whole(path, v)) for k, v in module.items() if k in names)


def _add_shared(tensors: dict, model_state: dict) -> None:
    """DeepSpeed's rule: an alias whose source is in the dict gets the source's tensor."""
    for alias, source in (model_state.get("shared_params") or {}).items():
        if source in tensors:
            tensors[alias] = tensors[source]


def _ranges(sources: list, starts: list, offset: int, length: int) -> list:
    """(path, tensor, start, length) pieces covering [offset, offset + length) of the concatenation of
    `sources` ((path, tensor) pairs) whose flat starts are `starts` (plus the total at the end)."""
    pieces = []
    end = offset + length
    for (path, tensor), lo, hi in zip(sources, starts, starts[1:]):
        a, b = max(lo, offset), min(hi, end)
        if a < b:
            pieces.append((path, tensor, a - lo, b - a))
    return pieces


def _zero12(model_path: str, optim_files: list, optim_states: list, world_size: int):
    from deepspeed.checkpoint.constants import (FROZEN_PARAM_FRAGMENTS, FROZEN_PARAM_SHAPES, PARAM_ALIGNMENT_PADDINGS,
                                                PARAM_SHAPES, SINGLE_PARTITION_OF_FP32_GROUPS)

    model_state = load_file(model_path)
    tensors = _buffers(model_path, model_state)
    frozen_shapes = model_state.get(FROZEN_PARAM_SHAPES) or {}
    fragments = model_state.get(FROZEN_PARAM_FRAGMENTS) or {}
    for name, shape in frozen_shapes.items():  # ZeRO-2: each frozen parameter whole on rank 0
        if name not in fragments:
            raise CheckpointError(f"{model_path}: frozen parameter {name} has no fragment")
        tensors[name] = LazyTensor(shape, [(model_path, fragments[name], 0, math.prod(shape))], torch.float32)
    param_shapes = _get(model_state, PARAM_SHAPES, model_path)
    groups = [_get(s, SINGLE_PARTITION_OF_FP32_GROUPS, p) for s, p in zip(optim_states, optim_files)]
    paddings = optim_states[0].get(PARAM_ALIGNMENT_PADDINGS)
    trainable = OrderedDict()
    align = 2 * world_size
    for g, shapes in enumerate(param_shapes):
        if any(len(rank_groups) <= g for rank_groups in groups):
            raise CheckpointError(f"{optim_files[0]}: {len(groups[0])} fp32 groups for {len(param_shapes)} "
                                  f"parameter groups in {model_path}")
        sources = [(path, rank_groups[g]) for path, rank_groups in zip(optim_files, groups)]
        starts = [0]
        for _, partition in sources:
            starts.append(starts[-1] + partition.numel())
        available = starts[-1]
        group_paddings = paddings[g] if paddings is not None else None
        if group_paddings is not None and len(group_paddings) != len(shapes):
            raise CheckpointError(f"{optim_files[0]}: {len(group_paddings)} alignment paddings for the "
                                  f"{len(shapes)} parameters of group {g}")
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            if offset + numel > available:
                raise CheckpointError(f"{optim_files[0]}: parameter {name} ends at {offset + numel}, past the "
                                      f"{available} fp32 elements of group {g}")
            trainable[name] = LazyTensor(shape, _ranges(sources, starts, offset, numel), torch.float32)
            offset += numel + (group_paddings[i] if group_paddings is not None else 0)
        if align * math.ceil(offset / align) != align * math.ceil(available / align):
            raise CheckpointError(f"{optim_files[0]}: group {g} uses {offset} of its {available} fp32 elements "
                                  f"(a layout relora-ds does not know)")
    if not frozen_shapes:  # ZeRO-1 saves no frozen fragments: the module holds every parameter whole
        module = _get(model_state, "module", model_path)
        aliases = set((model_state.get("shared_params") or {}))
        for name, tensor in module.items():
            if name not in tensors and name not in trainable and name not in aliases:
                tensors[name] = _whole(model_path, tensor)
    tensors.update(trainable)
    _add_shared(tensors, model_state)
    return tensors


def _zero3(model_files: list, optim_files: list, optim_states: list, world_size: int):
    from deepspeed.checkpoint.constants import (FP32_FLAT_GROUPS, FROZEN_PARAM_FRAGMENTS, FROZEN_PARAM_SHAPES,
                                                PARAM_SHAPES)
    from deepspeed.utils.zero_to_fp32 import zero3_partitioned_param_info

    model_states = [load_file(path) for path in model_files]
    tensors = _buffers(model_files[0], model_states[0])
    for name, shape in (model_states[0].get(FROZEN_PARAM_SHAPES) or {}).items():
        numel = math.prod(shape)
        pieces, position = [], 0
        for path, state in zip(model_files, model_states):
            fragment = (state.get(FROZEN_PARAM_FRAGMENTS) or {}).get(name)
            if fragment is None:
                raise CheckpointError(f"{path}: no fragment of frozen parameter {name}")
            take = min(fragment.numel(), numel - position)
            if take > 0:
                pieces.append((path, fragment, 0, take))
                position += take
        if position != numel:
            raise CheckpointError(f"{model_files[0]}: the fragments of frozen parameter {name} hold {position} "
                                  f"of its {numel} elements")
        tensors[name] = LazyTensor(shape, pieces, torch.float32)
    shapes = OrderedDict()
    for group in _get(model_states[0], PARAM_SHAPES, model_files[0]):
        shapes.update(group)
    flat = [_get(s, FP32_FLAT_GROUPS, p) for s, p in zip(optim_states, optim_files)]
    group_starts = [0]
    for tensor in flat[0]:
        group_starts.append(group_starts[-1] + tensor.numel())
    offset = 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        partitioned, _ = zero3_partitioned_param_info(numel, world_size)
        pieces, remaining = [], numel
        for path, rank_groups in zip(optim_files, flat):
            take = min(partitioned, remaining)
            pieces += _ranges([(path, t) for t in rank_groups], group_starts, offset, take)
            remaining -= take
        tensors[name] = LazyTensor(shape, pieces, torch.float32)
        offset += partitioned
    if offset != group_starts[-1]:
        raise CheckpointError(f"{optim_files[0]}: the trainable parameters use {offset} of the {group_starts[-1]} "
                              f"fp32 elements per rank (a layout relora-ds does not know)")
    _add_shared(tensors, model_states[0])
    return tensors


# --- giving read pages back ----------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4  # Linux
_libc = None


def _mark_droppable(tensors) -> None:
    """Mark the pieces whose source tensor lies inside a private memory map of its own file (one look at
    /proc/self/maps). Such a mapping lives as long as the source tensor, which the piece holds: its pages can be
    dropped after a read (they are never written) and are mapped again from the file if read again. Anything
    else (not Linux, a tensor not memory-mapped) is never dropped."""
    if not sys.platform.startswith("linux"):
        return
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return
    ranges = {}
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1].endswith("p"):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.setdefault(fields[5], []).append((lo, hi))
    real = {}
    for tensor in tensors:
        for i, (path, source, _, _) in enumerate(tensor.pieces):
            if path not in real:
                real[path] = os.path.realpath(path)
            storage = source.untyped_storage()
            begin, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
            tensor.droppable[i] = any(lo <= begin and end <= hi for lo, hi in ranges.get(real[path], ()))


def _drop_pages(source: torch.Tensor, start: int, length: int) -> None:
    """Drop from this process the whole pages of `source`'s elements [start, start + length), once copied out.

    `source` comes from a private (copy-on-write, never written) mmap of a checkpoint file (`_mark_droppable`):
    the pages read are file pages that would otherwise count in this process's resident memory until the whole
    file is released, so reading a checkpoint tensor by tensor would end up holding all of it. Dropped, a page
    read again is mapped again from the file.
    """
    global _libc
    item = source.element_size()
    begin = source.data_ptr() + start * item
    first, last = -(-begin // _PAGE) * _PAGE, (begin + length * item) // _PAGE * _PAGE
    if last - first < 16 * _PAGE:  # small: not worth a system call
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise(first, last - first, _MADV_DONTNEED)
    except (OSError, AttributeError):
        return
