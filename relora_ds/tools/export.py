"""Export a checkpoint (any ZeRO stage, wrapped or not) as a plain Hugging Face model of its family, streamed.

    relora-ds export CHECKPOINT --out DIR [--dtype fp32|bf16] [--max-shard-size 5GB]

The checkpoint is read by tools/reader.py (every file memory-mapped, one tensor made whole at a time) and never
held as a whole fp32 model: it yields the plain model's tensors one by one in the plain model's own order, each
wrapped layer's W merged with its adapters (W + s·B·A in fp32, s = alpha / r, or tanh(g) with trainable scaling;
the adapters themselves are not written), and `export` writes them in the export dtype to sharded safetensors, one
shard held at a time. Memory: about one shard (at most --max-shard-size, or the
largest tensor when that is bigger) plus twice the largest tensor in fp32, so --max-shard-size bounds the export's
memory. The files (shards, `model.safetensors.index.json` when there is more than one, config.json with the export
dtype, generation_config.json, the tokenizer) are written into a temporary sibling directory that is renamed into
place at the end: an interrupted export leaves no half-written DIR, and a DIR holding a previous export
(config.json) is replaced; any other non-empty DIR is refused. `AutoModelForCausalLM.from_pretrained(DIR)` gives
the trained model's logits.
"""

import json
import math
import os
import shutil
import struct

import torch

from relora_ds.files import parse_byte_size
from relora_ds.data.tokenize import load_tokenizer
from relora_ds.engine.checkpoint import CheckpointError
from relora_ds.memory import trim_heap
from relora_ds.tools.reader import INDEX_NAME, WEIGHTS_NAME, open_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_MAX_SHARD_SIZE = "5GB"


class ExportError(CheckpointError):
    """An export that cannot be written (a setting, the output directory); one line, printed like a
    CheckpointError by the command line."""


def parse_size(text) -> int:
    """Bytes in "5GB", "500MB", "2GiB", "1.5GB" or a plain number of bytes (GB = 10^9, GiB = 2^30, as in
    Hugging Face's max_shard_size); a one-line ExportError otherwise."""
    size = parse_byte_size(text)
    if size < 1:
        raise ExportError(f"--max-shard-size {text!r}: not a size; expected a positive number with a unit, "
                          f"such as 5GB, 500MB or 2GiB")
    return size


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ExportError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


# --- writing -------------------------------------------------------------------------------------------------

def plan_shards(sizes: dict, max_shard_size: int) -> list[list[str]]:
    """Names grouped into shards, greedily in order: a shard closes before the tensor that would take it past
    max_shard_size; a tensor larger than max_shard_size gets a shard of its own."""
    shards, current, current_size = [], [], 0
    for name, size in sizes.items():
        if current and current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current:
        shards.append(current)
    return shards


def shard_names(count: int) -> list[str]:
    """Hugging Face's file names: model.safetensors, or model-00001-of-00003.safetensors ..."""
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _check_out_dir(out_dir: str) -> None:
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"--out {out_dir}: exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, "config.json")):
        raise ExportError(f"--out {out_dir}: a non-empty directory that holds no previous export (no config.json); "
                          f"give a new or empty directory")


def export(path: str, out_dir: str, *, dtype: str = "fp32", max_shard_size=DEFAULT_MAX_SHARD_SIZE) -> str:
    """Write the merged plain model (safetensors shards in `dtype`), its config and the tokenizer to `out_dir`;
    returns out_dir. See the module docstring."""
    torch_dtype = _dtype(dtype)
    limit = parse_size(max_shard_size)
    out_dir = os.path.abspath(out_dir)
    _check_out_dir(out_dir)
    source = open_checkpoint(path)
    tag_dir = os.path.realpath(source.tag_dir)
    if os.path.commonpath([tag_dir, os.path.realpath(out_dir)]) == os.path.realpath(out_dir):
        raise ExportError(f"--out {out_dir}: holds the checkpoint {source.tag_dir} itself")

    def out_dtype(name):
        return torch_dtype if source.is_float(name) else source.lazy[name].dtype

    def out_size(name):
        return source.lazy[name].numel() * torch.empty((), dtype=out_dtype(name)).element_size()

    sizes = {name: out_size(name) for name in source.shapes}
    shards = plan_shards(sizes, limit)
    files = shard_names(len(shards))
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.export-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        stream = source.tensors()
        for names, file in zip(shards, files):
            entries = [(name, out_dtype(name), source.shapes[name]) for name in names]
            with SafetensorsWriter(os.path.join(tmp, file), entries, metadata={"format": "pt"}) as writer:
                for name in names:
                    got, tensor = next(stream)
                    writer.write(got, tensor.to(out_dtype(got)))
                    del tensor
                    trim_heap()
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())},
                     "weight_map": {name: file for names, file in zip(shards, files) for name in names}}
            with open(os.path.join(tmp, INDEX_NAME), "w") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config = source.config
        config.dtype = torch_dtype
        config.architectures = [source.architecture]
        config.save_pretrained(tmp)
        if source.generation_config is not None:
            source.generation_config.save_pretrained(tmp)
        load_tokenizer(source.cfg.data.tokenizer).save_pretrained(tmp)
        _replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# safetensors' names of the dtypes an export writes.
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                      torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8"}


class SafetensorsWriter:
    """One safetensors file written tensor by tensor: safetensors' own save_file needs every tensor of the file
    in memory at once, which made a shard (up to --max-shard-size) the export's memory.

    The format (github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON header giving
    each tensor's dtype, shape and [begin, end) byte range in the data that follows (padded with spaces to a
    multiple of 8), then the tensors' bytes back to back. All shapes are known before the first byte, so the
    header goes first and each tensor's bytes follow as it arrives, in `entries` order.
    """

    def __init__(self, path: str, entries: list, metadata: dict | None = None):
        header, offset = ({"__metadata__": metadata} if metadata else {}), 0
        for name, dtype, shape in entries:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.path, self.pending = path, list(entries)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, dtype, shape = self.pending.pop(0)
        if (name, tensor.dtype, tuple(tensor.shape)) != (expected_name, dtype, tuple(shape)):
            raise ValueError(f"{self.path}: got {name} {tensor.dtype} {tuple(tensor.shape)}, the header promised "
                             f"{expected_name} {dtype} {tuple(shape)}")  # a bug in the caller, not user input
        self.file.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        try:
            if kind is None:
                if self.pending:
                    raise ValueError(f"{self.path}: {len(self.pending)} tensors promised by the header not written")
                self.file.flush()
                os.fsync(self.file.fileno())
        finally:
            self.file.close()


def _replace(tmp: str, out_dir: str) -> None:
    """Move the finished export `tmp` to `out_dir`, replacing a previous export (or an empty dir) there."""
    if not os.path.isdir(out_dir):
        os.rename(tmp, out_dir)
        return
    _check_out_dir(out_dir)  # still a previous export or empty
    old = f"{tmp}-previous"
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
