"""Checkpoints: DeepSpeed save/load plus the run's own state, written so a torn write is never resumed.

Layout of `<output_dir>/checkpoints/`:
    step_00000500/              DeepSpeed's files for that tag (model, optimizer shards)
        relora_state.json       the run state (step, restart counter, mode, data position, config)
        rank_00000_rng.pt       per-rank RNG states
        MANIFEST.json           every other file of the tag: relative path, size in bytes, CRC32
        COMPLETE                written last, after every rank finished writing and MANIFEST.json
    latest                      the newest complete tag (written atomically; informational)
    reference                   the tag of the reference checkpoint (the warm-start switch, or
                                checkpoint.reference_step): the W that `relora-ds analyze` subtracts; never pruned
    damaged/step_00000500[.N]   complete tags whose files no longer match MANIFEST.json, moved aside by a resume,
                                a save of the same step or the pruning, with a warning naming them; never deleted
A tag without COMPLETE is never resumed from and is removed by the next save. A complete tag is never
removed to be rewritten: saving the same step with the same run state again (a resumed run that had already
finished, a requeued job) keeps the tag on disk as it is, unless its files no longer match MANIFEST.json.
Resuming takes the newest complete tag whose files match MANIFEST.json (sizes and CRC32s) and skips, with a
one-line warning, newer ones that do not; a tag named explicitly must match. A tag without MANIFEST.json
(written before relora-ds recorded one) is taken as it is.
"""

import contextlib
import json
import os
import pickle
import shutil
import sys
import zlib

import torch

from relora_ds import dist
from relora_ds.engine import zero
from relora_ds.files import atomic_write
from relora_ds.relora.wrap import relora_modules

COMPLETE = "COMPLETE"
STATE_FILE = "relora_state.json"
MANIFEST = "MANIFEST.json"
REFERENCE = "reference"
DAMAGED = "damaged"
CHUNK_BYTES = 8 << 20
# What torch.load and DeepSpeed's zero_to_fp32 raise on a truncated or corrupt file.
UNREADABLE = (OSError, EOFError, RuntimeError, pickle.UnpicklingError, ValueError, KeyError)


class CheckpointError(ValueError):
    """No usable checkpoint where one was asked for."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(checkpoint_dir: str) -> list[str]:
    """Complete tags, oldest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    tags = [t for t in os.listdir(checkpoint_dir)
            if t.startswith("step_") and os.path.isfile(os.path.join(checkpoint_dir, t, COMPLETE))]
    return sorted(tags)


def find_checkpoint(path: str, checksums: bool = True, set_aside: bool = False) -> str:
    """Resolve `path` to an intact complete tag dir, or raise CheckpointError.

    One tag dir (holding COMPLETE) must pass verify. A checkpoints dir or a run dir gives its newest complete
    tag that passes verify; each newer one that fails is skipped with a one-line warning on stderr (rank 0).
    set_aside (a resume, on rank 0 only): each one that fails is also moved to checkpoints/damaged/ (`set_aside`),
    so no later save or pruning can delete it and the next resume does not read it again.
    """
    if os.path.isfile(os.path.join(path, COMPLETE)):
        verify(path, checksums)
        return path
    for directory in (path, os.path.join(path, "checkpoints")):
        tags, failures = complete_tags(directory), []
        for tag in reversed(tags):
            try:
                verify(os.path.join(directory, tag), checksums)
                return os.path.join(directory, tag)
            except CheckpointError as e:
                failures.append(str(e))
                if set_aside:
                    set_aside_damaged(directory, tag, str(e), then="trying an older one")
                elif dist.is_rank_zero():
                    print(f"warning: {e}; skipping checkpoint {tag}, trying an older one", file=sys.stderr,
                          flush=True)
        if tags:
            moved = f", all moved to {os.path.join(directory, DAMAGED)}" if set_aside else ""
            raise CheckpointError(f"{directory}: none of its {len(tags)} complete checkpoints is intact{moved} "
                                  f"(the newest: {failures[0]})")
    raise CheckpointError(f"{path}: no complete relora-ds checkpoint found (expected a step_* directory "
                          f"holding {COMPLETE}, directly or under checkpoints/)")


