"""A model's weights, read one fp32 tensor at a time and never the whole model: a relora-ds checkpoint (any ZeRO
stage, fp32 or bf16, its wrapped layers merged) or an exported Hugging Face model dir (safetensors).

    model = open_model(path)                      # nothing read yet: .shapes, .targets, .step, ...
    for name, tensor in model.tensors(names):     # fp32, one tensor at a time
        ...

`relora-ds export` writes a checkpoint's tensors as safetensors shards, `eval` fills a plain model with them and
`analyze` streams two models in lockstep.

A checkpoint (`open_checkpoint`: a run dir, its checkpoints/ dir or one step_* dir, resolved and verified as a
resume resolves it, `engine.checkpoint.find_checkpoint`) is read by `engine.zero_checkpoint.lazy_fp32_state_dict`:
every file memory-mapped and unpickled with torch.load(weights_only=True), one tensor made whole at a time. Its
tensors are the plain model's, in that model's own state dict order, tied aliases left out (as save_pretrained
does): each wrapped layer's weight is what the run's method exports (W + s·B·A in fp32, s = alpha / r, or tanh(g)
with trainable scaling; a W stored as int8 or fp8 is dequantized with its per-row `weight_scale` first), the adapters
are not yielded, everything else passes through. The checkpoint must be its
config's model (names, shapes, adapter rank), else a one-line CheckpointError.

A model dir (config.json and model.safetensors, or shards and model.safetensors.index.json) is read with
safetensors' safe_open, each tensor on its own, in the order asked for; its `shapes` are in the files' own order
(shard by shard, by offset): the model's for `relora-ds export`, by name for files that safetensors' save_file wrote.

Both readers have `kind` ("checkpoint" or "export"), `path` (as given), `resolved` (the step_* dir or the model dir),
`step` (None for a model dir), `shapes` ({name: shape}), `targets` (the modules the run wrapped, else the family's
default projections; None when neither is known) and `tensors(names=None)`. A path or model dir that cannot be read
is a one-line ReadError (a CheckpointError).
"""

import json
import os
import struct

import torch

from relora_ds import methods
from relora_ds.config import RunConfig
from relora_ds.model.families import default_target_modules
from relora_ds.engine import checkpoint
from relora_ds.engine.checkpoint import CheckpointError
from relora_ds.engine.zero_checkpoint import lazy_fp32_state_dict
from relora_ds.model.build import describe, input_embedding_name, meta_model
from relora_ds.relora import quant

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
ADAPTER_SUFFIXES = ("lora_A", "lora_B", "lora_scaling")
SCALE_SUFFIX = "weight_scale"  # beside a W stored as int8 or fp8 (relora.base_dtype): its per-row scales
RUN_STATE_SUFFIXES = ("merge_residual",)  # relora.track_drift's sum of rounding errors: the run's, not the model's


class ReadError(CheckpointError):
    """A path or a model dir that cannot be read (no such path, no safetensors weights, a broken header or index);
    one line, printed like a CheckpointError by the command line."""


def family_targets(model_type: str | None) -> list[str] | None:
    """The default targets of a model family (by its model_type); None for a model_type without."""
    try:
        return list(default_target_modules(model_type))
    except ValueError:
        return None


# --- a relora-ds checkpoint --------------------------------------------------------------------------------------

