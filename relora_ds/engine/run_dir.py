"""The run directory and the resume policy: which checkpoint a run starts from, and what an earlier attempt left.

    out/config.yaml, ds_config.json, metrics.jsonl, loss.png, ...   this run's records (RUN_RECORDS)
    out/checkpoints/step_NNNNNNNN/                                  complete checkpoints (engine/checkpoint.py)
    out/checkpoints/damaged/                                        damaged ones, moved aside, never deleted
    out/previous_attempts/NNN/                                      the records of an attempt that died before
                                                                    its first complete checkpoint (resume: auto)
"""

import os

from relora_ds import dist
from relora_ds.engine import checkpoint, universal
from relora_ds.engine.train_module import Start
from relora_ds.errors import RunError

# What a run writes into train.output_dir besides checkpoints/ and the data cache/ (kept: its key is the data).
RUN_RECORDS = ("config.yaml", "ds_config.json", "metrics.jsonl", "loss.png", "wandb_run_id", "tensorboard")
PREVIOUS_ATTEMPTS = "previous_attempts"


def prepare_output_dir(cfg) -> str | None:
    """Check train.output_dir against train.resume; return the checkpoint tag to resume from (or None).

    false: a directory holding another run (config.yaml) is refused. true: the newest complete checkpoint,
    or a CheckpointError. auto: the newest complete checkpoint if there is one; else a fresh start, and the records
    of an attempt that died before its first complete checkpoint (RUN_RECORDS) are moved to
    previous_attempts/NNN/ (rank 0), so the new run's metrics.jsonl, wandb run and TensorBoard start empty.
    Torn checkpoints are never resumed; a later save removes them. Damaged ones (files that no longer match their
    MANIFEST.json) are moved to checkpoints/damaged/ with a warning, never deleted.
    """
    out = cfg.train.output_dir
    resume = cfg.train.resume
    if resume:  # true or "auto"
        try:
            return checkpoint.find_resume_checkpoint(out)  # damaged tags are moved aside, never deleted
        except checkpoint.CheckpointError as e:
            if resume != "auto":
                raise checkpoint.CheckpointError(f"{e}; train.resume=auto (--resume auto) starts fresh instead "
                                                 f"when there is none") from None
        if dist.is_rank_zero():
            moved_to = set_aside_previous_attempt(out)
            if moved_to:
                print(f"train.resume=auto: no complete checkpoint in {out}; starting fresh (the previous "
                      f"attempt's records were moved to {moved_to})", flush=True)
        return None
    if os.path.isfile(os.path.join(out, "config.yaml")):
        raise RunError(f"{out}: holds another run (config.yaml exists); choose a new train.output_dir or set "
                       f"train.resume=true (or auto) to continue it")
    return None


def set_aside_previous_attempt(out: str) -> str | None:
    """Move the RUN_RECORDS found in `out` to a new `out`/previous_attempts/NNN/; return it (None: nothing)."""
    found = [name for name in RUN_RECORDS if os.path.lexists(os.path.join(out, name))]
    if not found:
        return None
    parent = os.path.join(out, PREVIOUS_ATTEMPTS)
    os.makedirs(parent, exist_ok=True)
    index = 1 + max((int(n) for n in os.listdir(parent) if n.isdigit()), default=0)
    target = os.path.join(parent, f"{index:03d}")
    os.makedirs(target)
    for name in found:
        os.replace(os.path.join(out, name), os.path.join(target, name))
    return target


# The fields that shape the module and its saved state: a resume with other values cannot load its checkpoint.
MODEL_FIELDS = ("method", "model.preset", "model.family", "model.hf_config", "model.vocab_size", "data.tokenizer",
                "relora.rank", "relora.target_modules", "relora.base_dtype", "relora.trainable_scaling")


def check_same_model(cfg, saved_config: dict, tag: str) -> None:
    """A one-line RunError naming each MODEL_FIELDS value that differs from the one the checkpoint was written with
    (a field the saved config lacks is not compared)."""
    now, changed = cfg.to_dict(), []
    for field in MODEL_FIELDS:
        before, after = saved_config, now
        for key in field.split("."):
            before = before.get(key, KeyError) if isinstance(before, dict) else KeyError
            after = after.get(key) if isinstance(after, dict) else None
        if before is not KeyError and before != after:
            changed.append(f"{field} {before!r} -> {after!r}")
    if changed:
        raise RunError(f"{tag}: written with other model settings ({'; '.join(changed)}); resume with the "
                       f"checkpoint's values, or start a new run in another train.output_dir")


def find_start(cfg, resume_tag: str | None, zero_stage: int) -> Start:
    """Where the run starts: `resume_tag` (prepare_output_dir; converted first when it was written on another world
    size, refused when this `zero_stage` cannot load it), else the full-rank checkpoint named by
    relora.warm_start_checkpoint (the module only; a wrapped one is refused), else a fresh model."""
    if resume_tag:
        saved = checkpoint.read_state(resume_tag)
        check_same_model(cfg, saved.get("config") or {}, resume_tag)
        return Start(resume_tag, saved, resume=True, universal=universal.prepare(resume_tag, zero_stage))
    if not cfg.relora.warm_start_checkpoint:
        return Start()
    tag = checkpoint.find_checkpoint(cfg.relora.warm_start_checkpoint)
    saved = checkpoint.read_state(tag)
    if saved["wrapped"]:
        raise RunError(f"relora.warm_start_checkpoint {tag}: is already a ReLoRA checkpoint; "
                       f"use train.resume to continue it")
    return Start(tag, saved, resume=False)


def newest_checkpoint(out: str) -> str | None:
    """The newest complete checkpoint tag dir of the run in `out` (sizes checked, not checksums); None: none."""
    directory = os.path.join(out, "checkpoints")
    return checkpoint.find_checkpoint(directory, checksums=False) if checkpoint.complete_tags(directory) else None