def set_aside_damaged(checkpoint_dir: str, tag: str, reason: str, then: str = "") -> str:
    """Move the damaged tag `checkpoint_dir`/`tag` to `checkpoint_dir`/damaged/`tag` (`tag`.1, .2, ... when that is
    taken) with a one-line warning naming both and why; return where it went. Damaged checkpoints are never
    deleted by relora-ds: what is left of them may still be read by hand. Rank 0 only."""
    parent = os.path.join(checkpoint_dir, DAMAGED)
    os.makedirs(parent, exist_ok=True)
    target, n = os.path.join(parent, tag), 0
    while os.path.lexists(target):
        n += 1
        target = os.path.join(parent, f"{tag}.{n}")
    os.replace(os.path.join(checkpoint_dir, tag), target)
    print(f"warning: {reason}; checkpoint {tag} moved to {target} (kept, never deleted)"
          f"{'; ' + then if then else ''}", file=sys.stderr, flush=True)
    return target


def find_resume_checkpoint(path: str) -> str:
    """`find_checkpoint(path, set_aside=True)` for a run being resumed: rank 0 verifies the tags and moves the
    damaged ones aside; every rank gets its answer (the tag dir, or the same CheckpointError)."""
    return on_rank_zero(find_checkpoint, path, set_aside=True)


def on_rank_zero(fn, *args, wait_s: float | None = None, **kwargs):
    """fn(*args, **kwargs) run by rank 0 alone; every rank returns its value or raises its CheckpointError
    (collective; the others wait up to `wait_s`, see dist.from_rank_zero)."""
    outcome = None
    if dist.is_rank_zero():
        try:
            outcome = ("value", fn(*args, **kwargs))
        except CheckpointError as e:
            outcome = ("error", str(e))
    kind, value = dist.from_rank_zero(outcome, wait_s)
    if kind == "error":
        raise CheckpointError(value)
    return value


def file_crc32(path: str) -> int:
    """CRC32 of a file, read in CHUNK_BYTES pieces (about 0.4 s per GB from the page cache)."""
    crc, buffer = 0, bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return crc


def write_manifest(tag_dir: str) -> None:
    """Record every file under `tag_dir` but COMPLETE (relative path, size in bytes, CRC32) in MANIFEST.json,
    written atomically."""
    files = {}
    for root, _, names in os.walk(tag_dir):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, tag_dir)
            if relative not in (MANIFEST, COMPLETE):
                files[relative] = {"size": os.path.getsize(path), "crc32": file_crc32(path)}
    atomic_write(os.path.join(tag_dir, MANIFEST), json.dumps({"files": files}, indent=1, sort_keys=True))


def mark_complete(tag_dir: str, step: int) -> None:
    """Write MANIFEST.json, then COMPLETE: the last act of a save, once every file of the tag is written."""
    write_manifest(tag_dir)
    atomic_write(os.path.join(tag_dir, COMPLETE), f"{step}\n")


