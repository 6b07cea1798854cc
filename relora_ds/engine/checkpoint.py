"""Checkpoints: DeepSpeed save/load plus the run's own state, written so a torn write is never resumed.

Layout of `<output_dir>/checkpoints/`:
    step_00000500/              DeepSpeed's files for that tag (model, optimizer shards)
        relora_state.json       the run state (step, restart counter, mode, data position, config)
        rank_00000_rng.pt       per-rank RNG states
        COMPLETE                written last, after every rank finished writing
    latest                      the newest complete tag (written atomically; informational)
A tag without COMPLETE is never resumed from and is removed by the next save. A complete tag is never
removed to be rewritten: saving the same step with the same run state again (a resumed run that had already
finished, a requeued job) keeps the tag on disk as it is.
"""

import json
import os
import shutil

import torch

from relora_ds import dist

COMPLETE = "COMPLETE"
STATE_FILE = "relora_state.json"


class CheckpointError(ValueError):
    """No usable checkpoint where one was asked for."""


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(checkpoint_dir: str) -> list[str]:
    """Complete tags, oldest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    tags = [t for t in os.listdir(checkpoint_dir)
            if t.startswith("step_") and os.path.isfile(os.path.join(checkpoint_dir, t, COMPLETE))]
    return sorted(tags)


def find_checkpoint(path: str) -> str:
    """Resolve `path` (a checkpoints dir, a run dir, or one tag dir) to a complete tag dir, or raise."""
    if os.path.isfile(os.path.join(path, COMPLETE)):
        return path
    for directory in (path, os.path.join(path, "checkpoints")):
        tags = complete_tags(directory)
        if tags:
            return os.path.join(directory, tags[-1])
    raise CheckpointError(f"{path}: no complete relora-ds checkpoint found (expected a step_* directory "
                          f"holding {COMPLETE}, directly or under checkpoints/)")


def read_state(tag_dir: str) -> dict:
    path = os.path.join(tag_dir, STATE_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint state ({e})") from None


def save(engine, checkpoint_dir: str, *, step: int, state: dict, keep_last: int) -> str:
    """Save on every rank (collective); returns the tag dir. `state` must be identical on all ranks."""
    tag = tag_for(step)
    tag_dir = os.path.join(checkpoint_dir, tag)
    if _same_complete_tag(tag_dir, state):
        return tag_dir
    if dist.is_rank_zero() and os.path.isdir(tag_dir):
        shutil.rmtree(tag_dir)  # an earlier torn write of the same step
    dist.barrier()
    engine.save_checkpoint(checkpoint_dir, tag=tag, client_state={"relora_ds": state}, save_latest=False)
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save(rng, os.path.join(tag_dir, f"rank_{dist.rank():05d}_rng.pt"))
    dist.barrier()
    if dist.is_rank_zero():
        _atomic_write_text(os.path.join(tag_dir, STATE_FILE), json.dumps(state, indent=1, sort_keys=True))
        _atomic_write_text(os.path.join(tag_dir, COMPLETE), f"{step}\n")
        _atomic_write_text(os.path.join(checkpoint_dir, "latest"), tag + "\n")
        _prune(checkpoint_dir, keep_last, newest=tag)
    dist.barrier()
    return tag_dir


def _same_complete_tag(tag_dir: str, state: dict) -> bool:
    """Whether `tag_dir` is already complete with this very run state (rank 0 decides; every rank hears it)."""
    same = False
    if dist.is_rank_zero() and os.path.isfile(os.path.join(tag_dir, COMPLETE)):
        try:
            same = read_state(tag_dir) == json.loads(json.dumps(state))
        except CheckpointError:
            same = False
    if dist.world_size() > 1:
        decision = [same]
        torch.distributed.broadcast_object_list(decision, src=0)
        same = decision[0]
    return same


def _prune(checkpoint_dir: str, keep_last: int, newest: str) -> None:
    """Keep the newest `keep_last` complete tags; drop older ones and torn ones older than `newest`."""
    complete = complete_tags(checkpoint_dir)
    doomed = complete[:-keep_last] if keep_last > 0 else []
    doomed += [t for t in os.listdir(checkpoint_dir)
               if t.startswith("step_") and t not in complete and t < newest]
    for tag in doomed:
        shutil.rmtree(os.path.join(checkpoint_dir, tag), ignore_errors=True)


def load(engine, tag_dir: str, *, module_only: bool = False) -> dict:
    """Load a complete tag into `engine` (collective); restores this rank's RNG. Returns the run state."""
    checkpoint_dir, tag = os.path.split(os.path.normpath(tag_dir))
    load_path, _ = engine.load_checkpoint(checkpoint_dir, tag=tag, load_module_only=module_only,
                                          load_optimizer_states=not module_only,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise CheckpointError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    if not module_only:
        rng_path = os.path.join(tag_dir, f"rank_{dist.rank():05d}_rng.pt")
        if os.path.isfile(rng_path):
            rng = torch.load(rng_path, weights_only=False)
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
    return read_state(tag_dir)


def load_fp32_state_dict(tag_dir: str) -> dict:
    """The full fp32 module state dict of a checkpoint, on one process, from any ZeRO stage.

    ZeRO 1/2/3 and bf16 checkpoints are consolidated from their shards by DeepSpeed's zero_to_fp32
    (trainable parameters from the fp32 masters, frozen ones from the saved fragments); a stage-0 fp32
    checkpoint holds the module whole.
    """
    import glob

    checkpoint_dir, tag = os.path.split(os.path.normpath(tag_dir))
    if glob.glob(os.path.join(tag_dir, "*optim_states.pt")) and glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
        return {k: v.float() for k, v in state.items()}
    files = sorted(glob.glob(os.path.join(tag_dir, "*model_states.pt")))
    if not files:
        raise CheckpointError(f"{tag_dir}: no DeepSpeed model states file (*model_states.pt) found")
    saved = torch.load(files[0], map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in saved["module"].items()}
