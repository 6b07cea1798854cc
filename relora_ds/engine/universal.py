"""Resuming on another number of ranks: DeepSpeed's universal checkpoint of a ZeRO tag.

ZeRO-1/2/3 write each rank's slice of the optimizer state (the fp32 masters and Adam moments) to one file per
data-parallel rank, and DeepSpeed loads those only on the world size that wrote them. When a resumed run has another
world size (a job requeued on fewer or more nodes), rank 0 converts the tag with DeepSpeed's own converter
(`deepspeed.checkpoint.ds_to_universal`) into `<tag>/zero/` (one folder per parameter: fp32, exp_avg,
exp_avg_sq), the engine is made with `checkpoint.load_universal`, and every rank reads its new slice from there;
the folder is removed once every rank has loaded. DeepSpeed's universal load restores the trainable parameters
and nothing else of the module: the frozen parameters (ReLoRA's W among them; on ZeRO-3 each rank's new slice) and
the buffers (a stored W's scales) are copied after it from the tag, one tensor at a time (`restore_untrained`).
Below ZeRO-3 each wrapped W is read as on any resume.

A tag without per-rank optimizer files (ZeRO-0 with torch's optimizer) loads on any world size as it is.

    universal = prepare(tag_dir, stage)   # every rank; rank 0 converts when the world size changed
    ... make the engine with load_universal when `universal`, load the tag ...
    finish(tag_dir, module)               # every rank: what the universal load left out; rank 0 removes <tag>/zero
"""

import os
import re
import resource
import shutil
import subprocess
import sys
import time

import torch

from relora_ds import dist
from relora_ds.engine import ds_config as dsc, zero, zero_checkpoint
from relora_ds.engine.checkpoint import CheckpointError, on_rank_zero
from relora_ds.relora.wrap import relora_modules

FOLDER = "zero"  # where DeepSpeed's universal load looks, inside the tag
# How long the other ranks wait for rank 0's conversion: the optimizer state of a full-rank 7b is 84 GB to read
# and write again, longer than DeepSpeed's 10-minute collective timeout.
CONVERSION_WAIT_S = 6 * 3600
OPTIMIZER_FILE = re.compile(r"(bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt")
ZERO3_MODEL_FILE = re.compile(r"zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt")  # ZeRO-3: one per rank


def saved_ranks(tag_dir: str) -> int:
    """The number of data-parallel ranks whose optimizer files the tag holds (0: none, the optimizer state is in
    the model file and loads on any world size)."""
    return len({m.group(2) for m in map(OPTIMIZER_FILE.fullmatch, os.listdir(tag_dir)) if m})


def is_zero3(tag_dir: str) -> bool:
    return any(ZERO3_MODEL_FILE.fullmatch(name) for name in os.listdir(tag_dir))


# ZeRO stages whose files one another's engines load: 1 and 2 lay out the optimizer state alike.
STAGE_FAMILIES = ({0}, {1, 2}, {3})


def saved_stage(tag_dir: str) -> int | None:
    """The ZeRO stage of the DeepSpeed config the tag was written with (None: a tag without one)."""
    names = sorted(n for n in os.listdir(tag_dir) if n.endswith("_model_states.pt"))
    if not names:
        return None
    state = zero_checkpoint.load_file(os.path.join(tag_dir, names[0]))
    config = state.get("ds_config") if isinstance(state, dict) else None
    return dsc.zero_stage(config) if isinstance(config, dict) else None


def check_stage(tag_dir: str, stage: int) -> None:
    """A one-line CheckpointError when this run's ZeRO stage cannot load the tag's files."""
    saved = saved_stage(tag_dir)
    family = next(f for f in STAGE_FAMILIES if stage in f)
    if saved is not None and saved not in family:
        allowed = " or ".join(str(s) for s in sorted(next(f for f in STAGE_FAMILIES if saved in f)))
        raise CheckpointError(f"{tag_dir}: written with ZeRO stage {saved} and this run has zero_optimization.stage "
                              f"{stage}; resume it with stage {allowed}")


def prepare(tag_dir: str, stage: int) -> bool:
    """Whether the tag must be loaded as a universal checkpoint on this world size; if so, rank 0 has converted it
    into `<tag>/zero/` (collective: every rank returns, or raises the same CheckpointError). A ZeRO `stage` that
    cannot load the tag's files is refused first."""
    check_stage(tag_dir, stage)
    world = dist.world_size()
    saved = saved_ranks(tag_dir)
    if saved in (0, world):
        return False
    on_rank_zero(convert, tag_dir, saved, world, wait_s=CONVERSION_WAIT_S)
    return True