def verify(tag_dir: str, checksums: bool = True) -> None:
    """Raise CheckpointError naming the first file of MANIFEST.json that is missing, of another size or (with
    `checksums`) of another CRC32. A tag without MANIFEST.json passes."""
    manifest_path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isfile(manifest_path):
        return
    try:
        with open(manifest_path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable ({type(e).__name__}: {' '.join(str(e).split())})") from None
    for relative, expected in sorted(files.items()):
        path = os.path.join(tag_dir, relative)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        size = os.path.getsize(path)
        if size != expected["size"]:
            raise CheckpointError(f"{path}: {size} bytes, {MANIFEST} records {expected['size']} "
                                  f"(truncated or overwritten)")
        if checksums and file_crc32(path) != expected["crc32"]:
            raise CheckpointError(f"{path}: CRC32 differs from {MANIFEST} (corrupt file)")


def read_state(tag_dir: str) -> dict:
    path = os.path.join(tag_dir, STATE_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint state ({e})") from None


def save(engine, checkpoint_dir: str, *, step: int, state: dict, keep_last: int, reference: bool = False) -> str:
    """Save on every rank (collective); returns the tag dir. `state` must be identical on all ranks.
    reference: record the tag as the run's reference checkpoint (kept whatever keep_last says)."""
    tag = tag_for(step)
    tag_dir = os.path.join(checkpoint_dir, tag)
    if _same_complete_tag(tag_dir, state):
        if reference and dist.is_rank_zero():
            atomic_write(os.path.join(checkpoint_dir, REFERENCE), tag + "\n")
        return tag_dir
    if dist.is_rank_zero() and os.path.isdir(tag_dir):
        if os.path.isfile(os.path.join(tag_dir, COMPLETE)):  # complete, but another state or damaged files
            _set_aside_or_remove(checkpoint_dir, tag, then=f"saving step {step} again")
        else:
            shutil.rmtree(tag_dir)  # an earlier torn write of the same step
    dist.barrier()
    engine.save_checkpoint(checkpoint_dir, tag=tag, client_state={"relora_ds": state}, save_latest=False)
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save(rng, os.path.join(tag_dir, f"rank_{dist.rank():05d}_rng.pt"))
    dist.barrier()
    if dist.is_rank_zero():
        atomic_write(os.path.join(tag_dir, STATE_FILE), json.dumps(state, indent=1, sort_keys=True))
        mark_complete(tag_dir, step)
        atomic_write(os.path.join(checkpoint_dir, "latest"), tag + "\n")
        if reference:
            atomic_write(os.path.join(checkpoint_dir, REFERENCE), tag + "\n")
        _prune(checkpoint_dir, keep_last, newest=tag)
    dist.barrier()
    return tag_dir


def _same_complete_tag(tag_dir: str, state: dict) -> bool:
    """Whether `tag_dir` is already complete with this very run state and files of the sizes MANIFEST.json
    records (rank 0 decides; every rank hears it)."""
    same = False
    if dist.is_rank_zero() and os.path.isfile(os.path.join(tag_dir, COMPLETE)):
        try:
            verify(tag_dir, checksums=False)
            same = read_state(tag_dir) == json.loads(json.dumps(state))
        except CheckpointError:
            same = False
    return dist.from_rank_zero(same)


def reference_checkpoint(path: str) -> str | None:
    """The reference tag dir of a run dir or its checkpoints dir (the warm-start switch, or
    checkpoint.reference_step); None when the run recorded none. A recorded tag that is gone or damaged is a
    CheckpointError."""
    for directory in (path, os.path.join(path, "checkpoints")):
        tag = _reference_tag(directory)
        if tag is not None:
            tag_dir = os.path.join(directory, tag)
            if not os.path.isfile(os.path.join(tag_dir, COMPLETE)):
                raise CheckpointError(f"{os.path.join(directory, REFERENCE)}: names {tag}, which is not a complete "
                                      f"checkpoint in {directory}")
            verify(tag_dir, checksums=False)
            return tag_dir
    return None


def _reference_tag(checkpoint_dir: str) -> str | None:
    try:
        with open(os.path.join(checkpoint_dir, REFERENCE)) as f:
            return f.read().strip()
    except OSError:
        return None


def _prune(checkpoint_dir: str, keep_last: int, newest: str) -> None:
    """Keep the newest `keep_last` complete tags (and the reference tag); drop older ones and torn ones older than
    `newest`."""
    kept = _reference_tag(checkpoint_dir)
    complete = [t for t in complete_tags(checkpoint_dir) if t != kept]
    doomed = complete[:-keep_last] if keep_last > 0 else []
    doomed += [t for t in os.listdir(checkpoint_dir)
               if t.startswith("step_") and t not in complete and t != kept and t < newest]
    for tag in doomed:
        if os.path.isfile(os.path.join(checkpoint_dir, tag, COMPLETE)):
            _set_aside_or_remove(checkpoint_dir, tag, then=f"keeping the newest {keep_last}")
        else:
            shutil.rmtree(os.path.join(checkpoint_dir, tag), ignore_errors=True)


def _set_aside_or_remove(checkpoint_dir: str, tag: str, then: str) -> None:
    """A complete tag that is to go: removed when its files still match MANIFEST.json by size (an intact
    checkpoint replaced or pruned as asked), else moved aside as damaged, never deleted. Rank 0."""
    try:
        verify(os.path.join(checkpoint_dir, tag), checksums=False)
    except CheckpointError as e:
        set_aside_damaged(checkpoint_dir, tag, str(e), then=then)
        return
    shutil.rmtree(os.path.join(checkpoint_dir, tag), ignore_errors=True)


@contextlib.contextmanager
def memory_mapped_loads(engine):
    """Within it, DeepSpeed's torch checkpoint engine memory-maps the files it loads instead of reading each whole.

    DeepSpeed 0.19.8 reads a rank's model-states file whole (torch.load) and then copies its frozen fragments into
    the partitions, so a ZeRO-3 resume held the rank's frozen weights twice (6.5 GB more per rank for a 7b on two
    ranks). Memory-mapped (copy-on-write), pages are read as they are copied and stay reclaimable. Each wrapped
    layer's W held whole on this rank (a stored W, or the frozen Parameter below ZeRO-3) is read through a mapping of
    its own (`copy_stored_weights`).
    """
    from deepspeed.checkpoint.constants import FROZEN_PARAM_FRAGMENTS

    engine_of_files = getattr(engine, "checkpoint_engine", None)
    if type(engine_of_files).__name__ != "TorchCheckpointEngine":  # another engine (async, Nebula): as it is
        yield
        return

    whole_w = {f"{name}.weight": module.weight for name, module in relora_modules(engine.module).items()
              if not hasattr(module.weight, "ds_id")}  # ds_id: a ZeRO-3 partition, restored by DeepSpeed
    residuals = {f"{name}.merge_residual": module.merge_residual
                 for name, module in relora_modules(engine.module).items()
                 if getattr(module, "merge_residual", None) is not None}

    def load(path, map_location=None):
        state = torch.load(path, map_location=map_location, weights_only=False, mmap=True)
        module_state = state.get("module") if isinstance(state, dict) else None
        if isinstance(module_state, dict):  # relora.track_drift turned on, or a tag saved before it kept them
            for name in residuals.keys() - module_state.keys():
                module_state[name] = residuals[name]  # zeros: the drift is counted from this resume on
        if whole_w and isinstance(module_state, dict):
            copy_stored_weights(path, module_state, whole_w, map_location)
            # ZeRO-2 saves each frozen Parameter again as a "frozen param fragment" (the same storage) and its load
            # copies those after the module's state: point them at the module's own tensors too.
            fragments = state.get(FROZEN_PARAM_FRAGMENTS)
            for name in whole_w.keys() & (fragments.keys() if isinstance(fragments, dict) else set()):
                fragments[name] = whole_w[name]
        return state

    engine_of_files.load = load
    try:
        yield
    finally:
        del engine_of_files.load


def copy_stored_weights(path: str, module_state: dict, whole_w: dict, map_location=None) -> None:
    """Copy each wrapped layer's W (a stored W: module buffers; or the frozen Parameter; by state-dict name) from the
    model-states file at `path` into the module, one W per mapping of the file, and put the module's own tensor in
    `module_state` in its place (DeepSpeed's load then copies it onto itself). The pages a mapping has read stay
    resident until the mapping goes: through one mapping a 7b int8 resume held its 6 GiB of W twice."""
    for name, weight in whole_w.items():
        if name not in module_state:
            continue
        one = torch.load(path, map_location=map_location, weights_only=False, mmap=True)
        weight.copy_(one["module"][name])
        del one
        module_state[name] = weight


def load(engine, tag_dir: str, *, module_only: bool = False) -> dict:
    """Load a complete tag into `engine` (collective); restores this rank's RNG. Returns the run state."""
    checkpoint_dir, tag = os.path.split(os.path.normpath(tag_dir))
    with memory_mapped_loads(engine):
        load_path, _ = engine.load_checkpoint(checkpoint_dir, tag=tag, load_module_only=module_only,
                                              load_optimizer_states=not module_only,
                                              load_lr_scheduler_states=False)
    if load_path is None:
        raise CheckpointError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    if not module_only:
        zero.link_loaded_moments(engine)  # the restored moments, reachable before the engine's first step
        rng_path = os.path.join(tag_dir, f"rank_{dist.rank():05d}_rng.pt")
        if os.path.isfile(rng_path):
            rng = torch.load(rng_path, weights_only=True)  # tensors and None only
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
    return read_state(tag_dir)