class CheckpointReader:
    """A checkpoint opened without reading any tensor: `tag_dir` (= `resolved`), `state` (the run state), `cfg` (its
    RunConfig), `lazy` (the checkpoint's own tensors, engine.zero_checkpoint's LazyTensors), `shapes` (the plain
    model's tensor names in its state dict order, tied aliases left out, with their shapes), `wrapped` (weight name
    -> adapter prefix), `vocab_size`, and the plain model's `config`, `generation_config` and `architecture`."""

    kind = "checkpoint"

    def __init__(self, path: str):
        self.path = path
        self.tag_dir = self.resolved = checkpoint.find_checkpoint(path)
        self.state = checkpoint.read_state(self.tag_dir)
        if not isinstance(self.state.get("config"), dict):
            raise CheckpointError(f"{os.path.join(self.tag_dir, checkpoint.STATE_FILE)}: holds no run config")
        self.step = self.state.get("step")
        self.cfg = RunConfig.from_dict(self.state["config"])
        self.method = methods.from_config(self.cfg)
        self.lazy = lazy_fp32_state_dict(self.tag_dir)
        try:  # the vocabulary: the rows of the input embedding, named as the run's family names it
            embedding_name = input_embedding_name(self.cfg.model)
        except ValueError as e:
            raise CheckpointError(f"{self.tag_dir}: cannot build the run's model ({e})") from None
        embedding = self.lazy.get(embedding_name)
        if embedding is None:
            raise CheckpointError(f"{self.tag_dir}: no {embedding_name} in the checkpoint (not a model of its config, "
                                  f"{describe(self.cfg.model)}?)")
        self.vocab_size = embedding.shape[0]
        try:
            meta = meta_model(self.cfg.model, self.vocab_size)
        except ValueError as e:
            raise CheckpointError(f"{self.tag_dir}: cannot build the run's model ({e})") from None
        self.config = meta.config
        self.generation_config = getattr(meta, "generation_config", None)
        self.architecture = type(meta).__name__
        self.shapes, self.aliases, seen = {}, [], set()
        for name, tensor in meta.state_dict(keep_vars=True).items():
            if id(tensor) in seen:  # a tied alias (lm_head.weight of tied embeddings): not yielded
                self.aliases.append(name)
            else:
                seen.add(id(tensor))
                self.shapes[name] = tuple(tensor.shape)
        self.wrapped = {name: name[:-len("weight")] for name in self.shapes
                        if name.endswith(".weight") and f"{name[:-len('weight')]}lora_A" in self.lazy}
        targets = self.cfg.relora.target_modules
        self.targets = list(targets) if targets is not None else family_targets(self.config.model_type)
        self._check()

    def _check(self) -> None:
        """The checkpoint's tensors are the plain model's (adapters of wrapped layers and tied aliases aside), of
        the same shapes; the adapters have the run's rank. One CheckpointError line otherwise."""
        allowed = {prefix + suffix for prefix in self.wrapped.values()
                   for suffix in (*ADAPTER_SUFFIXES, SCALE_SUFFIX, *RUN_STATE_SUFFIXES)}
        missing = [k for k in self.shapes if k not in self.lazy]
        missing += [p + "lora_B" for p in self.wrapped.values() if p + "lora_B" not in self.lazy]
        unexpected = [k for k in self.lazy if k not in self.shapes and k not in allowed and k not in self.aliases]
        model = describe(self.cfg.model)
        if missing or unexpected:
            raise CheckpointError(f"{self.tag_dir}: checkpoint does not match its config ({model}): "
                                  f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, "
                                  f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        for name, shape in self.shapes.items():
            if tuple(self.lazy[name].shape) != shape:
                raise CheckpointError(f"{self.tag_dir}: {name} has shape {tuple(self.lazy[name].shape)} in the "
                                      f"checkpoint, {shape} in its config's model ({model})")
        if bool(self.state.get("wrapped", bool(self.wrapped))) != bool(self.wrapped):
            raise CheckpointError(f"{self.tag_dir}: its run state says wrapped={self.state.get('wrapped')}, but it "
                                  f"holds {len(self.wrapped)} wrapped layers (lora_A) of its config's model ({model})")
        rank = self.cfg.relora.rank
        for name, prefix in self.wrapped.items():
            out_features, in_features = self.shapes[name]
            a, b = tuple(self.lazy[prefix + "lora_A"].shape), tuple(self.lazy[prefix + "lora_B"].shape)
            if a != (rank, in_features) or b != (out_features, rank):
                raise CheckpointError(f"{self.tag_dir}: {prefix}lora_A {a} / lora_B {b} do not fit relora.rank "
                                      f"{rank} and W {(out_features, in_features)}")

    def is_float(self, name: str) -> bool:
        """Whether `tensors()` yields `name` as a float tensor (a wrapped layer's W always is, even stored as int8)."""
        return name in self.wrapped or self.lazy[name].dtype.is_floating_point

    def tensors(self, names=None):
        """(name, fp32 tensor) of the plain model, one at a time, in the model's order, wrapped layers merged; with
        `names`, only those (still in the model's order, whatever order `names` has; nothing else is read)."""
        wanted = None if names is None else set(names)
        for name in self.shapes:
            if wanted is not None and name not in wanted:
                continue
            tensor = self.lazy[name].load()
            prefix = self.wrapped.get(name)
            if prefix is not None and prefix + SCALE_SUFFIX in self.lazy:  # a stored int8/fp8 W: dequantized
                tensor = quant.dequantize(tensor, self.lazy[prefix + SCALE_SUFFIX].load())
            if prefix is not None:  # the run's method says what its wrapped layers export as (W + s·B·A)
                adapters = {suffix: self.lazy[prefix + suffix].load() for suffix in ADAPTER_SUFFIXES
                            if prefix + suffix in self.lazy}
                tensor = self.method.exported_weight(tensor, adapters)
                del adapters
            yield name, tensor


def open_checkpoint(path: str) -> CheckpointReader:
    """The checkpoint at `path` (a run dir, its checkpoints/ dir or one step_* dir), opened and checked against its
    config without reading any tensor. One-line CheckpointError for a checkpoint that is not its config's model."""
    return CheckpointReader(path)


def merged_tensors(path: str):
    """(Hugging Face name, fp32 tensor) of the checkpoint's plain model at `path`, one at a time, in the plain
    model's state dict order: each wrapped layer's weight merged, adapters and a tied lm_head.weight left out."""
    yield from open_checkpoint(path).tensors()


# --- an exported model dir -----------------------------------------------------------------------------------------

def read_safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file: {name: {dtype, shape, data_offsets}} (and __metadata__)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 1 << 30:
                raise ValueError(f"header of {length} bytes")
            return json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as e:
        raise ReadError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                        f"{' '.join(str(e).split())})") from None