def convert(tag_dir: str, saved: int, world: int) -> float:
    """DeepSpeed's universal form of the tag in `<tag>/zero/`, written beside the tag and moved in whole; returns the
    seconds it took. One process (rank 0)."""
    began = time.perf_counter()
    parent, tag = os.path.split(os.path.normpath(tag_dir))
    work = os.path.join(parent, f".universal-{tag}")  # not a step_ name: never taken for a tag
    shutil.rmtree(work, ignore_errors=True)
    out = os.path.join(work, tag)
    source = os.path.join(work, "input")
    slim_input(tag_dir, source)
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", source,
               "--output_folder", out, "--inject_missing_state", "--num_extract_workers", workers,
               "--num_merge_workers", workers]
    print(f"resume: {tag_dir} was written by {saved} ranks and this run has {world}; converting it to DeepSpeed's "
          f"universal checkpoint ({' '.join(command[1:4])} ...)", flush=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if result.returncode != 0 or not os.path.isdir(os.path.join(out, FOLDER)):
        os.makedirs(work, exist_ok=True)
        log = os.path.join(work, "convert.log")
        with open(log, "w") as f:
            f.write(result.stdout)
        last = (result.stdout.strip().splitlines() or ["no output"])[-1]
        raise CheckpointError(f"{tag_dir}: DeepSpeed's universal conversion failed (exit {result.returncode}: "
                              f"{last}); its output is in {log}")
    shutil.rmtree(os.path.join(tag_dir, FOLDER), ignore_errors=True)  # left by a resume that died after converting
    os.replace(os.path.join(out, FOLDER), os.path.join(tag_dir, FOLDER))
    shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB → GiB; its largest process
    print(f"resume: converted in {seconds:.1f} s, the converter's peak RSS {peak:.2f} GiB", flush=True)
    return seconds


def slim_input(tag_dir: str, folder: str) -> None:
    """What the converter needs of the tag, in `folder`: links to the optimizer files, and copies of the model-states
    files without the module's tensors and the frozen fragments (the universal load reads those from the tag
    itself). Given the module's tensors, the converter writes an fp32 file for each one without optimizer state
    (every frozen W) through `tensor.float()`, which for an fp32 W is the tensor itself; after the switch each W is
    a view into the full-rank engine's flat buffer, and each file held that whole buffer (1.2 GB per W of a 350m)."""
    from deepspeed.checkpoint.constants import FROZEN_PARAM_FRAGMENTS

    os.makedirs(folder)
    for name in sorted(os.listdir(tag_dir)):
        path = os.path.join(tag_dir, name)
        if OPTIMIZER_FILE.fullmatch(name):
            os.symlink(os.path.abspath(path), os.path.join(folder, name))
        elif name.endswith("_model_states.pt"):
            state = zero_checkpoint.load_file(path)
            state["module"] = {}
            state.pop(FROZEN_PARAM_FRAGMENTS, None)
            torch.save(state, os.path.join(folder, name))
            del state


def finish(tag_dir: str, module) -> None:
    """After every rank loaded the tag: what DeepSpeed's universal load leaves out (it restores the trainable
    parameters only) is restored (`restore_untrained`); then rank 0 removes `<tag>/zero/` (collective), so the tag
    is as it was saved."""
    restore_untrained(tag_dir, module)
    dist.barrier()
    if dist.is_rank_zero():
        shutil.rmtree(os.path.join(tag_dir, FOLDER), ignore_errors=True)
    dist.barrier()


def restore_untrained(tag_dir: str, module) -> None:
    """The module's tensors that are not trained, which the universal load does not read: frozen parameters (on
    ZeRO-3 this rank's new slice, from every rank's fragments) and buffers (a stored W's `weight_scale`,
    `merge_residual`), one tensor at a time through `zero_checkpoint`; local, no communication. A wrapped W held whole
    on this rank was copied already, when DeepSpeed read the module file (`checkpoint.memory_mapped_loads`)."""
    saved = zero_checkpoint.lazy_fp32_state_dict(tag_dir)
    whole_w = {f"{name}.weight" for name, layer in relora_modules(module).items() if not hasattr(layer.weight, "ds_id")}
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if name in whole_w or (isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad):
                continue
            if name not in saved:
                if name.endswith(".merge_residual"):  # a tag saved before track_drift was on: zeros, as always
                    continue
                raise CheckpointError(f"{tag_dir}: holds no {name}")
            if hasattr(tensor, "ds_id"):
                zero.write_module_param(tensor, saved[name].load())
            else:
                tensor.copy_(saved[name].load())