class SafetensorsReader:
    """An exported (Hugging Face) model dir: `files` ({name: its safetensors file}) and `shapes`, from the files'
    headers (no tensor read); `targets` are its family's defaults, by the model_type of its config.json."""

    kind = "export"
    step = None

    def __init__(self, path: str):
        self.path = self.resolved = path
        try:
            with open(os.path.join(path, CONFIG_NAME)) as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None
        self.targets = family_targets(model_type)
        index = os.path.join(path, INDEX_NAME)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                files = {name: os.path.join(path, file) for name, file in weight_map.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise ReadError(f"{index}: unreadable ({type(e).__name__}: {' '.join(str(e).split())})") from None
        else:
            files = None
        self.files, self.shapes = {}, {}
        for file in sorted(set(files.values())) if files else [os.path.join(path, WEIGHTS_NAME)]:
            if not os.path.isfile(file):
                raise ReadError(f"{file}: missing (named in {INDEX_NAME})")
            header = read_safetensors_header(file)
            header.pop("__metadata__", None)
            try:
                ordered = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
                for name, info in ordered:
                    if files is None or files.get(name) == file:
                        self.shapes[name] = tuple(int(d) for d in info["shape"])
                        self.files[name] = file
            except (KeyError, TypeError, IndexError, ValueError) as e:
                raise ReadError(f"{file}: not a safetensors header ({type(e).__name__}: {e})") from None
        if files is not None:
            absent = [name for name in files if name not in self.files]
            if absent:
                raise ReadError(f"{index}: {absent[0]} is not in {os.path.basename(files[absent[0]])}"
                                f"{f' (and {len(absent) - 1} more)' if len(absent) > 1 else ''}")

    def tensors(self, names=None):
        """(name, fp32 tensor) of `names` (default: all, in the files' order) in that order, each read from its file
        on its own."""
        from safetensors import safe_open

        handles = {}
        try:
            for name in self.shapes if names is None else names:
                file = self.files[name]
                if file not in handles:
                    handles[file] = safe_open(file, framework="pt", device="cpu")
                tensor = handles[file].get_tensor(name)
                yield name, tensor.to(torch.float32) if tensor.dtype != torch.float32 else tensor
                del tensor
        finally:
            handles.clear()


# --- either ------------------------------------------------------------------------------------------------------

def is_model_dir(path: str) -> bool:
    """Whether `path` is a Hugging Face model dir (it holds config.json) rather than a relora-ds checkpoint."""
    return os.path.isfile(os.path.join(path, CONFIG_NAME))


def open_model(path: str):
    """The model at `path`, opened without reading any tensor: a SafetensorsReader for an exported model dir
    (config.json and safetensors weights), else a CheckpointReader (a run dir, a checkpoints/ or step_* dir)."""
    if not os.path.exists(path):
        raise ReadError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        raise ReadError(f"{path}: not a directory (expected a run dir, a step_* checkpoint dir or an exported model "
                        f"dir)")
    if is_model_dir(path):
        if not (os.path.isfile(os.path.join(path, WEIGHTS_NAME)) or os.path.isfile(os.path.join(path, INDEX_NAME))):
            raise ReadError(f"{path}: a model dir without safetensors weights ({WEIGHTS_NAME} or {INDEX_NAME}); save "
                            f"it with safe_serialization or export it with relora-ds export")
        return SafetensorsReader(path)
    return CheckpointReader(path)


__all__ = ["CheckpointReader", "ReadError", "SafetensorsReader", "is_model_dir", "merged_tensors", "open_checkpoint",
           "open_model", "read_safetensors_header"]
